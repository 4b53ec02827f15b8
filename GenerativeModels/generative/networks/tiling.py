"""Tiled encoding and decoding with AutoencoderKL, for volumes larger than memory.

Two methods; ``method="auto"`` (the default) takes the exact one wherever the network allows it.

**Exact (``method="exact"``): a streamed pass, block by block and layer by layer.** GroupNorm is the only
part of the network that looks at the whole volume (besides attention): with every GroupNorm's
whole-volume statistics fixed, each convolution is purely local, so an output block needs only the input
block plus the convolution's halo (one voxel each side for the 3-wide kernels). The network is therefore
run one layer at a time over the whole volume:

* each layer (a convolution with the GroupNorm + SiLU in front of it, a down- or upsampling step, the
  second half of a residual block with its shortcut) runs over non-overlapping output blocks; a block
  reads its input region plus the halo, with zeros where the region leaves the volume, exactly as the
  convolution's own zero padding would;
* the layer's output is written into a full-size buffer and, block by block, its per-channel mean and
  squared deviations are merged (Chan et al.), which gives the next GroupNorm its whole-volume statistics
  when the layer is done;
* a buffer is released once the layers that read it are done (a residual block keeps its input until its
  shortcut has been added), so at most three full-size activations exist at once.

Every output voxel of every layer is computed once, as in whole-volume inference, and with the same
numbers: tiled and whole agree up to float rounding (the statistics are summed in another order), with
no blending and no dependence on the overlap. Attention blocks are global; they run on their whole input
(they sit at the deepest level, where the volume is smallest), which keeps them exact too, at the memory
cost of attention over that whole level.

Blocks: ``tile_size`` sets how many voxels a block has (scaled down with the resolution at deeper
levels: a block is always whole latent voxels). The blocks are shaped to span whole trailing axes where
that keeps the other sides at least 8 voxels of the deepest level (``_slab``): spans of whole rows are
contiguous in memory, so reading, normalising and writing them is cheap, while very thin blocks make the
convolutions slow.

What lives where: the input, the returned output and one block's working tensors (input region with halo,
its normalised copy, the convolution's output) are on the compute device; the full-size buffers between
layers live in ``buffers``: ``"cpu"`` (host memory, pinned when computing on CUDA; the default),
``"device"`` (the compute device: fastest on a GPU when they fit), or ``"disk"`` (memory-mapped scratch
files in the temporary directory, unlinked at once and freed when released: host memory is then only the
operating system's page cache). For the quickstart network the buffers peak at the decoder's first level
(64 channels of full-size activations: 8 GiB for a 512x512x128 volume in float32).

Networks the exact method cannot stream (a decoder with transposed-convolution upsampling, modules other
than AutoencoderKL's blocks), and calls with ``volume_statistics=False``, use the blended method. The
exact method computes without autograd (its buffers are filled in place); use ``method="blend"`` where a
gradient through tiled inference is needed.

**Blended (``method="blend"``): today's sliding windows.** The volume is cut into overlapping tiles with
MONAI's ``sliding_window_inference``; every tile runs through the network on its own and the outputs are
blended with a Gaussian importance map, so seams get little weight. Only one tile's activations exist at
a time; the full-size input, output and blending weights are the memory that grows with the volume.

GroupNorm is what makes naive tiling inaccurate: each tile would be normalised with its own mean and
variance, which differ from the whole volume's (a tile of background is not a tile of body). With
``volume_statistics=True`` we therefore first measure whole-volume statistics of every GroupNorm layer,
tile by tile: for the k-th layer (in forward order) the network runs on the tiles of the blended pass,
with the layers before k already using their whole-volume statistics, up to layer k, whose per-group sums
are accumulated over the part of each tile that is nearer its centre than any other tile's (so every
voxel counts once, and the zero padding at tile borders stays out). The blended pass then uses these
statistics everywhere. This costs one partial forward over all tiles per GroupNorm layer (several times
the blended pass itself), and it is still an approximation: a convolution near a tile border sees zero
padding instead of the neighbouring voxels, and attention attends within the tile. Tiles much larger
than the network's receptive field and an overlap of 0.5 keep both effects small.

Either way tiles are placed on the latent grid: tile sizes (and, when blending, the distance between tile
starts) are multiples of the network's total downsampling factor, so a tile's latent lands exactly on
latent voxels. A tiled reconstruction encodes the whole volume tile by tile (the latent is small enough
to keep) and then decodes that latent tile by tile. ``benchmarks/tiling.py`` measures time, memory and
agreement with whole-volume inference (see ``docs/tiling.md``).
"""

from __future__ import annotations

import math
import os
import tempfile
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from itertools import product

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from tqdm import tqdm

