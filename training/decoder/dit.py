"""The decoder DiT: a single-stream transformer over [latent patches, condition tokens].

Same design and parameter names as the released `ZImageTransformer2DModel` (LLaDA2.0-Uni `decoder/`), so its
`model.safetensors` loads with `load_state_dict` (see docs/decoder.md for what is covered):
  noise_refiner (t-modulated) on latent patches, context_refiner (no modulation) on condition tokens,
  then `layers` over the concatenation [x, cap]; adaLN with tanh gates, sandwich RMSNorms, QK-norm, SwiGLU,
  3-axis RoPE (sequence, h, w) with condition slot k at (k+1, 0, 0), pads included, and patch (h, w) at
  (Ncap_padded+1, h, w) (`position_ids`).
Differences from the release, on purpose: a batch holds images of one size (no per-item lists), so every
sequence is a dense [B, L, dim] tensor; the released attention is diffusers' `Attention`, here a plain module with
the same parameter names (`attention.to_q`, `to_k`, `to_v`, `to_out.0`, `norm_q`, `norm_k`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ADALN_EMBED_DIM = 256  # released constant: modulation input width is min(dim, 256)
SEQ_MULTI_OF = 32  # released: each stream is padded to a multiple of 32 with a learned pad token


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


class TimestepEmbedder(nn.Module):
    def __init__(self, out_size: int, mid_size: int, freq_size: int = 256):
        super().__init__()
        self.freq_size = freq_size
        self.mlp = nn.Sequential(nn.Linear(freq_size, mid_size), nn.SiLU(), nn.Linear(mid_size, out_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos first, as released
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, qk_norm: bool):
        super().__init__()
        self.heads = n_heads
        head = dim // n_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])  # released key: to_out.0.weight
        self.norm_q = RMSNorm(head, eps=1e-5) if qk_norm else None
        self.norm_k = RMSNorm(head, eps=1e-5) if qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, self.heads, -1) for f in (self.to_q, self.to_k, self.to_v))
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Released `ZImageTransformerBlock`: sandwich norms; with modulation, scale = 1 + s and gate = tanh(g)."""

    def __init__(self, dim: int, n_heads: int, norm_eps: float, qk_norm: bool, modulation: bool):
        super().__init__()
        self.attention = Attention(dim, n_heads, qk_norm)
        self.feed_forward = FeedForward(dim, int(dim / 3 * 8))
        self.attention_norm1 = RMSNorm(dim, norm_eps)
        self.ffn_norm1 = RMSNorm(dim, norm_eps)
        self.attention_norm2 = RMSNorm(dim, norm_eps)
        self.ffn_norm2 = RMSNorm(dim, norm_eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.Linear(min(dim, ADALN_EMBED_DIM), 4 * dim))

    def forward(self, x, rope, adaln: torch.Tensor | None = None):
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln).unsqueeze(1).chunk(4, dim=2)
        x = x + gate_msa.tanh() * self.attention_norm2(self.attention(self.attention_norm1(x) * (1 + scale_msa), rope))
        return x + gate_mlp.tanh() * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp)))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(dim, ADALN_EMBED_DIM), dim))

    def forward(self, x, c):
        return self.linear(self.norm_final(x) * (1 + self.adaLN_modulation(c).unsqueeze(1)))


def rope_tables(pos: torch.Tensor, axes_dims: list[int], theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [L, head_dim/2] for integer positions pos [L, 3]; axis i rotates its own axes_dims[i] channels."""
    angles = []
    for i, d in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        angles.append(pos[:, i].double()[:, None] * freqs[None])
    ang = torch.cat(angles, dim=-1).float()
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate interleaved channel pairs (2i, 2i+1), as the released complex-number form does. x: [B, L, H, D]."""
    cos, sin = (r[None, :, None, :] for r in rope)
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).type_as(x)


def _pad_len(n: int) -> int:
    return (-n) % SEQ_MULTI_OF


def position_ids(n_cap: int, gh: int, gw: int, cap_rope: str = "sequence") -> tuple[torch.Tensor, int]:
    """RoPE ids [L, 3] of the stream [patches + pads, cap + pads] and the padded patch count.

    As released (`patchify_and_embed` / `_pad_with_ids`): the cap ids are laid over the *padded* cap length, so cap
    slot k, pad slots included, is (k+1, 0, 0); patch (h, w) is (Ncap_padded + 1, h, w) and the patch pads (0, 0, 0).
    cap_rope=grid (a cap the size of the patch grid): cap k is (1, h_k, w_k), its cell; laid out on a grid like the
    patches, its pads take (0, 0, 0) as the patch pads do. A cap of another length falls back to the sequence ids."""
    n_img, cap_pad = gh * gw, n_cap + _pad_len(n_cap)
    hh, ww = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    img = torch.stack([torch.full_like(hh, cap_pad + 1), hh, ww], -1).reshape(-1, 3)
    img = torch.cat([img, torch.zeros(_pad_len(n_img), 3, dtype=img.dtype)])
    cap = torch.zeros(cap_pad, 3, dtype=torch.long)
    if cap_rope == "grid" and n_cap == n_img:
        cap[:n_cap] = torch.stack([torch.ones_like(hh), hh, ww], -1).reshape(-1, 3)
    else:
        cap[:, 0] = torch.arange(1, cap_pad + 1)
    return torch.cat([img, cap]), img.shape[0]


