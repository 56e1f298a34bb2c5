"""SigVQ condition embedding and the conditioned decoder (ids -> features -> DiT velocity).

SigVQ maps VQ ids to features: `prior_token_embedding` (an Embedding table, separate from the VQ codebook) then
`prior_projector` (Linear -> SiLU -> Linear). Parameter names are the released `image_tokenizer/sigvq_embedding.pt`
keys (`prior_projector.net.0.proj.*`, `prior_projector.net.2.*`), so that file loads with `load_state_dict`.
The id grid [gh, gw] is nearest-upsampled to the DiT token grid before embedding (released: 2x), and the null
condition for classifier-free guidance is an all-zero feature, as in the release.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.decoder.dit import DiT


class _Proj(nn.Module):
    def __init__(self, i: int, o: int):
        super().__init__()
        self.proj = nn.Linear(i, o)  # released key layout: net.0.proj

    def forward(self, x):
        return self.proj(x)


class _Projector(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(_Proj(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x):
        return self.net(x)


class SigVQ(nn.Module):
    def __init__(self, vocab_size: int, inner_dim: int):
        super().__init__()
        self.prior_token_embedding = nn.Embedding(vocab_size, inner_dim)
        self.prior_projector = _Projector(inner_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.prior_projector(self.prior_token_embedding(ids))


def upsample_ids(ids: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """Nearest-upsample an id grid [B, h, w] to [B, gh, gw] (integer factor), flattened to [B, gh*gw]."""
    b, h, w = ids.shape
    if gh % h or gw % w:
        raise ValueError(f"id grid {h}x{w} does not divide the DiT token grid {gh}x{gw}; "
                         f"set decoder.token_grid to a divisor of it")
    up = ids.repeat_interleave(gh // h, dim=1).repeat_interleave(gw // w, dim=2)
    return up.reshape(b, gh * gw)


class TokenDecoder(nn.Module):
    """v = TokenDecoder(x_t, t, ids, keep): velocity of the latent flow, conditioned on VQ ids.

    keep [B] bool: False replaces that item's condition by the null (all-zero) feature (CFG dropout / negative).
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.sigvq = SigVQ(cfg.codebook_size, cfg.cap_feat_dim)
        nn.init.normal_(self.sigvq.prior_token_embedding.weight, std=1.0)
        self.sigvq.requires_grad_(cfg.sigvq_trainable)
        self.transformer = DiT(cfg)

    def features(self, ids: torch.Tensor, grid: tuple[int, int], keep: torch.Tensor | None) -> torch.Tensor:
        feats = self.sigvq(upsample_ids(ids, *grid))
        if keep is not None:
            feats = feats * keep.to(feats.dtype)[:, None, None]
        return feats

    def forward(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor | None = None):
        p = self.cfg.patch_size
        feats = self.features(ids, (x.shape[-2] // p, x.shape[-1] // p), keep)
        out = self.transformer(x, t, feats)
        if self.cfg.prediction == "clean":  # x-prediction (JiT, Li & He 2025), returned as the velocity it implies
            one_minus_t = (1 - t.float()).clamp_min(self.cfg.prediction_t_clip).view(-1, *[1] * (x.dim() - 1))
            out = (out - x) / one_minus_t.to(out.dtype)
        return out
