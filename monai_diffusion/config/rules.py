"""The rules a config must follow, checked once at load, for the stage that runs.

* ``autoencoder`` (autoencoder training, memory estimation, evaluation, the factor study): the top-level
  keys, ``data`` and ``autoencoder`` (its network and its training: discriminator, perceptual loss).
* ``diffusion`` (diffusion training, sampling): the top-level keys, ``data``, the autoencoder's network
  (stage 2 encodes and decodes with it, but trains no discriminator and no perceptual loss) and
  ``diffusion``.
* ``controlnet`` (ControlNet training, sampling from masks): those of ``diffusion`` and ``controlnet``.

A stage never checks a section it does not use, so an autoencoder run is not refused for a diffusion UNet
reason. Every error is a :class:`ConfigError` whose one-line message names the key, the value, what is
expected and a fix.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from generative.inferers.tiling import tile_layout
from generative.networks.nets.autoencoderkl import check_spatial_shape, nearest_valid_sizes
from monai_diffusion.config.geometry import (
    autoencoder_totals,
    discriminator_min_size,
    latent_size,
    training_size,
    valid_sizes_near,
)
from monai_diffusion.config.schema import PHANTOM_NUM_CLASSES, SAMPLERS, Config, limits_of
from monai_diffusion.data.keys import PHANTOM_COVARIATES
from monai_diffusion.errors import ConfigError

__all__ = ["STAGES", "validate", "check_limits", "discriminator_min_size", "autoencoder_totals", "latent_size",
           "training_size", "check_tiles",  # the geometry helpers live in config/geometry.py, re-exported here
           "check_controlnet_unet"]

STAGES = ("autoencoder", "diffusion", "controlnet")


# ----------------------------------------------------------------------------------------------------
# the limits declared beside the fields
# ----------------------------------------------------------------------------------------------------
def _describe_limits(limits: dict[str, float], integer: bool) -> str:
    kind = "an integer" if integer else "a number"
    lower = f">= {limits['ge']:g}" if "ge" in limits else f"> {limits['gt']:g}" if "gt" in limits else ""
    upper = f"<= {limits['le']:g}" if "le" in limits else f"< {limits['lt']:g}" if "lt" in limits else ""
    return f"{kind} {' and '.join(part for part in (lower, upper) if part)}"


def _within(value: float, limits: dict[str, float]) -> bool:
    return (value >= limits.get("ge", -math.inf) and value > limits.get("gt", -math.inf)
            and value <= limits.get("le", math.inf) and value < limits.get("lt", math.inf))


def check_limits(section: Any, path: str, recurse: bool = False) -> None:
    """Check every field of the dataclass ``section`` against its declared limits (each element of a list).

    Args:
        section: a schema dataclass instance.
        path: its dotted key (``""`` for the top level).
        recurse: also check nested sections.
    """
    for item in dataclasses.fields(section):
        value = getattr(section, item.name)
        key = f"{path}.{item.name}" if path else item.name
        if dataclasses.is_dataclass(value):
            if recurse:
                check_limits(value, key, recurse)
            continue
        limits = limits_of(item)
        if not limits or value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        for element in values:
            if isinstance(element, (int, float)) and not isinstance(element, bool) and not _within(element, limits):
                integer = all(isinstance(v, int) for v in values)
                raise ConfigError(f"{key}: expected {_describe_limits(limits, integer)}"
                                  f"{' for each entry' if isinstance(value, (list, tuple)) else ''}, got {value!r}")


def _check_sections(config: Config, names: tuple[str, ...]) -> None:
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if not dataclasses.is_dataclass(value):
            continue
        if item.name in names:
            check_limits(value, item.name, recurse=True)
    check_limits(config, "")


# ----------------------------------------------------------------------------------------------------
# tiles
# ----------------------------------------------------------------------------------------------------
def check_tiles(spatial: tuple[int, ...], tile_size: int | list[int] | None, overlap: float,
                factors: tuple[int, ...], key: str = "--tile-size/--tile-overlap") -> None:
    """ConfigError naming ``key`` unless tiles of ``tile_size`` with ``overlap`` fit a volume of ``spatial``
    on the latent grid of ``factors`` (no-op for ``tile_size=None``)."""
    if tile_size is None:
        return
    try:
        tile_layout(spatial, tile_size, overlap, factors)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None


# ----------------------------------------------------------------------------------------------------
# the rules
# ----------------------------------------------------------------------------------------------------
def _validate_top(config: Config) -> None:
    device = config.device
    if not device or not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {device!r}")


def _validate_data(config: Config) -> None:
    data = config.data
    if data.phantom_covariates and data.source != "synthetic":
        raise ConfigError(f"data.phantom_covariates: only used with data.source: synthetic (the phantoms' own "
                          f"covariates), but data.source is {data.source}; drop it (your covariates come from a "
                          f"datalist in data.paths)")
    if data.phantom_organs != "random" and data.source != "synthetic":
        raise ConfigError(f"data.phantom_organs: only used with data.source: synthetic (the phantoms' layout), "
                          f"but data.source is {data.source}; drop it")
    lower, upper = data.intensity_percentiles
    if not lower < upper:
        raise ConfigError(f"data.intensity_percentiles: expected [lower, upper] with lower < upper, got "
                          f"{list(data.intensity_percentiles)}; e.g. [0.5, 99.5]")
    if data.intensity_window is not None and not data.intensity_window[0] < data.intensity_window[1]:
        raise ConfigError(f"data.intensity_window: expected [a_min, a_max] with a_min < a_max, got "
                          f"{list(data.intensity_window)}; e.g. [-1000, 1000] for CT in Hounsfield units")
    _validate_labels(config)


def _validate_labels(config: Config) -> None:
    data = config.data
    if data.num_classes is None:
        return
    if data.source == "synthetic" and data.num_classes < PHANTOM_NUM_CLASSES:
        raise ConfigError(f"data.num_classes: {data.num_classes} is too few for the phantoms' label maps, which "
                          f"have {PHANTOM_NUM_CLASSES} classes (background, body shell, soft tissue, 18 organ parts, "
                          f"cavity); set data.num_classes={PHANTOM_NUM_CLASSES}")
    if data.source == "nifti" and not (isinstance(data.paths, str) and data.paths.lower().endswith((".json", ".csv"))):
        raise ConfigError(f"data.num_classes: label maps come from a datalist's 'label' column; point data.paths at "
                          f"a .json or .csv file with image and label columns (got {data.paths!r}), or set "
                          f"data.num_classes: null")


def _validate_patches_and_tiles(config: Config, totals: tuple[int, ...]) -> None:
    data, ae = config.data, config.autoencoder
    image = tuple(data.image_size)[: ae.spatial_dims]
    if data.patch_size is not None:
        patch = tuple(data.patch_size)
        if ae.spatial_dims != 3:
            raise ConfigError("data.patch_size: patch training is for 3D autoencoders (autoencoder.spatial_dims: 3); "
                              "set data.patch_size: null")
        larger = [f"{p} > {s}" for p, s in zip(patch, image) if p > s]
        if larger:
            raise ConfigError(f"data.patch_size: {list(patch)} is larger than the volume data.image_size "
                              f"{list(image)} ({', '.join(larger)}); use patches at most the volume's size")
        nearest = valid_sizes_near(patch, totals)
        if nearest:
            raise ConfigError(f"data.patch_size: {list(patch)} is not a multiple of the total downsampling factors "
                              f"{list(totals)} on every axis; valid sizes near it: {nearest}")
    tile = config.inference_tile
    if ae.tile_size is not None:
        if len(tile) != ae.spatial_dims or (isinstance(ae.tile_size, list) and len(ae.tile_size) != ae.spatial_dims):
            raise ConfigError(f"autoencoder.tile_size: {ae.tile_size} needs one size or {ae.spatial_dims} (one per "
                              f"axis)")
        nearest = valid_sizes_near(tuple(tile), totals)
        if nearest:
            raise ConfigError(f"autoencoder.tile_size: {ae.tile_size} is off the latent grid: every tile size must "
                              f"be a multiple of the total downsampling factors {list(totals)}; valid sizes near it: "
                              f"{nearest}")


def _validate_autoencoder(config: Config) -> None:
    """The autoencoder's network and its geometry (both stages: stage 2 encodes and decodes with it)."""
    ae = config.autoencoder
    levels = len(ae.num_channels)
    if ae.spatial_dims not in (2, 3):
        raise ConfigError(f"autoencoder.spatial_dims: expected 2 or 3, got {ae.spatial_dims}")
    if levels == 0:
        raise ConfigError("autoencoder.num_channels: empty; give one channel count per level, e.g. [32, 64, 64]")
    bad = [c for c in ae.num_channels if c % ae.norm_num_groups]
    if bad:
        raise ConfigError(
            f"autoencoder.num_channels: {ae.num_channels} must all be multiples of autoencoder.norm_num_groups = "
            f"{ae.norm_num_groups} (not {bad}); change the channels or norm_num_groups"
        )
    if ae.out_channels != ae.in_channels:
        raise ConfigError(f"autoencoder.out_channels: {ae.out_channels} differs from autoencoder.in_channels = "
                          f"{ae.in_channels}; an autoencoder reconstructs its input, set both to the image channels")
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
    totals = autoencoder_totals(config)
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
    _validate_patches_and_tiles(config, totals)


