"""Convolutions whose input is recomputed during backward instead of stored.

Most activation memory of a 3D autoencoder sits in tensors that autograd keeps only because a
convolution needs its *input* to compute the weight gradient: the output of ``GroupNorm -> SiLU``
inside every residual block, the zero-padded input of every downsampling layer and the
nearest-neighbour upsampled input of every upsampling layer. Those inputs are cheap, elementwise
functions of a tensor that is kept anyway (the block input), while the convolution itself is the
expensive part of the network.

:func:`conv_with_recomputed_input` therefore keeps only the cheap op's input ``x``. In backward it
recomputes ``h = pre_op(x)`` (elementwise work) and calls the convolution's backward kernel directly,
so the convolution's forward is **not** repeated. Gradients are identical to plain autograd because the
same operations run on the same values, under the same autocast state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["conv_with_recomputed_input"]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _RecomputedInputConv(torch.autograd.Function):
    """``y = conv(act(pre_op(x, *pre_params)))`` that saves ``x`` rather than the convolution input."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        pre_op: Callable[..., torch.Tensor],
        silu: bool,
        conv: nn.Conv1d | nn.Conv2d | nn.Conv3d,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *pre_params: torch.Tensor,
    ) -> torch.Tensor:
        device_type = x.device.type
        ctx.pre_op, ctx.silu, ctx.conv = pre_op, silu, conv
        ctx.autocast = (device_type, *_autocast_state(device_type))
        ctx.has_bias = bias is not None
        h = _apply_pre(pre_op, silu, x, pre_params)
        y = _CONV_FN[weight.dim() - 2](h, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        ctx.conv_dtype, ctx.input_shape = y.dtype, h.shape
        tensors = (x, weight, bias, *pre_params) if bias is not None else (x, weight, *pre_params)
        ctx.save_for_backward(*tensors)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        x, weight = saved[0], saved[1]
        bias = saved[2] if ctx.has_bias else None
        pre_params = saved[3:] if ctx.has_bias else saved[2:]
        needs_x, needs_w, needs_b = ctx.needs_input_grad[3:6]
        needs_pre = ctx.needs_input_grad[6:]
        device_type, autocast_on, autocast_dtype = ctx.autocast
        conv, cdt = ctx.conv, ctx.conv_dtype
        grad_y = grad_y.to(cdt)
        conv_args = (
            list(conv.stride), list(conv.padding), list(conv.dilation), False, [0] * (weight.dim() - 2), conv.groups
        )

        def autocast() -> torch.autocast:
            return torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on)

        # 1. weight and bias gradients need the convolution input: recompute it without a graph, then drop it
        grad_w = grad_b = None
        if needs_w or (needs_b and bias is not None):
            with torch.no_grad(), autocast():
                h = _apply_pre(ctx.pre_op, ctx.silu, x, pre_params).to(cdt)
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad_y, h, weight.to(cdt), [weight.shape[0]] if bias is not None else None, *conv_args,
                [False, needs_w, needs_b and bias is not None],
            )
            del h
        # 2. the input gradient needs only the input's shape (as torch.nn.grad.convNd_input does)
        grad_x = None
        grad_pre: list[torch.Tensor | None] = [None] * len(pre_params)
        if needs_x or any(needs_pre):
            placeholder = grad_y.new_empty(1).expand(ctx.input_shape)
            grad_h = torch.ops.aten.convolution_backward(
                grad_y, placeholder, weight.to(cdt), None, *conv_args, [True, False, False]
            )[0]
            del grad_y
            # 3. back through the pre-op (and SiLU), recomputed with a small local graph
            with torch.enable_grad(), autocast():
                x_local = x.detach().requires_grad_(needs_x)
                params_local = [p.detach().requires_grad_(n) for p, n in zip(pre_params, needs_pre)]
                pre = ctx.pre_op(x_local, *params_local)
            if ctx.silu:
                grad_h = torch.ops.aten.silu_backward(grad_h.to(pre.dtype), pre.detach())
            wanted = [t for t in (x_local, *params_local) if t.requires_grad]
            grads = iter(torch.autograd.grad(pre, wanted, grad_h.to(pre.dtype)))
            grad_x = next(grads) if x_local.requires_grad else None
            grad_pre = [next(grads) if p.requires_grad else None for p in params_local]
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if (grad_b is not None and bias is not None) else None
        return (None, None, None, grad_x, grad_w, grad_b, *grad_pre)


def _apply_pre(pre_op: Callable[..., torch.Tensor], silu: bool, x: torch.Tensor, params) -> torch.Tensor:
    h = pre_op(x, *params)
    return F.silu(h) if silu else h


def conv_with_recomputed_input(
    x: torch.Tensor,
    conv: nn.Conv1d | nn.Conv2d | nn.Conv3d,
    pre_op: Callable[..., torch.Tensor],
    pre_params: Sequence[torch.Tensor] = (),
    silu: bool = False,
) -> torch.Tensor:
    """Compute ``conv(silu?(pre_op(x, *pre_params)))`` keeping only ``x`` for backward.

    Args:
        x: BxCx[SPATIAL DIMS] input of the cheap pre-op.
        conv: the (non-transposed, zero-padded) convolution layer.
        pre_op: cheap deterministic function ``(x, *pre_params) -> h`` (GroupNorm, padding, upsampling).
        pre_params: tensors ``pre_op`` depends on that may need gradients (e.g. GroupNorm affine).
        silu: apply SiLU after ``pre_op``; its backward is computed directly, which keeps one tensor less.

    Returns:
        the convolution output, identical to ``conv(silu?(pre_op(x, *pre_params)))``.
    """
    if isinstance(conv, nn.modules.conv._ConvTransposeNd) or conv.padding_mode != "zeros":
        raise ValueError("conv_with_recomputed_input supports plain zero-padded convolutions only")
    if isinstance(conv.padding, str):
        raise ValueError("conv_with_recomputed_input needs explicit integer padding, not 'same'/'valid'")
    return _RecomputedInputConv.apply(pre_op, silu, conv, x, conv.weight, conv.bias, *pre_params)
