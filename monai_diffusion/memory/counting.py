"""Counting memory without allocating it: what autograd saves, what is alive at once, and the GPU margin.

The real modules run on fake tensors (PyTorch's ``FakeTensorMode``: meta-device storage, so shapes and
dtypes only and no data, while the tensors still look like CPU tensors so autocast applies).
:func:`count_saved` records, through ``torch.autograd.graph.saved_tensors_hooks``, every tensor autograd
keeps for backward, each storage once, attributed to the block that saved it. :class:`LiveBytes` counts
every storage from its creation to its release, for passes without autograd.

Mixed precision follows the target's autocast rules: the fake tensors are CPU tensors, so CPU autocast
runs, and for ``target="cuda"`` :class:`CudaAutocastRules` adds the ops CUDA autocast keeps in float32
(GroupNorm, LayerNorm, softmax, exp, pow, sum, the losses, ...).

What no count sees on a GPU is kept as a stated margin (:func:`with_margin`). Inside torch's caching
allocator: ``FRAGMENTATION`` (what it reserves beyond what it has allocated) and ``WORKSPACE_BYTES``
(cuDNN's convolution and cuBLAS's workspaces, which it allocates through the same allocator but the count
does not see); outside it: ``CUDA_CONTEXT_BYTES`` (the CUDA context and the loaded kernels).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["GB", "FRAGMENTATION", "WORKSPACE_BYTES", "CUDA_CONTEXT_BYTES", "CUDA_RESERVED_BYTES", "with_margin",
           "margin_text", "format_bytes", "SavedTensors", "count_saved", "CUDA_FP32_OPS",
           "CUDA_FP32_UNLESS_DTYPE_OPS", "CudaAutocastRules", "LiveBytes", "PhaseEstimate"]

GB = 1e9


FRAGMENTATION = 0.10  # the caching allocator reserves typically 5-20 % more than it has allocated


WORKSPACE_BYTES = 0.25e9  # cuDNN convolution + cuBLAS workspaces: through the caching allocator, unseen by the count


CUDA_CONTEXT_BYTES = 0.5e9  # the CUDA context and loaded kernels (~0.3-0.5 GB): outside the caching allocator


CUDA_RESERVED_BYTES = WORKSPACE_BYTES + CUDA_CONTEXT_BYTES  # the fixed part of the margin


def with_margin(estimate_bytes: float) -> float:
    """What an estimated step needs of a GPU's memory: on top of the estimate, the caching allocator's
    fragmentation and the cuDNN/cuBLAS workspaces it also holds, and the CUDA context outside it."""
    return estimate_bytes * (1 + FRAGMENTATION) + CUDA_RESERVED_BYTES


def margin_text() -> str:
    """What :func:`with_margin` adds, in words."""
    return (f"estimate x {1 + FRAGMENTATION:.2f} (caching allocator) + {format_bytes(WORKSPACE_BYTES)} (cuDNN/cuBLAS "
            f"workspaces, allocated through it) + {format_bytes(CUDA_CONTEXT_BYTES)} (CUDA context, outside it)")


def format_bytes(count: float) -> str:
    """Human-readable bytes (decimal units, as GPU vendors quote memory)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count:.0f} B"


@dataclass
class SavedTensors:
    """Storages kept for backward, each counted once, with the name of the block that saved it first."""

    owners: dict[int, tuple[str, int]] = field(default_factory=dict)  # storage id -> (block, bytes)
    largest_numel: int = 0  # elements of the largest tensor produced by a tracked block

    @property
    def total(self) -> int:
        return sum(size for _, size in self.owners.values())

    def by_block(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for block, size in self.owners.values():
            out[block] = out.get(block, 0) + size
        return out


@contextlib.contextmanager
def count_saved(
    blocks: dict[str, nn.Module], exclude: tuple[nn.Module, ...] = (), fake: bool = False
) -> Iterator[SavedTensors]:
    """Record what autograd saves inside the ``with``; ``blocks`` name the modules to attribute it to.

    Storages of the parameters of ``exclude`` are not counted (they exist anyway and are counted as
    parameters); cast copies of them made by autocast are counted. With ``fake`` (FakeTensorMode), the
    GroupNorm statistics saved in bf16/fp16 are counted as float32: PyTorch's fake kernel reports them in
    the input's dtype while the CPU kernel keeps them in float32.
    """
    record = SavedTensors()
    stack: list[str] = ["other"]
    handles = []
    for name, module in blocks.items():
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: stack.append(n)))

        def done(m, a, out, n=name):
            stack.pop()
            if isinstance(out, torch.Tensor):
                record.largest_numel = max(record.largest_numel, out.numel())

        handles.append(module.register_forward_hook(done))

    skip = {p.untyped_storage()._cdata for module in exclude for p in module.parameters()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in skip:
            size = storage.nbytes()
            if (fake and tensor.dtype in (torch.bfloat16, torch.float16) and tensor.dim() == 2
                    and type(tensor.grad_fn).__name__ == "NativeGroupNormBackward0"):
                size *= 2
            record.owners.setdefault(storage._cdata, (stack[-1], size))
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield record
    finally:
        for handle in handles:
            handle.remove()


# CUDA autocast's float32 policies, by the Python name an op is reached through: torch's
# aten/src/ATen/autocast_mode.h, AT_FORALL_FP32 (inputs cast to float32) ...

CUDA_FP32_OPS = frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm", "native_layer_norm", "group_norm",
    "norm", "nuclear_norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss",
    "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
    "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
})


