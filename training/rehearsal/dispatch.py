"""The rehearsal's eyes: a dispatch mode over FakeTensorMode that sees every op and every collective of one rank.

Fake tensors have shapes, dtypes and devices but no values. The real step also computes on values in a few places:
routing counts that size the expert all-to-all (`.tolist()`), boolean selections (`logits[masked]`), `.item()` of a
flag. So beside each small fake tensor computed from the batch alone (noise, masks, positions: no weight involved)
this mode keeps a real CPU *shadow*, computed by the same op on the shadows of its inputs; a value read from such a
tensor is exact. A value the rehearsal cannot know (it depends on weights, which are fake) takes a stated stand-in:
    bincount / routing counts   balanced (every bin gets numel / bins; every EP peer sends what it receives)
    boolean selection           all selected (the memory upper bound)
    .item() / float() / bool()  0 (the metric values of a fake step mean nothing)
and is counted in `standins`. Besides that the mode records:
    violations   an op whose inputs sit on two devices (FakeTensorMode's device propagation raises; the op is then
                 re-run on the rank's device so the rest of the step is still rehearsed), a collective handed a tensor
                 that is not on the rank's device (NCCL: "no backend for cpu") — each with the Python line that did it
    collectives  calls and bytes per process group (dp / tp / ep / etp / edp / world)
    host_syncs   reads of a device tensor's value on the host (.item(), .tolist(), float(), bool(), .cpu()), each
                 a stall of the CPU until the GPU catches up (counted by guards.DeviceGuardFree, which sees Python
                 calls)
"""
from __future__ import annotations

import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException,
                                           FakeTensorDeviceMismatchError, UnsupportedOperatorException, is_fake,
                                           unset_fake_temporarily)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.weak import WeakTensorKeyDictionary

aten = torch.ops.aten
ROOT = Path(__file__).resolve().parents[2]
SHADOW_MAX_NUMEL = 1 << 22  # token-level tensors ([B, L] and a few times that) get shadows; activations never do
_NO_DEVICE_CHECK = {"barrier", "monitored_barrier"}  # c10d makes their tensor itself
_EMPTY = {aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default, aten.new_empty.default,
          aten.new_empty_strided.default}


def where() -> str:
    """The innermost project line (not torch's, not this package's) of the current Python stack."""
    for fr in reversed(traceback.extract_stack()):
        p = Path(fr.filename)
        if ROOT in p.parents and ".venv" not in p.parts and "rehearsal" not in p.parts:
            return f"{p.relative_to(ROOT)}:{fr.lineno} {fr.line}"
    fr = traceback.extract_stack()[-4]
    return f"{fr.filename}:{fr.lineno} {fr.line}"


@dataclass
class Audit:
    violations: list[dict] = field(default_factory=list)
    collectives: dict = field(default_factory=lambda: defaultdict(lambda: {"calls": 0, "bytes": 0}))
    host_syncs: Counter = field(default_factory=Counter)
    standins: Counter = field(default_factory=Counter)
    busy: bool = False  # inside a host read DeviceGuardFree already counted

    def summary(self) -> dict:
        return {"device_violations": len(self.violations), "violations": self.violations[:50],
                "collectives": {k: dict(v) for k, v in sorted(self.collectives.items())},
                "host_syncs": sum(self.host_syncs.values()), "host_sync_sites": dict(self.host_syncs.most_common(20)),
                "standins": dict(self.standins.most_common(20))}


def tensors_in(tree) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def _nbytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_in(tree))


def _all_meta(args, kwargs) -> bool:
    flat = tree_flatten((args, kwargs))[0]
    ts = [x for x in flat if isinstance(x, torch.Tensor)]
    devices = [x for x in flat if isinstance(x, torch.device)]
    return bool(ts or devices) and all(t.device.type == "meta" and not is_fake(t) for t in ts) and \
        all(d.type == "meta" for d in devices)


