"""The typed configuration schema: load a YAML file, apply ``--set`` overrides, validate once.

Every section is a dataclass; the loader walks the YAML against the type hints, so a typo or a wrong
type is reported with its full dotted path before any data is read:

    autoencoder.trainig: unknown key (did you mean 'autoencoder.training'?)
    autoencoder.training.batch_size: expected an integer, got 'two' (str)

The guide's rules (factor list length, divisibility of the volume by the total factor of each axis,
channels divisible by the GroupNorm groups, ...) are checked here as well, with suggestions.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from generative.networks.nets.autoencoderkl import (
    check_spatial_shape,
    nearest_valid_sizes,
    normalize_downsample_factors,
    total_downsample_factors,
)
from monai_diffusion.data import DataConfig, DataError, validate_data_config

__all__ = [
    "ConfigError",
    "Config",
    "AutoencoderConfig",
    "AutoencoderTrainingConfig",
    "DiscriminatorConfig",
    "PerceptualConfig",
    "DiffusionConfig",
    "DiffusionTrainingConfig",
    "SchedulerConfig",
    "SamplingConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "save_config",
    "apply_overrides",
]


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key, the value and what is expected."""


# ----------------------------------------------------------------------------------------------------
# the schema
# ----------------------------------------------------------------------------------------------------
@dataclass
class PerceptualConfig:
    """Offline 3D perceptual loss (MedicalNet ResNet features).

    Attributes:
        network: MedicalNet depth: resnet10, resnet18, resnet34 or resnet50.
        weights_path: local MedicalNet weights file (e.g. resnet_10_23dataset.pth); required when
            ``training.use_perceptual_loss`` is true. Nothing is downloaded at run time.
    """

    network: Literal["resnet10", "resnet18", "resnet34", "resnet50"] = "resnet10"
    weights_path: str | None = None


@dataclass
class DiscriminatorConfig:
    """MONAI core's PatchDiscriminator.

    Attributes:
        num_layers_d: number of strided convolution layers.
        num_channels: channels of the first layer (doubled per layer).
    """

    num_layers_d: int = 3
    num_channels: int = 32


@dataclass
class AutoencoderTrainingConfig:
    """How the autoencoder is trained (the guide's ``autoencoder.training`` keys and the recipe's knobs).

    Attributes:
        batch_size: volumes per step and device.
        gradient_accumulation_steps: micro-batches summed before each optimiser step.
        mixed_precision: autocast (bf16 where supported, else fp16 with a GradScaler).
        use_gradient_checkpointing: the network's low-memory checkpointing.
        use_perceptual_loss: add the offline MedicalNet perceptual loss (needs ``perceptual.weights_path``).
        use_adversarial_loss: add the patch adversarial loss after ``adversarial_warmup_epochs``.
        fast_dev_run: run ``fast_dev_run_batches`` train and validation batches end to end, then stop.
        fast_dev_run_batches: batches for ``fast_dev_run``.
        n_epochs: passes over the training set.
        max_steps: stop after this many optimiser steps (None: run all epochs).
        learning_rate: Adam learning rate of the autoencoder.
        discriminator_learning_rate: Adam learning rate of the discriminator.
        kl_weight: weight of the KL term.
        perceptual_weight: weight of the perceptual term.
        adversarial_weight: weight of the generator's adversarial term.
        adversarial_warmup_epochs: epochs trained without the adversarial loss.
        val_interval: validate every this many epochs.
        num_preview_volumes: validation volumes shown in the preview PNG.
        checkpoint_every_n_steps: also save ``last`` every this many optimiser steps (None: per epoch).
        keep_last_checkpoints: step checkpoints kept (``checkpoints/step_*.pt``; ``best`` is always kept).
        log_every_n_steps: TensorBoard scalar interval in optimiser steps.
    """

    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    mixed_precision: bool = False
    use_gradient_checkpointing: bool = False
    use_perceptual_loss: bool = False
    use_adversarial_loss: bool = True
    fast_dev_run: bool = False
    fast_dev_run_batches: int = 2
    n_epochs: int = 100
    max_steps: int | None = None
    learning_rate: float = 1e-4
    discriminator_learning_rate: float = 5e-4
    kl_weight: float = 1e-6
    perceptual_weight: float = 1e-3
    adversarial_weight: float = 1e-2
    adversarial_warmup_epochs: int = 5
    val_interval: int = 5
    num_preview_volumes: int = 1
    checkpoint_every_n_steps: int | None = None
    keep_last_checkpoints: int = 3
    log_every_n_steps: int = 10


