"""The SigLIP objective of `unidiff tokenizer train`: a small text tower trained with the ViT, the image head that
pools the ViT's patch features into one embedding, and the pairwise sigmoid loss (Zhai et al. 2023, eq. 1).

The heads and the text tower are training-only: the written `image_tokenizer/` dir holds the ViT and the VQ, as
released (which has no cls token, final norm or pooling head). The image embedding is the mean of the patch features,
so the loss acts directly on the per-patch features the codebook is later matched to.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TextTower(nn.Module):
    """Token ids [B, L] (pad 0 after the caption) -> unit embeddings [B, embed_dim]: pre-LN transformer, mean pool."""

    def __init__(self, vocab_size: int, width: int, depth: int, heads: int, max_len: int, embed_dim: int):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(max_len, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        keep = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]  # [B, L]
        x = self.blocks(self.tok(ids) + self.pos[:ids.shape[1]], src_key_padding_mask=~keep)
        x = (self.norm(x) * keep[..., None]).sum(1) / lengths[:, None].clamp(min=1)
        return F.normalize(self.proj(x), dim=-1)


class ImageHead(nn.Module):
    """ViT patch features [B, N, hidden] -> unit embeddings [B, embed_dim], and the loss's learned temperature and
    bias (SigLIP init: t' = log 10, b = -10, so the many negatives start near zero loss each)."""

    def __init__(self, hidden: int, embed_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, embed_dim)
        self.log_t = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.tensor(-10.0))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.norm(feats.mean(1))), dim=-1)


def sigmoid_loss(img: torch.Tensor, txt: torch.Tensor, log_t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """-1/|B| sum_ij log sigmoid(z_ij (t x_i.y_j + b)), z = +1 on the diagonal (the pair), -1 elsewhere."""
    logits = img @ txt.t() * log_t.exp() + bias
    z = 2 * torch.eye(len(img), device=img.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(z * logits).sum() / len(img)


def pair_accuracy(img: torch.Tensor, txt: torch.Tensor) -> float:
    """Share of images whose own caption is the nearest text in the batch (a readable companion of the loss)."""
    return float((img @ txt.t()).argmax(1).eq(torch.arange(len(img), device=img.device)).float().mean())