def _validate_autoencoder_training(config: Config) -> None:
    """The rules of training the autoencoder (stage 1 only: stage 2 trains no discriminator and no
    perceptual loss)."""
    ae, tr = config.autoencoder, config.autoencoder.training
    trained = training_size(config)
    if tr.use_adversarial_loss:
        smallest = discriminator_min_size(ae.discriminator.num_layers_d)
        if min(trained) < smallest:
            fewer = max((n for n in range(1, ae.discriminator.num_layers_d)
                         if discriminator_min_size(n) <= min(trained)), default=None)
            fix = f"set autoencoder.discriminator.num_layers_d: {fewer}" if fewer else "set use_adversarial_loss: false"
            key = "data.patch_size" if config.data.patch_size is not None else "data.image_size"
            raise ConfigError(
                f"autoencoder.discriminator.num_layers_d: {ae.discriminator.num_layers_d} layers need at least "
                f"{smallest} voxels per axis, but {key} is {list(trained)}; {fix} or use larger volumes"
            )
    if ae.spatial_dims == 2 and tr.use_perceptual_loss:
        raise ConfigError("autoencoder.training.use_perceptual_loss: the MedicalNet perceptual loss is 3D only")
    if tr.use_perceptual_loss and not ae.perceptual.weights_path:
        raise ConfigError(
            "autoencoder.perceptual.weights_path: required when autoencoder.training.use_perceptual_loss is true; "
            "download MedicalNet weights once (e.g. resnet_10_23dataset.pth from "
            "https://github.com/Tencent/MedicalNet) "
            "and set this key to the local file, or set use_perceptual_loss: false"
        )