@dataclass
class AutoencoderConfig:
    """The AutoencoderKL (the guide's ``autoencoder`` keys) and how it is trained.

    Attributes:
        spatial_dims: 3 for volumes (2 for slices).
        in_channels: image channels.
        out_channels: reconstructed channels.
        num_channels: channels per level; ``len(num_channels) - 1`` downsampling steps.
        downsample_factors: one factor per step (integer or per-axis list); None = 2 everywhere.
        latent_channels: channels of the latent.
        num_res_blocks: residual blocks per level (one integer or one per level).
        attention_levels: attention per level.
        norm_num_groups: GroupNorm groups; every entry of num_channels must be divisible by it.
        norm_eps: GroupNorm epsilon.
        with_encoder_nonlocal_attn: ResBlock-Attention-ResBlock at the encoder's bottom.
        with_decoder_nonlocal_attn: the same at the decoder's top.
        use_convtranspose: transposed-convolution upsampling.
        training: see AutoencoderTrainingConfig.
        discriminator: see DiscriminatorConfig.
        perceptual: see PerceptualConfig.
    """

    spatial_dims: int = 3
    in_channels: int = 1
    out_channels: int = 1
    num_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    downsample_factors: list[Union[int, list[int]]] | None = field(default_factory=lambda: [2, 2])
    latent_channels: int = 3
    num_res_blocks: Union[int, list[int]] = 1
    attention_levels: list[bool] = field(default_factory=lambda: [False, False, True])
    norm_num_groups: int = 16
    norm_eps: float = 1e-6
    with_encoder_nonlocal_attn: bool = False
    with_decoder_nonlocal_attn: bool = False
    use_convtranspose: bool = False
    training: AutoencoderTrainingConfig = field(default_factory=AutoencoderTrainingConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)

    def model_kwargs(self, use_checkpointing: bool | None = None) -> dict[str, Any]:
        """Keyword arguments for ``generative.networks.nets.AutoencoderKL``."""
        ckpt = self.training.use_gradient_checkpointing if use_checkpointing is None else use_checkpointing
        return dict(
            spatial_dims=self.spatial_dims,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            num_channels=list(self.num_channels),
            downsample_factors=copy.deepcopy(self.downsample_factors),
            latent_channels=self.latent_channels,
            num_res_blocks=self.num_res_blocks,
            attention_levels=list(self.attention_levels),
            norm_num_groups=self.norm_num_groups,
            norm_eps=self.norm_eps,
            with_encoder_nonlocal_attn=self.with_encoder_nonlocal_attn,
            with_decoder_nonlocal_attn=self.with_decoder_nonlocal_attn,
            use_convtranspose=self.use_convtranspose,
            use_checkpointing=ckpt,
        )


@dataclass
class SchedulerConfig:
    """The DDPM noise schedule (the established 3D LDM recipe: 1000 steps, scaled linear betas).

    Attributes:
        num_train_timesteps: diffusion steps.
        schedule: ``scaled_linear_beta``, ``linear_beta`` or ``cosine``.
        beta_start: first beta.
        beta_end: last beta.
        clip_sample: clip predicted samples to [-1, 1] (off for latents, which are not bounded).
    """

    num_train_timesteps: int = 1000
    schedule: Literal["scaled_linear_beta", "linear_beta", "cosine"] = "scaled_linear_beta"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    clip_sample: bool = False


