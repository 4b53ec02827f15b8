# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""Where the exact method keeps its full-size activations, and how blocks travel to and from them.

Kinds (``buffers=``):

* ``"device"``: on the compute device (fastest when they fit);
* ``"cpu"``: host memory, pinned when computing on CUDA. Blocks travel through small contiguous pinned
  staging tensors with asynchronous copies: a block read from the buffers is gathered into staging and
  copied up with ``non_blocking=True``; a computed block is copied down on a side stream while the next
  block computes, and scattered into the buffer when that copy is done (before the layer ends);
* ``"disk"``: memory-mapped scratch files in the temporary directory, unlinked at once (host memory is then
  the operating system's page cache), with the same staging;
* ``"auto"``: on CUDA, the whole volume at once (no tiling) when it fits the free device memory, else
  ``"device"`` when the buffers fit, else ``"cpu"`` (see :func:`choose_buffers`); off CUDA, ``"cpu"``.

An ``allocator`` (see :class:`BufferRequest`) can wrap every buffer allocation, e.g. to count it.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["BUFFER_KINDS", "BufferRequest", "BufferStore", "Transfers", "choose_buffers", "free_device_bytes",
           "side_stream", "buffer_dtype", "WHOLE_VOLUME_FACTOR", "USABLE_FRACTION"]

BUFFER_KINDS = ("auto", "device", "cpu", "disk")
# whole-volume inference keeps up to five full-size activations of a residual block alive (its input, the
# GroupNorm and SiLU outputs, the convolution's output, the block's output) where the streamer keeps three
# (input, inner activation, output): 5/3, rounded up to 2 for cuDNN workspaces
WHOLE_VOLUME_FACTOR = 2.0
# the part of the free device memory a choice may plan to use: the rest is for the blocks' working tensors
# (input region with halo, its normalised copy, the convolution's output) and the allocator's rounding
USABLE_FRACTION = 0.9


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA ``device`` (``torch.cuda.mem_get_info``); ``None`` when it cannot be asked (no
    CUDA device: a CPU, or fake CUDA tensors in a test, which replaces this function)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def side_stream(device: torch.device) -> torch.cuda.Stream | None:
    """A CUDA stream for copies beside the compute stream; ``None`` off CUDA (or without a CUDA runtime)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.Stream(device)


def buffer_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype activations are kept in: autocast's lower precision when it is on for ``device`` and
    ``dtype`` is a float32 (the convolutions return it then), else ``dtype``."""
    if dtype == torch.float32 and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def choose_buffers(requested: str, device: torch.device, buffer_bytes: int, io_bytes: int, batch: int = 1) -> str:
    """``"whole"`` (no tiling), ``"device"``, ``"cpu"`` or ``"disk"``: ``requested`` unless it is ``"auto"``.

    Args:
        requested: one of ``BUFFER_KINDS``.
        device: the compute device.
        buffer_bytes: the most bytes the exact method's buffers hold at once for one sample (see
            ``exact.buffer_peak``; the samples of a batch are streamed one after the other).
        io_bytes: the input and output of the whole batch, on the device.
        batch: samples (whole-volume inference runs them at once).
    """
    if requested != "auto":
        return requested
    free = free_device_bytes(device)
    if free is None:
        return "cpu"
    usable = free * USABLE_FRACTION
    if WHOLE_VOLUME_FACTOR * buffer_bytes * batch + io_bytes <= usable:
        return "whole"
    if buffer_bytes + io_bytes <= usable:
        return "device"
    return "cpu"


@dataclass
class BufferRequest:
    """One full-size buffer to allocate: ``allocate()`` makes it as ``where`` says."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    where: str
    device: torch.device

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def allocate(self) -> torch.Tensor:
        """An uninitialised tensor (every voxel is written before it is read)."""
        if self.where == "disk":
            return _disk_tensor(self.shape, self.dtype, self.nbytes)
        if self.where == "cpu":
            return torch.empty(self.shape, dtype=self.dtype, pin_memory=self.device.type == "cuda")
        return torch.empty(self.shape, dtype=self.dtype, device=self.device)


Allocator = Callable[[BufferRequest], torch.Tensor]


def _disk_tensor(shape: tuple[int, ...], dtype: torch.dtype, nbytes: int) -> torch.Tensor:
    handle, path = tempfile.mkstemp(prefix="tiling-", suffix=".bin")
    try:
        os.ftruncate(handle, max(nbytes, 1))
        array = np.memmap(path, dtype=np.uint8, mode="r+", shape=(max(nbytes, 1),))
    finally:
        os.close(handle)
        os.unlink(path)  # the mapping keeps the data until the tensor is freed
    return torch.from_numpy(array)[:nbytes].view(dtype).reshape(shape)


class BufferStore:
    """Allocates the full-size activations between layers and tracks the bytes held (``bytes``,
    ``peak_bytes``).

    Args:
        where: ``"device"``, ``"cpu"`` or ``"disk"``.
        device: the compute device.
        allocator: called with a :class:`BufferRequest` for every buffer (default: ``request.allocate()``).
    """

    def __init__(self, where: str, device: torch.device, allocator: Allocator | None = None) -> None:
        self.where, self.device = where, device
        self.allocator = allocator
        self.bytes = self.peak_bytes = 0

    def new(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        request = BufferRequest(tuple(shape), dtype, self.where, self.device)
        tensor = request.allocate() if self.allocator is None else self.allocator(request)
        self.bytes += request.nbytes
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        return tensor

    def release(self, tensor: torch.Tensor) -> None:
        self.bytes -= tensor.numel() * tensor.element_size()


def copy(destination: torch.Tensor, source: torch.Tensor, non_blocking: bool = False) -> None:
    """``destination.copy_(source)`` through the aten op (Python's ``Tensor.copy_`` enters a device guard, which
    needs a CUDA build: fake CUDA tensors in tests would fail there, not in the copy)."""
    torch.ops.aten.copy_.default(destination, source, non_blocking)


class Transfers:
    """Copies between the compute device and the buffers: direct when both are on one device, else through
    contiguous pinned staging with asynchronous copies (see the module docstring)."""

    # computed blocks whose copy down may still run when the next one starts
    IN_FLIGHT = 2

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.staged = device.type == "cuda"
        self.stream = side_stream(device) if self.staged else None
        self.pending: deque[tuple[torch.Tensor, torch.Tensor, object]] = deque()

    def fetch(self, destination: torch.Tensor, part: torch.Tensor) -> None:
        """``destination`` (on the device) <- ``part`` (a region of a buffer)."""
        if not self.staged or part.device == destination.device:
            copy(destination, part)
            return
        staging = torch.empty(part.shape, dtype=part.dtype, pin_memory=True)
        copy(staging, part)  # gathers the strided region into contiguous memory
        copy(destination, staging, non_blocking=True)  # the host allocator keeps staging until the copy ran

    def store(self, destination: torch.Tensor, block: torch.Tensor) -> bool:
        """``destination`` (a region of a buffer) <- ``block`` (on the device), complete after :meth:`flush`.
        Returns whether a copy may still read ``block`` (then it must not be overwritten)."""
        if not self.staged or destination.device == block.device:
            copy(destination, block)
            return False
        event = None
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                staging = torch.empty(block.shape, dtype=block.dtype, pin_memory=True)
                copy(staging, block, non_blocking=True)
                block.record_stream(self.stream)  # the block's memory is not reused before the copy ran
                event = torch.cuda.Event()
                event.record(self.stream)
        else:  # fake CUDA tensors: no stream to wait for
            staging = torch.empty(block.shape, dtype=block.dtype, pin_memory=True)
            copy(staging, block, non_blocking=True)
        self.pending.append((destination, staging, event))
        while len(self.pending) > self.IN_FLIGHT:
            self._land()
        return True

    def _land(self) -> None:
        destination, staging, event = self.pending.popleft()
        if event is not None:
            event.synchronize()  # type: ignore[attr-defined]
        copy(destination, staging)

    def flush(self) -> None:
        """Finish every copy down (before a buffer is read)."""
        while self.pending:
            self._land()
