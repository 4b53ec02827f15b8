# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""KL-regularised autoencoder (AutoencoderKL) with per-level downsampling factors.

The public API, defaults, numerics and ``state_dict`` key layout are those of MONAI Generative's
``generative.networks.nets.AutoencoderKL``; checkpoints saved by it load with ``strict=True`` and give
the same outputs. On top of that the network accepts ``downsample_factors``: one factor per
downsampling step, either an integer (the same stride along every axis) or a per-axis tuple, e.g.

>>> AutoencoderKL(spatial_dims=3, num_channels=(32, 64, 64), attention_levels=(False, False, False),
...               num_res_blocks=1, downsample_factors=[4, 2])   # 8x compression with three levels

Kernel rule (no voxel is skipped): a downsampling step with stride ``s`` along an axis pads one zero on
the right of that axis and uses a kernel of ``s + 1`` with no other padding, so consecutive windows
``[i*s, i*s + s]`` overlap by one voxel and together read every input voxel. For ``s = 2`` this is
exactly the original layer (right pad 1, kernel 3, stride 2). The matching upsampling step repeats each
voxel ``s`` times (nearest neighbour, ``upsample_mode="nearest"``, the default) and applies a 3-wide
convolution, as the original does for 2. ``upsample_mode="trilinear"`` interpolates linearly along every
axis instead (``align_corners=False``), as MONAI's ``AutoencoderKlMaisi`` decoder does, so its weights give
its outputs.

The network knows nothing about training: it has no losses and no optimiser logic.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from monai.networks.blocks import Convolution

from generative._dropin import LegacyPickleMixin
from generative.inferers.tiling import TilingInferer
from generative.inferers.tiling.steps import (
    ConvStep,
    DownsampleStep,
    GlobalStep,
    ResidualStep,
    Step,
    TilingPlan,
    UpsampleStep,
    plain_conv,
)
from generative.networks.layers.recompute import conv_with_recomputed_input

__all__ = [
    "AutoencoderKL",
    "Encoder",
    "Decoder",
    "ResBlock",
    "AttentionBlock",
    "Downsample",
    "Upsample",
    "normalize_downsample_factors",
    "total_downsample_factors",
    "latent_spatial_shape",
    "check_spatial_shape",
    "nearest_valid_sizes",
    "load_monai_core_state_dict",
    "UPSAMPLE_MODES",
]

Factor = Union[int, Sequence[int]]
_AXIS_NAMES = {1: ("L",), 2: ("H", "W"), 3: ("H", "W", "D")}
# the decoder's upsampling interpolation: "trilinear" is linear along every spatial axis (torch's "linear",
# "bilinear" or "trilinear" for 1, 2 or 3 axes)
UPSAMPLE_MODES = ("nearest", "trilinear")
_LINEAR_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}


def check_upsample_mode(upsample_mode: object) -> str:
    """Return ``upsample_mode`` if it is one of ``UPSAMPLE_MODES``, else raise a ``ValueError`` naming them."""
    if upsample_mode not in UPSAMPLE_MODES:
        raise ValueError(
            f"upsample_mode = {upsample_mode!r}: expected one of {', '.join(map(repr, UPSAMPLE_MODES))} "
            f"('nearest': MONAI Generative's decoder, the default; 'trilinear': MAISI's)"
        )
    return str(upsample_mode)


def interpolate(x: torch.Tensor, scale: Sequence[int], mode: str) -> torch.Tensor:
    """Upsample BxCx[SPATIAL DIMS] by the integer ``scale`` per axis with ``mode`` (see ``UPSAMPLE_MODES``).

    ``"trilinear"`` maps output voxel ``i`` to source coordinate ``(i + 0.5) / s - 0.5`` (``align_corners=False``,
    clamped to the volume), as ``F.interpolate(x, scale_factor=2.0, mode="trilinear")`` does for ``s = 2``."""
    size = [dim * s for dim, s in zip(x.shape[2:], scale)]
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=_LINEAR_MODE[x.dim() - 2], align_corners=False)


# ----------------------------------------------------------------------------------------------------
# downsample factor helpers (usable without building a network, e.g. to validate a config)
# ----------------------------------------------------------------------------------------------------
def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _normalize_factor(factor: object, spatial_dims: int, where: str) -> tuple[int, ...]:
    if _is_int(factor):
        if int(factor) < 1:  # type: ignore[call-overload]
            raise ValueError(
                f"{where} = {factor!r}: a downsampling factor must be an integer >= 1 (1 = no downsampling)"
            )
        return (int(factor),) * spatial_dims  # type: ignore[call-overload]
    if isinstance(factor, Sequence) and not isinstance(factor, (str, bytes)):
        if len(factor) != spatial_dims:
            raise ValueError(
                f"{where} = {list(factor)!r}: a per-axis factor needs exactly {spatial_dims} integers for "
                f"spatial_dims={spatial_dims}, e.g. {[4] * (spatial_dims - 1) + [2]}"
            )
        return tuple(_normalize_factor(f, 1, where)[0] for f in factor)
    raise ValueError(
        f"{where} = {factor!r}: expected an integer >= 1 (e.g. 2 or 4) or a per-axis list of "
        f"{spatial_dims} integers, got {type(factor).__name__}"
    )