@dataclass
class DiffusionTrainingConfig:
    """How the latent diffusion UNet is trained.

    Attributes:
        batch_size: latents per step and device.
        gradient_accumulation_steps: micro-batches per optimiser step.
        mixed_precision: autocast (bf16 where supported, else fp16 with a GradScaler).
        fast_dev_run: a few batches end to end, then stop.
        fast_dev_run_batches: batches for ``fast_dev_run``.
        n_epochs: passes over the training latents.
        max_steps: stop after this many optimiser steps (None: all epochs).
        learning_rate: Adam learning rate.
        ema_decay: keep an exponential moving average of the UNet weights (None: off), e.g. 0.999.
        val_interval: validate (loss + sample preview) every this many epochs.
        num_preview_samples: volumes generated for the preview PNG at each validation.
        preview_inference_steps: DDIM steps for the preview samples.
        scale_factor_batches: batches used to estimate the latent scale factor (1 / std).
        cache_latents_on_disk: also write the encoded latents to the run folder and reuse them on resume.
        checkpoint_every_n_steps: also save ``last`` every this many optimiser steps.
        keep_last_checkpoints: step checkpoints kept (``checkpoints/step_*.pt``; ``best`` is always kept).
        log_every_n_steps: TensorBoard scalar interval in optimiser steps.
    """

    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    mixed_precision: bool = False
    fast_dev_run: bool = False
    fast_dev_run_batches: int = 2
    n_epochs: int = 200
    max_steps: int | None = None
    learning_rate: float = 1e-4
    ema_decay: float | None = None
    val_interval: int = 10
    num_preview_samples: int = 1
    preview_inference_steps: int = 50
    scale_factor_batches: int = 4
    cache_latents_on_disk: bool = False
    checkpoint_every_n_steps: int | None = None
    keep_last_checkpoints: int = 3
    log_every_n_steps: int = 10


@dataclass
class SamplingConfig:
    """Defaults for ``sample.py`` (each can be overridden on its command line).

    Attributes:
        scheduler: ``ddpm`` (all training steps) or ``ddim`` (fewer steps).
        num_inference_steps: steps for DDIM.
        batch_size: volumes generated at once.
    """

    scheduler: Literal["ddpm", "ddim"] = "ddim"
    num_inference_steps: int = 50
    batch_size: int = 1


