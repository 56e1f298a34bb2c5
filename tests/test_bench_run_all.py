"""`make bench` runs a script that exists, and its quick mode passes each bench only flags that bench defines."""
from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.unit


def _make_target_script(target: str) -> str:
    """The .py path the Makefile's recipe for `target` runs with the venv's python."""
    text = (ROOT / "Makefile").read_text()
    recipe = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", text, re.M)
    assert recipe, f"no `{target}` target in the Makefile"
    return re.search(r"python\s+(\S+\.py)", recipe.group(1)).group(1)


def _flags_of(script) -> set[str]:
    tree = ast.parse(script.read_text())
    return {a.value for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "add_argument"
            for a in n.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}


def test_make_bench_runs_an_existing_script_whose_listing_runs():
    script = ROOT / _make_target_script("bench")
    assert script.is_file(), f"`make bench` runs {script}, which does not exist"
    r = subprocess.run([sys.executable, str(script), "--list"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) >= 5 and all("bench/bench_" in line for line in lines), r.stdout
    assert subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True,
                          timeout=60).returncode == 0


def test_quick_mode_passes_only_flags_each_bench_defines():
    spec = importlib.util.spec_from_file_location("bench_run_all", ROOT / "bench/run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    for name, argv in run_all.commands(list(run_all.BENCHES), full=False):
        script = ROOT / argv[1]
        assert script.is_file(), (name, script)
        unknown = {w for w in argv[2:] if w.startswith("--")} - _flags_of(script)
        assert not unknown, f"bench {name}: {script.name} has no flag {sorted(unknown)}"
