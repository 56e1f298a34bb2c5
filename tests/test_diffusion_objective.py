"""The diffusion objective: exact ELBO by enumeration, complementary masks, modality weights, CFG dropout,
training/inference consistency of the block-diffusion forward, schedules and config checks."""
from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.config import ConfigError, load_config
from training.diffusion import diffusion_loss
from training.diffusion.config import DiffusionConfig
from training.diffusion.masks import block_causal_mask, dense_training_mask
from training.diffusion.noise import elbo_weight, mask_prob, sample_t, time_from_mask_prob
from training.diffusion.objective import _noise
from training.diffusion.schedule import block_size_at
from training.model import build_model

pytestmark = pytest.mark.unit
MASK, UNCOND = 1, 2
SPECIALS = {"mask": MASK, "uncondition": UNCOND}


def _batch(ids, doc=None, image_from=None):
    ids = torch.as_tensor(ids)
    bsz, n = ids.shape
    is_image = torch.zeros_like(ids, dtype=torch.bool)
    if image_from is not None:
        is_image[:, image_from:] = True
    return {"input_ids": ids, "doc_ids": torch.zeros_like(ids) if doc is None else torch.as_tensor(doc),
            "maskable": torch.ones_like(ids, dtype=torch.bool), "is_image": is_image,
            "position_ids": torch.arange(n).expand(bsz, n).clone()}


@pytest.fixture(scope="module")
def small_vocab_model():
    cfg = load_config("configs/model/tiny.yaml", ["model.vocab_size=8", "model.image_token_offset=6"])
    model = build_model(cfg.model, seed=3)
    with torch.no_grad():  # sharper than the 0.02 init so the ELBO terms differ per mask
        model.lm_head.weight.mul_(60.0)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_model():
    cfg = load_config("configs/model/tiny.yaml", ["model.attention=sdpa"])
    return build_model(cfg.model, seed=0).eval()


def test_monte_carlo_elbo_converges_to_exact_enumeration(small_vocab_model):
    """Linear schedule, t ~ U[0, 1] clipped at eps: the exact NELBO is a sum over the 2^L - 1 masks of
    C(m) * (integral over t of w(t) P(m | t)), with C(m) the masked cross-entropy, computed independently here."""
    model, x0, n, eps = small_vocab_model, torch.tensor([3, 5, 0, 7]), 4, 1e-3
    exact = 0.0
    grid = np.linspace(eps, 1.0, 400001)
    with torch.no_grad():
        for k in range(1, n + 1):
            for pos in itertools.combinations(range(n), k):
                xt = x0.clone()
                xt[list(pos)] = MASK
                logp = F.log_softmax(model(xt[None]).logits[0], -1)
                cost = -sum(logp[i, x0[i]].item() for i in pos)
                dens = grid ** (k - 1) * (1 - grid) ** (n - k)  # (1/t) t^k (1-t)^(n-k)
                weight = np.trapezoid(dens, grid) + eps ** (k - 1) * (1 - eps) ** (n - k) * eps  # + the clip atom
                exact += cost * weight
    exact /= n  # normalize="sequence": NELBO per maskable token
    cfg = DiffusionConfig(block_schedule=[[0, 0]], mask_low=0.0, mask_high=1.0, mask_eps=eps, normalize="sequence")
    gen = torch.Generator().manual_seed(0)
    est = []
    with torch.no_grad():
        for _ in range(12):
            loss, m = diffusion_loss(model, _batch(x0.expand(4096, n)), cfg, 0, SPECIALS, gen)
            est.append(m["loss_diffusion"].item())
    mean, se = float(np.mean(est)), float(np.std(est, ddof=1) / math.sqrt(len(est)))
    print(f"MC {mean:.4f} +- {se:.4f} vs exact {exact:.4f}")
    assert abs(mean - exact) < 4 * se + 1e-3 * exact, (mean, exact, se)
    # The unweighted CE is a different quantity: the check above would catch a missing ELBO weight.
    plain, _ = diffusion_loss(model, _batch(x0.expand(4096, n)), dataclasses.replace(cfg, elbo_weight=False), 0,
                              SPECIALS, gen)
    assert abs(plain.item() - exact) > 10 * se


def test_complementary_masks_cover_every_maskable_position_once():
    gen = torch.Generator().manual_seed(0)
    batch = _batch(torch.randint(3, 50, (4, 32), generator=gen))
    batch["maskable"][:, :5] = False  # a prompt: never masked, in either half
    cfg = DiffusionConfig(complementary=True, mask_low=0.2, mask_high=0.9)
    x_t, masked, t, doubled = _noise(batch, cfg, 8, MASK, gen)
    first, second = masked.chunk(2)
    assert torch.equal(first.int() + second.int(), batch["maskable"].int())
    assert torch.equal(doubled["input_ids"], torch.cat([batch["input_ids"]] * 2))
    assert torch.equal(x_t == MASK, masked)
    # The inverse half is a draw at mask probability 1 - p: its time maps back to that probability.
    for schedule in ("linear", "cosine"):
        p = torch.rand(100, generator=gen)
        torch.testing.assert_close(mask_prob(schedule, time_from_mask_prob(schedule, 1 - p)), 1 - p)


