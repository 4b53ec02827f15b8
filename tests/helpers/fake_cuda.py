"""GPU tensors on a machine without a GPU, for tests of the code paths only a GPU takes.

Both stand-ins use torch's ``FakeTensorMode`` (tensors with a device and a shape, no values), which refuses
an operation that mixes a GPU tensor with a CPU tensor (``FakeTensorDeviceMismatchError``), as CUDA does:

- :func:`fake_cuda`: ``cuda:0`` tensors. A CPU-only build of torch refuses much of CUDA even on fake
  tensors (autograd aborts the process, indexing and copies raise), so this one serves optimiser steps with
  given gradients, where the device mix of optimiser state is the point.
- :func:`fake_gpu`: the ``meta`` device as the GPU: indexing, copies to and from host buffers and autograd
  all work, so whole training steps, sampling, tiling and the latent cache run. The precision is CUDA's
  (``Precision(..., CUDA)``: autocast context, fp16 ``GradScaler``); autocast casts only true CUDA
  tensors, so the dtypes inside the networks stay fp32.

What a CPU-only build cannot do is filled in, without changing what the code under test does:

- copying to ``cuda`` (``Tensor.to``, ``Module.to``): a fake CUDA tensor of the same shape and dtype;
- ``torch.cuda.is_available`` / ``get_device_capability`` / memory counters: a Hopper GPU;
- the host synchronisations, which need values (``item``, ``bool``, ``float``, ``tolist`` of a tensor
  without values): answered with zeros ("all finite", "no overflow") and counted, so a test can bound
  the synchronisations per optimiser step.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode

__all__ = ["FakeCuda", "fake_cuda", "fake_gpu", "CUDA", "META"]

CUDA = torch.device("cuda", 0)
META = torch.device("meta")


def _target(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.device | None, torch.dtype | None]:
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    for arg in args:
        if isinstance(arg, (str, torch.device)):
            device = arg
        elif isinstance(arg, torch.dtype):
            dtype = arg
        elif isinstance(arg, torch.Tensor):
            device, dtype = arg.device, arg.dtype
    return (torch.device(device) if device is not None else None), dtype


def _fake_copy(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return torch.empty_like(tensor, device=CUDA, dtype=dtype or tensor.dtype)


_SYNCS = {torch.Tensor.item: 0.0, torch.Tensor.__bool__: False, torch.Tensor.__float__: 0.0,
          torch.Tensor.__int__: 0, torch.Tensor.__index__: 0, torch.Tensor.tolist: None}


class _GpuStandIn(TorchFunctionMode):
    """Answers the host syncs of GPU tensors, which have no values here (zeros: "all finite", "no overflow"), counting
    them; with ``copies``, ``tensor.to("cuda")`` / ``tensor.cuda()`` of a CPU tensor gives a fake CUDA one."""

    def __init__(self, seen: FakeCuda, copies: bool) -> None:
        super().__init__()
        self.seen, self.copies = seen, copies

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's API)
        kwargs = kwargs or {}
        if func in _SYNCS and _without_values(args[0]):
            self.seen.syncs += 1
            return _zeros(func, args[0])
        if func in _SYNCS:  # a CPU tensor: its value if FakeTensorMode knows it (a constant), else zeros
            try:
                return func(*args, **kwargs)
            except DataDependentOutputException:
                return _zeros(func, args[0])
        if func is torch.Tensor.type and len(args) > 1 and str(args[1]).startswith("torch.meta."):
            # ``x.type(y.type())`` with ``y`` on the meta device (MONAI's adversarial loss does this)
            return args[0].to(getattr(torch, str(args[1]).split(".")[-1]).dtype)
        if self.copies and func in _CASTS:
            return _cast(func, args[0], args[1:], kwargs)
        return func(*args, **kwargs)


_CASTS = {torch.Tensor.to: None, torch.Tensor.cuda: None, torch.Tensor.cpu: None, torch.Tensor.float: torch.float32,
          torch.Tensor.half: torch.float16, torch.Tensor.bfloat16: torch.bfloat16, torch.Tensor.double: torch.float64,
          torch.Tensor.long: torch.int64}


def _cast(func: Any, tensor: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """A copy to or from ``cuda``, or a cast of a CUDA tensor, as a fake tensor of the target's device and
    dtype (a CPU build of torch refuses these copies even on fake tensors); other casts as torch does them."""
    device, dtype = _target(args, kwargs) if func is torch.Tensor.to else (None, _CASTS[func])
    if func is torch.Tensor.cuda:
        device = CUDA
    elif func is torch.Tensor.cpu:
        device = torch.device("cpu")
    device = device if device is not None else tensor.device
    dtype = dtype if dtype is not None else tensor.dtype
    if "cuda" not in (device.type, tensor.device.type) or (device == tensor.device and dtype == tensor.dtype):
        return func(tensor, *args, **kwargs)
    out = torch.empty_like(tensor, device=device, dtype=dtype)
    return out.requires_grad_(tensor.requires_grad) if tensor.is_leaf and dtype.is_floating_point else out


def _zeros(func: Any, tensor: torch.Tensor) -> Any:
    return np.zeros(tuple(tensor.shape)).tolist() if func is torch.Tensor.tolist else _SYNCS[func]


def _without_values(tensor: torch.Tensor) -> bool:
    """A tensor on the stand-in GPU (CPU scalars, e.g. Adam's step, keep the values FakeTensorMode tracks)."""
    return tensor.device.type in ("cuda", "meta")


def _module_to(original: Any, kind: str):  # noqa: ANN202
    """``Module.to(kind)`` replacing each parameter and buffer by a fake tensor there (fake parameters cannot
    be swapped in place); on ``cuda`` the parameters do not require gradients (see the module docstring)."""

    def to(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is None or device.type != kind:
            return original(self, *args, **kwargs)
        for module in self.modules():
            for name, param in module._parameters.items():
                if param is not None and param.device.type != kind:
                    copy = torch.empty_like(param, device=device, dtype=dtype if param.is_floating_point() else None)
                    module._parameters[name] = nn.Parameter(copy, requires_grad=param.requires_grad and kind != "cuda")
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.device.type != kind:
                    module._buffers[name] = torch.empty_like(buffer, device=device,
                                                             dtype=dtype if buffer.is_floating_point() else None)
        return self

    return to


@dataclass
class FakeCuda:
    """What a fake-GPU block saw: ``syncs`` counts the host synchronisations (``item``, ``bool``, ``float``,
    ``tolist`` ... of a tensor on the stand-in GPU)."""

    mode: FakeTensorMode | None = None
    syncs: int = 0


def _hopper(monkeypatch: Any) -> None:
    """A Hopper GPU as far as ``torch.cuda`` is asked."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)


def _mode() -> FakeTensorMode:
    """A fake mode without its dispatch cache (an entry left by an earlier test's mode crashed the process)."""
    FakeTensorMode.cache_clear()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    mode.cache_enabled = False
    return mode


def _one_sync_per_tolist(monkeypatch: Any, seen: FakeCuda) -> None:
    """FakeTensor's own ``tolist`` reads the values one ``item()`` at a time: one sync in truth."""
    tolist = FakeTensor.tolist

    def one_sync(self: torch.Tensor) -> Any:
        if _without_values(self):
            seen.syncs += 1
            return np.zeros(tuple(self.shape)).tolist()
        try:
            return tolist(self)
        except DataDependentOutputException:
            return np.zeros(tuple(self.shape)).tolist()

    monkeypatch.setattr(FakeTensor, "tolist", one_sync)


@contextlib.contextmanager
def fake_cuda(monkeypatch: Any) -> Iterator[FakeCuda]:
    """Run the ``with`` body with fake CUDA tensors (see the module docstring); ``monkeypatch``: pytest's."""
    mode = _mode()
    seen = FakeCuda(mode)
    _hopper(monkeypatch)
    monkeypatch.setattr(nn.Module, "to", _module_to(nn.Module.to, "cuda"))
    _one_sync_per_tolist(monkeypatch, seen)
    try:
        with mode, _GpuStandIn(seen, copies=True):
            yield seen
    finally:
        gc.collect()  # free this mode's fake tensors now: freed later, inside another mode, they crashed


@contextlib.contextmanager
def fake_gpu(monkeypatch: Any) -> Iterator[FakeCuda]:
    """Run the ``with`` body with fake tensors, the ``meta`` device standing in for the GPU (see the module
    docstring); use :data:`META` as the runtime's device and ``Precision(..., CUDA)`` for CUDA's precision."""
    mode = _mode()
    seen = FakeCuda(mode)
    _hopper(monkeypatch)
    monkeypatch.setattr(nn.Module, "to", _module_to(nn.Module.to, "meta"))
    _one_sync_per_tolist(monkeypatch, seen)
    for name in ("is_autocast_enabled", "get_autocast_dtype"):  # asked for the meta device: CUDA's answer
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *args, _f=original: _f(*("cuda" if a == "meta" else a for a in args)))
    try:
        with mode, _GpuStandIn(seen, copies=False):
            yield seen
    finally:
        gc.collect()  # free this mode's fake tensors now: freed later, inside another mode, they crashed


def run_in_fresh_process(code: str, timeout: float = 300) -> None:
    """Run ``code`` (a fake-GPU check) with this interpreter in a new process; AssertionError with its stderr
    when it fails.

    A process killed by a signal is run once more: copying a module whose parameters are fake tensors (the
    EMA's ``deepcopy``) makes torch read a fake tensor's data pointer, which torch itself warns is undefined
    behaviour, and one of about a dozen runs here crashed with SIGSEGV. A failure of the code under test (a device
    mismatch, a wrong dtype, a count) raises in Python and exits with 1: it is never retried.
    """
    import subprocess
    import sys

    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
        if result.returncode >= 0:
            break
    assert result.returncode == 0, f"exit code {result.returncode}:\n{result.stderr[-3000:]}"
