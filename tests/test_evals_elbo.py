"""The ELBO estimator against brute force, its standard error, and the elbo task on reference models."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from evals.likelihood import LikelihoodItem, draw_masks, item_generator, nelbo_draws, nelbo_sums, summarize

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny_model():
    from tests.evals_fixtures import tiny_cfg
    from training.model import build_model

    cfg = tiny_cfg()
    model = build_model(cfg.model, "cpu", seed=3).eval()
    return model


def _item(key=0):
    ids = torch.tensor([5, 17, 300, 42, 2100, 9])  # 2 prompt tokens, 4 maskable (one an image id)
    maskable = torch.tensor([False, False, True, True, True, True])
    return LikelihoodItem(ids, maskable, ids >= 2048, key)


@torch.no_grad()
def exact_nelbo(model, item, mask_id):
    """Enumerate every mask of the maskable positions: sum_M h(M) / (|M| C(n, |M|)) (the t-integral in closed form)."""
    pos = item.maskable.nonzero().flatten().tolist()
    n = len(pos)
    total = 0.0
    for k in range(1, n + 1):
        for subset in itertools.combinations(pos, k):
            x = item.ids.clone()
            x[list(subset)] = mask_id
            logp = torch.log_softmax(model(input_ids=x[None]).logits[0].double(), -1)
            h = -sum(float(logp[i, item.ids[i]]) for i in subset)
            total += h / (k * math.comb(n, k))
    return total


def _estimate(model, item, mc, estimator, sampling, seed=0):
    d = nelbo_draws(model, [item], mc=mc, estimator=estimator, sampling=sampling, eps=1e-3, block_size=0,
                    mask_id=2047, batch_size=512, seed=seed)
    return d


@pytest.mark.parametrize("estimator", ["l", "t"])
def test_mc_mean_matches_brute_force_and_se_shrinks(tiny_model, estimator):
    item = _item()
    exact = exact_nelbo(tiny_model, item, 2047)
    small = summarize(nelbo_sums(_estimate(tiny_model, item, 64, estimator, "iid"), [item]))
    big = summarize(nelbo_sums(_estimate(tiny_model, item, 1024, estimator, "iid", seed=1), [item]))
    n = 4
    assert abs(big["nelbo_per_token"] * n - exact) < 4 * big["se_mc"] * n + 1e-9
    if estimator == "l":
        # The 1/t weight of the t estimator is heavy-tailed (one masked token at small t), so its sample variance is
        # itself erratic; the l estimator's weight n/l is bounded and its standard error shrinks as 1/sqrt(mc).
        ratio = small["se_mc"] / big["se_mc"]
        assert 2.5 < ratio < 6.5, ratio  # ~ sqrt(1024 / 64) = 4


def test_stratified_and_antithetic_units_vary_less_than_iid():
    """The unit draws behind t (or l): each marginally uniform, and for a smooth integrand such as the per-t loss
    of a trained model, stratified and antithetic means vary far less than iid ones."""
    from evals.likelihood import units

    def spread(sampling):
        est = [float((units(8, sampling, torch.Generator().manual_seed(s)) ** 2).mean()) for s in range(400)]
        return torch.tensor(est).var().item(), torch.tensor(est).mean().item()

    iid, iid_mean = spread("iid")
    for sampling in ("stratified", "antithetic"):
        var, mean = spread(sampling)
        assert var < 0.25 * iid
        assert abs(mean - 1 / 3) < 0.01 and abs(iid_mean - 1 / 3) < 0.01  # all unbiased for int u^2 = 1/3
    u = units(8, "stratified", torch.Generator().manual_seed(0))
    assert sorted((u * 8).floor().long().tolist()) == list(range(8))  # one draw per stratum


def test_l_estimator_masks_exactly_l_and_draws_depend_only_on_key():
    maskable = torch.tensor([False, True, True, True, True, True, False, True])
    masks, w = draw_masks(maskable, 12, "l", "stratified", 1e-3, item_generator(0, 7))
    n = int(maskable.sum())
    assert not (masks & ~maskable).any()
    assert torch.allclose(w, n / masks.sum(1).double())
    assert sorted(masks.sum(1).tolist()) == sorted(masks.sum(1).tolist()) and masks.sum(1).min() >= 1
    again, _ = draw_masks(maskable, 12, "l", "stratified", 1e-3, item_generator(0, 7))
    assert torch.equal(masks, again)


def test_uniform_model_bound_is_log_vocab():
    from evals.reference_models import UniformModel

    items = [_item(k) for k in range(3)]
    model = UniformModel(2304)
    d = nelbo_draws(model, items, mc=16, estimator="l", sampling="stratified", eps=1e-3, block_size=32,
                    mask_id=2047, batch_size=64, seed=0)
    s = summarize(nelbo_sums(d, items))
    assert s["nelbo_per_token"] == pytest.approx(math.log(2304), rel=1e-6)  # exact for every l-draw
    assert s["se_mc"] == pytest.approx(0.0, abs=1e-6)
    assert s["text_nelbo_per_token"] > 0 and s["image_nelbo_per_token"] > 0


def test_elbo_task_oracle_zero_uniform_baseline(tmp_path_factory):
    from evals.reference_models import UniformModel
    from evals.tasks.elbo import ElboTask
    from tests import evals_fixtures as fx

    tmp = str(tmp_path_factory.mktemp("evtok"))
    ho = fx.heldout(tmp, 4)
    oracle = fx.context(tmp, fx.oracle_model(tmp, ho), ho, elbo_mc=4)
    r = ElboTask().run(oracle)
    assert r.status == "ok"
    assert r.scores["nelbo_per_token"] < 1e-6 and r.baselines["nelbo_per_token"] == pytest.approx(math.log(2304))
    uni = ElboTask().run(fx.context(tmp, UniformModel(2304), ho, elbo_mc=4, elbo_estimator="l"))
    assert uni.scores["nelbo_per_token"] == pytest.approx(math.log(2304), rel=1e-6)
    assert uni.scores["text_tokens"] > 0 and uni.scores["image_tokens"] > 0
