"""Cosine VQ after the last ViT block: 1x1 quant_conv, L2-normalise features and codebook, nearest code.
Module names equal the official VQVAE's (`quant_conv`, `post_quant_conv` [unused by encoding], `quantize.embedding`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VQConfig:
    num_embeddings: int
    embed_dim: int
    latent_channels: int
    beta: float = 0.25  # unused (training-time commitment weight in the original)


class Quantize(nn.Module):
    def __init__(self, c: VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(c.num_embeddings, c.embed_dim)


class VQModel(nn.Module):
    def __init__(self, c: VQConfig):
        super().__init__()
        self.config = c
        self.quant_conv = nn.Conv2d(c.latent_channels, c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.latent_channels, 1)
        self.quantize = Quantize(c)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """ViT features [B, N, latent] -> unit vectors [B, N, embed_dim] (the 1x1 conv is a Linear)."""
        w = self.quant_conv.weight.view(self.quant_conv.out_channels, -1)
        return F.normalize(F.linear(feats, w, self.quant_conv.bias), dim=-1)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """Unit vectors [..., D] -> ids: argmax cosine == argmin |z|^2+|e|^2-2z.e (first index on ties)."""
        e = F.normalize(self.quantize.embedding.weight, dim=-1)
        return (z @ e.t()).argmax(-1)

    def encode(self, feats: torch.Tensor) -> torch.Tensor:
        return self.codes(self.project(feats))