def _mutated(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors an op writes to (schema alias annotations: `Tensor(a!)`)."""
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = args[i] if i < len(args) else kwargs.get(a.name)
            out += tensors_in(v)
    return out


class RehearsalMode(TorchDispatchMode):
    """Enter inside a FakeTensorMode(allow_non_fake_inputs=True). `device`: the rank's device (fake cuda in the
    device pass); `groups`: {process group name or rank tuple: label} for the collective table."""

    def __init__(self, device: torch.device, groups: dict[str, str], audit: Audit | None = None):
        super().__init__()
        self.device, self.groups = torch.device(device), groups
        self.audit = audit or Audit()
        self.shadows = WeakTensorKeyDictionary()

    # ---- shadows --------------------------------------------------------------------------------------------
    def shadow(self, t):
        if not isinstance(t, torch.Tensor):
            return t
        if not is_fake(t):  # a real input is its own shadow
            if t.device.type == "meta":
                return None
            with unset_fake_temporarily():
                return t.to("cpu")
        return self.shadows.get(t)

    def _set_shadow(self, fake: torch.Tensor, real: torch.Tensor | None) -> None:
        if real is None or fake.numel() > SHADOW_MAX_NUMEL or tuple(real.shape) != tuple(fake.shape):
            self.shadows.pop(fake, None)
        else:
            self.shadows[fake] = real

    def _on_shadows(self, func, args, kwargs):
        """The op on real CPU values, or None when an input has no shadow."""
        flat, spec = tree_flatten((args, kwargs))
        real = []
        for x in flat:
            if isinstance(x, torch.Tensor):
                s = self.shadow(x)
                if s is None:
                    return None
                real.append(s)
            elif isinstance(x, torch.device) and x.type != "cpu":
                real.append(torch.device("cpu"))
            else:
                real.append(x)
        r_args, r_kwargs = tree_unflatten(real, spec)
        with unset_fake_temporarily():
            return func(*r_args, **r_kwargs)

    def _fake_like(self, real: torch.Tensor, device) -> torch.Tensor:
        """A fake tensor with the shape and dtype of `real` on `device`, shadowed by it."""
        out = torch.empty(real.shape, dtype=real.dtype, device=device)
        self._set_shadow(out, real)
        return out

    # ---- dispatch -------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _all_meta(args, kwargs):  # building on meta is already shape-only: keep FakeTensorMode out of it
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        if func.namespace == "c10d":
            return self._collective(func, args, kwargs)
        if func is aten._local_scalar_dense.default:
            return self._scalar(args[0])
        if func is aten.nonzero.default:
            return self._nonzero(args[0])
        if func is aten.copy_.default and args[0].device != args[1].device:
            # host <-> device copies are legal on CUDA; the CPU build's fake kernel for them is not
            self._set_shadow(args[0], self.shadow(args[1]))
            return args[0]
        if func is aten.bincount.default:
            return self._bincount(*args, **kwargs)
        if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._unsafe_index.Tensor):
            args = (args[0], self._bool_indices(args[1]), *args[2:])
        return self._call(func, args, kwargs)

    def _call(self, func, args, kwargs):
        try:
            out = func(*args, **kwargs)
        except FakeTensorDeviceMismatchError as e:
            self._violation(f"op {func.__name__}", str(e).splitlines()[0])
            args, kwargs = tree_map(self._to_rank_device, (args, kwargs))  # rehearse the rest of the step
            out = func(*args, **kwargs)
        except (DynamicOutputShapeException, DataDependentOutputException):
            self._data_dependent_shape(*tensors_in((args, kwargs)))
            real = self._on_shadows(func, args, kwargs)
            if real is None:
                raise RuntimeError(f"the rehearsal cannot size {func.__name__} (its output shape depends on values "
                                   f"computed from fake weights) at {where()}") from None
            dev = next((t.device for t in tensors_in((args, kwargs)) if is_fake(t)), self.device)
            return tree_map(lambda r: self._fake_like(r, dev) if isinstance(r, torch.Tensor) else r, real)
        self._propagate(func, args, kwargs, out)
        return out

    def _to_rank_device(self, x):
        if not isinstance(x, torch.Tensor) or x.device == self.device or x.dim() == 0:
            return x
        if not is_fake(x):
            from torch._guards import active_fake_mode
            fake = active_fake_mode().from_tensor(x)
            self._set_shadow(fake, x)
            x = fake
        out = aten._to_copy.default(x, device=self.device)
        self._set_shadow(out, self.shadow(x))
        return out

    def _propagate(self, func, args, kwargs, out) -> None:
        outs = [t for t in tensors_in(out) if is_fake(t)]
        written = [t for t in tensors_in((args, kwargs)) if is_fake(t) and any(t is m for m in _mutated(func, args, kwargs))]
        small = all(t.numel() <= SHADOW_MAX_NUMEL for t in outs + written) and (outs or written)
        if not small:
            return
        if func in _EMPTY:  # no values to mirror (and a weakref on a fresh tensor would block to_empty's swap)
            return
        real = self._on_shadows(func, args, kwargs)
        if real is None:
            for t in written:
                self.shadows.pop(t, None)
            for t in outs:
                self.shadows.pop(t, None)
            return
        for f, r in zip(tensors_in(out), tensors_in(real)):
            if is_fake(f):
                self._set_shadow(f, r)

    # ---- values the host reads ------------------------------------------------------------------------------
    def _data_dependent_shape(self, *tensors) -> None:
        """An op whose output size depends on values (nonzero, boolean indexing, repeat_interleave without
        output_size) waits on the GPU for them: a host sync inside the op (unless DeviceGuardFree counted the call
        that issued it)."""
        if not self.audit.busy and any(t.is_cuda for t in tensors):
            self.audit.host_syncs[f"{where()} (data-dependent shape)"] += 1

    def _scalar(self, t: torch.Tensor):
        s = self.shadow(t)
        if s is not None:
            with unset_fake_temporarily():
                return s.item()
        self.audit.standins[f"value of a weight-dependent tensor at {where()}"] += 1
        return False if t.dtype == torch.bool else (0 if not t.dtype.is_floating_point else 0.0)

    def _nonzero(self, mask: torch.Tensor) -> torch.Tensor:
        self._data_dependent_shape(mask)
        s = self.shadow(mask)
        if s is None:  # all selected: the upper bound on what follows
            self.audit.standins[f"boolean selection taken whole at {where()}"] += 1
            with unset_fake_temporarily():
                s = torch.ones(mask.shape, dtype=torch.bool)
        with unset_fake_temporarily():
            real = torch.nonzero(s)
        return self._fake_like(real, mask.device)

    def _bool_indices(self, indices):
        """aten.index with boolean masks -> long indices (one per masked dim), sized from shadows."""
        if not any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return indices
        out = []
        for i in indices:
            if isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8):
                nz = self._nonzero(i)
                out += [self._call(aten.select.int, (nz, 1, d), {}) for d in range(i.dim())]
            else:
                out.append(i)
        return out

    def _bincount(self, x, weights=None, minlength=0):
        s = self.shadow(x)
        if s is not None and weights is None:
            with unset_fake_temporarily():
                real = torch.bincount(s, minlength=minlength)
        else:  # routing counts: balanced over the bins
            self.audit.standins[f"balanced counts at {where()}"] += 1
            n, m = x.numel(), max(minlength, 1)
            with unset_fake_temporarily():
                real = torch.full((m,), n // m, dtype=torch.long)
                real[: n % m] += 1
        return self._fake_like(real, x.device)

    # ---- collectives ----------------------------------------------------------------------------------------
    def _group(self, args) -> tuple[str, int]:
        for a in args:
            if isinstance(a, torch.ScriptObject) and "ProcessGroup" in str(a._type()):
                pg = dist.ProcessGroup.unbox(a)
                if pg.group_name not in self.groups:  # a group of the engine's own (megatron): name it by its ranks
                    ranks = tuple(dist.get_process_group_ranks(pg))
                    self.groups[pg.group_name] = self.groups.get(ranks, "ranks" + ",".join(map(str, ranks[:4])) +
                                                                 (",..." if len(ranks) > 4 else ""))
                return self.groups[pg.group_name], pg.size()
        return "world", dist.get_world_size()

    def _collective(self, func, args, kwargs):
        name = func._schema.name.split("::")[-1].rstrip("_")
        label, size = self._group(args)
        tensors = tensors_in(args)
        if name not in _NO_DEVICE_CHECK:
            bad = [t for t in tensors if t.device != self.device]
            if bad:
                self._violation(f"collective {name} on {label}",
                                f"tensor on {bad[0].device}, the rank's device is {self.device}")
            stat = self.audit.collectives[f"{label}:{name}"]
            stat["calls"] += 1
            stat["bytes"] += max(_nbytes(args[0]), _nbytes(args[1]) if len(args) > 1 else 0)
        try:
            out = func(*args, **kwargs)
        except UnsupportedOperatorException:  # the coalesced ops have no fake kernel in torch (others do)
            from torch.distributed._meta_registrations import create_fakework
            out = create_fakework(args, return_first_arg=len(func._schema.returns) == 2)
        self._collective_shadows(name, args, size)
        return out

    def _collective_shadows(self, name: str, args, size: int) -> None:
        """Every rank of a balanced step holds the same values: all-reduce(sum) scales, gathers repeat, all-to-all
        returns what was sent."""
        with unset_fake_temporarily():
            if name == "allreduce":
                op = str(args[2]) if len(args) > 2 else ""
                for t in tensors_in(args[0]):
                    s = self.shadows.get(t)
                    if s is not None and "SUM" in op.upper():
                        s.mul_(size)
            elif name in ("alltoall_base", "_allgather_base", "allgather_into_tensor_coalesced"):
                src, dst = self.shadow(args[1]), args[0]
                if isinstance(dst, torch.Tensor) and src is not None:
                    self._set_shadow(dst, src.reshape(-1).repeat(dst.numel() // max(src.numel(), 1)).view(dst.shape))
            elif name == "allgather":
                src = [self.shadow(t) for t in tensors_in(args[1])]
                for outs in args[0]:
                    for o, s in zip(outs, src):
                        if s is not None:
                            self._set_shadow(o, s.clone())

    def _violation(self, what: str, detail: str) -> None:
        self.audit.violations.append({"what": what, "detail": detail, "where": where()})