class DiT(nn.Module):
    """velocity = DiT(x [B, C, H, W] latent, t [B] in [0, 1] (0 noise, 1 data), cap [B, Ncap, cap_feat_dim])."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        dim, p, c = cfg.dim, cfg.patch_size, cfg.in_channels
        key = f"{p}-1"  # released ModuleDict key: "<patch_size>-<frame_patch_size>"
        self.all_x_embedder = nn.ModuleDict({key: nn.Linear(p * p * c, dim)})
        self.all_final_layer = nn.ModuleDict({key: FinalLayer(dim, p * p * c)})
        blk = dict(dim=dim, n_heads=cfg.n_heads, norm_eps=cfg.norm_eps, qk_norm=cfg.qk_norm)
        self.noise_refiner = nn.ModuleList([Block(**blk, modulation=True) for _ in range(cfg.n_refiner_layers)])
        self.context_refiner = nn.ModuleList([Block(**blk, modulation=False) for _ in range(cfg.n_refiner_layers)])
        self.t_embedder = TimestepEmbedder(min(dim, ADALN_EMBED_DIM), cfg.t_mid_dim)
        self.semantic_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, cfg.norm_eps), nn.Linear(cfg.cap_feat_dim, dim))
        self.x_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.layers = nn.ModuleList([Block(**blk, modulation=True) for _ in range(cfg.n_layers)])
        self._rope_cache: dict = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.x_pad_token, std=0.02)
        nn.init.normal_(self.cap_pad_token, std=0.02)
        # adaLN-zero style start: the output layer predicts 0 and gates start closed-ish, which trains stably.
        for fl in self.all_final_layer.values():
            nn.init.zeros_(fl.linear.weight)
            nn.init.zeros_(fl.adaLN_modulation[1].weight)
        for blk in list(self.noise_refiner) + list(self.layers):
            nn.init.zeros_(blk.adaLN_modulation[0].weight)

    def _rope(self, n_cap: int, gh: int, gw: int, device) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        """cos/sin of `position_ids` for this size (cached) and the padded patch count."""
        key = (n_cap, gh, gw, str(device))
        if key not in self._rope_cache:
            pos, n_img_pad = position_ids(n_cap, gh, gw, self.cfg.cap_rope)
            cos, sin = rope_tables(pos, list(self.cfg.axes_dims), self.cfg.rope_theta)
            self._rope_cache[key] = (cos.to(device), sin.to(device), n_img_pad)
        cos, sin, n_img_pad = self._rope_cache[key]
        return (cos, sin), n_img_pad

    def forward(self, x: torch.Tensor, t: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.cfg.patch_size
        gh, gw = h // p, w // p
        key = f"{p}-1"
        adaln = self.t_embedder(t * self.cfg.t_scale).to(x.dtype)
        (cos, sin), n_img_pad = self._rope(cap.shape[1], gh, gw, x.device)
        n_img = gh * gw
        # patchify: "c (h ph) (w pw) -> (h w) (ph pw c)" (released order, channels last within a patch)
        patches = x.view(b, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(b, n_img, p * p * c)
        xs = self.all_x_embedder[key](patches)
        cs = self.semantic_embedder(cap.to(xs.dtype))
        if self.cfg.cap_add and cap.shape[1] == n_img:
            xs = xs + cs
        if n_img_pad > n_img:
            xs = torch.cat([xs, self.x_pad_token.expand(b, n_img_pad - n_img, -1).to(xs.dtype)], 1)
        rope_x = (cos[:n_img_pad], sin[:n_img_pad])
        for blk in self.noise_refiner:
            xs = blk(xs, rope_x, adaln)
        n_cap = cap.shape[1]
        if _pad_len(n_cap):
            cs = torch.cat([cs, self.cap_pad_token.expand(b, _pad_len(n_cap), -1).to(cs.dtype)], 1)
        rope_c = (cos[n_img_pad:], sin[n_img_pad:])
        for blk in self.context_refiner:
            cs = blk(cs, rope_c)
        u = torch.cat([xs, cs], 1)
        for blk in self.layers:
            u = blk(u, (cos, sin), adaln)
        out = self.all_final_layer[key](u[:, :n_img], adaln)
        return out.view(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
