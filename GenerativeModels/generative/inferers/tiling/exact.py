# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""The exact method: a :class:`~.steps.TilingPlan` run layer by layer over non-overlapping blocks with halos.

GroupNorm is the only part of the network that looks at the whole volume (besides attention): with every
GroupNorm's whole-volume statistics fixed, each convolution is purely local, so an output block needs only
the input block plus the convolution's halo. Each step runs over non-overlapping output blocks into a
full-size buffer, merging the per-channel moments block by block (Chan et al.) for the next GroupNorm; a
buffer is released once the steps that read it are done, so at most three full-size activations exist at
once. Tiled and whole-volume inference agree up to float rounding. See ``docs/tiling.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import product

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from generative.inferers.tiling.buffers import BufferStore, Transfers, buffer_dtype
from generative.inferers.tiling.layout import region
from generative.inferers.tiling.steps import (
    ConvStep,
    DownsampleStep,
    GlobalStep,
    ResidualStep,
    Step,
    TilingPlan,
    UpsampleStep,
)

__all__ = ["exact_encode", "exact_decode", "buffer_peak"]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
Bounds = tuple[Sequence[int], Sequence[int]]  # (low, high) per spatial axis, high exclusive


class Moments:
    """Per-channel voxel count, mean and sum of squared deviations of an activation, block by block.

    Each block's moments come from torch's GroupNorm kernel with one group per channel (a vectorised,
    numerically stable one-pass reduction); blocks are merged in float64 with Chan, Golub and LeVeque's
    update, so the error does not grow with the number of blocks."""

    def __init__(self, channels: int, device: torch.device) -> None:
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float64, device=device)
        self.squares = torch.zeros(channels, dtype=torch.float64, device=device)

    def add(self, block: torch.Tensor, keep: bool = False) -> None:
        """Merge a contiguous float32 1xCx[BLOCK DIMS] block; it is overwritten (GroupNorm's output goes there)
        unless ``keep``."""
        channels, count = block.shape[1], block.shape[2:].numel()
        mean, rstd = block.new_empty(1, channels), block.new_empty(1, channels)
        torch.ops.aten.native_group_norm.out(block, None, None, 1, channels, count, channels, 0.0,
                                             out0=torch.empty_like(block) if keep else block, out1=mean, out2=rstd)
        mean, var = mean.reshape(-1).double(), rstd.reshape(-1).double().pow(-2)  # rstd = inf for a constant channel
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * (count / total)
        self.squares += var * count + delta.pow(2) * (self.count * count / total)
        self.count = total

    def groups(self, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (biased) variance of each group of consecutive channels, float64."""
        means = self.mean.reshape(num_groups, -1)
        mean = means.mean(1)
        squares = self.squares.reshape(num_groups, -1).sum(1) + self.count * (means - mean.unsqueeze(1)).pow(2).sum(1)
        return mean, squares / (self.count * means.shape[1])


@dataclass
class Activation:
    """A full-size activation (1xCx[SPATIAL DIMS]) and, once complete, its per-channel moments."""

    data: torch.Tensor
    moments: Moments | None = None
    owned: bool = True  # False for the caller's tensors, which are never released


def _normaliser(norm: nn.GroupNorm, source: Activation, silu: bool) -> Callable[[torch.Tensor], None]:
    """In-place GroupNorm of a block of ``source`` with ``source``'s whole-volume statistics (+ SiLU).

    Like torch's own GroupNorm kernel it applies one scale and shift per channel,
    ``x * (rstd * weight) + (bias - mean * rstd * weight)``."""
    if source.moments is None:
        raise RuntimeError("tiling: an activation read by a GroupNorm has no statistics")
    mean, var = source.moments.groups(norm.num_groups)
    per_group = norm.num_channels // norm.num_groups
    scale = torch.rsqrt(var + norm.eps).repeat_interleave(per_group)
    shift = torch.zeros_like(scale)
    if norm.affine:
        scale, shift = scale * norm.weight.double(), norm.bias.double()
    shift = shift - mean.repeat_interleave(per_group) * scale
    shape = (1, -1) + (1,) * (source.data.dim() - 2)
    scale, shift = scale.reshape(shape), shift.reshape(shape)

    def apply(block: torch.Tensor) -> None:  # block: 1xCx[BLOCK DIMS], normalised in place
        block.mul_(scale.to(block)).add_(shift.to(block))
        if silu:
            F.silu(block, inplace=True)

    return apply


class _Reader:
    """Reads regions of full-size activations onto the compute device (through ``transfers``)."""

    def __init__(self, device: torch.device, transfers: Transfers) -> None:
        self.device, self.transfers = device, transfers

    def read(self, source: torch.Tensor, low: Sequence[int], high: Sequence[int],
             pre: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """``source[..., low:high]`` as a new tensor on the device, zeros where the region leaves ``source``;
        ``pre`` (in place) sees only the part inside, as a zero-padded layer would. A normalised block is
        float32 (GroupNorm under autocast computes in float32, as whole-volume inference does)."""
        size = source.shape[2:]
        inside_low = [max(lo, 0) for lo in low]
        inside_high = [min(hi, n) for hi, n in zip(high, size)]
        part = region(source, inside_low, inside_high)
        dtype = torch.float32 if pre is not None and part.dtype in (torch.float16, torch.bfloat16) else part.dtype
        block = torch.empty((*part.shape[:2], *(hi - lo for lo, hi in zip(low, high))), dtype=dtype,
                            device=self.device)
        view = region(block, [a - lo for a, lo in zip(inside_low, low)], [b - lo for b, lo in zip(inside_high, low)])
        self.transfers.fetch(view, part)
        for axis, (a, b, lo, hi) in enumerate(zip(inside_low, inside_high, low, high), start=2):  # beyond the volume
            block.narrow(axis, 0, a - lo).zero_()
            block.narrow(axis, b - lo, hi - b).zero_()
        if pre is not None:
            pre(view)
        return block

    def conv(self, conv: nn.Module, source: torch.Tensor, low: Sequence[int], high: Sequence[int],
             pre: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Output ``[low, high)`` of ``conv`` applied to ``pre(source)`` (zero padded), exactly."""
        (region_low, region_high), padding = _conv_input(conv, low, high, source.shape[2:])
        return _run_conv(conv, self.read(source, region_low, region_high, pre), padding)

    def upsample(self, step: UpsampleStep, source: torch.Tensor, low: Sequence[int],
                 high: Sequence[int]) -> torch.Tensor:
        """Output ``[low, high)`` of an upsampling step (interpolation + convolution).

        The convolution's input region of the upsampled volume is built from the low-resolution region that
        covers it, with zeros where it leaves the upsampled volume (the convolution's zero padding).
        Nearest: upsampled voxel ``i`` is source voxel ``i // scale``. Trilinear: the source region gets one
        more voxel each side (the interpolation's neighbours; at the volume's edge a copy of the edge voxel,
        which is what clamping the source coordinate gives), is interpolated as a whole and the wanted part
        is cut out: the source coordinate ``(i + 0.5) / scale - 0.5`` is the same in the region's frame."""
        conv, scale, device = step.conv, step.scale, self.device
        size = [n * s for n, s in zip(source.shape[2:], scale)]
        (need_low, need_high), padding = _conv_input(conv, low, high, size)
        if step.mode == "nearest":
            source_low = [lo // s for lo, s in zip(need_low, scale)]
            block = self.read(source, source_low, [-(-hi // s) for hi, s in zip(need_high, scale)])
            for axis, (lo, hi, first, s) in enumerate(zip(need_low, need_high, source_low, scale), start=2):
                if s > 1:
                    block = block.index_select(axis, torch.arange(lo, hi, device=device) // s - first)
            return _run_conv(conv, block, padding)
        inside_low = [min(max(lo, 0), n) for lo, n in zip(need_low, size)]
        inside_high = [max(min(hi, n), lo) for hi, n, lo in zip(need_high, size, inside_low)]
        halo_low = [lo // s - 1 for lo, s in zip(inside_low, scale)]
        halo_high = [-(-hi // s) + 1 for hi, s in zip(inside_high, scale)]
        read_low = [max(lo, 0) for lo in halo_low]
        read_high = [min(hi, n) for hi, n in zip(halo_high, source.shape[2:])]
        block = self.read(source, read_low, read_high)
        for axis, (lo, hi, first, last) in enumerate(zip(halo_low, halo_high, read_low, read_high), start=2):
            block = block.index_select(axis, torch.arange(lo, hi, device=device).clamp(first, last - 1) - first)
        up = region(step.interpolate(block), [lo - h * s for lo, h, s in zip(inside_low, halo_low, scale)],
                    [hi - h * s for hi, h, s in zip(inside_high, halo_low, scale)])
        pad = [w for lo, hi, ilo, ihi in reversed(list(zip(need_low, need_high, inside_low, inside_high)))
               for w in (ilo - lo, hi - ihi)]
        return _run_conv(conv, F.pad(up, pad), padding)


def _conv_input(
    conv: nn.Module, low: Sequence[int], high: Sequence[int], size: Sequence[int]
) -> tuple[Bounds, list[int]]:
    """The input region that output ``[low, high)`` of ``conv`` reads from an input of spatial ``size``,
    and the padding to run the convolution with.

    Where the output block spans a whole axis, the region is the whole axis and the convolution pads it
    itself (one copy less, and the block stays contiguous); elsewhere the region includes the halo and the
    zeros beyond the volume, and the convolution runs without padding."""
    region_low, region_high, padding = [], [], []
    for lo, hi, n, s, p, d, k in zip(low, high, size, conv.stride, conv.padding, conv.dilation, conv.kernel_size):
        first, last = lo * s - p, (hi - 1) * s - p + d * (k - 1) + 1
        native = first == -p and last == n + p
        region_low.append(0 if native else first)
        region_high.append(n if native else last)
        padding.append(p if native else 0)
    return (region_low, region_high), padding


def _contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor.contiguous()`` through the aten op (see ``buffers.copy``)."""
    if tensor.is_contiguous():
        return tensor
    return torch.ops.aten.clone.default(tensor, memory_format=torch.contiguous_format)


def _run_conv(conv: nn.Module, block: torch.Tensor, padding: Sequence[int]) -> torch.Tensor:
    """``conv`` on ``block`` with explicit padding. A block in a half-precision buffer dtype meets the weights in
    that dtype, as autocast would cast them (so the result does not depend on autocast reaching this call)."""
    weight, bias = conv.weight, conv.bias
    if block.dtype != weight.dtype and block.dtype in (torch.float16, torch.bfloat16):
        weight, bias = weight.to(block.dtype), None if bias is None else bias.to(block.dtype)
    return _CONV_FN[block.dim() - 2](block, weight, bias, conv.stride, tuple(padding), conv.dilation, conv.groups)


class Stream:
    """Runs the steps of one sample over non-overlapping blocks (see the module docstring)."""

    def __init__(self, buffers: BufferStore, tile: Sequence[int], image_shape: Sequence[int], bar: tqdm) -> None:
        self.buffers, self.device = buffers, buffers.device
        self.transfers = Transfers(self.device)
        self.reader = _Reader(self.device, self.transfers)
        self.tile, self.image_shape, self.bar = list(tile), list(image_shape), bar

    def _blocks(self, shape: Sequence[int]) -> Iterator[Bounds]:
        size = [max(1, t * n // i) for t, n, i in zip(self.tile, shape, self.image_shape)]  # the tile at this level
        for low in product(*(range(0, n, b) for n, b in zip(shape, size))):
            yield low, [min(lo + b, n) for lo, b, n in zip(low, size, shape)]

    def layer(self, channels: int, shape: Sequence[int],
              compute: Callable[[Sequence[int], Sequence[int]], torch.Tensor], dtype: torch.dtype,
              statistics: bool = True, out: torch.Tensor | None = None, whole: bool = False) -> Activation:
        """A full-size activation of ``channels`` x ``shape``, block by block from ``compute(low, high)``.

        Args:
            channels: output channels.
            shape: output spatial shape.
            compute: the output block ``[low, high)``, 1x``channels``x[BLOCK DIMS] on the device.
            dtype: the input's dtype (the buffer's follows autocast, see ``buffers.buffer_dtype``).
            statistics: gather the per-channel moments a following GroupNorm needs.
            out: write into this 1x``channels``x[``shape``] tensor (a result for the caller) instead of a buffer.
            whole: one block, the whole activation (attention).
        """
        data = self.buffers.new((1, channels, *shape), buffer_dtype(dtype, self.device)) if out is None else out
        moments = Moments(channels, self.device) if statistics else None
        for low, high in [([0] * len(shape), list(shape))] if whole else self._blocks(shape):
            block = compute(low, high)
            stored = block.to(data.dtype)
            in_flight = self.transfers.store(region(data, low, high), stored)
            if moments is not None:  # float32, as GroupNorm's statistics under autocast
                statistics_block = _contiguous(block.float())
                moments.add(statistics_block, keep=in_flight and statistics_block is stored)
            self.bar.update()
        self.transfers.flush()
        return Activation(data, moments, owned=out is None)

    def release(self, *activations: Activation) -> None:
        """Give the buffers of ``activations`` back (the caller's tensors stay)."""
        for activation in activations:
            if activation.owned:
                self.buffers.release(activation.data)
                activation.data = torch.empty(0)

    def conv(self, step: ConvStep, source: Activation, statistics: bool = False, out: torch.Tensor | None = None,
             shape: Sequence[int] | None = None) -> Activation:
        """``finish(conv(silu?(norm(source))))``, ``norm`` with ``source``'s whole-volume statistics;
        ``shape``: the output's, where more zeros than the convolution's own padding lie beyond the volume
        (a downsampling step). See :meth:`layer` for the rest."""
        conv = step.conv
        pre = _normaliser(step.norm, source, step.silu) if step.norm is not None else None
        shape = step.out_shape(source.data.shape[2:]) if shape is None else shape

        def compute(low: Sequence[int], high: Sequence[int]) -> torch.Tensor:
            block = self.reader.conv(conv, source.data, low, high, pre)
            return step.finish(block) if step.finish is not None else block

        return self.layer(conv.out_channels, shape, compute, source.data.dtype, statistics, out)

    def residual(self, step: ResidualStep, x: Activation, statistics: bool) -> Activation:
        """A residual block in two layers: the inner activation (with the statistics of ``norm2``), then
        ``shortcut(x) + conv2(silu(norm2(inner)))``."""
        inner = self.conv(ConvStep(step.conv1, step.norm1, silu=True), x, statistics=True)
        pre = _normaliser(step.norm2, inner, silu=True)

        def compute(low: Sequence[int], high: Sequence[int]) -> torch.Tensor:
            y = self.reader.conv(step.conv2, inner.data, low, high, pre)
            if step.shortcut is None:
                return y.add_(self.reader.read(x.data, low, high))
            return y.add_(self.reader.conv(step.shortcut, x.data, low, high))

        y = self.layer(step.conv2.out_channels, x.data.shape[2:], compute, x.data.dtype, statistics)
        self.release(inner)
        return y

    def step(self, step: Step, x: Activation, statistics: bool, out: torch.Tensor | None = None) -> Activation:
        """One step on ``x`` (a full-size activation), into ``out`` or a new buffer."""
        if isinstance(step, ResidualStep):
            return self.residual(step, x, statistics)
        channels, shape = step.out_channels(x.data.shape[1]), step.out_shape(x.data.shape[2:])
        if isinstance(step, UpsampleStep):
            return self.layer(channels, shape, lambda low, high: self.reader.upsample(step, x.data, low, high),
                              x.data.dtype, statistics, out)
        if isinstance(step, GlobalStep):  # the whole (deepest, smallest) activation at once
            return self.layer(channels, shape, lambda low, high: step.module(x.data.to(self.device)), x.data.dtype,
                              statistics, out, whole=True)
        if isinstance(step, DownsampleStep):  # its right zero pad is the region beyond the volume
            return self.conv(ConvStep(step.conv), x, statistics, out, shape=shape)
        return self.conv(step, x, statistics, out)

    def run(self, steps: Sequence[Step], x: Activation, out: torch.Tensor | None = None) -> Activation:
        """All ``steps`` on ``x``; the last one writes into ``out`` (else a buffer)."""
        for index, step in enumerate(steps):
            last = index == len(steps) - 1
            statistics = not last and steps[index + 1].normalises
            y = self.step(step, x, statistics, out if last else None)
            self.release(x)
            x = y
        return x


def exact_encode(plan: TilingPlan, x: torch.Tensor, latent_shape: Sequence[int], block: Sequence[int],
                 store: Callable[[], BufferStore], progress: bool) -> tuple[tuple[torch.Tensor, ...], int]:
    """The plan's heads (``(z_mu, z_sigma)``) for x: BxCx[SPATIAL DIMS], and the buffers' peak bytes.

    ``store()`` makes the buffers of one sample; ``block``: the block in image voxels."""
    outputs = tuple(torch.empty((x.shape[0], *latent_shape), dtype=x.dtype, device=x.device) for _ in plan.heads)
    peak = 0
    with torch.no_grad(), tqdm(desc="tiled encode", unit="block", disable=not progress, leave=False) as bar:
        for index in range(x.shape[0]):
            buffers = store()
            stream = Stream(buffers, block, x.shape[2:], bar)
            h = stream.run(plan.encoder, Activation(x.narrow(0, index, 1), owned=False))
            for head, output in zip(plan.heads, outputs):
                stream.conv(head, h, out=output.narrow(0, index, 1))
            stream.release(h)
            peak = max(peak, buffers.peak_bytes)
    return outputs, peak


def exact_decode(plan: TilingPlan, z: torch.Tensor, out_channels: int, block: Sequence[int],
                 store: Callable[[], BufferStore], progress: bool) -> tuple[torch.Tensor, int]:
    """The plan's decoder on z: Bx``latent_channels``x[LATENT DIMS], and the buffers' peak bytes."""
    image_shape = [n * f for n, f in zip(z.shape[2:], plan.factors)]
    result = torch.empty((z.shape[0], out_channels, *image_shape), dtype=z.dtype, device=z.device)
    peak = 0
    with torch.no_grad(), tqdm(desc="tiled decode", unit="block", disable=not progress, leave=False) as bar:
        for index in range(z.shape[0]):
            buffers = store()
            stream = Stream(buffers, block, image_shape, bar)
            stream.run(plan.decoder, Activation(z.narrow(0, index, 1), owned=False), out=result.narrow(0, index, 1))
            peak = max(peak, buffers.peak_bytes)
    return result, peak


def buffer_peak(steps: Sequence[Step], channels: int, shape: Sequence[int], itemsize: int,
                last_into_output: bool) -> int:
    """The most bytes :meth:`Stream.run` holds in buffers at once for ``steps`` on a 1x``channels``x``shape``
    input (the caller's, not counted), without running them; ``last_into_output``: the last step writes
    into the caller's tensor (a decoder) rather than a buffer (an encoder, whose heads read it)."""
    live = peak = 0
    for index, step in enumerate(steps):
        out_channels, shape = step.out_channels(channels), step.out_shape(shape)
        voxels = 1
        for n in shape:
            voxels *= n
        out = 0 if last_into_output and index == len(steps) - 1 else out_channels * voxels * itemsize
        inner = step.conv1.out_channels * voxels * itemsize if isinstance(step, ResidualStep) else 0
        peak = max(peak, live + inner + out)
        live, channels = out, out_channels
    return peak

