"""What the CPU build cannot do on fake cuda tensors at the Python level, and the host syncs only Python sees.

`DeviceGuardFree` (a TorchFunctionMode under RehearsalMode, see dispatch.py) reroutes the Python bindings that take
a CUDA device guard (copy_, indexing, `~`, `Tensor.type()`: they abort the CPU build) through meta tensors and puts
the outputs back on cuda, and counts the reads of a device value on the host (.item(), .tolist(), float(), bool(),
.cpu(), data-dependent output sizes). `presented_as_meta` shows fake cuda tensors as meta for code that checks
devices in Python.
"""
from __future__ import annotations

import contextlib
import sys

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from training.rehearsal.dispatch import Audit, tensors_in, where

aten = torch.ops.aten


def _sized_by_values(func, args, kwargs) -> bool:
    """Ops whose output size is read from a device tensor's values (a host sync inside the op)."""
    if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
        return _has_cuda_mask(args[1])
    if func in (torch.nonzero, torch.Tensor.nonzero, torch.masked_select, torch.Tensor.masked_select):
        return any(t.is_cuda for t in tensors_in((args, kwargs)))
    if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and repeats.is_cuda and kwargs.get("output_size") is None
    return False


def _has_cuda_mask(idx) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.is_cuda for i in items)


def _long_indices(idx):
    """Boolean masks in an index -> their nonzero long indices (sized by RehearsalMode's shadows)."""
    if isinstance(idx, torch.Tensor) and idx.dtype == torch.bool:
        return _as_meta(torch.Tensor.nonzero, (idx,), {"as_tuple": True}) if idx.is_cuda else idx.nonzero(as_tuple=True)
    if isinstance(idx, tuple) and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx):
        out = ()
        for i in idx:
            out += _long_indices(i) if isinstance(i, torch.Tensor) and i.dtype == torch.bool else (i,)
        return out
    return idx


class DeviceGuardFree(TorchFunctionMode):
    """Tensor methods whose Python bindings take a CUDA device guard before dispatch (copy_, indexing, ~) fail in the
    CPU build even on fake cuda tensors ("not linked with support for cuda devices"). copy_ goes through the
    dispatcher; the others run again with the fake cuda tensors presented as meta (which has a device guard) and
    their outputs put back on cuda. FakeTensorMode and RehearsalMode still see every op inside."""

    def __init__(self, audit: Audit):
        super().__init__()
        self.audit, self._reading, self._tolist_frame = audit, False, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._reading or not self._host_sync(func, args, kwargs):
            return self._run(func, args, kwargs)
        self._reading = self.audit.busy = True  # the ops inside belong to this one sync
        try:
            return self._run(func, args, kwargs)
        finally:
            self._reading = self.audit.busy = False

    def _host_sync(self, func, args, kwargs) -> bool:
        """Whether this call waits for the device (and count it): a host read of a device tensor, or an op whose
        output size comes from device values. One count per call, however many elements it reads."""
        if func in _HOST_READS and isinstance(args[0], torch.Tensor) and args[0].is_cuda:
            # FakeTensor.tolist is `[e.item() for e in self]`: count the tolist once, not each item
            caller = sys._getframe(2)
            for _ in range(8):
                if caller is None or caller.f_code.co_name == "tolist":
                    break
                caller = caller.f_back
            in_tolist = caller is not None and caller.f_code.co_name == "tolist"
            if not (in_tolist and caller is self._tolist_frame):
                self.audit.host_syncs[where()] += 1
            self._tolist_frame = caller if in_tolist else None
            return True
        if _sized_by_values(func, args, kwargs):
            self.audit.host_syncs[f"{where()} (data-dependent shape)"] += 1
            return True
        return False

    def _run(self, func, args, kwargs):
        if func is torch.tensor and args and isinstance(args[0], (list, tuple)):
            elems = [x for x in tree_flatten(args[0])[0] if isinstance(x, torch.Tensor)]
            if elems:  # a host tensor built from device scalars: one device-to-host read per element
                self.audit.host_syncs[where()] += sum(e.is_cuda for e in elems)
                flat = torch.stack([torch.as_tensor(x).reshape(()).to("cpu") for x in tree_flatten(args[0])[0]])
                shape = torch.as_tensor(_nested_shape(args[0]))
                out = flat.reshape(tuple(int(d) for d in shape.tolist()) if shape.numel() else ())
                return out.to(device=kwargs.get("device") or "cpu", dtype=kwargs.get("dtype") or flat.dtype)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and args[0].is_cuda:
            # the legacy type string of a cuda tensor needs CUDA's type registry (the CPU build aborts)
            return f"torch.cuda.{_LEGACY_TYPE[args[0].dtype]}Tensor"
        if func is torch.Tensor.copy_:
            return aten.copy_.default(args[0], args[1], kwargs.get("non_blocking", False))
        if func is torch.Tensor.__getitem__:
            args = (args[0], _long_indices(args[1]), *args[2:])
        try:
            return func(*args, **kwargs)
        except RuntimeError as e:
            if "not linked with support for cuda" not in str(e):
                raise
            return _as_meta(func, args, kwargs)  # the guard fails before the op runs: nothing happened yet


_META = torch.device("meta")
_LEGACY_TYPE = {torch.float32: "Float", torch.bfloat16: "BFloat16", torch.float16: "Half", torch.float64: "Double",
                torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
                torch.bool: "Bool"}
_HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
               torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy}


def _nested_shape(data) -> list[int]:
    shape = []
    while isinstance(data, (list, tuple)):
        shape.append(len(data))
        data = data[0] if data else None
    return shape


def _as_meta(func, args, kwargs):
    cuda = [t for t in tensors_in((args, kwargs)) if is_fake(t) and t.device.type == "cuda"]
    devices = [t.fake_device for t in cuda]
    for t in cuda:
        t.fake_device = _META
    try:
        out = func(*args, **kwargs)
    finally:
        for t, d in zip(cuda, devices):
            t.fake_device = d
    back = devices[0] if devices else None
    for o in tensors_in(out):
        if back is not None and is_fake(o) and o.device == _META:
            o.fake_device = back
    return out


@contextlib.contextmanager
def presented_as_meta(tensors):
    """Fake cuda tensors seen as meta for the duration (autograd bookkeeping the CPU build has no cuda for)."""
    cuda = [t for t in tensors if is_fake(t) and t.device.type == "cuda"]
    devices = [t.fake_device for t in cuda]
    for t in cuda:
        t.fake_device = _META
    try:
        yield
    finally:
        for t, d in zip(cuda, devices):
            t.fake_device = d
