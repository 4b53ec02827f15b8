"""A ControlNet that makes the frozen diffusion UNet follow a label map, and the UNet it steers.

The label map (B x 1 x [SPATIAL DIMS] integer classes, at image size) is one-hot encoded and brought to the
latent grid by the ControlNet's conditioning embedding (MONAI core's ``ControlNet``): one stride-2 block per
factor 2 of the autoencoder's total downsampling; the part of a factor that is not a power of two (or the
extra factor of an anisotropic axis) is averaged away first. The ControlNet starts from the UNet's weights
(every key they share) and its residuals are added to the UNet's skip connections and middle block, scaled by
``conditioning_scale`` (Zhang and Agrawala, 2023). The covariates' class labels and cross-attention context
reach the ControlNet too (not only the UNet; cf. MONAI#8344).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import ControlNet, DiffusionModelUNet
from monai.networks.utils import copy_model_state

from generative.networks.nets import AutoencoderKL
from monai_diffusion.config import Config
from monai_diffusion.errors import CheckpointError
from monai_diffusion.generation.conditioning import Conditioning
from monai_diffusion.runs.checkpoints import _stored_config, load_checkpoint, resolve_checkpoint

__all__ = ["MaskControlNet", "ControlledUNet", "controlnet_kwargs", "embedding_plan", "ControlNetBundle",
           "load_controlnet"]


def _twos(factor: int) -> int:
    """How many times 2 divides ``factor``."""
    count = 0
    while factor % 2 == 0 and factor > 1:
        factor //= 2
        count += 1
    return count


def embedding_plan(total_factors: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """``(stride-2 blocks, pooling kernel per axis)`` that take the image grid to the latent grid.

    Args:
        total_factors: the autoencoder's total downsampling per axis (e.g. (4, 4, 4) or (8, 8, 4)).

    Returns:
        ``blocks`` = the power of two every axis shares; ``kernel[axis]`` = ``total_factors[axis] / 2**blocks``
        (average pooling applied first; all ones when the factors are the same power of two).
    """
    blocks = min(_twos(int(f)) for f in total_factors)
    return blocks, tuple(int(f) // 2**blocks for f in total_factors)


def controlnet_kwargs(unet_args: dict[str, Any], num_classes: int, conditioning_channels: int,
                      total_factors: tuple[int, ...]) -> dict[str, Any]:
    """Arguments of MONAI's ControlNet: the UNet's architecture, a conditioning embedding from ``num_classes``
    one-hot channels with ``conditioning_channels * 2**i`` channels in block ``i``."""
    blocks, _ = embedding_plan(total_factors)
    keep = ("spatial_dims", "in_channels", "num_res_blocks", "channels", "attention_levels", "norm_num_groups",
            "norm_eps", "resblock_updown", "num_head_channels", "with_conditioning", "transformer_num_layers",
            "cross_attention_dim", "num_class_embeds", "upcast_attention", "include_fc", "use_combined_linear",
            "use_flash_attention")
    kwargs = {k: v for k, v in unet_args.items() if k in keep}
    kwargs.update(conditioning_embedding_in_channels=int(num_classes),
                  conditioning_embedding_num_channels=[int(conditioning_channels) * 2**i for i in range(blocks + 1)])
    return kwargs


class MaskControlNet(nn.Module):
    """MONAI's ControlNet fed with a one-hot label map at image size.

    Args:
        controlnet_args: see :func:`controlnet_kwargs`.
        num_classes: classes of the label maps (background included).
        pool_kernel: average pooling of the one-hot map before the embedding (see :func:`embedding_plan`).
    """

    def __init__(self, controlnet_args: dict[str, Any], num_classes: int, pool_kernel: tuple[int, ...]) -> None:
        super().__init__()
        self.controlnet = ControlNet(**controlnet_args)
        self.num_classes, self.pool_kernel = int(num_classes), tuple(int(k) for k in pool_kernel)

    def one_hot(self, label: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """B x 1 x [SPATIAL DIMS] integer classes -> B x num_classes x [SPATIAL DIMS] (pooled as planned)."""
        # scattered into the target dtype: no int64 one-hot of num_classes x the volume on the way
        onehot = torch.zeros((label.shape[0], self.num_classes, *label.shape[2:]), dtype=dtype, device=label.device)
        onehot.scatter_(1, label.long(), 1.0)
        if any(k > 1 for k in self.pool_kernel):
            pool = F.avg_pool3d if onehot.dim() == 5 else F.avg_pool2d
            onehot = pool(onehot, kernel_size=self.pool_kernel)
        return onehot

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, label: torch.Tensor, conditioning_scale: float = 1.0,
                context: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Residuals for the UNet's down blocks and middle block.

        Args:
            x: noisy latents B x C x [LATENT DIMS].
            timesteps: B.
            label: B x 1 x [SPATIAL DIMS] integer classes (image size).
            conditioning_scale: multiplies every residual.
            context: B x 1 x cross_attention_dim (continuous covariates), or None.
            class_labels: B (categorical covariates), or None.
        """
        return self.controlnet(x=x, timesteps=timesteps, controlnet_cond=self.one_hot(label, x.dtype),
                               conditioning_scale=conditioning_scale, context=context, class_labels=class_labels)


