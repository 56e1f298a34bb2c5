"""LLaDA2.0 MoE layer: sigmoid router with expert bias and group-limited top-k, fused experts, shared expert.

Routing (DeepSeek-V3 style, as released):
    s = sigmoid(x W_g^T) in fp32;  s_b = s + expert_bias          (the bias only affects *selection*)
    group score = sum of the top-2 s_b in each of n_group groups;  keep topk_group groups
    idx = top-k of s_b within kept groups;  w = s[idx] / sum s[idx] * routed_scaling_factor
    y = sum_i w_i Expert_i(x) + SharedExpert(x)

Expert compute groups tokens by expert: token-expert pairs are sorted by expert id and each expert runs one matmul on
its contiguous slice (or one `torch._grouped_mm` for all of them). Expert parallelism replaces `dispatcher`: the
default `LocalDispatcher` keeps every pair on this rank; the engines install an all-to-all one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from training import accelerator
from training.model.mlp import SwiGLU


@dataclass
class RouterStats:
    """Per-layer routing statistics for logging and the aux-loss-free bias update."""
    load: torch.Tensor  # [E] token-expert assignments per expert (this rank's tokens)
    entropy: torch.Tensor  # scalar, mean entropy of the normalised router scores


class Router(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.scale = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        # A buffer, not a parameter: it is moved by the load-balancing rule, never by the optimizer.
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Group-limited top-k over biased scores [N, E] -> expert ids [N, k]."""
        biased = scores + self.expert_bias
        if self.n_group > 1:
            n = biased.shape[0]
            grouped = biased.view(n, self.n_group, -1)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            biased = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(n, -1)
        return biased.topk(self.top_k, dim=-1).indices

    def forward(self, x: torch.Tensor):
        """x [N, H] -> (ids [N,k], weights [N,k] fp32, scores [N,E] fp32, logits [N,E] fp32)."""
        with torch.autocast(x.device.type, enabled=False):  # fp32 scores as released (autocast would cast to bf16)
            logits = F.linear(x.float(), self.weight.float())
        scores = torch.sigmoid(logits)
        idx = self.select(scores.detach())
        w = scores.gather(1, idx)
        if self.top_k > 1:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * self.scale, scores, logits