def _validate_diffusion(config: Config) -> None:
    df, tr = config.diffusion, config.diffusion.training
    levels = len(df.num_channels)
    if levels == 0 or any(c % df.norm_num_groups for c in df.num_channels):
        raise ConfigError(
            f"diffusion.num_channels: {df.num_channels} must be non-empty multiples of "
            f"diffusion.norm_num_groups = {df.norm_num_groups}"
        )
    for key in ("attention_levels", "num_head_channels"):
        if len(getattr(df, key)) != levels:
            raise ConfigError(
                f"diffusion.{key}: {len(getattr(df, key))} entries {getattr(df, key)} but diffusion.num_channels has "
                f"{levels} levels; give one per level"
            )
    for level, (attention, head) in enumerate(zip(df.attention_levels, df.num_head_channels)):
        always = level == levels - 1  # MONAI's middle block attends at the deepest level whatever attention_levels says
        if (attention or always) and (head <= 0 or df.num_channels[level] % head):
            why = ("the UNet's middle block always has attention there" if always and not attention
                   else "attention is on")
            raise ConfigError(
                f"diffusion.num_head_channels[{level}]: {head} must be a positive divisor of "
                f"diffusion.num_channels[{level}] = {df.num_channels[level]} ({why}); e.g. {df.num_channels[level]}"
            )
    unet_factor = 2 ** (levels - 1)
    latent = latent_size(config)
    if any(n % unet_factor for n in latent):
        raise ConfigError(
            f"diffusion.num_channels: a UNet with {levels} levels halves the latent {levels - 1} times, so every "
            f"latent axis must be divisible by {unet_factor}, but data.image_size {list(config.data.image_size)} "
            f"gives the latent {latent}; use fewer UNet levels, other autoencoder.downsample_factors or another "
            f"image_size"
        )
    _validate_conditioning(config)
    scheduler = df.scheduler
    if not scheduler.beta_start < scheduler.beta_end:
        raise ConfigError(f"diffusion.scheduler.beta_start: {scheduler.beta_start} must be below "
                          f"diffusion.scheduler.beta_end = {scheduler.beta_end}")
    _validate_sampler(df.scheduler, df.sampling.scheduler)
    for key, steps in (("diffusion.sampling.num_inference_steps", df.sampling.num_inference_steps),
                       ("diffusion.training.preview_inference_steps", tr.preview_inference_steps)):
        if steps > scheduler.num_train_timesteps:
            raise ConfigError(f"{key}: {steps} exceeds diffusion.scheduler.num_train_timesteps = "
                              f"{scheduler.num_train_timesteps}; use at most that many steps")