from generative.networks.nets.autoencoderkl import (
    AttentionBlock,
    AutoencoderKL,
    Downsample,
    ResBlock,
    Upsample,
    interpolate,
)

__all__ = ["tile_layout", "tiled_encode", "tiled_decode", "tiled_reconstruct", "exact_tiling_supported"]

# Gaussian blending (MONAI's importance map); sigma = 1/8 of the tile, MONAI's default
_BLEND = {"mode": "gaussian", "sigma_scale": 0.125}
_METHODS = ("auto", "exact", "blend")
_BUFFERS = ("cpu", "device", "disk")


# ----------------------------------------------------------------------------------------------------
# tile placement and the blended method
# ----------------------------------------------------------------------------------------------------
def tile_layout(
    spatial_shape: Sequence[int], tile_size: Sequence[int] | int, overlap: float, factors: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Tile size and step between tile starts, both multiples of the total downsampling factor.

    Args:
        spatial_shape: the volume's spatial size (each a multiple of its factor).
        tile_size: voxels per tile along each axis (an int applies to every axis); each a multiple of the
            axis' total downsampling factor. Tiles larger than the volume are shrunk to it.
        overlap: fraction of a tile shared with its neighbour, in [0, 1); rounded up so that the step
            between tiles is a whole number of latent voxels.
        factors: total downsampling factor per axis.

    Returns:
        ``(tile, step)`` in image voxels.

    Raises:
        ValueError: for a tile size or overlap the network cannot use, naming the valid choices.
    """
    dims = len(factors)
    tiles = [int(tile_size)] * dims if isinstance(tile_size, int) else [int(t) for t in tile_size]
    if len(tiles) != dims:
        raise ValueError(f"tile_size = {tiles}: expected one size per spatial axis ({dims})")
    if not 0.0 <= float(overlap) < 1.0:
        raise ValueError(f"tile_overlap = {overlap}: expected a fraction in [0, 1), e.g. 0.25")
    for t, f in zip(tiles, factors):
        if t < f or t % f != 0:
            lower, upper = max(f, t // f * f), max(f, math.ceil(t / f) * f)
            choice = f"{lower} or {upper}" if upper != lower else str(lower)
            raise ValueError(
                f"tile_size = {tiles}: every tile size must be a positive multiple of the total downsampling "
                f"factor {list(factors)}; {t} is not (use {choice})"
            )
    tiles = [min(t, s) for t, s in zip(tiles, spatial_shape)]
    steps = [max(f, int(t * (1.0 - overlap)) // f * f) for t, f in zip(tiles, factors)]
    return tuple(tiles), tuple(steps)


def _monai_overlap(tile: Sequence[int], step: Sequence[int]) -> list[float]:
    """MONAI's ``overlap`` argument for an exact step: it computes the step as ``int(tile * (1 - overlap))``,
    and half a voxel keeps float rounding away from the integer below."""
    return [min(max(0.0, 1.0 - (s + 0.5) / t), 0.999) for t, s in zip(tile, step)]


class _StopForward(Exception):
    """Raised inside the network once the GroupNorm layer being measured has seen its tile."""


class _VolumeNormStatistics:
    """Whole-volume statistics for every GroupNorm layer of ``model``, measured tile by tile.

    Inside :meth:`applied` the GroupNorm layers normalise with these statistics instead of the tile's.
    """

    def __init__(self, model: nn.Module) -> None:
        self.norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
        self.frozen: dict[nn.GroupNorm, tuple[torch.Tensor, torch.Tensor]] = {}
        self.measuring: nn.GroupNorm | None = None
        self.order: list[nn.GroupNorm] | None = None
        self._sums: list[torch.Tensor] = []

    @contextmanager
    def applied(self) -> Iterator[None]:
        for norm in self.norms:
            norm.forward = types.MethodType(self._forward, norm)  # type: ignore[method-assign]
        try:
            yield
        finally:
            for norm in self.norms:
                del norm.forward

    def _forward(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        if self.order is not None and norm not in self.order:
            self.order.append(norm)
        if norm is self.measuring:
            # count only the part of the tile that is nearer its centre than any other tile's
            region = tuple(slice(lo * size // t, hi * size // t)
                           for (lo, hi), size, t in zip(self._region, x.shape[2:], self._tile))
            values = x[(slice(None), slice(None), *region)].double().reshape(x.shape[0], norm.num_groups, -1)
            count = torch.full_like(values[..., 0], values.shape[-1])
            self._sums.append(torch.stack([values.sum(-1), values.pow(2).sum(-1), count]))
            raise _StopForward
        # like GroupNorm under autocast: computed in float32, returned in float32 (else in x's dtype)
        dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype
        if norm not in self.frozen:  # not measured yet (only while recording the order)
            return nn.functional.group_norm(x.float(), norm.num_groups, norm.weight.float() if norm.affine else None,
                                            norm.bias.float() if norm.affine else None, norm.eps).to(dtype)
        mean, var = self.frozen[norm]
        groups = x.float().reshape(x.shape[0], norm.num_groups, -1)
        normalised = ((groups - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)).reshape(x.shape)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if norm.affine:
            normalised = normalised * norm.weight.float().reshape(shape) + norm.bias.float().reshape(shape)
        return normalised.to(dtype)

    def measure(
        self, x: torch.Tensor, tile: Sequence[int], step: Sequence[int], unit: Sequence[int], predictor: Callable,
        progress: bool,
    ) -> None:
        """Measure every layer's statistics over the tiles of ``x`` (batch 1).

        The tiles are those of the blended pass; each voxel is counted once, in the tile whose centre is
        nearest (boundaries rounded to multiples of ``unit``, the downsampling the activations undergo).
        """
        axes = []
        for size, t, s, u in zip(x.shape[2:], tile, step, unit):
            starts = sorted({*range(0, size - t + 1, s), size - t})
            cuts = [0, *[(a + t + b) // 2 // u * u for a, b in zip(starts, starts[1:])], size]
            axes.append([(a, (lo - a, hi - a)) for a, lo, hi in zip(starts, cuts, cuts[1:])])
        windows = list(product(*axes))
        self._tile = tuple(tile)
        with self.applied(), torch.no_grad():  # the statistics are constants, never differentiated
            self.order = []
            predictor(x[(slice(None), slice(None), *(slice(0, t) for t in tile))])  # records the forward order
            order, self.order = self.order, None
            bar = tqdm(total=len(order) * len(windows), desc="GroupNorm statistics", disable=not progress, leave=False)
            for norm in order:
                self.measuring, self._sums = norm, []
                for window in windows:
                    self._region = [region for _, region in window]
                    crop = tuple(slice(a, a + t) for (a, _), t in zip(window, tile))
                    try:
                        predictor(x[(slice(None), slice(None), *crop)])
                    except _StopForward:
                        pass
                    bar.update()
                total, squares, count = torch.stack(self._sums).sum(0)
                mean = total / count
                self.frozen[norm] = (mean.float(), (squares / count - mean.pow(2)).clamp_min(0).float())
            bar.close()
        self.measuring, self._sums = None, []


def _sliding(
    model: nn.Module,
    x: torch.Tensor,
    tile: Sequence[int],
    step: Sequence[int],
    unit: Sequence[int],
    predictor: Callable,
    progress: bool,
    volume_statistics: bool,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Sliding-window ``predictor`` over ``x``, sample by sample, with whole-volume GroupNorm statistics."""
    outputs = []
    for index in range(x.shape[0]):
        sample = x[index : index + 1]
        statistics = _VolumeNormStatistics(model)
        if volume_statistics:
            statistics.measure(sample, tile, step, unit, predictor, progress)
        with statistics.applied() if volume_statistics else nullcontext():
            outputs.append(sliding_window_inference(
                sample, roi_size=list(tile), sw_batch_size=1, predictor=predictor,
                overlap=_monai_overlap(tile, step), progress=progress, **_BLEND,
            ))
    if isinstance(outputs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outputs))
    return torch.cat(outputs)