def test_schedules_weights_and_t_sampling():
    t = torch.linspace(0.05, 1.0, 50)
    torch.testing.assert_close(elbo_weight("linear", t), 1 / t)
    # -alpha'/(1-alpha) by finite differences for cosine
    h, td = 1e-5, t.double()
    alpha = lambda s: 1 - mask_prob("cosine", s)  # noqa: E731
    fd = -(alpha(td + h) - alpha(td - h)) / (2 * h) / (1 - alpha(td))
    torch.testing.assert_close(elbo_weight("cosine", td), fd, rtol=1e-6, atol=1e-6)
    s = sample_t((1000,), 0.3, 0.8, 1e-3, True, "cpu", torch.Generator().manual_seed(0))
    assert s.min() >= 0.3 and s.max() <= 0.8
    # stratified: exactly one draw per stratum of width 0.5/1000
    assert torch.equal(((s - 0.3) / 0.5 * 1000).floor().long().sort().values.clamp(max=999), torch.arange(1000))


def test_modality_weights_are_linear_and_losses_split(tiny_model):
    gen_ids = torch.randint(3, 2000, (2, 32), generator=torch.Generator().manual_seed(1))
    gen_ids[:, 16:] += 2048 - 3 - 2000 + 100  # image ids
    batch = _batch(gen_ids.clamp(max=2303), image_from=16)
    base = DiffusionConfig(block_schedule=[[0, 8]], mask_low=0.3, mask_high=0.9)

    def run(wt, wi):
        cfg = dataclasses.replace(base, loss_weight_text=wt, loss_weight_image=wi)
        with torch.no_grad():
            return diffusion_loss(tiny_model, batch, cfg, 0, SPECIALS, torch.Generator().manual_seed(7))

    (l_t, m_t), (l_i, _), (l_both, m_both) = run(1, 0), run(0, 1), run(2, 3)
    torch.testing.assert_close(l_both, 2 * l_t + 3 * l_i)
    torch.testing.assert_close(m_t["loss_text"], m_both["loss_text"])
    assert m_both["loss_text"] > 0 and m_both["loss_image"] > 0 and m_both["block_size"] == 8


def test_cap_term_and_mask_embedding_noise(tiny_model):
    batch = _batch(torch.randint(3, 2000, (2, 32), generator=torch.Generator().manual_seed(2)))
    cfg = DiffusionConfig(block_schedule=[[0, 8]], cap_lambda=2.0)
    with torch.no_grad():
        loss, m = diffusion_loss(tiny_model, batch, cfg, 0, SPECIALS, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, m["loss_diffusion"] + m["aux_loss"] + 2.0 * m["cap_entropy"])
    noisy = dataclasses.replace(cfg, cap_lambda=0.0, mask_embed_noise_std=1.0, mask_embed_noise_steps=10)
    quiet = dataclasses.replace(noisy, mask_embed_noise_std=0.0)
    with torch.no_grad():
        ref = diffusion_loss(tiny_model, batch, quiet, 5, SPECIALS, torch.Generator().manual_seed(0))[0]
        during = diffusion_loss(tiny_model, batch, noisy, 5, SPECIALS, torch.Generator().manual_seed(0))[0]
        after = diffusion_loss(tiny_model, batch, noisy, 10, SPECIALS, torch.Generator().manual_seed(0))[0]
    assert not torch.allclose(during, ref) and torch.allclose(after, ref)


def test_loss_backward_with_packed_documents(tiny_model):
    batch = _batch(torch.randint(3, 2000, (2, 32)), doc=torch.tensor([[0] * 10 + [1] * 14 + [2] * 8] * 2))
    batch["maskable"][:, 24:] = False  # padding document
    for bs in ([[0, 1]], [[0, 4]], [[0, 0]]):
        model = build_model(tiny_model.config, seed=0)
        loss, m = diffusion_loss(model, batch, DiffusionConfig(block_schedule=bs, complementary=True), 0, SPECIALS)
        loss.backward()
        assert torch.isfinite(loss) and model.lm_head.weight.grad.abs().sum() > 0
        assert m["block_size"] == (32 if bs == [[0, 0]] else bs[0][1])


