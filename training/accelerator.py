"""What differs between a CPU run and a CUDA run, decided in one place (nanoGPT's rule).

    device         cuda:LOCAL_RANK on a GPU machine, else cpu
    backend        nccl on CUDA (it has no CPU tensors: every collective's tensors live on the device), else gloo
    attention      model.attention=auto -> FlexAttention on CUDA, dense SDPA on CPU (masks.use_flex)
    megatron       megatron-core's CPU compatibility layer only without CUDA (engines/megatron_cpu_compat.py)

`unidiff plan` rehearses a GPU rank on a CPU-only machine: inside `rehearse_cuda()` every decision above takes its
CUDA branch while the tensors are fake (training/rehearsal/), so the rehearsal runs the code a GPU job runs.
Code that needs a CUDA decision asks here, never `torch.cuda.is_available()` directly.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

# None, or where the rehearsal's fake tensors live while every decision takes its CUDA branch: "cuda" (the device
# pass) or "cpu" (the memory pass: fake cpu tensors, CUDA numerics such as the expert matmul dtype).
_rehearsing: str | None = None


def cuda() -> bool:
    """Whether this run takes the CUDA branch of every decision."""
    return _rehearsing is not None or torch.cuda.is_available()


def rehearsing() -> bool:
    return _rehearsing is not None


@contextlib.contextmanager
def rehearse_cuda(tensors_on: str = "cuda"):
    """CUDA decisions without a GPU, for the rehearsal's passes (which keep every tensor fake)."""
    global _rehearsing
    before, _rehearsing = _rehearsing, tensors_on
    try:
        yield
    finally:
        _rehearsing = before


def device_for(local_rank: int) -> torch.device:
    """This rank's device (the rehearsal's fake GPU is always cuda:0: one rank is rehearsed per process)."""
    if _rehearsing is not None:
        return torch.device(_rehearsing, 0) if _rehearsing == "cuda" else torch.device("cpu")
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def inference_dtype(device) -> torch.dtype:
    """Weights of a backbone loaded for inference: bf16 on CUDA (as released and served), fp32 on the CPU (bf16
    matmuls there are slower than fp32, and tests compare against fp32 references)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def set_device(device: torch.device) -> None:
    if device.type == "cuda" and _rehearsing is None:
        torch.cuda.set_device(device)


def backend() -> str:
    return "nccl" if cuda() else "gloo"


def comm_device() -> torch.device:
    """Where tensors handed to a collective must live: the current GPU under NCCL, the CPU under gloo."""
    if _rehearsing is not None:
        return device_for(0)
    return torch.device("cuda", torch.cuda.current_device()) if cuda() else torch.device("cpu")


def all_reduce_host(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """All-reduce a host-side tensor (flags, counters, eval sums): through the device under NCCL, which has no CPU
    backend ("no backend for cpu"), then back to where it came from. A no-op without a process group."""
    if not dist.is_initialized():
        return t
    on = t.to(comm_device())
    dist.all_reduce(on, op=op, group=group)
    return on.to(t.device)


def grouped_mm_on_cuda(dtype: torch.dtype) -> bool:
    """torch._grouped_mm's CUDA kernel takes bf16 operands on compute capability >= 9.0 (H100/H200); the rehearsal
    stands in for an H100."""
    if dtype != torch.bfloat16:
        return False
    return _rehearsing is not None or torch.cuda.get_device_capability() >= (9, 0)


def gpus_visible() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
