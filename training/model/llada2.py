"""The one LLaDA2.0(-Uni) MoE backbone definition. Plain PyTorch; parallelism is applied from outside (engines).

Module names reproduce the official weight names (`model.word_embeddings`, `model.layers.N.attention.query_key_value`,
`model.layers.N.mlp.gate.expert_bias`, `lm_head`, ...), so `hf_format` only has to split/stack the fused experts.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from training.model import lora
from training.model.attention import Attention
from training.model.mlp import SwiGLU
from training.model.moe import MoE, RouterStats
from training.model.norm import RMSNorm
from training.model.rope import rope_tables


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, L, V] (fp32 on the way out of the head under autocast), None if return_hidden
    aux_loss: torch.Tensor  # scalar: load-balancing + router z-loss, already scaled by their coefficients
    router: list[RouterStats] = field(default_factory=list)  # one per MoE layer
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (k, v) of *these* tokens, if use_cache
    hidden: torch.Tensor | None = None  # [B, L_kept, H] final normed hidden states, if return_hidden


class DecoderLayer(nn.Module):
    """pre-RMSNorm -> attention -> residual -> RMSNorm -> dense MLP or MoE -> residual."""

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = layer_idx >= cfg.first_k_dense_replace
        self.mlp = MoE(cfg) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.recompute_attention = getattr(cfg, "activation_checkpointing", "none") == "selective"
        if self.is_moe:
            self.mlp.experts.recompute = self.recompute_attention

    def forward(self, x, cos, sin, mask, past_kv=None):
        if self.recompute_attention and torch.is_grad_enabled():
            a, kv = checkpoint(self.attention, self.input_layernorm(x), cos, sin, mask, past_kv, use_reentrant=False)
        else:
            a, kv = self.attention(self.input_layernorm(x), cos, sin, mask, past_kv)
        x = x + a
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            m, aux, stats = self.mlp(h)
        else:
            m, aux, stats = self.mlp(h), None, None
        return x + m, kv, aux, stats


class LLaDA2Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LLaDA2MoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.rotary_dim = int(cfg.head_dim * cfg.partial_rotary_factor)
        self.model = LLaDA2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.word_embeddings.weight
        self.activation_checkpointing = getattr(cfg, "activation_checkpointing", "none")  # none | full | selective

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.word_embeddings(input_ids)

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, past_kv=None, use_cache=False,
                inputs_embeds=None, logits_to_keep: int | None = None, return_hidden: bool = False) -> ModelOutput:
        """input_ids [B, L] (or inputs_embeds [B, L, H]); position_ids [B, L] (default arange, offset by the cache);
        attention_mask: bool broadcastable to [B, 1, L, L_past + L] (True = may attend), a FlexAttention BlockMask,
        or None (full bidirectional). past_kv: list of per-layer (k, v) from earlier calls with use_cache=True.
        logits_to_keep: run the LM head on the first N positions only (block diffusion needs none for x_0).
        return_hidden: skip the LM head and return the final normed hidden states (the loss runs the head itself, on
        the masked rows only)."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        b, l, _ = x.shape
        if position_ids is None:
            start = past_kv[0][0].shape[2] if past_kv else 0
            position_ids = torch.arange(start, start + l, device=x.device).expand(b, l)
        cos, sin = rope_tables(position_ids, self.rotary_dim, self.config.rope_theta,
                               torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type)
                               else x.dtype)
        aux_total = x.new_zeros((), dtype=torch.float32)
        stats, new_kv = [], []
        for i, layer in enumerate(self.model.layers):
            past = past_kv[i] if past_kv else None
            if self.activation_checkpointing == "full" and torch.is_grad_enabled():
                # the layer's collectives (EP all-to-all, TP) run again in the backward, on every rank alike
                x, kv, aux, st = checkpoint(layer, x, cos, sin, attention_mask, past, use_reentrant=False)
            else:
                x, kv, aux, st = layer(x, cos, sin, attention_mask, past)
            if aux is not None:
                aux_total = aux_total + aux
                stats.append(st)
            if use_cache:
                new_kv.append(kv)
        h = self.model.norm(x)  # (sequence parallel gathers the positions here, see tensor_parallel.py)
        if logits_to_keep is not None:
            h = h[:, :logits_to_keep]
        logits = None if return_hidden else self.lm_head(h).float()
        return ModelOutput(logits=logits, aux_loss=aux_total, router=stats, kv=new_kv if use_cache else None,
                           hidden=h if return_hidden else None)

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers if layer.is_moe]

    @torch.no_grad()
    def update_expert_bias(self, loads: list[torch.Tensor], rate: float) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): bias += rate * sign(mean load - load), per MoE layer.
        `loads` should already be summed over data-parallel ranks so every replica moves identically."""
        for moe, load in zip(self.moe_layers(), loads):
            moe.gate.expert_bias += rate * torch.sign(load.mean() - load).to(moe.gate.expert_bias)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Deterministic init (normal(0, initializer_range); output projections scaled by 1/sqrt(2 * layers))."""
        for name, p in self.named_parameters():
            p.copy_(self.init_tensor(name, p.shape, seed))
        for moe in self.moe_layers():
            moe.gate.expert_bias.zero_()

    def init_tensor(self, name: str, shape, seed: int = 0) -> torch.Tensor:
        """Initial value of the parameter `name` at its full (unsharded) `shape`. Seeded by (seed, name) alone, so
        a sharded engine that materialises only its slice gets exactly the weights a single process would."""
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            return torch.ones(shape)
        if name.endswith(".bias"):
            return torch.zeros(shape)
        gen = torch.Generator(device="cpu")
        gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
        if lora.is_adapter(name):
            return lora.init_tensor(name, shape, gen)
        std = self.config.initializer_range
        if name.endswith(("dense.weight", "down_proj.weight", "down_proj")):
            std = std / math.sqrt(2 * self.config.num_hidden_layers)
        return torch.randn(shape, generator=gen) * std


def build_model(cfg, device: str | torch.device = "cpu", seed: int = 0) -> LLaDA2MoE:
    """Build on the meta device (no memory), then materialise on `device` and initialise, unless device is meta."""
    with torch.device("meta"):
        model = LLaDA2MoE(cfg)
    if str(device) == "meta":
        return model
    model.to_empty(device=device)
    model.init_weights(seed)
    return model


def count_params(model: LLaDA2MoE) -> dict:
    """Total and per-token active parameters (embeddings and head included); works on the meta device."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for moe in model.moe_layers():
        e = moe.experts
        per_expert = (e.gate_proj.numel() + e.up_proj.numel() + e.down_proj.numel()) // cfg.num_experts
        inactive += (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
    emb = model.model.word_embeddings.weight.numel()
    return {"total_params": total, "active_params": total - inactive,
            "active_params_no_embeddings": total - inactive - emb - (0 if cfg.tie_word_embeddings else emb),
            "experts_per_layer": cfg.num_experts, "moe_layers": len(model.moe_layers())}