class Experts(nn.Module):
    """Fused expert weights in the dFactory training layout: gate/up [E, I, H], down [E, H, I]."""

    def __init__(self, num_experts: int, hidden: int, inter: int, grouped_gemm: str = "auto"):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, inter, hidden))
        self.up_proj = nn.Parameter(torch.empty(num_experts, inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))
        self.grouped_gemm = grouped_gemm
        self.recompute = False  # model.activation_checkpointing=selective: recompute the expert MLPs in the backward

    def _use_grouped(self, dtype: torch.dtype, on_cuda: bool) -> bool:
        if not hasattr(torch, "_grouped_mm") or self.grouped_gemm == "off":
            return False
        # torch 2.13 runs it on CPU in any dtype (the fastest expert path there too, bench_engines.py); on CUDA
        # only in bf16 on sm90+ (accelerator.grouped_mm_on_cuda), else the per-expert loop below.
        # It wants 16-byte aligned rows (CPU and CUDA): the [M, r] LoRA product of a bf16 rank like 4 takes the loop.
        lora = getattr(self, "gate_proj_lora_A", None)
        if lora is not None and lora.shape[1] * dtype.itemsize % 16:
            return False
        return not on_cuda or accelerator.grouped_mm_on_cuda(dtype)

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x [M, H] sorted by (local) expert, counts[e] rows each -> [M, H]."""
        if x.shape[0] == 0:
            return x
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self._compute, x, counts, use_reentrant=False)
        return self._compute(x, counts)

    def _compute(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        on_cuda = x.is_cuda or accelerator.cuda()  # (cuda() also in the rehearsal's memory pass, on cpu tensors)
        # autocast does not cover _grouped_mm: on CUDA take its dtype explicitly, as a Linear would. On CPU the
        # experts keep the input dtype (bf16 _grouped_mm is ~4x slower than fp32 on these CPUs, measured).
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if on_cuda and torch.is_autocast_enabled(dev) else x.dtype
        if self._use_grouped(dtype, on_cuda):
            offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
            gmm = lambda a, w: torch._grouped_mm(a.to(dtype).contiguous(), w.transpose(1, 2).to(dtype), offs=offs)
            h = F.silu(self._project(x, "gate_proj", gmm)) * self._project(x, "up_proj", gmm)
            return self._project(h, "down_proj", gmm)
        outs = []
        for e, chunk in enumerate(x.split(counts)):  # one matmul per expert, never per token
            if chunk.shape[0]:
                mm = lambda a, w, e=e: a.to(dtype) @ w[e].t().to(dtype)
                h = F.silu(self._project(chunk, "gate_proj", mm)) * self._project(chunk, "up_proj", mm)
                outs.append(self._project(h, "down_proj", mm))
        return torch.cat(outs) if outs else x[:0]

    def _project(self, x: torch.Tensor, name: str, mm) -> torch.Tensor:
        """x through the fused weight `name` [E, out, in], plus its per-expert LoRA update if it has one
        (training/model/lora.py: `<name>_lora_A` [E, r, in], `<name>_lora_B` [E, out, r])."""
        y = mm(x, getattr(self, name))
        a = getattr(self, f"{name}_lora_A", None)
        if a is None:
            return y
        return y + mm(mm(x, a), getattr(self, f"{name}_lora_B")) * self.lora_scale


class LocalDispatcher:
    """No expert parallelism: every (token, expert) pair is computed on this rank."""

    def __call__(self, experts: Experts, x: torch.Tensor, idx: torch.Tensor, num_experts: int) -> torch.Tensor:
        """x [N,H], idx [N,k] -> per-pair outputs [N*k, H] in the order of idx.flatten()."""
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=num_experts).tolist()
        y_sorted = experts(x[order // idx.shape[1]], counts)
        out = torch.empty_like(y_sorted)
        out[order] = y_sorted
        return out


class MoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.gate = Router(cfg)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.grouped_gemm)
        self.shared_experts = (SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts)
                               if cfg.num_shared_experts else None)
        self.dispatcher = LocalDispatcher()
        self.aux_loss_coeff = cfg.aux_loss_coeff
        self.z_loss_coeff = cfg.z_loss_coeff

    def forward(self, x: torch.Tensor):
        b, l, h = x.shape
        flat = x.reshape(-1, h)
        idx, w, scores, logits = self.gate(flat)
        pair_out = self.dispatcher(self.experts, flat, idx, self.num_experts)
        y = (pair_out.view(*idx.shape, h) * w.unsqueeze(-1).to(pair_out.dtype)).sum(1)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        load = torch.bincount(idx.flatten(), minlength=self.num_experts).float()
        probs = scores / scores.sum(-1, keepdim=True)
        entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean()
        aux = x.new_zeros((), dtype=torch.float32)
        if self.training and self.aux_loss_coeff > 0:
            aux = aux + self.aux_loss_coeff * self._sequence_aux_loss(idx.view(b, l, -1), probs.view(b, l, -1))
        if self.training and self.z_loss_coeff > 0:
            aux = aux + self.z_loss_coeff * torch.logsumexp(logits, -1).pow(2).mean()
        return y.view(b, l, h), aux, RouterStats(load=load.detach(), entropy=entropy.detach())

    def _sequence_aux_loss(self, idx: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 sequence-wise balance loss: sum_i f_i P_i per sequence, f_i = E/(k L) * count_i."""
        b, l, k = idx.shape
        counts = torch.zeros(b, self.num_experts, device=idx.device).scatter_add_(
            1, idx.reshape(b, -1), torch.ones(b, l * k, device=idx.device))
        f = counts * self.num_experts / (k * l)
        return (f * probs.mean(1)).sum(-1).mean()
