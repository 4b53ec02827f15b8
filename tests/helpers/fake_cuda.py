"""GPU tensors on a machine without a GPU, for tests of the code paths only a GPU takes.

Two stand-ins, both refusing an operation that mixes a GPU tensor with a CPU tensor, as CUDA does:

- :func:`fake_cuda`: torch's ``FakeTensorMode`` with ``cuda:0`` tensors (a device and a shape, no values),
  under CUDA autocast. A CPU-only build of torch cannot record autograd for CUDA tensors (it aborts the
  process), so parameters moved there do not require gradients: for inference, sampling, tiling, the
  latent cache, resume loading and optimiser steps with given gradients.
- :func:`meta_gpu`: the ``meta`` device (shapes, no values, full autograd) for the training steps; the
  precision is CUDA's (autocast context, fp16 ``GradScaler``), though autocast casts only CUDA tensors.

What a CPU-only build cannot do is filled in, without changing what the code under test does:

- copying to ``cuda`` (``Tensor.to``, ``Module.to``): a fake CUDA tensor of the same shape and dtype;
- ``torch.cuda.is_available`` / ``get_device_capability`` / memory counters: a Hopper GPU;
- the host synchronisations, which need values (``item``, ``bool``, ``float``, ``tolist`` of a tensor
  without values): answered with zeros ("all finite", "no overflow") and counted, so a test can bound
  the synchronisations per optimiser step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode

__all__ = ["FakeCuda", "fake_cuda", "meta_gpu", "CUDA", "META"]

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
            return np.zeros(tuple(args[0].shape)).tolist() if func is torch.Tensor.tolist else _SYNCS[func]
        if self.copies and func in (torch.Tensor.to, torch.Tensor.cuda):
            device, dtype = _target(args[1:], kwargs)
            if func is torch.Tensor.cuda:
                device = CUDA
            if device is not None and device.type == "cuda" and args[0].device.type != "cuda":
                out = _fake_copy(args[0], dtype)
                return out.requires_grad_(args[0].requires_grad) if args[0].is_leaf else out
        return func(*args, **kwargs)


def _without_values(tensor: torch.Tensor) -> bool:
    """A tensor on the stand-in GPU (CPU scalars, e.g. Adam's step, keep the values FakeTensorMode tracks)."""
    return tensor.device.type in ("cuda", "meta")


def _module_to(original):  # noqa: ANN001, ANN202
    def to(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is None or device.type != "cuda":
            return original(self, *args, **kwargs)
        for module in self.modules():  # parameters replaced in place (fake tensors cannot be swapped)
            for name, param in module._parameters.items():
                if param is not None and param.device.type != "cuda":
                    # no autograd on CUDA in a CPU build (see the module docstring)
                    module._parameters[name] = nn.Parameter(_fake_copy(param, dtype if param.is_floating_point()
                                                                       else None), requires_grad=False)
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.device.type != "cuda":
                    module._buffers[name] = _fake_copy(buffer, dtype if buffer.is_floating_point() else None)
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


@contextlib.contextmanager
def fake_cuda(monkeypatch: Any) -> Iterator[FakeCuda]:
    """Run the ``with`` body with fake CUDA tensors (see the module docstring); ``monkeypatch``: pytest's."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    seen = FakeCuda(mode)
    _hopper(monkeypatch)
    monkeypatch.setattr(nn.Module, "to", _module_to(nn.Module.to))
    tolist = FakeTensor.tolist  # FakeTensor's own reads the values one item() at a time: one sync in truth

    def one_sync(self: torch.Tensor) -> Any:
        if not _without_values(self):
            return tolist(self)
        seen.syncs += 1
        return np.zeros(tuple(self.shape)).tolist()

    monkeypatch.setattr(FakeTensor, "tolist", one_sync)
    with mode, _GpuStandIn(seen, copies=True):
        yield seen


@contextlib.contextmanager
def meta_gpu(monkeypatch: Any) -> Iterator[FakeCuda]:
    """Run the ``with`` body with the ``meta`` device as the GPU (see the module docstring)."""
    seen = FakeCuda()
    _hopper(monkeypatch)
    with _GpuStandIn(seen, copies=False):
        yield seen
