"""The diffusion UNet of a checkpoint: MONAI core's ``DiffusionModelUNet``, or the same network that also reads
its conditions as extra input channels (the model-zoo brain LDM's way).

The brain LDM concatenates its four covariates, broadcast over the latent's grid, to the three latent channels
(``in_channels`` 7) and gives them to cross-attention as well. :class:`ConcatConditionUNet` does the
concatenation inside ``forward``, so the sampler and the trainer call it like any conditional UNet
(``unet(x, timesteps, context=...)``). Its weights are core's, key for key.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet

__all__ = ["ConcatConditionUNet", "build_unet", "unet_defaults", "unet_differences", "CONCAT_KEY"]

CONCAT_KEY = "concat_conditions"  # in a checkpoint's ``unet_args``: conditions read as input channels


class ConcatConditionUNet(DiffusionModelUNet):
    """MONAI core's DiffusionModelUNet whose input is the latent and the first ``concat_conditions`` values of the
    cross-attention context, each broadcast to a constant channel.

    Args:
        concat_conditions: context values appended as channels (``in_channels`` counts them).
        kwargs: MONAI core's DiffusionModelUNet arguments.
    """

    def __init__(self, concat_conditions: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 < concat_conditions < kwargs["in_channels"]:
            raise ValueError(f"concat_conditions must be in [1, in_channels), got {concat_conditions}")
        self.concat_conditions = concat_conditions

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Args: x: Bx(in_channels - concat_conditions)x[SPATIAL DIMS] latents; context: Bx1xN (N >=
        ``concat_conditions``). Returns: Bx``out_channels``x[SPATIAL DIMS]."""
        if context is None:
            raise ValueError("this UNet reads its conditions as input channels: a context is required")
        values = context[:, 0, : self.concat_conditions].to(x.dtype)
        channels = values.reshape(*values.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
        return super().forward(torch.cat([x, channels], dim=1), timesteps, context=context,
                               class_labels=class_labels, **kwargs)


def build_unet(unet_args: Mapping[str, Any]) -> DiffusionModelUNet:
    """The UNet a checkpoint's ``unet_args`` describe (core's class, or :class:`ConcatConditionUNet`), with its
    attention through ``scaled_dot_product_attention`` (``use_flash_attention``): the same weights and state-dict
    keys as the math path, the same outputs to float rounding, but no voxels x voxels attention matrix kept for
    backward (and no fp16 overflow of q.k before scaling). The kernel is not part of the architecture, so
    checkpoints keep ``unet_args`` without it and old ones load unchanged."""
    args = {**unet_args, "use_flash_attention": True}
    if args.get(CONCAT_KEY):
        return ConcatConditionUNet(**args)
    args.pop(CONCAT_KEY, None)
    return DiffusionModelUNet(**args)



def unet_defaults() -> dict[str, Any]:
    """What an argument that a checkpoint's ``unet_args`` leave out means: core DiffusionModelUNet's defaults and
    no concatenated conditions."""
    parameters = inspect.signature(DiffusionModelUNet.__init__).parameters.items()
    defaults = {name: p.default for name, p in parameters if p.default is not inspect.Parameter.empty}
    return {**defaults, CONCAT_KEY: 0}


_PER_LEVEL = ("num_head_channels", "num_res_blocks")  # one value for every level, or one per level
_NOT_ARCHITECTURE = ("use_flash_attention", "use_checkpointing")  # kernels and memory settings


def unet_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every UNet constructor argument in which two ``unet_args`` differ, lists and tuples
    alike. An argument one side leaves out is at its default (:func:`unet_defaults`), so arguments stored before a
    key existed (e.g. ``resblock_updown``) equal a config that leaves it at its default, and an imported UNet's
    full argument list equals the few keys our config gives; one value for all levels equals that value per level.
    """

    def plain(value: Any) -> Any:
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value

    defaults = unet_defaults()
    full = [{**defaults, **old}, {**defaults, **new}]
    comparable = []
    for args in full:
        levels = len(args["channels"])
        comparable.append({k: ([v] * levels if k in _PER_LEVEL and isinstance(v, int) else plain(v))
                           for k, v in args.items()})
    keys = [k for k in {**old, **new} if k not in _NOT_ARCHITECTURE]
    return [f"{k}: {full[0][k]} -> {full[1][k]}" for k in keys if comparable[0][k] != comparable[1][k]]