# ... and AT_FORALL_FP32_SET_OPT_DTYPE (run in float32 unless the call names a dtype)
CUDA_FP32_UNLESS_DTYPE_OPS = frozenset({"prod", "softmax", "log_softmax", "cumprod", "cumsum", "sum",
                                        "vector_norm", "matrix_norm"})
_LOWER = (torch.bfloat16, torch.float16)


class CudaAutocastRules(TorchFunctionMode):
    """Inside CPU autocast (which is what runs on the estimator's fake tensors), run the ops that CUDA
    autocast keeps in float32 in float32, as a GPU would: their bf16/fp16 tensor inputs are cast to float32
    and autocast is off for the op, so its output, and what autograd saves from it, is float32."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (TorchFunctionMode's API)
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        upcast = name in CUDA_FP32_OPS or (name in CUDA_FP32_UNLESS_DTYPE_OPS and kwargs.get("dtype") is None)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if not (upcast and torch.is_autocast_enabled("cpu") and any(t.dtype in _LOWER for t in tensors)):
            return func(*args, **kwargs)

        def to_float(value: Any) -> Any:
            return value.float() if isinstance(value, torch.Tensor) and value.dtype in _LOWER else value

        with torch.autocast("cpu", enabled=False):
            return func(*[to_float(a) for a in args], **{k: to_float(v) for k, v in kwargs.items()})


@contextlib.contextmanager
def _autocast(enabled: bool, target: str = "cpu") -> Iterator[None]:
    """Autocast as on ``target``. The fake tensors look like CPU tensors, so CPU autocast is what runs;
    for ``cuda``, :class:`CudaAutocastRules` adds CUDA autocast's float32 ops (GroupNorm, LayerNorm,
    softmax, exp, pow, sum, ...)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
        with CudaAutocastRules() if enabled and target == "cuda" else contextlib.nullcontext():
            yield


class LiveBytes(TorchDispatchMode):
    """The most bytes of tensor storage alive at once while the ``with`` runs (``peak``; ``now`` for the
    current level). Every storage an operation creates is counted once, from its creation until it is
    freed; views and in-place results add nothing. Storages created inside :meth:`uncounted` are left out
    (e.g. buffers that live in host memory while the network computes on the device)."""

    def __init__(self) -> None:
        super().__init__()
        self.now = self.peak = 0
        self._live: dict[int, int] = {}  # storage id -> bytes counted
        self._counting = True

    @contextlib.contextmanager
    def uncounted(self) -> Iterator[None]:
        self._counting, before = False, self._counting
        try:
            yield
        finally:
            self._counting = before

    def _freed(self, key: int) -> None:
        self.now -= self._live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (TorchDispatchMode's API)
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)  # the storage's Python object lives exactly as long as the storage
            if key in self._live:
                continue
            # a view or in-place result of a tensor made before the ``with`` (weights, inputs): not new memory
            size = storage.nbytes() if self._counting and key not in inputs else 0
            self._live[key] = size
            self.now += size
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._freed, key)
        return out


@dataclass
class PhaseEstimate:
    """One phase of the pipeline: what the device holds at its peak, and the host memory it needs."""

    name: str
    detail: str
    device_bytes: int
    host_bytes: int = 0