# ----------------------------------------------------------------------------------------------------
# the exact method: layer by layer over non-overlapping blocks with halos
# ----------------------------------------------------------------------------------------------------
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
Bounds = tuple[Sequence[int], Sequence[int]]  # (low, high) per spatial axis, high exclusive


class _Buffers:
    """Allocates the full-size activations between layers in host memory, on the device or on disk.

    Tracks the bytes held (``bytes``, ``peak_bytes``) so that callers can report them.
    """

    def __init__(self, where: str, device: torch.device) -> None:
        self.where, self.device = where, device
        self.bytes = self.peak_bytes = 0

    def new(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` (every voxel is written before it is read)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if self.where == "disk":
            handle, path = tempfile.mkstemp(prefix="tiling-", suffix=".bin")
            try:
                os.ftruncate(handle, max(nbytes, 1))
                array = np.memmap(path, dtype=np.uint8, mode="r+", shape=(max(nbytes, 1),))
            finally:
                os.close(handle)
                os.unlink(path)  # the mapping keeps the data until the tensor is freed
            tensor = torch.from_numpy(array)[:nbytes].view(dtype).reshape(tuple(shape))
        elif self.where == "cpu":
            tensor = torch.empty(tuple(shape), dtype=dtype, pin_memory=self.device.type == "cuda")
        else:
            tensor = torch.empty(tuple(shape), dtype=dtype, device=self.device)
        self.bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        return tensor

    def release(self, tensor: torch.Tensor) -> None:
        self.bytes -= tensor.numel() * tensor.element_size()


class _Moments:
    """Per-channel voxel count, mean and sum of squared deviations of an activation, block by block.

    Each block's moments come from torch's GroupNorm kernel with one group per channel (a vectorised,
    numerically stable one-pass reduction); blocks are merged in float64 with Chan, Golub and LeVeque's
    update, so the error does not grow with the number of blocks."""

    def __init__(self, channels: int, device: torch.device) -> None:
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float64, device=device)
        self.squares = torch.zeros(channels, dtype=torch.float64, device=device)

    def add(self, block: torch.Tensor) -> None:
        """Merge a contiguous 1xCx[BLOCK DIMS] block, which is overwritten (GroupNorm's output goes there)."""
        channels, count = block.shape[1], block[0, 0].numel()
        mean, rstd = block.new_empty(1, channels), block.new_empty(1, channels)
        torch.ops.aten.native_group_norm.out(block, None, None, 1, channels, count, channels, 0.0,
                                             out0=block, out1=mean, out2=rstd)
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
        squares = self.squares.reshape(num_groups, -1).sum(1) + self.count * (means - mean[:, None]).pow(2).sum(1)
        return mean, squares / (self.count * means.shape[1])


@dataclass
class _Activation:
    """A full-size activation (1xCx[SPATIAL DIMS]) and, once complete, its per-channel moments."""

    data: torch.Tensor
    moments: _Moments | None = None
    owned: bool = True  # False for the caller's tensors, which are never released


def _normaliser(norm: nn.GroupNorm, source: _Activation, silu: bool) -> Callable[[torch.Tensor], None]:
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


def _read(
    source: torch.Tensor, low: Sequence[int], high: Sequence[int], device: torch.device,
    pre: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """``source[..., low:high]`` (per spatial axis) as a new tensor on ``device``, with zeros where the
    region leaves ``source``; ``pre`` (in place) sees only the part inside, as a zero-padded layer would."""
    size = source.shape[2:]
    inside = tuple(slice(max(lo, 0), min(hi, n)) for lo, hi, n in zip(low, high, size))
    part = source[(slice(None), slice(None), *inside)]
    block = torch.empty((*part.shape[:2], *(hi - lo for lo, hi in zip(low, high))), dtype=part.dtype, device=device)
    view = block[(slice(None), slice(None), *(slice(s.start - lo, s.stop - lo) for s, lo in zip(inside, low)))]
    view.copy_(part)
    for axis, (s, lo, hi) in enumerate(zip(inside, low, high), start=2):  # the zeros beyond the volume
        block.narrow(axis, 0, s.start - lo).zero_()
        block.narrow(axis, s.stop - lo, hi - s.stop).zero_()
    if pre is not None:
        pre(view)
    return block


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


def _run_conv(conv: nn.Module, block: torch.Tensor, padding: Sequence[int]) -> torch.Tensor:
    return _CONV_FN[block.dim() - 2](block, conv.weight, conv.bias, conv.stride, tuple(padding), conv.dilation,
                                     conv.groups)


def _conv(conv: nn.Module, source: torch.Tensor, low: Sequence[int], high: Sequence[int], device: torch.device,
          pre: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Output ``[low, high)`` of ``conv`` applied to ``pre(source)`` (zero padded), exactly."""
    region, padding = _conv_input(conv, low, high, source.shape[2:])
    return _run_conv(conv, _read(source, *region, device, pre), padding)


def _upsample(layer: Upsample, source: torch.Tensor, low: Sequence[int], high: Sequence[int],
              device: torch.device) -> torch.Tensor:
    """Output ``[low, high)`` of an ``Upsample`` (interpolation + 3-wide convolution).

    The convolution's input region of the upsampled volume is built from the low-resolution region that
    covers it, with zeros where it leaves the upsampled volume (the convolution's zero padding).
    Nearest-neighbour: upsampled voxel ``i`` is source voxel ``i // scale``. Trilinear: the source region
    gets one more voxel each side (the interpolation's neighbours; at the volume's edge a copy of the edge
    voxel, which is what clamping the source coordinate gives), is interpolated as a whole, and the wanted
    part is cut out: the source coordinate ``(i + 0.5) / scale - 0.5`` is the same in the region's frame."""
    conv, scale = layer.conv.conv, layer.scale
    size = [n * s for n, s in zip(source.shape[2:], scale)]
    (need_low, need_high), padding = _conv_input(conv, low, high, size)
    if layer.mode == "nearest":
        source_low = [lo // s for lo, s in zip(need_low, scale)]
        block = _read(source, source_low, [-(-hi // s) for hi, s in zip(need_high, scale)], device)
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
    block = _read(source, read_low, read_high, device)
    for axis, (lo, hi, first, last) in enumerate(zip(halo_low, halo_high, read_low, read_high), start=2):
        block = block.index_select(axis, torch.arange(lo, hi, device=device).clamp(first, last - 1) - first)
    up = interpolate(block, scale, layer.mode)
    up = up[(slice(None), slice(None), *(slice(lo - h * s, hi - h * s)
                                         for lo, hi, h, s in zip(inside_low, inside_high, halo_low, scale)))]
    pad = [w for lo, hi, ilo, ihi in reversed(list(zip(need_low, need_high, inside_low, inside_high)))
           for w in (ilo - lo, hi - ihi)]
    return _run_conv(conv, F.pad(up, pad), padding)


def _is_plain_conv(module: nn.Module) -> bool:
    """MONAI's ``Convolution(conv_only=True)`` around a zero-padded, non-transposed convolution."""
    children = list(module.children())
    return (len(children) == 1 and isinstance(children[0], (nn.Conv1d, nn.Conv2d, nn.Conv3d))
            and children[0].padding_mode == "zeros" and not isinstance(children[0].padding, str))


def _streamable(blocks: nn.ModuleList) -> bool:
    body, norm, conv = blocks[:-2], blocks[-2], blocks[-1]
    if type(norm) is not nn.GroupNorm or not _is_plain_conv(conv):
        return False
    for block in body:
        if type(block) is ResBlock:
            if not all(_is_plain_conv(c) for c in (block.conv1, block.conv2)) or not (
                    type(block.nin_shortcut) is nn.Identity or _is_plain_conv(block.nin_shortcut)):
                return False
        elif type(block) is Downsample or type(block) is AttentionBlock:
            continue
        elif type(block) is Upsample:
            if block.use_convtranspose:
                return False
        elif not _is_plain_conv(block):
            return False
    return True


def exact_tiling_supported(model: nn.Module) -> bool:
    """Whether the exact (streamed) method can run ``model``: an ``AutoencoderKL`` built from its own blocks,
    upsampling by interpolation (``use_convtranspose=False``; nearest or trilinear)."""
    if type(model) is not AutoencoderKL:
        return False
    convs = (model.quant_conv_mu, model.quant_conv_log_sigma, model.post_quant_conv)
    return _streamable(model.encoder.blocks) and _streamable(model.decoder.blocks) and all(map(_is_plain_conv, convs))


# the thinnest block side the exact method makes, in voxels of the deepest level (thinner blocks run far
# slower than their size suggests: measured in docs/tiling.md)
_MIN_DEEPEST_SIDE = 8


def _slab(tile: Sequence[int], shape: Sequence[int], factors: Sequence[int]) -> list[int]:
    """The exact method's block: at most as many voxels as ``tile``, spanning whole trailing axes.

    From the last axis forwards, an axis is widened to the whole volume while the axes before it can shrink
    (evenly, to multiples of their factors) to keep the voxel count, but not below ``_MIN_DEEPEST_SIDE``
    voxels of the deepest level. Blocks that span whole trailing axes are long contiguous runs of memory,
    which makes reading, normalising, padding and writing them cheap."""
    block, voxels = [min(t, n) for t, n in zip(tile, shape)], math.prod(tile)
    for axis in range(len(block) - 1, 0, -1):
        if block[axis] == shape[axis]:
            continue
        lead = block[:axis]
        ratio = (voxels / (math.prod(lead) * shape[axis] * math.prod(block[axis + 1 :]))) ** (1 / axis)
        lead = [min(int(t * ratio) // f * f, n) for t, f, n in zip(lead, factors, shape)]
        if any(t < min(_MIN_DEEPEST_SIDE * f, n) for t, f, n in zip(lead, factors, shape)):
            break
        block = [*lead, shape[axis], *block[axis + 1 :]]
    return block


class _Stream:
    """Runs layers of one sample over non-overlapping blocks (see the module docstring)."""

    def __init__(self, buffers: _Buffers, tile: Sequence[int], image_shape: Sequence[int], bar: tqdm) -> None:
        self.buffers, self.device = buffers, buffers.device
        self.tile, self.image_shape, self.bar = list(tile), list(image_shape), bar

    def _blocks(self, shape: Sequence[int]) -> Iterator[Bounds]:
        size = [max(1, t * n // i) for t, n, i in zip(self.tile, shape, self.image_shape)]  # the tile at this level
        for low in product(*(range(0, n, b) for n, b in zip(shape, size))):
            yield low, [min(lo + b, n) for lo, b, n in zip(low, size, shape)]

    def layer(self, channels: int, shape: Sequence[int],
              compute: Callable[[Sequence[int], Sequence[int]], torch.Tensor], dtype: torch.dtype,
              statistics: bool = True, out: torch.Tensor | None = None, whole: bool = False) -> _Activation:
        """A full-size activation of ``channels`` x ``shape``, block by block from ``compute(low, high)``.

        Args:
            channels: output channels.
            shape: output spatial shape.
            compute: the output block ``[low, high)``, 1x``channels``x[BLOCK DIMS] on the device.
            dtype: the buffer's dtype.
            statistics: gather the per-channel moments a following GroupNorm needs.
            out: write into this 1x``channels``x[``shape``] tensor (a result for the caller) instead of a buffer.
            whole: one block, the whole activation (attention).
        """
        data = self.buffers.new((1, channels, *shape), dtype) if out is None else out
        moments = _Moments(channels, self.device) if statistics else None
        for low, high in [([0] * len(shape), list(shape))] if whole else self._blocks(shape):
            block = compute(low, high)
            data[(slice(None), slice(None), *(slice(lo, hi) for lo, hi in zip(low, high)))].copy_(block)
            if moments is not None:  # after the copy: it overwrites the block
                moments.add(block.float().contiguous())  # (float32 under autocast, as GroupNorm's statistics)
            self.bar.update()
        return _Activation(data, moments, owned=out is None)

    def release(self, *activations: _Activation) -> None:
        """Give the buffers of ``activations`` back (the caller's tensors stay)."""
        for activation in activations:
            if activation.owned:
                self.buffers.release(activation.data)
                activation.data = torch.empty(0)

    def conv(self, conv: nn.Module, source: _Activation, norm: nn.GroupNorm | None = None, silu: bool = False,
             statistics: bool = False, out: torch.Tensor | None = None,
             finish: Callable[[torch.Tensor], torch.Tensor] | None = None, shape: Sequence[int] | None = None,
             ) -> _Activation:
        """``finish(conv(silu?(norm(source))))`` for a MONAI ``Convolution`` ``conv``, ``norm`` with
        ``source``'s whole-volume statistics; ``shape``: the output's, where more zeros than the
        convolution's own padding lie beyond the volume (Downsample). See :meth:`layer` for the rest."""
        layer = conv.conv
        pre = _normaliser(norm, source, silu) if norm is not None else None
        if shape is None:
            shape = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in zip(
                source.data.shape[2:], layer.padding, layer.dilation, layer.kernel_size, layer.stride)]

        def compute(low: Sequence[int], high: Sequence[int]) -> torch.Tensor:
            block = _conv(layer, source.data, low, high, self.device, pre)
            return finish(block) if finish is not None else block

        return self.layer(layer.out_channels, shape, compute, source.data.dtype, statistics, out)

    def residual(self, block: ResBlock, x: _Activation, statistics: bool) -> _Activation:
        """A residual block in two layers: the inner activation (with the statistics of ``norm2``), then
        ``shortcut(x) + conv2(silu(norm2(inner)))``."""
        inner = self.conv(block.conv1, x, block.norm1, silu=True, statistics=True)
        pre = _normaliser(block.norm2, inner, silu=True)
        shortcut = block.nin_shortcut

        def compute(low: Sequence[int], high: Sequence[int]) -> torch.Tensor:
            y = _conv(block.conv2.conv, inner.data, low, high, self.device, pre)
            if isinstance(shortcut, nn.Identity):
                region = (slice(None), slice(None), *(slice(a, b) for a, b in zip(low, high)))
                return y.add_(x.data[region].to(y.device))
            return y.add_(_conv(shortcut.conv, x.data, low, high, self.device))

        y = self.layer(block.out_channels, x.data.shape[2:], compute, x.data.dtype, statistics)
        self.release(inner)
        return y

    def blocks(self, blocks: nn.ModuleList, x: _Activation, out: torch.Tensor | None = None) -> _Activation:
        """Encoder or decoder ``blocks`` (all but the last two, then GroupNorm + convolution) on ``x``;
        ``out``: where the result goes (else a buffer)."""
        body = list(blocks[:-2])
        for block, following in zip(body, [*body[1:], blocks[-2]]):
            statistics = type(following) in (ResBlock, AttentionBlock, nn.GroupNorm)  # it normalises its input
            if type(block) is ResBlock:
                y = self.residual(block, x, statistics)
            elif type(block) is Upsample:
                shape = [n * s for n, s in zip(x.data.shape[2:], block.scale)]
                y = self.layer(block.conv.conv.out_channels, shape,
                               lambda low, high, x=x, block=block: _upsample(block, x.data, low, high, self.device),
                               x.data.dtype, statistics)
            elif type(block) is AttentionBlock:  # global: the whole (deepest, smallest) activation at once
                y = self.layer(x.data.shape[1], x.data.shape[2:], lambda low, high, x=x, block=block: block(
                    x.data.to(self.device)), x.data.dtype, statistics, whole=True)
            elif type(block) is Downsample:  # its right zero pad is the region beyond the volume
                y = self.conv(block.conv, x, statistics=statistics,
                              shape=[n // s for n, s in zip(x.data.shape[2:], block.stride)])
            else:
                y = self.conv(block, x, statistics=statistics)
            self.release(x)
            x = y
        y = self.conv(blocks[-1], x, blocks[-2], silu=False, out=out)
        self.release(x)
        return y


def _exact_encode(
    model: AutoencoderKL, x: torch.Tensor, tile: Sequence[int], buffers: str, progress: bool, report: dict | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (x.shape[0], *model.latent_shape(x.shape[2:]))
    z_mu = torch.empty(shape, dtype=x.dtype, device=x.device)
    z_sigma = torch.empty(shape, dtype=x.dtype, device=x.device)
    peak = 0
    with torch.no_grad(), tqdm(desc="tiled encode", unit="block", disable=not progress, leave=False) as bar:
        for index in range(x.shape[0]):
            store = _Buffers(buffers, x.device)
            stream = _Stream(store, tile, x.shape[2:], bar)
            h = stream.blocks(model.encoder.blocks, _Activation(x[index : index + 1], owned=False))
            stream.conv(model.quant_conv_mu, h, out=z_mu[index : index + 1])
            stream.conv(model.quant_conv_log_sigma, h, out=z_sigma[index : index + 1],
                        finish=lambda t: torch.exp(torch.clamp(t, -30.0, 20.0) / 2))
            stream.release(h)
            peak = max(peak, store.peak_bytes)
    _report(report, "exact", peak, tile)
    return z_mu, z_sigma


def _exact_decode(
    model: AutoencoderKL, z: torch.Tensor, tile: Sequence[int], buffers: str, progress: bool, report: dict | None,
) -> torch.Tensor:
    image_shape = [n * f for n, f in zip(z.shape[2:], model.total_factors)]
    channels = model.decoder.blocks[-1].conv.out_channels
    result = torch.empty((z.shape[0], channels, *image_shape), dtype=z.dtype, device=z.device)
    peak = 0
    with torch.no_grad(), tqdm(desc="tiled decode", unit="block", disable=not progress, leave=False) as bar:
        for index in range(z.shape[0]):
            store = _Buffers(buffers, z.device)
            stream = _Stream(store, tile, image_shape, bar)
            h = stream.conv(model.post_quant_conv, _Activation(z[index : index + 1], owned=False))
            stream.blocks(model.decoder.blocks, h, out=result[index : index + 1])
            peak = max(peak, store.peak_bytes)
    _report(report, "exact", peak, tile)
    return result


def _report(report: dict | None, method: str, buffer_bytes: int, block: Sequence[int] | None = None) -> None:
    if report is not None:
        report["method"] = method
        report["buffer_peak_bytes"] = max(report.get("buffer_peak_bytes", 0), buffer_bytes)
        if block is not None:
            report["block"] = tuple(block)


def _method(model: nn.Module, method: str, buffers: str, volume_statistics: bool) -> str:
    """The method to run (``"exact"`` or ``"blend"``), after checking the arguments."""
    if method not in _METHODS:
        raise ValueError(f"method = {method!r}: expected one of {', '.join(map(repr, _METHODS))}")
    if buffers not in _BUFFERS:
        raise ValueError(f"buffers = {buffers!r}: expected one of {', '.join(map(repr, _BUFFERS))}")
    if method == "exact" and not volume_statistics:
        raise ValueError("method = 'exact' normalises with whole-volume statistics: drop volume_statistics=False "
                         "or use method='blend'")
    if method == "exact" and not exact_tiling_supported(model):
        raise ValueError("method = 'exact': this network cannot be streamed (transposed-convolution upsampling or "
                         "modules other than AutoencoderKL's blocks); use method='blend'")
    if method == "auto":
        return "exact" if volume_statistics and exact_tiling_supported(model) else "blend"
    return method


def tiled_encode(
    model: AutoencoderKL, x: torch.Tensor, tile_size: Sequence[int] | int, overlap: float = 0.5, progress: bool = False,
    volume_statistics: bool = True, method: str = "auto", buffers: str = "cpu", report: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``model.encode`` tile by tile.

    Args:
        model: the autoencoder.
        x: BxCx[SPATIAL DIMS].
        tile_size: image voxels per tile (multiples of ``model.total_factors``).
        overlap: fraction of a tile shared with its neighbour (blended method only; the exact method's
            blocks do not overlap).
        progress: show a tqdm bar over the blocks (tiles).
        volume_statistics: normalise with the whole volume's GroupNorm statistics; False = each tile's own
            (blended only: cheaper, less accurate).
        method: ``"exact"`` (streamed, equal to whole-volume inference up to float rounding, no autograd),
            ``"blend"`` (overlapping tiles with Gaussian blending, differentiable) or ``"auto"`` (exact
            wherever the network allows it); see the module docstring.
        buffers: where the exact method keeps full-size activations between layers: ``"cpu"`` (host
            memory), ``"device"`` (the compute device) or ``"disk"`` (memory-mapped temporary files).
        report: if given, receives ``"method"`` (the one that ran), ``"buffer_peak_bytes"`` (the most
            bytes the exact method's buffers held at once; 0 when blending) and, for the exact method,
            ``"block"`` (its block in image voxels, see the module docstring).

    Returns:
        ``(z_mu, z_sigma)``, each Bx``latent_channels``x[SPATIAL DIMS / total factor].

    Raises:
        ValueError: for a tile size off the latent grid, an overlap outside [0, 1) or a method, buffer
            location or statistics choice that cannot be used, naming the fix.
    """
    model._check_input(x)
    tile, step = tile_layout(x.shape[2:], tile_size, overlap, model.total_factors)
    if _method(model, method, buffers, volume_statistics) == "exact":
        return _exact_encode(model, x, _slab(tile, x.shape[2:], model.total_factors), buffers, progress, report)
    _report(report, "blend", 0)
    z_mu, z_sigma = _sliding(model, x, tile, step, model.total_factors, lambda t: model.encode(t), progress,
                             volume_statistics)
    return z_mu, z_sigma


def tiled_decode(
    model: AutoencoderKL, z: torch.Tensor, tile_size: Sequence[int] | int, overlap: float = 0.5, progress: bool = False,
    volume_statistics: bool = True, method: str = "auto", buffers: str = "cpu", report: dict | None = None,
) -> torch.Tensor:
    """``model.decode`` tile by tile.

    Args:
        model: the autoencoder.
        z: Bx``latent_channels``x[LATENT DIMS].
        tile_size: image voxels per output tile (multiples of ``model.total_factors``); the latent tiles
            are ``tile_size / total factor``.
        overlap: fraction of a tile shared with its neighbour (blended method only).
        progress: show a tqdm bar over the blocks (tiles).
        volume_statistics: see :func:`tiled_encode`.
        method: see :func:`tiled_encode`.
        buffers: see :func:`tiled_encode`.
        report: see :func:`tiled_encode`.

    Returns:
        BxCx[LATENT DIMS * total factor].

    Raises:
        ValueError: as :func:`tiled_encode`.
    """
    factors = model.total_factors
    image_shape = [s * f for s, f in zip(z.shape[2:], factors)]
    tile, step = tile_layout(image_shape, tile_size, overlap, factors)
    if _method(model, method, buffers, volume_statistics) == "exact":
        return _exact_decode(model, z, _slab(tile, image_shape, factors), buffers, progress, report)
    _report(report, "blend", 0)
    latent_tile = [t // f for t, f in zip(tile, factors)]
    latent_step = [s // f for s, f in zip(step, factors)]
    return _sliding(model, z, latent_tile, latent_step, [1] * len(factors), lambda t: model.decode(t), progress,
                    volume_statistics)  # type: ignore[return-value]


def tiled_reconstruct(
    model: AutoencoderKL, x: torch.Tensor, tile_size: Sequence[int] | int, overlap: float = 0.5, progress: bool = False,
    volume_statistics: bool = True, method: str = "auto", buffers: str = "cpu", report: dict | None = None,
) -> torch.Tensor:
    """``model.reconstruct`` tile by tile: the latent mean of the whole volume is encoded with
    :func:`tiled_encode` (it is ``total factor`` times smaller per axis, so it fits) and decoded with
    :func:`tiled_decode`.

    Args:
        model: the autoencoder.
        x: BxCx[SPATIAL DIMS].
        tile_size: image voxels per tile (multiples of ``model.total_factors``).
        overlap: fraction of a tile shared with its neighbour (blended method only).
        progress: show a tqdm bar over the blocks (tiles).
        volume_statistics: see :func:`tiled_encode`.
        method: see :func:`tiled_encode`.
        buffers: see :func:`tiled_encode`.
        report: see :func:`tiled_encode` (the buffer peak is that of the larger of the two passes).

    Returns:
        BxCx[SPATIAL DIMS].
    """
    z_mu, _ = tiled_encode(model, x, tile_size, overlap, progress, volume_statistics, method, buffers, report)
    return tiled_decode(model, z_mu, tile_size, overlap, progress, volume_statistics, method, buffers, report)