def normalize_downsample_factors(
    downsample_factors: Sequence[Factor] | None, num_levels: int, spatial_dims: int
) -> tuple[tuple[int, ...], ...]:
    """Validate ``downsample_factors`` and return one per-axis tuple per downsampling step.

    Args:
        downsample_factors: one entry per downsampling step (``len(num_channels) - 1`` entries), each an
            integer >= 1 or a per-axis sequence of ``spatial_dims`` integers. ``None`` means 2 everywhere.
        num_levels: ``len(num_channels)``.
        spatial_dims: number of spatial dimensions.

    Raises:
        ValueError: with a message naming the offending value and what is expected.
    """
    steps = num_levels - 1
    if downsample_factors is None:
        return ((2,) * spatial_dims,) * steps
    if not isinstance(downsample_factors, Sequence) or isinstance(downsample_factors, (str, bytes)):
        raise ValueError(
            f"downsample_factors = {downsample_factors!r}: expected a list with one factor per downsampling step, "
            f"e.g. [4, 2] for num_channels of length 3"
        )
    if len(downsample_factors) != steps:
        example_channels = [32, 64, 64, 128][: max(num_levels, 2)]
        example_factors = ([4] + [2] * (len(example_channels) - 2)) if len(example_channels) > 1 else []
        raise ValueError(
            f"downsample_factors has {len(downsample_factors)} entries ({list(downsample_factors)!r}) but "
            f"num_channels has {num_levels} levels, so {steps} are expected (len(num_channels) - 1, one per "
            f"downsampling step), e.g. num_channels={example_channels} with downsample_factors={example_factors}"
        )
    return tuple(
        _normalize_factor(f, spatial_dims, f"downsample_factors[{i}]") for i, f in enumerate(downsample_factors)
    )


def total_downsample_factors(factors: Sequence[Sequence[int]], spatial_dims: int) -> tuple[int, ...]:
    """Product of the normalized per-step factors along each axis."""
    return tuple(math.prod(step[axis] for step in factors) for axis in range(spatial_dims))


