"""CPU proxies for two CUDA failure kinds (issue 35; the `device_proxy` tests use them):

- `ImplicitDevices`: a tensor that hld's code creates without naming a device (`torch.zeros(n)`)
  lands on the CPU when the data is on a GPU: a device mismatch, or a silent host round trip. The mode
  records every factory call (`torch.zeros`, `arange`, `tensor`, ...) made from a file of `src/hld`
  without a `device=`; torch's and transformers' own calls are theirs to get right.
- `HostSyncs`: what would stop the host until the GPU catches up, counted per kind: a scalar read
  (`.item()`, `float(t)`, `bool(t)`: aten._local_scalar_dense), an op whose output shape depends on
  the data (nonzero, masked_select, boolean indexing, unique, repeat_interleave without output_size)
  and a copy to the host (`.tolist()`, `.numpy()`, `.cpu()`, `.to("cpu")`). On a CPU every tensor is
  host memory, so the counter follows which tensors *would be* on the device: the modules' parameters
  and buffers, whatever is moved with `.to(PROXY_DEVICE)` (the run's device, `cpu:0`: a CPU device that
  names an index, so "to the device" and "to the host" differ) or created on it, and every op output
  with such an input. A sync on host data (the batch before it is moved, the cache's decoded arrays)
  costs nothing on a GPU and is not counted.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

import hld

PROXY_DEVICE = torch.device("cpu", 0)  # the run's device in the proxies: CPU memory, told apart from "cpu"
_HLD_SRC = str(Path(hld.__file__).resolve().parent)


def _hld_caller(direct: bool = False) -> str | None:
    """`file:line` of the nearest hld frame calling into torch, or None when the call is not hld's;
    `direct`: only when hld itself made the call (not torch code that hld called)."""
    f = sys._getframe(1)
    while f is not None and f.f_code.co_filename.endswith("proxies.py"):
        f = f.f_back
    while f is not None:
        name = f.f_code.co_filename
        if name.startswith(_HLD_SRC):
            return f"{Path(name).relative_to(Path(_HLD_SRC).parent)}:{f.f_lineno}"
        if name.endswith("proxies.py"):
            pass  # this module's other mode, between the op and its caller
        elif direct or "/torch/" not in name:
            return None  # a library's call (transformers, numpy, pytest): not ours to name a device for
        f = f.f_back
    return None


class ImplicitDevices(TorchFunctionMode):
    """Records (`sites`) each tensor factory call from hld's code without `device=`; `strict` raises."""

    def __init__(self, strict: bool = False) -> None:
        super().__init__()
        self.strict = strict
        self.sites: collections.Counter[str] = collections.Counter()
        self._constructors = _device_constructors()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._constructors and kwargs.get("device") is None:
            # hld's own calls: a module that torch builds (nn.Linear) on the default device and hld then
            # moves is the usual pattern, not an implicit device
            site = _hld_caller(direct=True)
            if site is not None:
                self.sites[f"{site} torch.{func.__name__}"] += 1
                if self.strict:
                    raise AssertionError(f"{site}: torch.{func.__name__} without device=")
        return func(*args, **kwargs)


_DATA_SHAPED = {
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten._unique2.default,
    torch.ops.aten.unique_dim.default,
    torch.ops.aten.unique_consecutive.default,
}
_TO_HOST = {"tolist", "numpy", "cpu"}


def _is_device(d) -> bool:
    return isinstance(d, (torch.device, str)) and torch.device(d) == PROXY_DEVICE


class _Taint(TorchDispatchMode):
    """Marks op outputs as device data when an input is; counts the syncs the dispatcher sees."""

    def __init__(self, owner: HostSyncs) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = any(self.owner.on_device(t) for t in inputs)
        if on_device:
            self.owner.count_dispatch(func, args, kwargs)
        out = func(*args, **kwargs)
        if on_device or _is_device(kwargs.get("device")):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.owner.mark(t)
        return out


class _Moves(TorchFunctionMode):
    """`.to(PROXY_DEVICE)` returns a marked copy; `.tolist()`, `.numpy()`, `.cpu()`, `.to("cpu")` of device
    data count as copies to the host."""

    def __init__(self, owner: HostSyncs) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("to", "cuda") and args and isinstance(args[0], torch.Tensor):
            target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (torch.device, str))), None))
            if _is_device(target):
                out = func(*args, **kwargs)
                out = out.clone() if out is args[0] else out  # a move, not the same host tensor
                self.owner.mark(out)
                return out
            if target is not None and torch.device(target).type == "cpu" and self._counted(args[0]):
                self.owner.add("to_host", "to(cpu)")
        elif name in _TO_HOST and args and isinstance(args[0], torch.Tensor) and self._counted(args[0]):
            self.owner.add("to_host", name)
        return func(*args, **kwargs)

    def _counted(self, t: torch.Tensor) -> bool:
        """A move of device data to the host by hld's code. torch's own `.to(other.device)` (clip_grad_norm_
        gathering norms onto the first gradient's device) moves device to device on a GPU: not counted."""
        return self.owner.on_device(t) and _hld_caller(direct=True) is not None


class HostSyncs:
    """`with HostSyncs(modules) as h: ...`; `h.counts` by kind, `h.sites` by kind and op."""

    def __init__(self, *modules: torch.nn.Module | None) -> None:
        self._device_data: WeakIdKeyDictionary = WeakIdKeyDictionary()
        for m in modules:
            if m is not None:
                for t in [*m.parameters(), *m.buffers()]:
                    self.mark(t)
        self.counts: collections.Counter[str] = collections.Counter()
        self.sites: collections.Counter[str] = collections.Counter()
        self._modes = (_Moves(self), _Taint(self))

    def mark(self, t: torch.Tensor) -> None:
        self._device_data[t] = True

    def on_device(self, t: torch.Tensor) -> bool:
        return t in self._device_data or (t._base is not None and t._base in self._device_data)

    def add(self, kind: str, what: str) -> None:
        self.counts[kind] += 1
        self.sites[f"{kind}: {what} at {_hld_caller() or 'torch/library'}"] += 1

    def count_dispatch(self, func, args, kwargs) -> None:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.add("item", "item")
        elif func in _DATA_SHAPED:
            self.add("data_shape", str(func))
        elif func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default):
            idx = args[1] if len(args) > 1 else []
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx):
                self.add("data_shape", "boolean indexing")
        elif func is torch.ops.aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.add("data_shape", "repeat_interleave")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> HostSyncs:
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
