"""The configuration schema: one dataclass per YAML section.

Each field's type is what the loader converts the YAML value to; simple limits (``>= 1``, ``> 0``, ...) are
declared beside the field with :func:`bounded` and checked by :func:`monai_diffusion.config.rules.validate`
for the sections a stage uses. The ``Attributes`` of each docstring are the reference documentation
(``docs/configuration.md`` is generated from them by ``python -m monai_diffusion.config.reference``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

__all__ = [
    "SAMPLERS",
    "bounded",
    "limits_of",
    "AugmentationConfig",
    "DataConfig",
    "PHANTOM_NUM_CLASSES",
    "PerceptualConfig",
    "DiscriminatorConfig",
    "LoopConfig",
    "AutoencoderTrainingConfig",
    "AutoencoderConfig",
    "SchedulerConfig",
    "DiffusionTrainingConfig",
    "ControlNetTrainingConfig",
    "ControlNetConfig",
    "SamplingConfig",
    "ConditioningConfig",
    "DiffusionConfig",
    "Config",
]


from monai_diffusion.config.schema_conditioning import ConditioningConfig  # (re-exported)
from monai_diffusion.config.schema_data import (  # noqa: F401  (re-exported: the schema's one import path)
    PHANTOM_NUM_CLASSES,
    AugmentationConfig,
    DataConfig,
    bounded,
    limits_of,
)


# ----------------------------------------------------------------------------------------------------
# stage 1: the autoencoder
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
    weights_path: Union[str, None] = None


@dataclass
class DiscriminatorConfig:
    """MONAI core's PatchDiscriminator.

    Attributes:
        num_layers_d: number of strided convolution layers.
        num_channels: channels of the first layer (doubled per layer).
    """

    num_layers_d: int = bounded(3, ge=1)
    num_channels: int = bounded(32, ge=1)


@dataclass
class LoopConfig:
    """What both training stages share: batches, steps, precision, validation and checkpoints.

    Attributes:
        batch_size: volumes (latents, in the diffusion stage) per step and device.
        gradient_accumulation_steps: micro-batches summed before each optimiser step.
        mixed_precision: autocast (bf16 on CPUs and GPUs of compute capability 8+, else fp16 with a
            GradScaler).
        fast_dev_run: run ``fast_dev_run_batches`` train and validation batches end to end, then stop.
        fast_dev_run_batches: batches for ``fast_dev_run``.
        n_epochs: passes over the training set.
        max_steps: stop after this many optimiser steps (null: run all epochs).
        learning_rate: Adam learning rate.
        val_interval: validate every this many epochs.
        checkpoint_every_n_steps: also save ``last`` every this many optimiser steps (null: per epoch).
        keep_last_checkpoints: step checkpoints kept (``checkpoints/step_*.pt``; ``best`` is always kept).
        log_every_n_steps: TensorBoard scalar interval in optimiser steps.
        warmup_steps: optimiser steps over which every learning rate rises linearly from 0 (fp16 runs
            are less prone to NaNs with a warm-up).
        lr_schedule: after the warm-up: ``constant``, or ``cosine`` / ``linear`` decay to
            ``min_lr_ratio`` x the learning rate at the last step (``max_steps``, else all epochs).
        min_lr_ratio: the decayed learning rate's final fraction of the learning rate.
        grad_clip_norm: clip the gradient norm of each network to this value (null: no clipping).
    """

    batch_size: int = bounded(4, ge=1)
    gradient_accumulation_steps: int = bounded(1, ge=1)
    mixed_precision: bool = False
    fast_dev_run: bool = False
    fast_dev_run_batches: int = bounded(2, ge=1)
    n_epochs: int = bounded(100, ge=1)
    max_steps: Union[int, None] = bounded(None, ge=1)
    learning_rate: float = bounded(1e-4, gt=0)
    val_interval: int = bounded(5, ge=1)
    checkpoint_every_n_steps: Union[int, None] = bounded(None, ge=1)
    keep_last_checkpoints: int = bounded(3, ge=1)
    log_every_n_steps: int = bounded(10, ge=1)
    warmup_steps: int = bounded(0, ge=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = bounded(0.0, ge=0, le=1)
    grad_clip_norm: Union[float, None] = bounded(None, gt=0)


@dataclass
class AutoencoderTrainingConfig(LoopConfig):
    """How the autoencoder is trained (the guide's ``autoencoder.training`` keys and the recipe's knobs).

    Attributes:
        use_gradient_checkpointing: the network's low-memory checkpointing.
        use_perceptual_loss: add the offline MedicalNet perceptual loss (needs ``perceptual.weights_path``).
        use_adversarial_loss: add the patch adversarial loss after ``adversarial_warmup_epochs``.
        discriminator_learning_rate: Adam learning rate of the discriminator.
        kl_weight: weight of the KL term.
        perceptual_weight: weight of the perceptual term.
        adversarial_weight: weight of the generator's adversarial term.
        adversarial_warmup_epochs: epochs trained without the adversarial loss.
        num_preview_volumes: validation volumes shown in the preview PNG.
    """

    use_gradient_checkpointing: bool = False
    use_perceptual_loss: bool = False
    use_adversarial_loss: bool = True
    discriminator_learning_rate: float = bounded(5e-4, gt=0)
    kl_weight: float = bounded(1e-6, ge=0)
    perceptual_weight: float = bounded(1e-3, ge=0)
    adversarial_weight: float = bounded(1e-2, ge=0)
    adversarial_warmup_epochs: int = bounded(5, ge=0)
    num_preview_volumes: int = bounded(1, ge=0)


@dataclass
class AutoencoderConfig:
    """The AutoencoderKL (the guide's ``autoencoder`` keys) and how it is trained.

    Attributes:
        spatial_dims: 3 for volumes (2 for the centre slices of the volumes).
        in_channels: image channels.
        out_channels: reconstructed channels (equal to ``in_channels``).
        num_channels: channels per level; ``len(num_channels) - 1`` downsampling steps.
        downsample_factors: one factor per step (an integer or a per-axis list); null = 2 everywhere.
        latent_channels: channels of the latent.
        num_res_blocks: residual blocks per level (one integer or one per level).
        attention_levels: attention per level.
        norm_num_groups: GroupNorm groups; every entry of num_channels must be divisible by it.
        norm_eps: GroupNorm epsilon.
        with_encoder_nonlocal_attn: ResBlock-Attention-ResBlock at the encoder's bottom.
        with_decoder_nonlocal_attn: the same at the decoder's top.
        use_convtranspose: transposed-convolution upsampling.
        upsample_mode: the decoder's interpolation before each upsampling convolution: ``nearest`` (MONAI
            Generative's) or ``trilinear`` (MAISI's AutoencoderKlMaisi; set by ``ldm-import maisi``).
        tile_size: run the autoencoder on whole volumes in overlapping tiles of this size (one value or one
            per axis, multiples of the total downsampling factor): validation, the latent cache of the
            diffusion stage, samples. null: ``data.patch_size`` when training on patches, else whole
            volumes at once.
        tile_overlap: fraction of a tile shared with its neighbour (blended tiles).
        tile_buffers: where exact tiling keeps its full-size activations between layers: ``auto`` (on a GPU
            the whole volume at once when it fits the free memory, else buffers on the GPU when they fit,
            else pinned host memory; off a GPU host memory), ``device``, ``cpu`` (host memory) or ``disk``
            (memory-mapped temporary files). The ``--buffers`` flag of sample.py and evaluate_autoencoder.py
            overrides it.
        init_from: start training from the weights of this run folder or checkpoint (one we trained, or one
            written by ``ldm-import``), with a fresh optimiser, schedule and discriminator; the architecture
            keys above must match it (see docs/pretrained.md). null: random initialisation.
        training: see AutoencoderTrainingConfig.
        discriminator: see DiscriminatorConfig.
        perceptual: see PerceptualConfig.
    """

    spatial_dims: int = 3
    in_channels: int = bounded(1, ge=1)
    out_channels: int = bounded(1, ge=1)
    num_channels: list[int] = bounded(factory=lambda: [32, 64, 64], ge=1)
    downsample_factors: Union[list[Union[int, list[int]]], None] = field(default_factory=lambda: [2, 2])
    latent_channels: int = bounded(3, ge=1)
    num_res_blocks: Union[int, list[int]] = bounded(1, ge=1)
    attention_levels: list[bool] = field(default_factory=lambda: [False, False, True])
    norm_num_groups: int = bounded(16, ge=1)
    norm_eps: float = bounded(1e-6, gt=0)
    with_encoder_nonlocal_attn: bool = False
    with_decoder_nonlocal_attn: bool = False
    use_convtranspose: bool = False
    upsample_mode: Literal["nearest", "trilinear"] = "nearest"
    tile_size: Union[int, list[int], None] = bounded(None, ge=1)
    tile_overlap: float = bounded(0.5, ge=0, lt=1)
    init_from: Union[str, None] = None
    tile_buffers: Literal["auto", "device", "cpu", "disk"] = "auto"
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
            # only when not the default: the arguments stored by earlier runs stay equal on --resume
            **({"upsample_mode": self.upsample_mode} if self.upsample_mode != "nearest" else {}),
            use_checkpointing=ckpt,
        )


# ----------------------------------------------------------------------------------------------------
# stage 2: latent diffusion
# ----------------------------------------------------------------------------------------------------
# the samplers that suit each training objective (diffusion.scheduler.type), the first one the default
SAMPLERS: dict[str, tuple[str, ...]] = {"ddpm": ("ddim", "ddpm", "dpm-solver++"), "rflow": ("rflow",)}


@dataclass
class SchedulerConfig:
    """The training objective and its noise schedule: DDPM (the established 3D LDM recipe: 1000 steps, scaled
    linear betas, noise prediction) or rectified flow (MAISI v2's: velocity prediction, MONAI core's
    ``RFlowScheduler``). The run stores it, so ``sample.py`` needs no flag (see docs/sampling.md).

    Attributes:
        type: ``ddpm`` (the UNet predicts the noise; sampled with ddpm, ddim or dpm-solver++) or ``rflow``
            (rectified flow: the UNet predicts the velocity ``x0 - noise`` on the straight path between them;
            sampled with rflow, in far fewer steps).
        num_train_timesteps: diffusion steps (rflow: the scale of its continuous time).
        schedule: ``scaled_linear_beta``, ``linear_beta`` or ``cosine`` (ddpm only).
        beta_start: first beta (ddpm only).
        beta_end: last beta (ddpm only).
        clip_sample: clip predicted samples to [-1, 1] (ddpm only; off for latents, which are not bounded).
        sample_method: rflow's training times: ``logit-normal`` (more of them at mid noise, as MAISI v2 and
            Stable Diffusion 3) or ``uniform``.
        timestep_transform: rflow: shift the times with the latent size (more noise for latents larger than
            ``transform_base_numel``, less for smaller ones), in training and sampling alike, as MAISI v2. Off by
            default: on 4^3 latents the shift (to far less noise) cost most of the quality that the unshifted
            model reaches in 10 steps (benchmarks/results/sampling).
        transform_base_numel: rflow: the latent voxel count (per channel) at which the shift is neutral
            (MONAI's default 32 x 32 x 32).
    """

    type: Literal["ddpm", "rflow"] = "ddpm"
    num_train_timesteps: int = bounded(1000, ge=2)
    schedule: Literal["scaled_linear_beta", "linear_beta", "cosine"] = "scaled_linear_beta"
    beta_start: float = bounded(0.0015, gt=0, lt=1)
    beta_end: float = bounded(0.0195, gt=0, lt=1)
    clip_sample: bool = False
    sample_method: Literal["logit-normal", "uniform"] = "logit-normal"
    timestep_transform: bool = False
    transform_base_numel: int = bounded(32 * 32 * 32, ge=1)


@dataclass
class DiffusionTrainingConfig(LoopConfig):
    """How the latent diffusion UNet is trained.

    Attributes:
        n_epochs: passes over the training latents.
        val_interval: validate (loss + sample preview) every this many epochs.
        ema_decay: keep an exponential moving average of the UNet weights (null: off), e.g. 0.999.
        num_preview_samples: volumes generated for the preview PNG at each validation.
        preview_inference_steps: sampling steps for the preview samples (with the sampler that suits the run).
        scale_factor_batches: batches used to estimate the latent scale factor (1 / std).
        cache_latents_on_disk: also write the encoded latents to the run folder and reuse them on resume.
        latent_sample: what the UNet learns from the cached posterior of each volume: ``draw`` a fresh
            z = mu + sigma * eps at every step, or its ``mean`` mu (no sigma * eps noise floor under the loss;
            the usual choice on a pretrained autoencoder, see docs/pretrained.md).
    """

    n_epochs: int = bounded(200, ge=1)
    val_interval: int = bounded(10, ge=1)
    ema_decay: Union[float, None] = bounded(None, gt=0, lt=1)
    num_preview_samples: int = bounded(1, ge=0)
    preview_inference_steps: int = bounded(50, ge=1)
    scale_factor_batches: int = bounded(4, ge=1)
    cache_latents_on_disk: bool = False
    latent_sample: Literal["draw", "mean"] = "draw"


@dataclass
class SamplingConfig:
    """Defaults for ``sample.py`` (each can be overridden on its command line).

    Attributes:
        scheduler: the sampler: ``auto`` (the one that suits the run's ``diffusion.scheduler.type``: ``ddim`` for
            ddpm runs, ``rflow`` for rflow runs), ``ddpm`` (ancestral, all training steps unless --steps),
            ``ddim``, ``dpm-solver++`` (multistep DPM-Solver++ 2M, from diffusers: ``pip install
            monai-diffusion[solvers]``) or ``rflow``; see docs/sampling.md.
        num_inference_steps: network evaluations per sample (sampling steps; ddpm: all training steps).
        batch_size: volumes generated at once.
        guidance_scale: classifier-free guidance of a conditional model: 1 follows the conditions as trained,
            larger values follow them more strongly, 0 ignores them.
    """

    scheduler: Literal["auto", "ddpm", "ddim", "dpm-solver++", "rflow"] = "auto"
    num_inference_steps: int = bounded(50, ge=1)
    batch_size: int = bounded(1, ge=1)
    guidance_scale: float = bounded(1.0, ge=0)


@dataclass
class DiffusionConfig:
    """Stage 2: MONAI core's DiffusionModelUNet trained on the frozen autoencoder's latents.

    Attributes:
        autoencoder_run: autoencoder run folder or checkpoint (null: ``<output_dir>/autoencoder``).
        init_from: start the UNet from this diffusion run folder or checkpoint (ours, or one written by
            ``ldm-import``; its EMA weights when it kept them) and its latent scale factor, with a fresh
            optimiser and schedule; the UNet keys below must match it. null: random initialisation.
        num_channels: UNet channels per level; the latent size must be divisible by 2^(levels - 1).
        attention_levels: attention per level.
        num_head_channels: channels per attention head, per level (0 where there is no attention; the
            deepest level always has attention in MONAI's middle block).
        num_res_blocks: residual blocks per level.
        norm_num_groups: GroupNorm groups of the UNet.
        resblock_updown: down- and upsample with residual blocks rather than strided / interpolating
            convolutions (MONAI's ``resblock_updown``; the brain LDM's UNet has them).
        upcast_attention: cast the attention's queries and keys to float32 (MONAI's ``upcast_attention``, for
            mixed precision; the brain LDM's UNet has it).
        scheduler: see SchedulerConfig.
        training: see DiffusionTrainingConfig.
        sampling: see SamplingConfig.
        conditioning: see ConditioningConfig (empty lists: an unconditional model).
    """

    autoencoder_run: Union[str, None] = None
    init_from: Union[str, None] = None
    num_channels: list[int] = bounded(factory=lambda: [32, 64, 64], ge=1)
    attention_levels: list[bool] = field(default_factory=lambda: [False, True, True])
    num_head_channels: list[int] = bounded(factory=lambda: [0, 32, 32], ge=0)
    num_res_blocks: int = bounded(1, ge=1)
    norm_num_groups: int = bounded(16, ge=1)
    resblock_updown: bool = False
    upcast_attention: bool = False
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    training: DiffusionTrainingConfig = field(default_factory=DiffusionTrainingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)

    def unet_kwargs(self, latent_channels: int, spatial_dims: int) -> dict[str, Any]:
        """Keyword arguments for ``monai.networks.nets.DiffusionModelUNet`` (with ``concat_conditions`` when
        ``conditioning.concat``: ``monai_diffusion.pretrained.unet.build_unet`` builds that network). The
        conditions' cross-attention arguments come from the fitted conditioning (``Conditioning.unet_kwargs``).
        Keys at their defaults are left out, so the arguments stored by earlier runs stay equal on --resume."""
        concat = len(self.conditioning.continuous) if self.conditioning.concat else 0
        optional = {"resblock_updown": self.resblock_updown, "upcast_attention": self.upcast_attention,
                    "concat_conditions": concat}
        return dict(
            spatial_dims=spatial_dims,
            in_channels=latent_channels + concat,
            out_channels=latent_channels,
            num_res_blocks=self.num_res_blocks,
            channels=list(self.num_channels),
            attention_levels=list(self.attention_levels),
            num_head_channels=list(self.num_head_channels),
            norm_num_groups=self.norm_num_groups,
            **{key: value for key, value in optional.items() if value},
        )


# ----------------------------------------------------------------------------------------------------
# stage 3: a ControlNet on label maps
# ----------------------------------------------------------------------------------------------------
@dataclass
class ControlNetTrainingConfig(DiffusionTrainingConfig):
    """How the ControlNet is trained (the frozen diffusion UNet's loss, the same knobs as its training)."""

    n_epochs: int = bounded(100, ge=1)


@dataclass
class ControlNetConfig:
    """Stage 3: MONAI core's ControlNet, initialised from the trained diffusion UNet (which stays frozen), that
    makes the UNet follow a label map (``data.num_classes``); see docs/masks.md.

    Attributes:
        diffusion_run: diffusion run folder or checkpoint (null: ``<output_dir>/diffusion``).
        conditioning_channels: channels of the conditioning embedding's first block; the one-hot label map
            (``data.num_classes`` channels, image size) is brought to the latent grid by stride-2 blocks that
            double them, one per factor 2 of the autoencoder's total downsampling (an odd rest of a factor is
            averaged away first).
        conditioning_scale: how strongly the ControlNet's residuals steer the UNet when sampling (1: as
            trained; ``sample.py --conditioning-scale``).
        training: see ControlNetTrainingConfig.
    """

    diffusion_run: Union[str, None] = None
    conditioning_channels: int = bounded(16, ge=1)
    conditioning_scale: float = bounded(1.0, ge=0)
    training: ControlNetTrainingConfig = field(default_factory=ControlNetTrainingConfig)


# ----------------------------------------------------------------------------------------------------
# the whole run
# ----------------------------------------------------------------------------------------------------
@dataclass
class Config:
    """A whole run.

    Attributes:
        seed: seeds Python, NumPy and torch, and the data split.
        output_dir: runs are written below it (``<output_dir>/autoencoder``, ``<output_dir>/diffusion``).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N`` (``cuda:N`` only for a single
            process; under torchrun each process takes the GPU of its LOCAL_RANK).
        data: see DataConfig.
        autoencoder: see AutoencoderConfig.
        diffusion: see DiffusionConfig.
        controlnet: see ControlNetConfig.
    """

    seed: int = bounded(42, ge=0)
    output_dir: str = "runs/ldm"
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    controlnet: ControlNetConfig = field(default_factory=ControlNetConfig)

    @property
    def autoencoder_dir(self) -> Path:
        """Run folder of the autoencoder stage."""
        return Path(self.output_dir) / "autoencoder"

    @property
    def diffusion_dir(self) -> Path:
        """Run folder of the diffusion stage."""
        return Path(self.output_dir) / "diffusion"

    @property
    def controlnet_dir(self) -> Path:
        """Run folder of the ControlNet stage."""
        return Path(self.output_dir) / "controlnet"

    @property
    def diffusion_source(self) -> Path:
        """Where the ControlNet stage reads the trained diffusion model from."""
        return Path(self.controlnet.diffusion_run) if self.controlnet.diffusion_run else self.diffusion_dir

    @property
    def inference_tile(self) -> Union[list[int], None]:
        """The tile size the autoencoder runs whole volumes with (``autoencoder.tile_size``, else
        ``data.patch_size`` when it trained on patches, else None: whole volumes at once), per axis."""
        tile = self.autoencoder.tile_size
        if tile is None and self.data.patch_size is not None:
            tile = list(self.data.patch_size)
        if tile is None:
            return None
        dims = self.autoencoder.spatial_dims
        return [int(tile)] * dims if isinstance(tile, int) else [int(t) for t in tile][:dims]

    @property
    def autoencoder_source(self) -> Path:
        """Where the diffusion stage reads the trained autoencoder from."""
        return Path(self.diffusion.autoencoder_run) if self.diffusion.autoencoder_run else self.autoencoder_dir
