"""SigLIP ViT of the release: conv patch embed, a learned position table resampled to any grid, pre-LN blocks with
fused-qkv attention and a GELU MLP, no final norm (LLaDA2.0-Uni `encoder/image_tokenizer.py`, GLM-Image).

Module names equal the official VisionEncoder's, so `state_dict()` keys are the released ones minus `model.visual.`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    depth: int
    patch_size: int
    image_size: int
    in_channels: int = 3
    hidden_act: str = "gelu"
    attention_bias: bool = True
    layer_norm_eps: float = 1e-6
    spatial_merge_size: int = 1


class PatchEmbed(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(c.in_channels, c.hidden_size, c.patch_size, c.patch_size, bias=True)


class Embeddings(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.position_embedding = nn.Embedding((c.image_size // c.patch_size) ** 2, c.hidden_size)


class Attention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.heads = c.num_heads
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size, bias=c.attention_bias)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size, bias=c.attention_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # (N, 3, heads, head_dim): q, k, v blocks, head-major within each (official reshape order)
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)  # full bidirectional attention within each image
        return self.proj(o.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)
        self.act = nn.GELU()  # "gelu" = exact erf form

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.attn = Attention(c)
        self.mlp = MLP(c)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        if c.spatial_merge_size != 1:
            raise ValueError(f"vision_config.spatial_merge_size={c.spatial_merge_size}: only 1 (the release) is "
                             f"supported; with m>1 patch order and positions change")
        self.config = c
        self.patch_embed = PatchEmbed(c)
        self.embeddings = Embeddings(c)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))

    def position_table(self, gh: int, gw: int) -> torch.Tensor:
        """The S x S table bilinearly resampled to (gh, gw); equals the official grid_sample(align_corners=False,
        padding border) at pixel centres; identity when the grid is S x S."""
        w = self.embeddings.position_embedding.weight
        s = int(round(w.shape[0] ** 0.5))
        table = w.view(1, s, s, -1).permute(0, 3, 1, 2).float()
        if (gh, gw) != (s, s):
            table = F.interpolate(table, size=(gh, gw), mode="bilinear", align_corners=False, antialias=False)
        return table[0].permute(1, 2, 0).reshape(gh * gw, -1).to(w.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, H, W] (one grid size per batch), normalised -> features [B, gh*gw, hidden]."""
        p = self.config.patch_size
        b, _, h, w = pixel_values.shape
        if h % p or w % p:
            raise ValueError(f"image {h}x{w} is not a multiple of the patch size {p}")
        x = self.patch_embed.proj(pixel_values.to(self.patch_embed.proj.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # raster order: patch (r, c) -> r * gw + c
        x = x + self.position_table(h // p, w // p)
        for blk in self.blocks:
            x = blk(x)
        return x