def test_block_diffusion_forward_matches_inference_over_clean_prefix(tiny_model):
    """Block k of x_t under the training mask sees exactly what the sampler shows it: clean blocks < k + itself."""
    gen = torch.Generator().manual_seed(4)
    n, bs, k = 16, 4, 2
    x0 = torch.randint(3, 2000, (1, n), generator=gen)
    xt = x0.clone()
    xt[0, torch.rand(n, generator=gen) < 0.5] = MASK
    pos = torch.arange(n)[None]
    with torch.no_grad():
        train = tiny_model(torch.cat([xt, x0], 1), torch.cat([pos, pos], 1),
                           dense_training_mask(torch.zeros(1, n, dtype=torch.long), bs)).logits[0, k * bs:(k + 1) * bs]
        ctx = torch.cat([x0[:, :k * bs], xt[:, k * bs:(k + 1) * bs]], 1)
        mask = block_causal_mask(torch.arange((k + 1) * bs), torch.ones(1, (k + 1) * bs, dtype=torch.bool), bs)
        infer = tiny_model(ctx, attention_mask=mask).logits[0, k * bs:]
    torch.testing.assert_close(train, infer, atol=1e-5, rtol=1e-4)


def test_block_schedule_and_config_validation():
    wsd = [[0, 1], [10, 4], [20, 32], [30, 64], [40, 0], [90, 32]]
    assert [block_size_at(wsd, s, 256) for s in (0, 9, 10, 25, 35, 50, 95)] == [1, 1, 4, 32, 64, 256, 32]
    cfg = load_config("configs/model/tiny.yaml", ["diffusion.block_schedule=[[0,1],[10,4],[20,0]]"])
    assert cfg.diffusion.block_schedule[-1] == [20, 0]
    for override, key in (("diffusion.block_schedule=[[0,48]]", "block_schedule"),
                          ("diffusion.block_schedule=[[5,4]]", "block_schedule"),
                          ("diffusion.mask_low=0.9", "mask_low"),
                          ("diffusion.normalize=batch", "normalize"),
                          ("diffusion.schedule=square", "schedule"),
                          ("diffusion.cfg_drop_text=0.1", "cfg_drop_text")):  # gone: dropout is data.t2i_uncond_prob
        extra = ["diffusion.mask_high=0.8"] if key == "mask_low" else []
        with pytest.raises(ConfigError, match=f"diffusion.{key}"):
            load_config("configs/model/tiny.yaml", [override, *extra])


def test_objective_flex_path_equals_sdpa_path():
    """The loss through FlexAttention BlockMasks equals the dense SDPA path (forward: torch 2.13 has no flex
    backward on CPU, and training there refuses flex with a clear error)."""
    cfg = load_config("configs/model/tiny.yaml")
    ids = torch.randint(3, 2000, (2, 64), generator=torch.Generator().manual_seed(9))
    batch = _batch(ids, doc=torch.tensor([[0] * 30 + [1] * 34, [0] * 64]))
    dcfg = DiffusionConfig(block_schedule=[[0, 8]])
    losses = []
    for attention in ("sdpa", "flex"):
        model = build_model(dataclasses.replace(cfg.model, attention=attention), seed=0)
        with torch.no_grad():
            losses.append(diffusion_loss(model, batch, dcfg, 0, SPECIALS, torch.Generator().manual_seed(0))[0])
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="model.attention"):
        diffusion_loss(model, batch, dcfg, 0, SPECIALS)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(mode):
    """Recomputation (model.activation_checkpointing) changes what is kept, never the numbers: the block-diffusion
    loss and every gradient equal the run that keeps all activations."""
    def grads(ac: str):
        cfg = load_config("configs/model/tiny.yaml", [f"model.activation_checkpointing={ac}"])
        model = build_model(cfg.model, seed=5).train()
        ids = torch.randint(3, cfg.model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
        dcfg = dataclasses.replace(cfg.diffusion, block_schedule=[[0, 16]])
        loss, _ = diffusion_loss(model, _batch(ids, image_from=30), dcfg, 0, SPECIALS,
                                 torch.Generator().manual_seed(2))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (l0, g0), (l1, g1) = grads("none"), grads(mode)
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-6, atol=1e-8, msg=n)