@dataclass
class DiffusionConfig:
    """Stage 2: MONAI core's DiffusionModelUNet trained on the frozen autoencoder's latents.

    Attributes:
        autoencoder_run: autoencoder run folder or checkpoint (None: ``<output_dir>/autoencoder``).
        num_channels: UNet channels per level; the latent size must be divisible by 2^(levels - 1).
        attention_levels: attention per level.
        num_head_channels: channels per attention head, per level (0 where there is no attention).
        num_res_blocks: residual blocks per level.
        norm_num_groups: GroupNorm groups of the UNet.
        scheduler: see SchedulerConfig.
        training: see DiffusionTrainingConfig.
        sampling: see SamplingConfig.
    """

    autoencoder_run: str | None = None
    num_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    attention_levels: list[bool] = field(default_factory=lambda: [False, True, True])
    num_head_channels: list[int] = field(default_factory=lambda: [0, 32, 32])
    num_res_blocks: int = 1
    norm_num_groups: int = 16
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    training: DiffusionTrainingConfig = field(default_factory=DiffusionTrainingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def unet_kwargs(self, latent_channels: int, spatial_dims: int) -> dict[str, Any]:
        """Keyword arguments for ``monai.networks.nets.DiffusionModelUNet``."""
        return dict(
            spatial_dims=spatial_dims,
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_res_blocks=self.num_res_blocks,
            channels=list(self.num_channels),
            attention_levels=list(self.attention_levels),
            num_head_channels=list(self.num_head_channels),
            norm_num_groups=self.norm_num_groups,
        )


@dataclass
class Config:
    """A whole run.

    Attributes:
        seed: seeds Python, NumPy and torch, and the data split.
        output_dir: runs are written below it (``<output_dir>/autoencoder``).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        data: see DataConfig.
        autoencoder: see AutoencoderConfig.
        diffusion: see DiffusionConfig.
    """

    seed: int = 42
    output_dir: str = "runs/ldm"
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    @property
    def autoencoder_dir(self) -> Path:
        """Run folder of the autoencoder stage."""
        return Path(self.output_dir) / "autoencoder"

    @property
    def diffusion_dir(self) -> Path:
        """Run folder of the diffusion stage."""
        return Path(self.output_dir) / "diffusion"

    @property
    def autoencoder_source(self) -> Path:
        """Where the diffusion stage reads the trained autoencoder from."""
        return Path(self.diffusion.autoencoder_run) if self.diffusion.autoencoder_run else self.autoencoder_dir


# ----------------------------------------------------------------------------------------------------
# type-directed conversion
# ----------------------------------------------------------------------------------------------------
_MISMATCH = object()


def _as_number(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    return _MISMATCH


# scalar type -> (how it is described in errors, parser returning the value or _MISMATCH)
_SCALARS: dict[type, tuple[str, Any]] = {
    bool: ("true or false", lambda v: v if isinstance(v, bool) else _MISMATCH),
    int: ("an integer", lambda v: v if isinstance(v, int) and not isinstance(v, bool) else _MISMATCH),
    float: ("a number", _as_number),
    str: ("a string", lambda v: v if isinstance(v, str) else _MISMATCH),
}


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _SCALARS:
        return _SCALARS[tp][0]
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
        return f"a list (each: {_describe(args[0])})" if args else "a list"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return getattr(tp, "__name__", str(tp))


def _shown(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in sorted((a for a in args if a is not type(None)), key=_union_order):
            try:
                return _convert(value, option, path)
            except ConfigError as err:
                errors.append((option, err))
        # a list given where a list is allowed: its own (more precise) error names the bad element
        for option, err in errors:
            if isinstance(value, (list, tuple)) and typing.get_origin(option) in (list, tuple):
                raise err
        raise ConfigError(f"{path}: expected {_describe(tp)}, got {_shown(value)}")
    if tp in _SCALARS:
        description, parse = _SCALARS[tp]
        result = parse(value)
        if result is _MISMATCH:
            raise ConfigError(f"{path}: expected {description}, got {_shown(value)}")
        return result
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{path}: expected {_describe(tp)}, got {_shown(value)}{hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {_describe(tp)}, got {_shown(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {_describe(tp)}, got {len(value)} values {list(value)!r}")
            return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        items = [_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)] if args else list(value)
        return tuple(items) if origin is tuple else items
    raise TypeError(f"unsupported schema type {tp!r} at {path}")


def _union_order(tp: Any) -> int:
    """Try scalars before containers, and int before float, so ``2`` stays an integer."""
    return {bool: 0, int: 1, float: 2, str: 3}.get(tp, 4)


def _build_dataclass(cls: type, value: Any, path: str) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        where = path or "the config file"
        raise ConfigError(f"{where}: expected a mapping of keys (a section), got {_shown(value)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in value:
        if key not in names:
            full = f"{path}.{key}" if path else str(key)
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f" (did you mean '{path + '.' if path else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"{full}: unknown key{hint}; valid keys here: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in value:
            kwargs[name] = _convert(value[name], hints[name], f"{path}.{name}" if path else name)
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------------
# the guide's rules
# ----------------------------------------------------------------------------------------------------
def discriminator_min_size(num_layers_d: int) -> int:
    """Smallest axis length MONAI's PatchDiscriminator trains on with batch 1 (kernel 4, padding 1; strides 2, ..., 2, 1, 1)."""

    def fits(size: int) -> bool:
        strides = [2] * num_layers_d + [1, 1]
        for index, stride in enumerate(strides):
            size = (size + 2 - 4) // stride + 1
            if size < (1 if index == len(strides) - 1 else 2):  # BatchNorm needs > 1 value per channel
                return False
        return True

    return next(n for n in range(1, 1 << 16) if fits(n))


def validate(config: Config) -> Config:
    """Check the cross-key rules of the guide; raise ConfigError naming the key and a fix."""
    ae = config.autoencoder
    tr = ae.training
    try:
        config.data = validate_data_config(config.data)
    except DataError as err:
        raise ConfigError(str(err)) from None
    levels = len(ae.num_channels)
    if ae.spatial_dims not in (2, 3):
        raise ConfigError(f"autoencoder.spatial_dims: expected 2 or 3, got {ae.spatial_dims}")
    if levels == 0:
        raise ConfigError("autoencoder.num_channels: empty; give one channel count per level, e.g. [32, 64, 64]")
    bad = [c for c in ae.num_channels if c <= 0 or c % ae.norm_num_groups]
    if ae.norm_num_groups <= 0 or bad:
        raise ConfigError(
            f"autoencoder.num_channels: {ae.num_channels} must all be positive multiples of "
            f"autoencoder.norm_num_groups = {ae.norm_num_groups} (not {bad}); change the channels or norm_num_groups"
        )
    if len(ae.attention_levels) != levels:
        raise ConfigError(
            f"autoencoder.attention_levels: {len(ae.attention_levels)} entries {ae.attention_levels} but "
            f"num_channels has {levels} levels; give one true/false per level, e.g. {[False] * (levels - 1) + [True]}"
        )
    if isinstance(ae.num_res_blocks, list) and len(ae.num_res_blocks) != levels:
        raise ConfigError(
            f"autoencoder.num_res_blocks: {ae.num_res_blocks} has {len(ae.num_res_blocks)} entries, expected one "
            f"integer or {levels} (one per level)"
        )
    try:
        factors = normalize_downsample_factors(ae.downsample_factors, levels, ae.spatial_dims)
    except ValueError as err:
        raise ConfigError(f"autoencoder.{err}") from None
    totals = total_downsample_factors(factors, ae.spatial_dims)
    size = tuple(config.data.image_size)[: ae.spatial_dims]
    try:
        check_spatial_shape(size, totals)
    except ValueError:
        suggestion = [nearest_valid_sizes(s, f) if s % f else str(s) for s, f in zip(size, totals)]
        raise ConfigError(
            f"data.image_size: {list(size)} is not divisible by the total downsampling factors {list(totals)} "
            f"(product of autoencoder.downsample_factors per axis); valid sizes near it: "
            f"{' x '.join(suggestion)}, or choose smaller downsample_factors"
        ) from None
    positive = {
        "autoencoder.latent_channels": ae.latent_channels,
        "autoencoder.in_channels": ae.in_channels,
        "autoencoder.out_channels": ae.out_channels,
        "autoencoder.training.batch_size": tr.batch_size,
        "autoencoder.training.gradient_accumulation_steps": tr.gradient_accumulation_steps,
        "autoencoder.training.fast_dev_run_batches": tr.fast_dev_run_batches,
        "autoencoder.training.n_epochs": tr.n_epochs,
        "autoencoder.training.val_interval": tr.val_interval,
        "autoencoder.training.log_every_n_steps": tr.log_every_n_steps,
        "autoencoder.training.keep_last_checkpoints": tr.keep_last_checkpoints,
        "autoencoder.discriminator.num_layers_d": ae.discriminator.num_layers_d,
        "autoencoder.discriminator.num_channels": ae.discriminator.num_channels,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: expected an integer >= 1, got {value}")
    for key, value in {"autoencoder.training.max_steps": tr.max_steps,
                       "autoencoder.training.checkpoint_every_n_steps": tr.checkpoint_every_n_steps}.items():
        if value is not None and value < 1:
            raise ConfigError(f"{key}: expected an integer >= 1 or null, got {value}")
    for key in ("learning_rate", "discriminator_learning_rate"):
        if not getattr(tr, key) > 0:
            raise ConfigError(f"autoencoder.training.{key}: expected a positive number, got {getattr(tr, key)}")
    for key in ("kl_weight", "perceptual_weight", "adversarial_weight"):
        value = getattr(tr, key)
        if not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"autoencoder.training.{key}: expected a number >= 0, got {value}")
    if tr.adversarial_warmup_epochs < 0 or tr.num_preview_volumes < 0:
        raise ConfigError("autoencoder.training: adversarial_warmup_epochs and num_preview_volumes must be >= 0")
    if tr.use_adversarial_loss:
        smallest = discriminator_min_size(ae.discriminator.num_layers_d)
        if min(size) < smallest:
            fewer = max((n for n in range(1, ae.discriminator.num_layers_d) if discriminator_min_size(n) <= min(size)), default=None)
            fix = f"set autoencoder.discriminator.num_layers_d: {fewer}" if fewer else "set use_adversarial_loss: false"
            raise ConfigError(
                f"autoencoder.discriminator.num_layers_d: {ae.discriminator.num_layers_d} layers need at least "
                f"{smallest} voxels per axis, but data.image_size is {list(size)}; {fix} or use larger volumes"
            )
    if ae.spatial_dims == 2 and tr.use_perceptual_loss:
        raise ConfigError("autoencoder.training.use_perceptual_loss: the MedicalNet perceptual loss is 3D only")
    if tr.use_perceptual_loss and not ae.perceptual.weights_path:
        raise ConfigError(
            "autoencoder.perceptual.weights_path: required when autoencoder.training.use_perceptual_loss is true; "
            "download MedicalNet weights once (e.g. resnet_10_23dataset.pth from https://github.com/Tencent/MedicalNet) "
            "and set this key to the local file, or set use_perceptual_loss: false"
        )
    _validate_diffusion(config, size, totals)
    if not config.device or not (config.device in ("auto", "cpu", "cuda") or config.device.startswith("cuda:")):
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {config.device!r}")
    return config


def _validate_diffusion(config: Config, size: tuple[int, ...], totals: tuple[int, ...]) -> None:
    df, tr = config.diffusion, config.diffusion.training
    levels = len(df.num_channels)
    if levels == 0 or any(c <= 0 or c % df.norm_num_groups for c in df.num_channels):
        raise ConfigError(
            f"diffusion.num_channels: {df.num_channels} must be non-empty positive multiples of "
            f"diffusion.norm_num_groups = {df.norm_num_groups}"
        )
    for key in ("attention_levels", "num_head_channels"):
        if len(getattr(df, key)) != levels:
            raise ConfigError(
                f"diffusion.{key}: {len(getattr(df, key))} entries {getattr(df, key)} but diffusion.num_channels has "
                f"{levels} levels; give one per level"
            )
    for level, (attention, head) in enumerate(zip(df.attention_levels, df.num_head_channels)):
        if attention and (head <= 0 or df.num_channels[level] % head):
            raise ConfigError(
                f"diffusion.num_head_channels[{level}]: {head} must be a positive divisor of "
                f"diffusion.num_channels[{level}] = {df.num_channels[level]} where attention is on"
            )
    unet_factor = 2 ** (levels - 1)
    latent = [s // f for s, f in zip(size, totals)]
    if any(n % unet_factor for n in latent):
        raise ConfigError(
            f"diffusion.num_channels: a UNet with {levels} levels halves the latent {levels - 1} times, so every "
            f"latent axis must be divisible by {unet_factor}, but data.image_size {list(size)} gives the latent "
            f"{latent}; use fewer UNet levels, other autoencoder.downsample_factors or another image_size"
        )
    positive = {
        "diffusion.training.batch_size": tr.batch_size,
        "diffusion.training.gradient_accumulation_steps": tr.gradient_accumulation_steps,
        "diffusion.training.fast_dev_run_batches": tr.fast_dev_run_batches,
        "diffusion.training.n_epochs": tr.n_epochs,
        "diffusion.training.val_interval": tr.val_interval,
        "diffusion.training.preview_inference_steps": tr.preview_inference_steps,
        "diffusion.training.scale_factor_batches": tr.scale_factor_batches,
        "diffusion.training.log_every_n_steps": tr.log_every_n_steps,
        "diffusion.training.keep_last_checkpoints": tr.keep_last_checkpoints,
        "diffusion.scheduler.num_train_timesteps": df.scheduler.num_train_timesteps,
        "diffusion.sampling.num_inference_steps": df.sampling.num_inference_steps,
        "diffusion.sampling.batch_size": df.sampling.batch_size,
        "diffusion.num_res_blocks": df.num_res_blocks,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: expected an integer >= 1, got {value}")
    if tr.checkpoint_every_n_steps is not None and tr.checkpoint_every_n_steps < 1:
        raise ConfigError(
            f"diffusion.training.checkpoint_every_n_steps: expected an integer >= 1 or null, got {tr.checkpoint_every_n_steps}"
        )
    if not tr.learning_rate > 0:
        raise ConfigError(f"diffusion.training.learning_rate: expected a positive number, got {tr.learning_rate}")
    if tr.ema_decay is not None and not 0 < tr.ema_decay < 1:
        raise ConfigError(f"diffusion.training.ema_decay: expected a number between 0 and 1 (e.g. 0.999) or null, got {tr.ema_decay}")
    if df.sampling.num_inference_steps > df.scheduler.num_train_timesteps:
        raise ConfigError(
            f"diffusion.sampling.num_inference_steps: {df.sampling.num_inference_steps} exceeds "
            f"diffusion.scheduler.num_train_timesteps = {df.scheduler.num_train_timesteps}"
        )


# ----------------------------------------------------------------------------------------------------
# loading, overriding, saving
# ----------------------------------------------------------------------------------------------------
def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass --config with an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {err.problem or err}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a readable YAML file ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a raw config mapping."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. autoencoder.training.batch_size=1")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. autoencoder.training.batch_size=1")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r} as YAML") from None
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: '{'.'.join(parts[: depth + 1])}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a raw mapping (e.g. one stored in a checkpoint)."""
    return validate(_build_dataclass(Config, data, ""))


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a YAML config, apply ``--set`` overrides and validate it (raises ConfigError)."""
    return config_from_dict(apply_overrides(_read_yaml(Path(path)), overrides))


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain YAML-friendly types."""
    return _plain(dataclasses.asdict(config))


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")
