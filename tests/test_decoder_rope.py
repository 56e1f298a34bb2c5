"""Decoder RoPE position ids against the released layout (LLaDA2.0-Uni decoder/decoder_model.py, basic mode).

The reference below follows the release step by step: `_pad_with_ids` gives the cap a coordinate grid of size
(n_cap + pad, 1, 1) from (1, 0, 0) and then appends `pad` rows of (0, 0, 0); `_prepare_sequence` keeps only the
first len(features) = n_cap + pad rows, so the appended zeros never reach attention and cap pad slot k sits at
(k + 1, 0, 0). The patches get a (1, gh, gw) grid from (cap_len + 1, 0, 0) plus (0, 0, 0) pads, kept whole.
"""
from __future__ import annotations

import pytest
import torch

from training.decoder.config import DecoderConfig
from training.decoder.dit import DiT, rope_tables

pytestmark = pytest.mark.unit
MULTI = 32  # released SEQ_MULTI_OF


def _grid(size, start):
    axes = [torch.arange(s0, s0 + n) for s0, n in zip(start, size)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def released_ids(n_cap: int, gh: int, gw: int) -> tuple[torch.Tensor, int]:
    """[patch ids + pads, cap ids + pads] as the release builds them for one item, and the padded patch count."""
    cap_pad = (-n_cap) % MULTI
    cap_len = n_cap + cap_pad
    cap = torch.cat([_grid((cap_len, 1, 1), (1, 0, 0)), torch.zeros(cap_pad, 3, dtype=torch.long)])[:cap_len]
    n_img = gh * gw
    img = torch.cat([_grid((1, gh, gw), (cap_len + 1, 0, 0)), torch.zeros((-n_img) % MULTI, 3, dtype=torch.long)])
    return torch.cat([img, cap]), len(img)


def _dit(cap_rope: str) -> DiT:
    cfg = DecoderConfig(image_size=16, token_grid=2, patch_size=4, dim=32, n_heads=2, axes_dims=[4, 6, 6],
                        n_layers=1, cap_feat_dim=16, t_mid_dim=32, codebook_size=10, cap_rope=cap_rope)
    return DiT(cfg)


# (gh, gw, n_cap): 30x34 = 1020 patches and cap tokens, 4 pads each; 16x16 = 256, no pads; a cap of its own length
CASES = [(30, 34, 1020), (16, 16, 256), (16, 16, 100), (30, 34, 64)]


@pytest.mark.parametrize("gh,gw,n_cap", CASES)
def test_sequence_cap_rope_tables_match_the_released_ids(gh, gw, n_cap):
    """The cos/sin tables forward uses are those of the released ids, cap pad slots included."""
    want, want_img = released_ids(n_cap, gh, gw)
    dit = _dit("sequence")
    (cos, sin), n_img_pad = dit._rope(n_cap, gh, gw, "cpu")
    ref_cos, ref_sin = rope_tables(want, [4, 6, 6], dit.cfg.rope_theta)
    assert n_img_pad == want_img and torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


@pytest.mark.parametrize("gh,gw,n_cap", CASES)
def test_sequence_position_ids_are_the_released_ids(gh, gw, n_cap):
    from training.decoder.dit import position_ids
    want, want_img = released_ids(n_cap, gh, gw)
    pos, n_img_pad = position_ids(n_cap, gh, gw, "sequence")
    assert n_img_pad == want_img and torch.equal(pos, want)
    if n_cap % MULTI:  # the pad slots continue the sequence, right up to the patches' first id
        assert pos[-1, 0] == pos[0, 0] - 1 and (pos[want_img + n_cap:, 1:] == 0).all()


@pytest.mark.parametrize("gh,gw", [(30, 34), (16, 16)])
def test_grid_cap_rope_pads_like_the_released_patch_stream(gh, gw):
    """grid mode lays the cap on the patch grid, so its pads take (0, 0, 0) like the released patch pads; the
    patch ids are the released ones; a cap of another length falls back to the released sequence ids."""
    from training.decoder.dit import position_ids
    n = gh * gw
    pos, n_img_pad = position_ids(n, gh, gw, "grid")
    want, want_img = released_ids(n, gh, gw)
    assert n_img_pad == want_img and torch.equal(pos[:want_img], want[:want_img])
    cap = pos[want_img:]
    assert torch.equal(cap[:n], _grid((1, gh, gw), (1, 0, 0)))
    assert len(cap) == n + (-n) % MULTI and (cap[n:] == 0).all()
    (cos, _), _ = _dit("grid")._rope(n, gh, gw, "cpu")
    assert torch.equal(cos, rope_tables(pos, [4, 6, 6], 256.0)[0])
    assert torch.equal(position_ids(n - 7, gh, gw, "grid")[0], released_ids(n - 7, gh, gw)[0])
