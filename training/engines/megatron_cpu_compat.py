"""megatron-core 0.16.1 on a CPU-only torch: the smallest runtime compatibility layer, applied only without CUDA.

megatron-core has no switch for CPU (research note docs: /work/shared/research/cpu-megatron-deepspeed.md, section
3). The engine uses parallel_state, the tensor-parallel mappings, DistributedDataParallel and the distributed
optimizer; of those, these call sites assume CUDA (measured on 0.16.1):

  part       what breaks on CPU                                                  fix here
  cuda       torch.cuda.current_device() for buffer devices (param_and_grad_buffer, utils.GlobalMemoryBuffer),
             torch.cuda.Stream/Event/synchronize in DDP and mappings          -> CPU device, no-op streams/events
  devmap     tensors created with device='cuda' (optimizer.py found_inf/dummy overflow buf, clip_grads.py) and
             `assert grad.type() == 'torch.cuda.FloatTensor'` (clip_grads.py, optimizer.py, distrib_optimizer.py)
                                                                              -> a TorchFunctionMode, entered only
                                                                                 around megatron calls, maps 'cuda'
                                                                                 to cpu and answers .type() as cuda
  rng        tensor_parallel.random's cuda RNG tracker (model_parallel_cuda_manual_seed)
                                                                              -> CPU generator state

Parts of the note's shim that this engine does not need, because it runs the project's own model (no megatron
GPTModel, MoELayer, WrappedTorchNorm, TE): the WrappedTorchNorm SP assert, `te_general_gemm`, the alltoall
dispatcher's split sizes. The layer is pinned: `check_version()` refuses any other megatron-core version.
"""
from __future__ import annotations

import contextlib
import inspect
import os

import torch
from torch.overrides import TorchFunctionMode

PINNED = "0.16.1"
_applied = False


def check_version() -> None:
    import megatron.core
    v = getattr(megatron.core, "__version__", "unknown")
    if v != PINNED:
        raise RuntimeError(f"megatron-core {v} is installed; training/engines/megatron_cpu_compat.py is written and "
                           f"tested against megatron-core=={PINNED} (pyproject pin). Install that version, or re-check "
                           "every call site listed in the module docstring before changing the pin.")


class _NullStream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return _NullEvent()

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent:
    def __init__(self, *a, **k):
        pass

    def record(self, *a, **k):
        pass

    def wait(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def apply() -> None:
    """Install the `cuda` and `rng` parts for a run on CPU tensors (idempotent). Only on a machine without CUDA."""
    if torch.cuda.is_available():
        raise RuntimeError("megatron_cpu_compat.apply() is for CPU-only machines; CUDA is available here")
    stub_cuda_runtime(torch.device("cpu"))


def stub_cuda_runtime(current_device) -> None:
    """torch.cuda's runtime calls megatron makes (streams, events, synchronize, current device, the cuda RNG) as
    no-ops / CPU generator state. `current_device`: what torch.cuda.current_device() answers: the cpu device for a
    CPU run, cuda:0 for the GPU rehearsal (tensors then stay on the fake cuda:0 — no device mapping there)."""
    global _applied
    if _applied:
        return
    check_version()
    c = torch.cuda
    c.current_device = lambda: current_device
    c.Stream, c.Event = _NullStream, _NullEvent
    c.current_stream = lambda *a, **k: _NullStream()
    c.default_stream = lambda *a, **k: _NullStream()
    c.stream = lambda *a, **k: contextlib.nullcontext()
    c.synchronize = lambda *a, **k: None
    c.empty_cache = lambda: None
    c.get_rng_state = lambda *a, **k: torch.get_rng_state()
    c.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    c.manual_seed = lambda seed: torch.manual_seed(seed)
    torch.Tensor.record_stream = lambda self, *a, **k: None
    from megatron.core.tensor_parallel import random as mrandom
    mrandom._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)
    if hasattr(mrandom, "_get_cuda_rng_state"):
        mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    _applied = True


def _called_from_megatron() -> bool:
    frame = inspect.currentframe()
    try:
        f = frame.f_back.f_back
        return f is not None and f"{os.sep}megatron{os.sep}" in f.f_code.co_filename
    finally:
        del frame


class _CpuDeviceMode(TorchFunctionMode):
    """Inside megatron calls on CPU: device='cuda' -> cpu, .cuda()/.to('cuda') -> no move, and Tensor.type() of a
    CPU float tensor answers 'torch.cuda.*' to megatron's string type asserts."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        dev = kwargs.get("device")
        if dev is not None and "cuda" in str(dev):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple("cpu" if isinstance(a, (str, torch.device)) and "cuda" in str(a) else a for a in args)
        result = func(*args, **kwargs)
        if func is torch.Tensor.type and not args[1:] and not kwargs and isinstance(result, str) \
                and result.startswith("torch.") and _called_from_megatron():
            return result.replace("torch.", "torch.cuda.", 1)
        return result


@contextlib.contextmanager
def cpu_device_mode():
    """Wrap megatron DDP/optimizer construction and steps; a no-op when CUDA is present (or rehearsed)."""
    from training import accelerator
    if accelerator.device_for(0).type == "cuda":
        yield
        return
    with _CpuDeviceMode():
        yield
