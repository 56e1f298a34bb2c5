"""Data-parallel likelihood tasks: 2 gloo processes, each scoring its share of the held-out items, give exactly the
single-process numbers (draws are seeded per item; sums are all-reduced)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.dist_helpers import run_distributed

pytestmark = pytest.mark.dist


def _items():
    from evals.likelihood import LikelihoodItem

    g = torch.Generator().manual_seed(0)
    items = []
    for k in range(5):  # odd count: the ranks get unequal shares
        n = 6 + k
        ids = torch.randint(0, 2304, (n,), generator=g)
        maskable = torch.ones(n, dtype=torch.bool)
        maskable[:2] = False
        items.append(LikelihoodItem(ids, maskable, ids >= 2048, k))
    return items


def _choice_items():
    from evals.heldout import ChoiceItem

    return [ChoiceItem([5, 6, 7 + i], [[100 + k, 2] for k in range(3)], i % 3, f"t{i % 2}", i) for i in range(5)]


def _run(rank: int, world: int, out: str):
    import torch.distributed as dist

    from evals.context import EvalContext
    from evals.heldout import HeldOut
    from evals.tasks.choice import ChoiceTask
    from evals.tasks.elbo import ElboTask
    from tests.evals_fixtures import tiny_cfg
    from training.model import build_model

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = tiny_cfg(elbo_mc=4, choice_mc=3, batch_size=4)
    model = build_model(cfg.model, "cpu", seed=1).eval()
    specials = type("S", (), {"mask": 2047, "eos": 2})()
    ctx = EvalContext(cfg=cfg, model=model, specials=specials, data=HeldOut(elbo=_items(), choice=_choice_items()),
                      rank=rank, world=world)
    e, c = ElboTask().run(ctx), ChoiceTask().run(ctx)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"elbo": e.scores, "choice": c.scores, "per_type": c.tables["per_type"]}, f)
    if world > 1:
        dist.destroy_process_group()


def test_dp_elbo_and_choice_equal_single_process(tmp_path):
    single, double = tmp_path / "one.json", tmp_path / "two.json"
    _run(0, 1, str(single))
    run_distributed(_run, 2, str(double), start_method="spawn")
    a, b = json.loads(single.read_text()), json.loads(double.read_text())
    for k, v in a["elbo"].items():
        assert b["elbo"][k] == pytest.approx(v, rel=1e-5, abs=1e-9), k
    assert a["elbo"]["items"] == 5 and a["elbo"]["se_mc"] > 0
    assert b["choice"] == pytest.approx(a["choice"]) and b["per_type"] == a["per_type"]