def nearest_valid_sizes(size: int, factor: int) -> str:
    """The multiples of ``factor`` around ``size``, as text: ``"1224 or 1232"`` (or just the upper one)."""
    lower, upper = (size // factor) * factor, (size // factor + 1) * factor
    return f"{lower} or {upper}" if lower > 0 else f"{upper}"


def check_spatial_shape(spatial_shape: Sequence[int], total_factors: Sequence[int]) -> None:
    """Raise ``ValueError`` unless every axis of ``spatial_shape`` is divisible by its total factor.

    The message names the axis, the size, the total factor and the nearest valid sizes.
    """
    names = _AXIS_NAMES.get(len(total_factors), tuple(str(i) for i in range(len(total_factors))))
    for axis, (size, factor) in enumerate(zip(spatial_shape, total_factors)):
        if size % factor == 0 and size > 0:
            continue
        raise ValueError(
            f"spatial size {size} along axis {axis} ({names[axis]}) is not divisible by the total downsampling "
            f"factor {factor} of that axis; nearest valid sizes: {nearest_valid_sizes(size, factor)} "
            f"(pad or crop the volume, or choose other downsample_factors)"
        )


def latent_spatial_shape(spatial_shape: Sequence[int], total_factors: Sequence[int]) -> tuple[int, ...]:
    """Spatial shape of the latent for an input of ``spatial_shape`` (validated, see ``check_spatial_shape``)."""
    if len(spatial_shape) != len(total_factors):
        raise ValueError(
            f"input has {len(spatial_shape)} spatial dimensions {tuple(spatial_shape)}, the network expects "
            f"{len(total_factors)}"
        )
    check_spatial_shape(spatial_shape, total_factors)
    return tuple(size // factor for size, factor in zip(spatial_shape, total_factors))


# ----------------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------------
def _conv(spatial_dims: int, in_ch: int, out_ch: int, kernel: int | Sequence[int] = 3, stride=1, padding=1):
    return Convolution(
        spatial_dims=spatial_dims,
        in_channels=in_ch,
        out_channels=out_ch,
        strides=stride,
        kernel_size=kernel,
        padding=padding,
        conv_only=True,
    )


class _LowMemoryMixin:
    """Blocks with a ``low_memory`` switch: recompute cheap conv inputs in backward (see ``recompute``)."""

    low_memory: bool = False

    def _use_low_memory(self) -> bool:
        return self.low_memory and torch.is_grad_enabled()


def _plain_group_norm(norm: nn.Module) -> bool:
    """Whether ``norm``'s forward is ``F.group_norm`` with its own parameters: a ``torch.nn.GroupNorm`` whose
    ``forward`` is not replaced (as tiled inference does to apply whole-volume statistics). Hooks do not
    count: the low-memory path skips them, as it always has (the memory estimator's hooks rely on it)."""
    return type(norm) is nn.GroupNorm and "forward" not in vars(norm)


def _norm_conv(x: torch.Tensor, norm: nn.GroupNorm, conv: Convolution, activation: bool, low_memory: bool):
    """``conv([silu](norm(x)))``; with ``low_memory`` only ``x`` is kept for backward (when ``norm`` is a
    plain GroupNorm: an overridden one is called as a module, so that the override applies)."""
    if low_memory and _plain_group_norm(norm):
        groups, eps = norm.num_groups, norm.eps
        return conv_with_recomputed_input(
            x, conv.conv, lambda t, w, b: F.group_norm(t, groups, w, b, eps), (norm.weight, norm.bias), activation
        )
    h = norm(x)
    return conv(F.silu(h) if activation else h)


class Upsample(nn.Module, _LowMemoryMixin):
    """Interpolation by ``scale_factor`` (nearest neighbour by default) followed by a 3-wide convolution.

    Args:
        spatial_dims: number of spatial dimensions (1D, 2D, 3D).
        in_channels: number of input (and output) channels.
        use_convtranspose: if True, use a transposed convolution instead (kernel ``max(3, s + 1)``,
            padding 1, output padding 1 for ``s >= 2``, so the output is exactly ``s`` times larger).
        scale_factor: integer or per-axis integers; 2 reproduces the original layer.
        mode: the interpolation, ``"nearest"`` (the original) or ``"trilinear"`` (linear along every axis,
            ``align_corners=False``: MAISI's); ignored with ``use_convtranspose``.
    """

    mode: str = "nearest"  # instances pickled before the mode existed upsample as they did

    def __init__(
        self, spatial_dims: int, in_channels: int, use_convtranspose: bool = False, scale_factor: Factor = 2,
        mode: str = "nearest",
    ) -> None:
        super().__init__()
        self.scale = _normalize_factor(scale_factor, spatial_dims, "scale_factor")
        self.mode = check_upsample_mode(mode)
        self.use_convtranspose = use_convtranspose
        if use_convtranspose:
            self.conv = Convolution(
                spatial_dims=spatial_dims,
                in_channels=in_channels,
                out_channels=in_channels,
                strides=self.scale,
                kernel_size=[max(3, s + 1) for s in self.scale],
                padding=1,
                output_padding=[1 if s >= 2 else 0 for s in self.scale],
                conv_only=True,
                is_transposed=True,
            )
        else:
            self.conv = _conv(spatial_dims, in_channels, in_channels)

    def _interpolate(self, x: torch.Tensor) -> torch.Tensor:
        if all(s == 1 for s in self.scale):
            return x
        return interpolate(x, self.scale, self.mode)

    def tiling_step(self) -> Step | None:
        """This block for the exact tiled method (``None`` with transposed convolutions)."""
        conv = plain_conv(self.conv)
        if self.use_convtranspose or conv is None:
            return None
        return UpsampleStep(conv, self.scale, self.mode, lambda x: interpolate(x, self.scale, self.mode))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: BxCx[SPATIAL DIMS]. Returns: BxCx[SPATIAL DIMS * scale]."""
        if self.use_convtranspose:
            return self.conv(x)
        if self._use_low_memory():
            return conv_with_recomputed_input(x, self.conv.conv, self._interpolate)
        return self.conv(self._interpolate(x))


class Downsample(nn.Module, _LowMemoryMixin):
    """Strided convolution that divides each axis by its factor without skipping any voxel.

    Pads one zero on the right of every axis and convolves with kernel ``s + 1`` and stride ``s``
    (per axis). Factor 2 is the original layer: pad ``(0, 1)``, kernel 3, stride 2, no padding.

    Args:
        spatial_dims: number of spatial dimensions (1D, 2D, 3D).
        in_channels: number of input (and output) channels.
        stride: integer or per-axis integers (>= 1).
    """

    def __init__(self, spatial_dims: int, in_channels: int, stride: Factor = 2) -> None:
        super().__init__()
        self.stride = _normalize_factor(stride, spatial_dims, "stride")
        self.pad = (0, 1) * spatial_dims
        self.conv = _conv(spatial_dims, in_channels, in_channels, [s + 1 for s in self.stride], self.stride, 0)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pad, mode="constant", value=0.0)

    def tiling_step(self) -> Step | None:
        """This block for the exact tiled method."""
        conv = plain_conv(self.conv)
        return None if conv is None else DownsampleStep(conv, self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: BxCx[SPATIAL DIMS], each divisible by its stride. Returns: BxCx[SPATIAL DIMS / stride]."""
        if self._use_low_memory():
            return conv_with_recomputed_input(x, self.conv.conv, self._pad)
        return self.conv(self._pad(x))


class ResBlock(nn.Module, _LowMemoryMixin):
    """``x + conv2(silu(norm2(conv1(silu(norm1(x))))))`` with a 1x1 shortcut when channels change.

    Args:
        spatial_dims: number of spatial dimensions (1D, 2D, 3D).
        in_channels: input channels.
        norm_num_groups: GroupNorm groups; channels must be divisible by it.
        norm_eps: GroupNorm epsilon.
        out_channels: output channels.
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, norm_num_groups: int, norm_eps: float, out_channels: int
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=norm_eps, affine=True)
        self.conv1 = _conv(spatial_dims, in_channels, out_channels)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=norm_eps, affine=True)
        self.conv2 = _conv(spatial_dims, out_channels, out_channels)
        self.nin_shortcut: nn.Module = (
            _conv(spatial_dims, in_channels, out_channels, 1, 1, 0) if in_channels != out_channels else nn.Identity()
        )

    def tiling_step(self) -> Step | None:
        """This block for the exact tiled method (``None`` unless its convolutions are plain ones)."""
        conv1, conv2 = plain_conv(self.conv1), plain_conv(self.conv2)
        identity = isinstance(self.nin_shortcut, nn.Identity)
        shortcut = None if identity else plain_conv(self.nin_shortcut)
        if conv1 is None or conv2 is None or (shortcut is None and not identity) or not (
                _plain_group_norm(self.norm1) and _plain_group_norm(self.norm2)):
            return None
        return ResidualStep(self.norm1, conv1, self.norm2, conv2, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: BxC_inx[SPATIAL DIMS]. Returns: BxC_outx[SPATIAL DIMS]."""
        low_memory = self._use_low_memory()
        h = _norm_conv(x, self.norm1, self.conv1, True, low_memory)
        h = _norm_conv(h, self.norm2, self.conv2, True, low_memory)
        return self.nin_shortcut(x) + h


class AttentionBlock(nn.Module, _LowMemoryMixin):
    """Spatial self-attention with a residual connection (MONAI Generative's block).

    Uses ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels where
    the device has them); the math is the original's: per head, softmax(q k^T / sqrt(C / heads)) v over
    all voxels. One head unless ``num_head_channels`` is given (AutoencoderKL always uses one).

    MONAI Generative creates a ``proj_attn`` linear layer but never applies it; it is kept (frozen) so
    checkpoints keep their keys. ``apply_out_projection=True`` applies it (MONAI core's ``include_fc``).

    Args:
        spatial_dims: number of spatial dimensions (1D, 2D, 3D).
        num_channels: input (and output) channels.
        num_head_channels: channels per attention head (``num_channels`` must be a multiple);
            ``None`` = one head.
        norm_num_groups: GroupNorm groups.
        norm_eps: GroupNorm epsilon.
        use_flash_attention: kept for MONAI Generative's API; attention always uses SDPA.
        apply_out_projection: apply ``proj_attn`` after attention.
    """

    def __init__(
        self,
        spatial_dims: int,
        num_channels: int,
        num_head_channels: int | None = None,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        use_flash_attention: bool = False,
        apply_out_projection: bool = False,
    ) -> None:
        super().__init__()
        if num_head_channels is not None and (num_head_channels < 1 or num_channels % num_head_channels):
            raise ValueError(
                f"num_head_channels = {num_head_channels!r}: expected a positive divisor of num_channels = "
                f"{num_channels}"
            )
        self.spatial_dims = spatial_dims
        self.num_channels = num_channels
        self.num_heads = 1 if num_head_channels is None else num_channels // num_head_channels
        self.use_flash_attention = use_flash_attention
        self.apply_out_projection = apply_out_projection
        self.norm = nn.GroupNorm(norm_num_groups, num_channels, eps=norm_eps, affine=True)
        self.to_q = nn.Linear(num_channels, num_channels)
        self.to_k = nn.Linear(num_channels, num_channels)
        self.to_v = nn.Linear(num_channels, num_channels)
        self.proj_attn = nn.Linear(num_channels, num_channels)
        self.proj_attn.requires_grad_(apply_out_projection)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = self.norm(x).reshape(shape[0], shape[1], -1).transpose(1, 2)  # B x N x C
        heads = self.num_heads
        # B x heads x N x C/heads
        q, k, v = (layer(tokens).unflatten(-1, (heads, -1)).transpose(1, 2)
                   for layer in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        if self.apply_out_projection:
            out = self.proj_attn(out)
        return out.to(x.dtype).transpose(1, 2).reshape(shape) + x

    def tiling_step(self) -> Step:
        """This block for the exact tiled method: global, it runs on its whole input."""
        return GlobalStep(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: BxCx[SPATIAL DIMS]. Returns: same shape."""
        if self._use_low_memory():
            return torch.utils.checkpoint.checkpoint(self._attend, x, use_reentrant=False)
        return self._attend(x)


def _as_level_list(value: Sequence[int] | int, levels: int) -> list[int]:
    return [value] * levels if isinstance(value, int) else list(value)


def _tiling_steps(blocks: nn.ModuleList) -> list[Step] | None:
    """Encoder or decoder ``blocks`` for the exact tiled method: each block's step, then the final GroupNorm
    + convolution as one step; ``None`` if a block cannot be streamed."""
    steps: list[Step | None] = []
    for block in blocks[:-2]:
        describe = getattr(block, "tiling_step", None)
        if describe is not None:
            steps.append(describe())
        else:
            conv = plain_conv(block)
            steps.append(None if conv is None else ConvStep(conv))
    norm, conv = blocks[-2], plain_conv(blocks[-1])
    if type(norm) is not nn.GroupNorm or conv is None or any(step is None for step in steps):
        return None
    return [*steps, ConvStep(conv, norm)]  # type: ignore[list-item]


class Encoder(nn.Module, _LowMemoryMixin):
    """Convolutional cascade that downsamples an image into a spatial latent.

    Args:
        spatial_dims: number of spatial dimensions (1D, 2D, 3D).
        in_channels: number of input channels.
        num_channels: output channels of each level.
        out_channels: channels of the output (latent) representation.
        num_res_blocks: residual blocks per level.
        norm_num_groups: GroupNorm groups.
        norm_eps: GroupNorm epsilon.
        attention_levels: which levels have attention after each residual block.
        with_nonlocal_attn: add ResBlock-Attention-ResBlock at the deepest level.
        use_flash_attention: kept for API compatibility; attention always uses SDPA.
        downsample_factors: one factor per step (``len(num_channels) - 1``), default 2 everywhere.
        attention_out_projection: apply the attention blocks' output projection.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_channels: Sequence[int],
        out_channels: int,
        num_res_blocks: Sequence[int],
        norm_num_groups: int,
        norm_eps: float,
        attention_levels: Sequence[bool],
        with_nonlocal_attn: bool = True,
        use_flash_attention: bool = False,
        downsample_factors: Sequence[Factor] | None = None,
        attention_out_projection: bool = False,
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.num_channels = tuple(num_channels)
        self.downsample_factors = normalize_downsample_factors(downsample_factors, len(num_channels), spatial_dims)
        res_blocks = _as_level_list(num_res_blocks, len(num_channels))
        # MONAI Generative's attributes
        self.in_channels, self.out_channels, self.num_res_blocks = in_channels, out_channels, tuple(res_blocks)
        self.norm_num_groups, self.norm_eps, self.attention_levels = norm_num_groups, norm_eps, tuple(attention_levels)

        def attention(ch: int) -> AttentionBlock:
            return AttentionBlock(spatial_dims, ch, norm_num_groups=norm_num_groups, norm_eps=norm_eps,
                                  use_flash_attention=use_flash_attention,
                                  apply_out_projection=attention_out_projection)

        blocks: list[nn.Module] = [_conv(spatial_dims, in_channels, num_channels[0])]
        channels = num_channels[0]
        for level, level_channels in enumerate(num_channels):
            for _ in range(res_blocks[level]):
                blocks.append(ResBlock(spatial_dims, channels, norm_num_groups, norm_eps, level_channels))
                channels = level_channels
                if attention_levels[level]:
                    blocks.append(attention(channels))
            if level < len(num_channels) - 1:
                blocks.append(Downsample(spatial_dims, channels, self.downsample_factors[level]))
        if with_nonlocal_attn:
            blocks.append(ResBlock(spatial_dims, channels, norm_num_groups, norm_eps, channels))
            blocks.append(attention(channels))
            blocks.append(ResBlock(spatial_dims, channels, norm_num_groups, norm_eps, channels))
        blocks.append(nn.GroupNorm(norm_num_groups, channels, eps=norm_eps, affine=True))
        blocks.append(_conv(spatial_dims, channels, out_channels))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: BxC_inx[SPATIAL DIMS]. Returns: Bx``out_channels``x[SPATIAL DIMS / total factor]."""
        return _run_blocks(self.blocks, x, self._use_low_memory())


class Decoder(nn.Module, _LowMemoryMixin):
    """Convolutional cascade that upsamples a spatial latent into an image.

    Args:
        spatial_dims: number of spatial dimensions (1D, 2D, 3D).
        num_channels: channels of each level, in encoder order (the decoder runs them reversed).
        in_channels: latent channels.
        out_channels: image channels.
        num_res_blocks: residual blocks per level (encoder order).
        norm_num_groups: GroupNorm groups.
        norm_eps: GroupNorm epsilon.
        attention_levels: attention per level (encoder order).
        with_nonlocal_attn: add ResBlock-Attention-ResBlock at the deepest level.
        use_flash_attention: kept for API compatibility; attention always uses SDPA.
        use_convtranspose: upsample with transposed convolutions.
        upsample_factors: one factor per upsampling step in decoder order (deepest first), i.e. the
            encoder's ``downsample_factors`` reversed; default 2 everywhere.
        attention_out_projection: apply the attention blocks' output projection.
        upsample_mode: the upsampling interpolation, ``"nearest"`` or ``"trilinear"`` (see ``Upsample``).
    """

    def __init__(
        self,
        spatial_dims: int,
        num_channels: Sequence[int],
        in_channels: int,
        out_channels: int,
        num_res_blocks: Sequence[int],
        norm_num_groups: int,
        norm_eps: float,
        attention_levels: Sequence[bool],
        with_nonlocal_attn: bool = True,
        use_flash_attention: bool = False,
        use_convtranspose: bool = False,
        upsample_factors: Sequence[Factor] | None = None,
        attention_out_projection: bool = False,
        upsample_mode: str = "nearest",
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.num_channels = tuple(num_channels)
        self.upsample_factors = normalize_downsample_factors(upsample_factors, len(num_channels), spatial_dims)
        # MONAI Generative's attributes
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_res_blocks = tuple(_as_level_list(num_res_blocks, len(num_channels)))
        self.norm_num_groups, self.norm_eps, self.attention_levels = norm_num_groups, norm_eps, tuple(attention_levels)
        rev_channels = list(reversed(num_channels))
        rev_attention = list(reversed(attention_levels))
        rev_res_blocks = list(reversed(_as_level_list(num_res_blocks, len(num_channels))))

        def attention(ch: int) -> AttentionBlock:
            return AttentionBlock(spatial_dims, ch, norm_num_groups=norm_num_groups, norm_eps=norm_eps,
                                  use_flash_attention=use_flash_attention,
                                  apply_out_projection=attention_out_projection)

        channels = rev_channels[0]
        blocks: list[nn.Module] = [_conv(spatial_dims, in_channels, channels)]
        if with_nonlocal_attn:
            blocks.append(ResBlock(spatial_dims, channels, norm_num_groups, norm_eps, channels))
            blocks.append(attention(channels))
            blocks.append(ResBlock(spatial_dims, channels, norm_num_groups, norm_eps, channels))
        for level, level_channels in enumerate(rev_channels):
            for _ in range(rev_res_blocks[level]):
                blocks.append(ResBlock(spatial_dims, channels, norm_num_groups, norm_eps, level_channels))
                channels = level_channels
                if rev_attention[level]:
                    blocks.append(attention(channels))
            if level < len(rev_channels) - 1:
                blocks.append(Upsample(spatial_dims, channels, use_convtranspose, self.upsample_factors[level],
                                       upsample_mode))
        blocks.append(nn.GroupNorm(norm_num_groups, channels, eps=norm_eps, affine=True))
        blocks.append(_conv(spatial_dims, channels, out_channels))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: Bx``in_channels``x[LATENT DIMS]. Returns: Bx``out_channels``x[LATENT DIMS * total factor]."""
        return _run_blocks(self.blocks, x, self._use_low_memory())


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, low_memory: bool) -> torch.Tensor:
    """Run all blocks; the final GroupNorm + conv pair may keep only its input (``low_memory``)."""
    for block in blocks[:-2]:
        x = block(x)
    return _norm_conv(x, blocks[-2], blocks[-1], False, low_memory)


class AutoencoderKL(LegacyPickleMixin, nn.Module):
    """Autoencoder with a KL-regularised latent space (Rombach et al. 2022; Pinaya et al. 2022).

    Same arguments, defaults and methods as MONAI Generative's AutoencoderKL, plus ``downsample_factors``.

    Args:
        spatial_dims: number of spatial dimensions (1D, 2D, 3D).
        in_channels: number of input channels.
        out_channels: number of output channels.
        num_res_blocks: residual blocks per level (an int applies to every level).
        num_channels: output channels of each level; all must be multiples of ``norm_num_groups``.
        attention_levels: which levels have attention blocks (same length as ``num_channels``).
        latent_channels: channels of the latent representation.
        norm_num_groups: GroupNorm groups.
        norm_eps: GroupNorm epsilon.
        with_encoder_nonlocal_attn: ResBlock-Attention-ResBlock at the bottom of the encoder.
        with_decoder_nonlocal_attn: ResBlock-Attention-ResBlock at the top of the decoder.
        use_flash_attention: kept for API compatibility; attention always runs through
            ``scaled_dot_product_attention``, which picks flash/memory-efficient kernels itself.
        use_checkpointing: trade a little compute for much less activation memory while training:
            convolution inputs that are cheap functions of kept tensors (GroupNorm+SiLU outputs, padded
            and upsampled maps) are recomputed in backward instead of stored, and attention blocks are
            checkpointed. Gradients are unchanged.
        use_convtranspose: upsample with transposed convolutions in the decoder.
        downsample_factors: one factor per downsampling step (``len(num_channels) - 1`` entries): an
            integer >= 1 or a per-axis tuple such as ``(4, 4, 2)``. ``None`` = 2 everywhere (the original).
            The decoder upsamples by the same factors in reverse order.
        attention_out_projection: apply the attention output projection (``proj_attn``). MONAI Generative
            never applies it (``False``, default); MONAI core's ``include_fc=True`` does.
        upsample_mode: the decoder's interpolation before each upsampling convolution: ``"nearest"``
            (MONAI Generative's, default) or ``"trilinear"`` (linear along every axis, ``align_corners=False``:
            MAISI's ``AutoencoderKlMaisi``, whose weights need it). Same weights and keys either way.

    Example:
        >>> model = AutoencoderKL(3, num_channels=(32, 64, 64), attention_levels=(False, False, False),
        ...                       num_res_blocks=1, downsample_factors=[4, 2])
        >>> model.latent_shape((128, 128, 64))
        (3, 16, 16, 8)
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        out_channels: int = 1,
        num_res_blocks: Sequence[int] | int = (2, 2, 2, 2),
        num_channels: Sequence[int] = (32, 64, 64, 64),
        attention_levels: Sequence[bool] = (False, False, True, True),
        latent_channels: int = 3,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        with_encoder_nonlocal_attn: bool = True,
        with_decoder_nonlocal_attn: bool = True,
        use_flash_attention: bool = False,
        use_checkpointing: bool = False,
        use_convtranspose: bool = False,
        downsample_factors: Sequence[Factor] | None = None,
        attention_out_projection: bool = False,
        upsample_mode: str = "nearest",
    ) -> None:
        super().__init__()
        check_upsample_mode(upsample_mode)
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims = {spatial_dims!r}: expected 1, 2 or 3")
        num_channels = list(num_channels)
        if not num_channels:
            raise ValueError("num_channels is empty: give one channel count per level, e.g. [32, 64, 64]")
        bad = [c for c in num_channels if c % norm_num_groups != 0]
        if bad:
            raise ValueError(
                f"num_channels = {num_channels}: every entry must be a multiple of norm_num_groups = "
                f"{norm_num_groups} (GroupNorm), but {bad} are not; change the channels or norm_num_groups"
            )
        if len(attention_levels) != len(num_channels):
            raise ValueError(
                f"attention_levels has {len(attention_levels)} entries ({list(attention_levels)}) but num_channels "
                f"has {len(num_channels)}: give one True/False per level, e.g. "
                f"{[False] * (len(num_channels) - 1) + [True]}"
            )
        res_blocks = _as_level_list(num_res_blocks, len(num_channels))
        if len(res_blocks) != len(num_channels):
            raise ValueError(
                f"num_res_blocks = {list(res_blocks)}: give a single integer or one integer per level "
                f"({len(num_channels)} levels)"
            )
        factors = normalize_downsample_factors(downsample_factors, len(num_channels), spatial_dims)

        # the constructor arguments, so a checkpoint can rebuild the network (see ``init_args``)
        self.init_args = copy.deepcopy(dict(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
            num_res_blocks=num_res_blocks, num_channels=num_channels, attention_levels=list(attention_levels),
            latent_channels=latent_channels, norm_num_groups=norm_num_groups, norm_eps=norm_eps,
            with_encoder_nonlocal_attn=with_encoder_nonlocal_attn,
            with_decoder_nonlocal_attn=with_decoder_nonlocal_attn,
            use_flash_attention=use_flash_attention, use_checkpointing=use_checkpointing,
            use_convtranspose=use_convtranspose, downsample_factors=downsample_factors,
            attention_out_projection=attention_out_projection, upsample_mode=upsample_mode,
        ))
        self.spatial_dims = spatial_dims
        self.latent_channels = latent_channels
        self.downsample_factors = factors
        self.total_factors = total_downsample_factors(factors, spatial_dims)
        self.encoder = Encoder(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            num_channels=num_channels,
            out_channels=latent_channels,
            num_res_blocks=res_blocks,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            attention_levels=attention_levels,
            with_nonlocal_attn=with_encoder_nonlocal_attn,
            use_flash_attention=use_flash_attention,
            downsample_factors=factors,
            attention_out_projection=attention_out_projection,
        )
        self.decoder = Decoder(
            spatial_dims=spatial_dims,
            num_channels=num_channels,
            in_channels=latent_channels,
            out_channels=out_channels,
            num_res_blocks=res_blocks,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            attention_levels=attention_levels,
            with_nonlocal_attn=with_decoder_nonlocal_attn,
            use_flash_attention=use_flash_attention,
            use_convtranspose=use_convtranspose,
            upsample_factors=list(reversed(factors)),
            attention_out_projection=attention_out_projection,
            upsample_mode=upsample_mode,
        )
        self.quant_conv_mu = _conv(spatial_dims, latent_channels, latent_channels, 1, 1, 0)
        self.quant_conv_log_sigma = _conv(spatial_dims, latent_channels, latent_channels, 1, 1, 0)
        self.post_quant_conv = _conv(spatial_dims, latent_channels, latent_channels, 1, 1, 0)
        self.attention_out_projection = attention_out_projection
        self.upsample_mode = upsample_mode
        self.use_checkpointing = use_checkpointing

    upsample_mode: str = "nearest"  # instances pickled before the mode existed

    # -- configuration helpers ---------------------------------------------------------------------
    @property
    def use_checkpointing(self) -> bool:
        return self._use_checkpointing

    @use_checkpointing.setter
    def use_checkpointing(self, value: bool) -> None:
        self._use_checkpointing = bool(value)
        for module in self.modules():
            if isinstance(module, _LowMemoryMixin):
                module.low_memory = self._use_checkpointing

    def latent_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Latent shape ``(latent_channels, *spatial)`` for an input of ``spatial_shape`` (validated)."""
        return (self.latent_channels, *latent_spatial_shape(spatial_shape, self.total_factors))

    def tiling_plan(self) -> TilingPlan | None:
        """How the exact tiled method streams this network (``generative.inferers.tiling``); ``None`` where it
        cannot (transposed-convolution upsampling, replaced modules, a subclass)."""
        if type(self) is not AutoencoderKL:
            return None
        encoder, decoder = _tiling_steps(self.encoder.blocks), _tiling_steps(self.decoder.blocks)
        heads = [plain_conv(c) for c in (self.quant_conv_mu, self.quant_conv_log_sigma, self.post_quant_conv)]
        if encoder is None or decoder is None or any(c is None for c in heads):
            return None
        mu, log_sigma, post = heads
        return TilingPlan(
            encoder=encoder,
            heads=[ConvStep(mu), ConvStep(log_sigma, finish=lambda t: torch.exp(torch.clamp(t, -30.0, 20.0) / 2))],
            decoder=[ConvStep(post), *decoder],
            factors=tuple(self.total_factors),
            latent_channels=self.latent_channels,
        )

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"input of shape {tuple(x.shape)}: expected B x C x {' x '.join(_AXIS_NAMES[self.spatial_dims])} "
                f"({self.spatial_dims + 2} dimensions) for spatial_dims={self.spatial_dims}"
            )
        check_spatial_shape(x.shape[2:], self.total_factors)

    # -- the upstream API (plus optional tiling for volumes larger than memory) ---------------------
    def encode(
        self, x: torch.Tensor, *, tile_size: Sequence[int] | int | None = None, tile_overlap: float = 0.5
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode an image into the latent mean and standard deviation.

        Args:
            x: BxCx[SPATIAL DIMS]; each spatial size divisible by its total downsampling factor.
            tile_size: encode tile by tile, tiles of this many voxels per axis (multiples of the total
                factor), with the whole volume's GroupNorm statistics (see ``generative.inferers.tiling``:
                exact for this network unless it upsamples with transposed convolutions, else blended
                overlapping tiles); ``None`` = the whole volume at once.
            tile_overlap: fraction of a tile shared with its neighbour when blending.

        Returns:
            ``(z_mu, z_sigma)``, each Bx``latent_channels``x[SPATIAL DIMS / total factor].
        """
        if tile_size is not None:
            self._check_input(x)
            return TilingInferer(tile_size, tile_overlap).encode(self, x)
        self._check_input(x)
        h = self.encoder(x)
        z_mu = self.quant_conv_mu(h)
        z_log_var = torch.clamp(self.quant_conv_log_sigma(h), -30.0, 20.0)
        return z_mu, torch.exp(z_log_var / 2)

    def sampling(self, z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
        """Reparameterised sample ``z_mu + eps * z_sigma`` with ``eps ~ N(0, I)``."""
        return z_mu + torch.randn_like(z_sigma) * z_sigma

    def reconstruct(
        self, x: torch.Tensor, *, tile_size: Sequence[int] | int | None = None, tile_overlap: float = 0.5
    ) -> torch.Tensor:
        """Encode and decode the latent mean.

        Args:
            x: BxCx[SPATIAL DIMS].
            tile_size: encode, then decode, tile by tile, tiles of this many voxels per axis (see
                :meth:`encode` and ``generative.inferers.tiling``); ``None`` = the whole volume.
            tile_overlap: fraction of a tile shared with its neighbour when blending.

        Returns:
            BxCx[SPATIAL DIMS].
        """
        if tile_size is not None:
            self._check_input(x)
            return TilingInferer(tile_size, tile_overlap).reconstruct(self, x)
        z_mu, _ = self.encode(x)
        return self.decode(z_mu)

    def decode(
        self, z: torch.Tensor, *, tile_size: Sequence[int] | int | None = None, tile_overlap: float = 0.5
    ) -> torch.Tensor:
        """Decode a latent.

        Args:
            z: Bx``latent_channels``x[LATENT DIMS].
            tile_size: decode tile by tile, output tiles of this many voxels per axis (multiples of the
                total factor; see :meth:`encode`); ``None`` = the whole latent at once.
            tile_overlap: fraction of a tile shared with its neighbour when blending.

        Returns:
            BxCx[LATENT DIMS * total factor].
        """
        if tile_size is not None:
            return TilingInferer(tile_size, tile_overlap).decode(self, z)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(reconstruction, z_mu, z_sigma)`` for x: BxCx[SPATIAL DIMS]."""
        z_mu, z_sigma = self.encode(x)
        return self.decode(self.sampling(z_mu, z_sigma)), z_mu, z_sigma

    def encode_stage_2_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A sampled latent, as the diffusion model's training input."""
        z_mu, z_sigma = self.encode(x)
        return self.sampling(z_mu, z_sigma)

    def decode_stage_2_outputs(self, z: torch.Tensor) -> torch.Tensor:
        """Decode a latent produced by the diffusion model."""
        return self.decode(z)

    # -- whole models pickled by MONAI Generative 0.2.3 (``torch.save(model)``) ----------------------
    _own_marker = "init_args"  # only our instances have it; see ``generative._dropin.LegacyPickleMixin``

    @classmethod
    def _args_from_023(cls, old: nn.Module) -> dict:
        """Constructor arguments of an unpickled 0.2.3 AutoencoderKL tree."""
        enc, dec = old.encoder, old.decoder

        def nonlocal_attn(coder: nn.Module) -> bool:  # attention blocks beyond those of the levels
            per_levels = sum(n for n, attn in zip(coder.num_res_blocks, coder.attention_levels) if attn)
            return sum(type(b).__name__ == "AttentionBlock" for b in coder.blocks) > per_levels

        attention = [b for b in list(enc.blocks) + list(dec.blocks) if type(b).__name__ == "AttentionBlock"]
        return dict(
            spatial_dims=enc.spatial_dims, in_channels=enc.in_channels, out_channels=dec.out_channels,
            num_res_blocks=enc.num_res_blocks, num_channels=enc.num_channels, attention_levels=enc.attention_levels,
            latent_channels=old.latent_channels, norm_num_groups=enc.norm_num_groups, norm_eps=enc.norm_eps,
            with_encoder_nonlocal_attn=nonlocal_attn(enc), with_decoder_nonlocal_attn=nonlocal_attn(dec),
            use_flash_attention=any(getattr(b, "use_flash_attention", False) for b in attention),
            use_checkpointing=getattr(old, "use_checkpointing", False),
            use_convtranspose=any(getattr(b, "use_convtranspose", False) for b in dec.blocks),
        )

    def load_monai_core_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load weights saved by ``monai.networks.nets.AutoencoderKL``; see ``load_monai_core_state_dict``."""
        load_monai_core_state_dict(self, state_dict)


# ----------------------------------------------------------------------------------------------------
# MONAI core checkpoints
# ----------------------------------------------------------------------------------------------------
def load_monai_core_state_dict(model: AutoencoderKL, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a checkpoint of MONAI core's ``monai.networks.nets.AutoencoderKL`` into ``model``.

    MONAI core renamed some weights when it adopted the network: attention projections live under
    ``attn.`` (``attn.to_q`` ...; ``attn.qkv`` with ``use_combined_linear=True``; ``attn.out_proj`` with
    ``include_fc=True``) and upsampling convolutions are called ``postconv``. This maps them back to
    MONAI Generative's layout and loads with ``strict=True``.

    The model must be built with the same architecture arguments (MONAI core's ``channels`` is our
    ``num_channels``, ``use_checkpoint`` our ``use_checkpointing``). A core model with ``include_fc=True``
    (its default) applies an output projection: build ours with ``attention_out_projection=True``.

    Raises:
        ValueError: for checkpoints that cannot be represented (transposed-convolution upsampling, which
            MONAI core implements with a different kernel) or that need ``attention_out_projection``.
    """
    source = dict(state_dict)
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    has_out_proj = False
    for key, value in source.items():
        if ".attn." in key:
            prefix, name = key.split(".attn.", 1)
            if name.startswith("qkv."):
                param = name.split(".", 1)[1]
                for part, chunk in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                    mapped[f"{prefix}.{part}.{param}"] = chunk
                continue
            if name.startswith("out_proj."):
                has_out_proj = True
                name = "proj_attn." + name.split(".", 1)[1]
            mapped[f"{prefix}.{name}"] = value
        elif ".postconv." in key:
            mapped[key.replace(".postconv.", ".conv.")] = value
        elif ".deconv." in key:
            raise ValueError(
                f"{key}: MONAI core checkpoints with use_convtranspose=True use a different upsampling kernel "
                f"and cannot be loaded into this AutoencoderKL"
            )
        else:
            mapped[key] = value
    if has_out_proj and not model.attention_out_projection:
        raise ValueError(
            "this MONAI core checkpoint applies an attention output projection (include_fc=True); build the "
            "model with AutoencoderKL(..., attention_out_projection=True) to load it with the same outputs"
        )
    for key in target:
        if key.endswith("proj_attn.weight") and key not in mapped:  # include_fc=False: identity projection
            mapped[key] = torch.eye(target[key].shape[0], dtype=target[key].dtype)
            mapped[key.replace(".weight", ".bias")] = torch.zeros_like(target[key.replace(".weight", ".bias")])
    model.load_state_dict(mapped, strict=True)
