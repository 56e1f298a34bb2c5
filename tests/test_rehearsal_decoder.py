"""The decoder stages on a fake CUDA device of an 8-rank world (training/rehearsal/decoder_pass.py): no op mixes
devices, and a batch left on the host — what the stages did before they ran on the engines — is caught and named."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT
from tests.test_decoder_dist import TINY

DISTILL = ["distill.steps=2", "distill.batch_size=2", "decoder.steps=4"]


def _rehearse(prelude: str = "") -> dict:
    code = (f"import sys; {prelude}\nfrom training.rehearsal.decoder_pass import main\n"
            f"main(['8', '', *{TINY + DISTILL!r}])")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("REHEARSAL ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    return json.loads(lines[-1][len("REHEARSAL "):])


def test_decoder_stages_on_fake_cuda_keep_every_op_on_the_device():
    rep = _rehearse()
    assert rep["device_violations"] == 0, rep["violations"][:3]
    assert rep["collectives"], rep  # the replicas' start is broadcast over the 8 ranks: the fake world is real


def test_a_batch_left_on_the_host_is_caught_at_the_line_that_uses_it():
    rep = _rehearse("import training.decoder.train as t; t._on = lambda device, pairs: pairs")
    assert rep["device_violations"] > 0
    first = rep["violations"][0]
    assert "cuda:0 and cpu" in first["detail"] and first["where"].startswith("training/decoder/"), first