class ControlledUNet(nn.Module):
    """The UNet steered by a ControlNet for fixed label maps, with the UNet's call signature, so every sampler
    and loss that runs a UNet runs it (``generate_volumes``, classifier-free guidance: when the batch is a
    multiple of the label maps' batch, e.g. the conditional and unconditional halves, the maps are repeated).

    Args:
        unet: the (frozen) diffusion UNet.
        controlnet: a :class:`MaskControlNet` (or its DDP wrapper).
        label: B x 1 x [SPATIAL DIMS] integer classes.
        conditioning_scale: scales the ControlNet's residuals.
    """

    def __init__(self, unet: nn.Module, controlnet: nn.Module, label: torch.Tensor,
                 conditioning_scale: float = 1.0) -> None:
        super().__init__()
        self.unet, self.controlnet = unet, controlnet
        self.label, self.conditioning_scale = label, float(conditioning_scale)
        # the wrapper's mode is the ControlNet's, so a sampler that restores "the mode it found" leaves the frozen
        # UNet and a sampling ControlNet in eval mode
        self.training = bool(controlnet.training)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        label = self.label.to(x.device)
        if len(x) != len(label):
            label = label.repeat(len(x) // len(label), *([1] * (label.dim() - 1)))
        down, mid = self.controlnet(x, timesteps, label, self.conditioning_scale, context=context,
                                    class_labels=class_labels)
        return self.unet(x, timesteps=timesteps, context=context, class_labels=class_labels,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid)


def build_controlnet(unet: DiffusionModelUNet, unet_args: dict[str, Any], num_classes: int,
                     conditioning_channels: int, total_factors: tuple[int, ...]) -> tuple[MaskControlNet, dict]:
    """A :class:`MaskControlNet` initialised from ``unet`` (every key both have, with the same shape); returns it
    and its arguments (for checkpoints)."""
    args = controlnet_kwargs(unet_args, num_classes, conditioning_channels, total_factors)
    _, kernel = embedding_plan(total_factors)
    model = MaskControlNet(args, num_classes, kernel)
    copy_model_state(model.controlnet, unet.state_dict(), inplace=True)
    return model, {"controlnet_args": args, "num_classes": int(num_classes), "pool_kernel": list(kernel)}


@dataclasses.dataclass
class ControlNetBundle:
    """A trained ControlNet run: the frozen UNet, the ControlNet (EMA weights when kept), the autoencoder."""

    unet: DiffusionModelUNet
    controlnet: MaskControlNet
    autoencoder: AutoencoderKL
    config: Config
    scale_factor: float
    reference_affine: torch.Tensor
    conditioning: Conditioning

    def controlled(self, label: torch.Tensor, conditioning_scale: float | None = None) -> ControlledUNet:
        scale = self.config.controlnet.conditioning_scale if conditioning_scale is None else conditioning_scale
        return ControlledUNet(self.unet, self.controlnet, label, scale)


def _ema_or(state: dict[str, Any], key: str, ema_key: str) -> dict[str, Any]:
    if state.get(ema_key) is not None:
        return {k.removeprefix("module."): v for k, v in state[ema_key].items() if k.startswith("module.")}
    return state[key]


def load_controlnet(run_or_checkpoint: str | Path, map_location: str | torch.device = "cpu",
                    key: str = "--run") -> ControlNetBundle:
    """Load a trained ControlNet run (folder or checkpoint), in eval mode."""
    path = resolve_checkpoint(run_or_checkpoint, key)
    state = load_checkpoint(path)
    if state.get("stage") != "controlnet":
        raise CheckpointError(f"{key}: {path} is not a ControlNet checkpoint")
    config = _stored_config(state, path)
    unet = DiffusionModelUNet(**state["unet_args"])
    unet.load_state_dict(state["unet"], strict=True)
    spec = state["controlnet_spec"]
    controlnet = MaskControlNet(spec["controlnet_args"], spec["num_classes"], tuple(spec["pool_kernel"]))
    controlnet.load_state_dict(_ema_or(state, "controlnet", "ema"), strict=True)
    autoencoder = AutoencoderKL(**state["autoencoder_args"])
    autoencoder.load_state_dict(state["autoencoder"], strict=True)
    device = torch.device(map_location) if isinstance(map_location, str) else map_location
    return ControlNetBundle(unet.to(device).eval(), controlnet.to(device).eval(), autoencoder.to(device).eval(),
                            config, float(state["scale_factor"]), torch.as_tensor(state["reference_affine"]),
                            Conditioning.from_state(state.get("conditioning")))


def total_factors_of(autoencoder: AutoencoderKL) -> tuple[int, ...]:
    """The autoencoder's total downsampling per axis."""
    return tuple(int(f) for f in autoencoder.total_factors)