def test_chunked_masked_head_equals_the_full_logits_path():
    """masked_head_ce (LM head on the masked rows only, in recomputed chunks) gives the cross-entropy, accuracy and
    CAP entropy of full [B, L, V] logits, and the same gradients; diffusion_loss does not depend on the chunk."""
    from training.diffusion.objective import masked_head_ce

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 11, 16, generator=g, requires_grad=True)
    target = torch.randint(0, 50, (3, 11), generator=g)
    masked = torch.rand(3, 11, generator=g) < 0.6
    logits = head(hidden).float()  # the reference: full logits, then select
    ref_ce = F.cross_entropy(logits[masked], target[masked], reduction="none")
    logp = F.log_softmax(logits[masked], -1)
    ref_ent = -(logp.exp() * logp).sum(-1)
    (ref_ce.sum() + ref_ent.sum()).backward()
    ref_grads = head.weight.grad.clone(), hidden.grad.clone()
    head.weight.grad, hidden.grad = None, None
    ce, correct, ent = masked_head_ce(head, hidden[masked], target[masked], chunk=4, with_entropy=True)
    (ce.sum() + ent.sum()).backward()
    torch.testing.assert_close(ce, ref_ce)
    torch.testing.assert_close(ent, ref_ent)
    assert torch.equal(correct, logits[masked].argmax(-1) == target[masked])
    torch.testing.assert_close(head.weight.grad, ref_grads[0])
    torch.testing.assert_close(hidden.grad, ref_grads[1])

    cfg = load_config("configs/model/tiny.yaml").diffusion
    model = build_model(load_config("configs/model/tiny.yaml").model, seed=4).train()
    ids = torch.randint(3, 2000, (2, 40), generator=g)
    out = []
    for chunk in (5, 100000):
        loss, m = diffusion_loss(model, _batch(ids), dataclasses.replace(cfg, loss_chunk=chunk, cap_lambda=0.5), 0,
                                 SPECIALS, torch.Generator().manual_seed(3))
        model.zero_grad()
        loss.backward()
        out.append((loss.detach(), m["acc_masked"], model.lm_head.weight.grad.clone()))
    torch.testing.assert_close(out[0][0], out[1][0])
    assert out[0][1] == out[1][1]
    torch.testing.assert_close(out[0][2], out[1][2])


# ---- "token" normalisation over the global batch ----------------------------------------------------------------
_SEQ = 16


def _rows():
    """Two sequences with very different maskable counts (14 vs 2): per-rank ratios average them very differently
    from the one ratio over the whole batch."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 60, (2, _SEQ), generator=g)
    maskable = torch.zeros(2, _SEQ, dtype=torch.bool)
    maskable[0, :14], maskable[1, -2:] = True, True
    return {"input_ids": ids, "doc_ids": torch.zeros(2, _SEQ, dtype=torch.long),
            "position_ids": torch.arange(_SEQ).repeat(2, 1), "is_image": torch.zeros(2, _SEQ, dtype=torch.bool),
            "maskable": maskable}


def _token_norm_step(rank, world, micro):
    """One trainer step (training.trainer.train_step) of the native engine over rows[rank * per : ...]."""
    from tests.engine_cases import make_cfg
    from training.engines import build_engine
    from training.trainer import train_step
    # t = 1: every maskable token is masked, so the masks (and counts) are the same in every layout
    cfg = make_cfg("native", extra=["train.global_batch_size=2", f"train.micro_batch_size={micro}",
                                    "model.aux_loss_coeff=0", "model.z_loss_coeff=0", "diffusion.normalize=token",
                                    "diffusion.mask_low=1.0", "diffusion.mask_high=1.0",
                                    "diffusion.block_schedule=[[0,4]]"])
    engine = build_engine(cfg)
    rows, per = _rows(), 2 // world
    mine = {k: v[rank * per:(rank + 1) * per] for k, v in rows.items()}
    batches = iter([{k: v[m:m + micro] for k, v in mine.items()} for m in range(0, per, micro)])
    sums, result, _ = train_step(engine, batches, engine.global_batch_accum(), cfg, 0, {"mask": 1})
    state = engine.full_state_dict()
    return {"loss": float(sums["loss"]), "grad_norm": float(result["grad_norm"]),
            "state": None if state is None else {k: v.clone() for k, v in state.items()}}


@pytest.mark.dist
def test_token_normalisation_is_over_the_global_batch():
    """Two ranks with 14 and 2 masked tokens, and one process with 2 micro-batches, equal one process over the
    whole batch (one CE sum / one masked count), in loss, grad norm and weights after the step."""
    from tests.dist_helpers import run_distributed
    whole = _token_norm_step(0, 1, micro=2)
    for name, got in (("2 micro-batches", _token_norm_step(0, 1, micro=1)),
                      ("2 ranks", run_distributed(_token_norm_step, 2, 1)[0])):
        assert got["loss"] == pytest.approx(whole["loss"], rel=1e-5), name
        assert got["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-4), name
        for k, v in whole["state"].items():
            torch.testing.assert_close(got["state"][k], v, rtol=1e-4, atol=1e-6, msg=f"{name}: {k}")



def test_pad_multiple_is_the_lcm_of_the_schedules_block_sizes():
    from training.diffusion.schedule import pad_multiple
    assert pad_multiple([[0, 1], [10, 4], [20, 32], [30, 0], [40, 64]], 4096) == 64
    assert pad_multiple([[0, 16], [4, 0]], 64) == 16
    assert pad_multiple([[0, 0]], 128) is None and pad_multiple([[0, 64]], 64) is None  # MDLM only