def _validate_schedule(section: Any, key: str) -> None:
    """Learning-rate settings that would be silently ignored or never take effect."""
    if section.lr_schedule == "constant" and section.min_lr_ratio != 0:
        raise ConfigError(f"{key}.min_lr_ratio: {section.min_lr_ratio} only applies to a decaying schedule, but "
                          f"{key}.lr_schedule is constant; set {key}.lr_schedule to cosine or linear, or drop "
                          f"min_lr_ratio")
    if section.max_steps is not None and section.warmup_steps >= section.max_steps:
        raise ConfigError(f"{key}.warmup_steps: {section.warmup_steps} warm-up steps, but {key}.max_steps = "
                          f"{section.max_steps}: the learning rate would never reach its configured value; use "
                          f"fewer warm-up steps (e.g. {max(1, section.max_steps // 10)})")


def _validate_sampler(scheduler: Any, sampler: str) -> None:
    """``diffusion.sampling.scheduler`` must suit the training objective ``diffusion.scheduler.type``."""
    if sampler != "auto" and sampler not in SAMPLERS[scheduler.type]:
        raise ConfigError(f"diffusion.sampling.scheduler: {sampler} cannot sample a model trained with "
                          f"diffusion.scheduler.type = {scheduler.type}; use auto or one of "
                          f"{', '.join(SAMPLERS[scheduler.type])}")




def _validate_conditioning(config: Config) -> None:
    cond, df, data = config.diffusion.conditioning, config.diffusion, config.data
    names = cond.categorical + cond.continuous
    if cond.concat and not cond.continuous:
        raise ConfigError("diffusion.conditioning.concat: true reads the continuous covariates as input channels, "
                          "but diffusion.conditioning.continuous is empty; list them there or set concat: false")
    if cond.continuous and not cond.presence_flag and cond.dropout > 0:
        raise ConfigError(f"diffusion.conditioning.dropout: {cond.dropout} drops conditions, but presence_flag: false "
                          f"leaves a dropped sample looking like one whose covariates are all 0; set dropout: 0 or "
                          f"presence_flag: true")
    if not names:
        return
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"diffusion.conditioning: {twice} listed twice; each covariate is categorical or "
                          f"continuous")
    if cond.continuous and not any(df.attention_levels):
        raise ConfigError("diffusion.conditioning.continuous: continuous covariates reach the UNet through "
                          "cross-attention; switch on at least one of diffusion.attention_levels")
    if data.source == "synthetic":
        unknown = [n for n in names if n not in PHANTOM_COVARIATES]
        if not data.phantom_covariates or unknown:
            raise ConfigError(f"diffusion.conditioning: the synthetic phantoms offer the covariates "
                              f"{list(PHANTOM_COVARIATES)} with data.phantom_covariates: true (got {names}); for "
                              f"your own covariates point data.paths at a datalist (.json or .csv)")
    elif not (isinstance(data.paths, str) and data.paths.lower().endswith((".json", ".csv"))):
        raise ConfigError(f"diffusion.conditioning: covariates {names} need a datalist: point data.paths at a "
                          f".json or .csv file with an image column and one column per covariate")


def validate(config: Config, stage: str = "autoencoder") -> Config:
    """Check ``config`` for ``stage`` (see the module docstring); returns it, raises ConfigError."""
    if stage not in STAGES:
        raise ValueError(f"stage = {stage!r}: expected one of {STAGES}")
    sections = ("data", "autoencoder") + STAGES[1: STAGES.index(stage) + 1]
    _check_sections(config, sections)
    _validate_top(config)
    _validate_data(config)
    _validate_autoencoder(config)
    if stage == "autoencoder":
        _validate_autoencoder_training(config)
        _validate_schedule(config.autoencoder.training, "autoencoder.training")
    else:
        _validate_diffusion(config)
        _validate_schedule(config.diffusion.training, "diffusion.training")
    if stage == "controlnet":
        _validate_controlnet(config)
    return config


def check_controlnet_unet(config: Config) -> None:
    """Refuse a diffusion UNet that MONAI's ControlNet cannot copy (ConfigError)."""
    if config.diffusion.conditioning.concat:
        raise ConfigError("diffusion.conditioning.concat: the ControlNet stage cannot steer a UNet that reads its "
                          "conditions as input channels (MONAI's ControlNet copies the UNet's input layer, which "
                          "expects them); train the ControlNet on a UNet with concat: false")


def _validate_controlnet(config: Config) -> None:
    if config.data.num_classes is None:
        raise ConfigError("data.num_classes: the ControlNet stage learns to follow label maps; set data.num_classes "
                          "(the phantoms: 22; a datalist: its label column's classes, background included)")
    check_controlnet_unet(config)
    tr, steps = config.controlnet.training, config.diffusion.scheduler.num_train_timesteps
    if tr.preview_inference_steps > steps:
        raise ConfigError(f"controlnet.training.preview_inference_steps: {tr.preview_inference_steps} exceeds "
                          f"diffusion.scheduler.num_train_timesteps = {steps}; use at most that many steps")
