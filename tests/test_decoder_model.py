"""Decoder DiT, SigVQ conditioning, CFG, checkpoint round trip, config errors."""
from __future__ import annotations

import pytest
import torch

from training.decoder import checkpoint
from training.decoder.config import DecoderConfig
from training.decoder.dit import apply_rope, rope_tables
from training.decoder.samplers import guided_velocity
from training.decoder.sigvq import TokenDecoder, upsample_ids
from training.decoder.decode import decode_tokens, decoder_meta, load_decoder

pytestmark = pytest.mark.unit

TINY = dict(image_size=16, token_grid=2, patch_size=4, dim=32, n_heads=2, axes_dims=[4, 6, 6], n_layers=1,
            cap_feat_dim=16, t_mid_dim=32, codebook_size=10)


def _model(seed=0, **kw) -> TokenDecoder:
    torch.manual_seed(seed)
    m = TokenDecoder(DecoderConfig(**{**TINY, **kw}))
    with torch.no_grad():  # leave the zero-init start so outputs depend on everything
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def test_upsample_ids_is_nearest():
    ids = torch.tensor([[[1, 2], [3, 4]]])
    up = upsample_ids(ids, 4, 4).view(4, 4)
    assert up.tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    with pytest.raises(ValueError, match="token_grid"):
        upsample_ids(ids, 3, 3)


def test_rope_scores_depend_only_on_relative_position():
    pos = torch.tensor([[3, 1, 2], [5, 4, 4], [13, 11, 12], [15, 14, 14]])  # pairs 2,3 = pairs 0,1 shifted by 10
    cos, sin = rope_tables(pos, [4, 6, 6], 256.0)
    q = torch.randn(1, 1, 1, 16).expand(1, 4, 1, 16)
    k = torch.randn(1, 1, 1, 16).expand(1, 4, 1, 16)
    qr, kr = apply_rope(q, (cos, sin)), apply_rope(k, (cos, sin))
    s01 = (qr[0, 0, 0] * kr[0, 1, 0]).sum()
    s23 = (qr[0, 2, 0] * kr[0, 3, 0]).sum()
    assert torch.allclose(s01, s23, atol=1e-5)
    assert not torch.allclose(s01, (qr[0, 0, 0] * kr[0, 3, 0]).sum(), atol=1e-3)


def test_forward_shapes_condition_and_padding():
    m = _model()
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    ids = torch.tensor([[[1, 2], [3, 4]], [[1, 2], [3, 5]]])
    v = m(x, t, ids)
    assert v.shape == x.shape
    # the condition reaches every output: change one id and the velocity changes
    ids2 = ids.clone()
    ids2[0, 0, 0] = 9
    assert not torch.allclose(m(x, t, ids2)[0], v[0])
    # batch items are independent (no leakage through padding or attention)
    assert torch.allclose(m(x[:1], t[:1], ids[:1]), v[:1], atol=1e-5)
    # keep=False is the all-zero (null) condition, independent of the ids
    keep = torch.zeros(2, dtype=torch.bool)
    assert torch.allclose(m(x, t, ids, keep), m(x, t, ids2, keep), atol=1e-6)


def test_cfg_scale_one_equals_the_conditional_path():
    m = _model()
    x, t, ids = torch.randn(3, 3, 16, 16), torch.rand(3), torch.randint(0, 10, (3, 2, 2))
    cond = m(x, t, ids, torch.ones(3, dtype=torch.bool))
    assert torch.allclose(guided_velocity(m, x, t, ids, 1.0, fast_path=False), cond, atol=1e-5)
    # w = 3 with norm clipping: u + 3 (c - u), rescaled to ||c|| where it is larger
    u = m(x, t, ids, torch.zeros(3, dtype=torch.bool))
    raw = u + 3.0 * (cond - u)
    ref = raw * torch.clamp(cond.flatten(1).norm(dim=1) / raw.flatten(1).norm(dim=1), max=1.0).view(-1, 1, 1, 1)
    assert torch.allclose(guided_velocity(m, x, t, ids, 3.0), ref, atol=1e-5)
    assert torch.allclose(guided_velocity(m, x, t, ids, 3.0, norm_clip=False), raw, atol=1e-5)


def test_checkpoint_round_trip_and_latest(tmp_path):
    m = _model(1)
    d = tmp_path / "ckpt"
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(1, 3, 16, 16), torch.rand(1), torch.zeros(1, 2, 2, dtype=torch.long)).sum().backward()
    opt.step()
    checkpoint.save(d, 5, {"model": m.state_dict(), "ema": m.state_dict(), "optimizer": opt.state_dict(),
                           "meta": decoder_meta(m.cfg, "turbo", 4)}, keep_last=2)
    for s in (6, 7):
        checkpoint.save(d, s, {"model": m.state_dict(), "meta": decoder_meta(m.cfg, "turbo", 4)}, keep_last=2)
    assert not (d / "step_000005").exists() and (d / "latest").read_text().strip() == "step_000007"
    assert (d / "step_000007" / "manifest.json").exists()  # the one CheckpointManager: hashed, atomic
    (d / ".tmp_step_000008").mkdir()  # a crash mid-save leaves a temp dir: ignored
    step, state = checkpoint.load_latest(d)
    assert step == 7
    for k, v in m.state_dict().items():
        assert torch.equal(state["model"][k], v)
    (d / "latest").write_text("step_000099")  # a dangling pointer falls back to the newest complete step
    assert checkpoint.load_latest(d)[0] == 7
    # a checkpoint dir decodes to the same images as the in-memory model (same sampler and noise)
    checkpoint.save(d, 8, {"model": m.state_dict(), "ema": m.state_dict(), "meta": decoder_meta(m.cfg, "turbo", 4)})
    loaded, meta = load_decoder(d)
    ids = torch.randint(0, 10, (2, 2, 2))
    a = decode_tokens(d, ids, seed=3)
    b = decode_tokens(m, ids, steps=4, sampler="turbo", seed=3)
    assert meta["sampler"] == "turbo" and a.shape == (2, 3, 16, 16)
    assert torch.allclose(a, b, atol=1e-5)


def test_config_errors_name_key_and_allowed():
    from training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"decoder.axes_dims=.*sum"):
        load_config(None, ["decoder.axes_dims=[8,8,8]"])
    with pytest.raises(ConfigError, match=r"decoder.token_grid=3"):
        load_config(None, ["decoder.token_grid=3"])
    with pytest.raises(ConfigError, match=r"distill.method=dmd"):
        load_config(None, ["distill.method=dmd"])
