"""How much memory an autoencoder configuration needs, counted without allocating it.

The real modules run on fake tensors (PyTorch's ``FakeTensorMode``: meta-device storage, so shapes and
dtypes only and no data, while the tensors still look like CPU tensors so autocast applies), and
``torch.autograd.graph.saved_tensors_hooks`` records every tensor autograd keeps for backward. Counting
each storage once gives the activation memory exactly; it is attributed to the encoder/decoder block that
saved it, so the report shows which resolution level costs what. Parameters, gradients and Adam's two
moments are counted from the parameter tensors.

What the count cannot see is modelled and named in the report:
* the backward pass's working set (gradients of the activations being processed, recomputed inputs):
  modelled as 1.5 (2.5 with checkpointing) float32 copies of the network's largest activation, factors
  calibrated against measured CPU peaks by ``benchmarks/memory.py`` (added as ``backward working set``);
* allocator overhead and fragmentation (CUDA's caching allocator typically adds 5-20 %), not included;
* which attention kernel the device uses: counted as the kernel this machine runs (PyTorch's SDPA);
* mixed precision follows the target's autocast rules: ``target="cuda"`` (the default) runs GroupNorm in
  float32, as CUDA autocast does, ``target="cpu"`` in bf16, as CPU autocast does (the CPU benchmarks
  compare against that).

The budget search keeps a stated margin for what the count leaves out on a GPU (``CUDA_RESERVED_BYTES``
for the CUDA context and cuDNN workspace, ``FRAGMENTATION`` for the caching allocator).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from generative.networks.nets import AutoencoderKL
from monai_diffusion.config import Config
from monai_diffusion.config.rules import autoencoder_totals, discriminator_min_size, training_size

__all__ = [
    "StepMeasurement",
    "measure_training_step",
    "DiffusionEstimate",
    "estimate_diffusion",
    "training_batch",
    "SavedTensors", "count_saved", "LevelRow", "MemoryEstimate", "estimate_autoencoder", "format_bytes", "report",
    "LiveBytes", "PhaseEstimate", "estimate_autoencoder_inference", "estimate_pipeline", "pipeline_report",
    "Candidate", "search_budget", "parse_budget", "with_margin", "CUDA_RESERVED_BYTES", "FRAGMENTATION",
]

GB = 1e9
CUDA_RESERVED_BYTES = 0.75e9  # CUDA context (~0.3-0.5 GB) + cuDNN/cuBLAS workspaces, outside the allocator's count
FRAGMENTATION = 0.10  # the caching allocator reserves typically 5-20 % more than it has allocated


def format_bytes(count: float) -> str:
    """Human-readable bytes (decimal units, as GPU vendors quote memory)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count:.0f} B"


@dataclass
class SavedTensors:
    """Storages kept for backward, each counted once, with the name of the block that saved it first."""

    owners: dict[int, tuple[str, int]] = field(default_factory=dict)  # storage id -> (block, bytes)
    largest_numel: int = 0  # elements of the largest tensor produced by a tracked block

    @property
    def total(self) -> int:
        return sum(size for _, size in self.owners.values())

    def by_block(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for block, size in self.owners.values():
            out[block] = out.get(block, 0) + size
        return out


@contextlib.contextmanager
def count_saved(
    blocks: dict[str, nn.Module], exclude: tuple[nn.Module, ...] = (), fake: bool = False
) -> Iterator[SavedTensors]:
    """Record what autograd saves inside the ``with``; ``blocks`` name the modules to attribute it to.

    Storages of the parameters of ``exclude`` are not counted (they exist anyway and are counted as
    parameters); cast copies of them made by autocast are counted. With ``fake`` (FakeTensorMode), the
    GroupNorm statistics saved in bf16/fp16 are counted as float32: PyTorch's fake kernel reports them in
    the input's dtype while the CPU kernel keeps them in float32.
    """
    record = SavedTensors()
    stack: list[str] = ["other"]
    handles = []
    for name, module in blocks.items():
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: stack.append(n)))

        def done(m, a, out, n=name):
            stack.pop()
            if isinstance(out, torch.Tensor):
                record.largest_numel = max(record.largest_numel, out.numel())

        handles.append(module.register_forward_hook(done))

    skip = {p.untyped_storage()._cdata for module in exclude for p in module.parameters()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in skip:
            size = storage.nbytes()
            if (fake and tensor.dtype in (torch.bfloat16, torch.float16) and tensor.dim() == 2
                    and type(tensor.grad_fn).__name__ == "NativeGroupNormBackward0"):
                size *= 2
            record.owners.setdefault(storage._cdata, (stack[-1], size))
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield record
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class LevelRow:
    """Bytes kept for backward by the blocks that run at one resolution."""

    part: str
    resolution: tuple[int, ...]
    channels: int
    saved_bytes: int


@dataclass
class MemoryEstimate:
    """An autoencoder training step's memory, by component (bytes)."""

    latent_shape: tuple[int, ...]
    batch_size: int
    precision: str
    checkpointing: bool
    levels: list[LevelRow]
    autoencoder_activations: int
    discriminator_activations: int
    perceptual_activations: int
    backward_working_set: int
    parameters: int
    gradients: int
    optimizer_state: int

    @property
    def activations(self) -> int:
        return self.autoencoder_activations + self.discriminator_activations + self.perceptual_activations

    @property
    def autoencoder_step(self) -> int:
        """The autoencoder's forward + backward alone: its activations, working set, weights and gradients."""
        return self.autoencoder_activations + self.backward_working_set + self.parameters + self.gradients

    @property
    def total(self) -> int:
        return (self.activations + self.backward_working_set + self.parameters + self.gradients
                + self.optimizer_state)

    def contributors(self) -> list[tuple[str, int]]:
        parts = [(f"{row.part} at {'x'.join(map(str, row.resolution))} ({row.channels} ch)", row.saved_bytes)
                 for row in self.levels]
        parts += [("discriminator activations", self.discriminator_activations),
                  ("perceptual network activations", self.perceptual_activations),
                  ("backward working set", self.backward_working_set),
                  ("parameters + gradients + Adam state", self.parameters + self.gradients + self.optimizer_state)]
        return sorted(parts, key=lambda item: -item[1])


def _block_names(model: AutoencoderKL) -> dict[str, nn.Module]:
    names = {f"encoder.{i}": b for i, b in enumerate(model.encoder.blocks)}
    names.update({f"decoder.{i}": b for i, b in enumerate(model.decoder.blocks)})
    return names


def _level_rows(model: AutoencoderKL, x: torch.Tensor, by_block: dict[str, int]) -> list[LevelRow]:
    """Group the blocks' saved bytes by the resolution and channels of their inputs."""
    shapes: dict[str, tuple[int, ...]] = {}

    def remember(name: str, args: tuple) -> None:  # a pre-hook must return None (else it replaces the input)
        shapes.setdefault(name, tuple(args[0].shape))

    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: remember(n, a)) for n, m in _block_names(model).items()]
    with torch.no_grad():
        model.reconstruct(x)
    for hook in hooks:
        hook.remove()
    rows: list[LevelRow] = []
    for name, shape in shapes.items():
        part = name.split(".")[0]
        resolution, channels = shape[2:], shape[1]
        if rows and rows[-1].part == part and rows[-1].resolution == resolution:
            rows[-1].saved_bytes += by_block.get(name, 0)
            rows[-1].channels = max(rows[-1].channels, channels)
        else:
            rows.append(LevelRow(part, resolution, channels, by_block.get(name, 0)))
    return rows


def training_batch(config: Config, volumes: int | None = None) -> int:
    """Samples in one training step: volumes per step, times ``data.patches_per_volume`` on patches."""
    volumes = volumes or config.autoencoder.training.batch_size
    return volumes * (config.data.patches_per_volume if config.data.patch_size is not None else 1)


@contextlib.contextmanager
def _autocast(enabled: bool, target: str = "cpu") -> Iterator[None]:
    """Autocast as on ``target``. The fake tensors look like CPU tensors, so CPU autocast is what runs;
    for ``cuda``, GroupNorm is moved to float32 as CUDA autocast does (its output then stays float32)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
        if not (enabled and target == "cuda"):
            yield
            return
        group_norm = F.group_norm

        def float32_group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
            with torch.autocast("cpu", enabled=False):
                return group_norm(x.float(), num_groups, None if weight is None else weight.float(),
                                  None if bias is None else bias.float(), eps)

        F.group_norm = float32_group_norm
        try:
            yield
        finally:
            F.group_norm = group_norm


def estimate_autoencoder(
    config: Config,
    input_size: tuple[int, ...] | None = None,
    batch_size: int | None = None,
    mixed_precision: bool | None = None,
    checkpointing: bool | None = None,
    target: str = "cuda",
) -> MemoryEstimate:
    """Count one training step of the autoencoder stage described by ``config`` on the meta device.

    Args:
        config: the run config (its ``autoencoder`` and ``data`` sections are used).
        input_size: spatial size (default: what the autoencoder trains on, ``data.patch_size`` or
            ``data.image_size``).
        batch_size: volumes per step (default ``autoencoder.training.batch_size``); each brings
            ``data.patches_per_volume`` patches when the config trains on patches.
        mixed_precision: default ``autoencoder.training.mixed_precision``.
        checkpointing: default ``autoencoder.training.use_gradient_checkpointing``.
        target: ``cuda`` or ``cpu``: whose autocast rules mixed precision follows.
    """
    ae, tr = config.autoencoder, config.autoencoder.training
    size = tuple(input_size)[: ae.spatial_dims] if input_size else training_size(config)
    batch = training_batch(config, batch_size)
    amp = tr.mixed_precision if mixed_precision is None else mixed_precision
    ckpt = tr.use_gradient_checkpointing if checkpointing is None else checkpointing
    if target not in ("cuda", "cpu"):
        raise ValueError(f"target = {target!r}: expected 'cuda' or 'cpu'")
    return _estimate_fake(config, size, batch, amp, ckpt, target)


def _estimate_fake(config: Config, size: tuple[int, ...], samples: int, amp: bool, ckpt: bool,
                   target: str = "cuda") -> MemoryEstimate:
    """:func:`estimate_autoencoder` for ``samples`` inputs of ``size`` (no defaults applied)."""
    with FakeTensorMode():
        return _estimate(config, tuple(size), samples, amp, ckpt, target)


def _estimate(config: Config, size: tuple[int, ...], batch: int, amp: bool, ckpt: bool, target: str) -> MemoryEstimate:
    ae, tr = config.autoencoder, config.autoencoder.training
    model = AutoencoderKL(**ae.model_kwargs(use_checkpointing=ckpt))
    x = torch.empty((batch, ae.in_channels, *size))
    model.train()
    latent = model.latent_shape(size)
    with count_saved(_block_names(model), exclude=(model,), fake=True) as record:
        with _autocast(amp, target):
            reconstruction, z_mu, z_sigma = model(x)
            loss = F.l1_loss(reconstruction.float(), x) + (z_mu.float().pow(2) + z_sigma.float().pow(2)).mean()
    ae_saved = record.total
    levels = _level_rows(model, x, record.by_block())
    disc_saved = 0
    n_params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if tr.use_adversarial_loss:
        from monai.networks.nets import PatchDiscriminator

        disc = PatchDiscriminator(spatial_dims=ae.spatial_dims, num_layers_d=ae.discriminator.num_layers_d,
                                  channels=ae.discriminator.num_channels, in_channels=ae.out_channels, out_channels=1)
        with count_saved({}, exclude=(disc,), fake=True) as disc_record, _autocast(amp, target):
            # the discriminator's own step: fake and real volumes; the outputs are kept alive so their saved
            # tensors stay allocated (and counted once) until both passes are done, as in a real step
            kept = [disc(reconstruction.detach().float())[-1].sum(), disc(x)[-1].sum()]
        disc_saved = disc_record.total
        del kept
        n_params += sum(p.numel() for p in disc.parameters())
        trainable += sum(p.numel() for p in disc.parameters())
    perceptual_saved = 0
    if tr.use_perceptual_loss:
        from monai_diffusion.perceptual import MedicalNetResNet

        net = MedicalNetResNet(ae.perceptual.network).eval().requires_grad_(False)
        with count_saved({}, exclude=(net,), fake=True) as perceptual_record, _autocast(amp, target):
            features = net(reconstruction.float())  # kept alive until counted, as in a real step
        perceptual_saved = perceptual_record.total
        del features
        n_params += sum(p.numel() for p in net.parameters())
    del loss
    return MemoryEstimate(
        latent_shape=latent,
        batch_size=batch,
        precision=("mixed (bf16/fp16)" if amp else "fp32") + f", {target} rules",
        checkpointing=ckpt,
        levels=levels,
        autoencoder_activations=ae_saved,
        discriminator_activations=disc_saved,
        perceptual_activations=perceptual_saved,
        backward_working_set=int((2.5 if ckpt else 1.5) * 4 * record.largest_numel),
        parameters=4 * n_params,
        gradients=4 * trainable,
        optimizer_state=8 * trainable,
    )


@dataclass
class DiffusionEstimate:
    """A diffusion UNet training step on whole-volume latents, by component (bytes)."""

    latent_shape: tuple[int, ...]
    batch_size: int
    activations: int
    backward_working_set: int
    parameters: int
    gradients: int
    optimizer_state: int
    ema: int

    @property
    def total(self) -> int:
        return (self.activations + self.backward_working_set + self.parameters + self.gradients
                + self.optimizer_state + self.ema)


def estimate_diffusion(config: Config, batch_size: int | None = None, mixed_precision: bool | None = None,
                       target: str = "cuda") -> DiffusionEstimate:
    """Count one training step of the diffusion stage (MONAI's DiffusionModelUNet on the latents of whole
    volumes, noise-prediction loss, Adam, EMA copy) on fake tensors, as :func:`estimate_autoencoder` does."""
    from monai.networks.nets import DiffusionModelUNet

    df, ae = config.diffusion, config.autoencoder
    batch = batch_size or df.training.batch_size
    amp = df.training.mixed_precision if mixed_precision is None else mixed_precision
    size = tuple(config.data.image_size)[: ae.spatial_dims]
    latent = (ae.latent_channels, *(s // f for s, f in zip(size, autoencoder_totals(config))))
    with FakeTensorMode():
        unet = DiffusionModelUNet(**df.unet_kwargs(ae.latent_channels, ae.spatial_dims)).train()
        blocks = {f"down.{i}": b for i, b in enumerate(unet.down_blocks)}
        blocks.update({"middle": unet.middle_block, **{f"up.{i}": b for i, b in enumerate(unet.up_blocks)}})
        x = torch.empty((batch, *latent))
        timesteps = torch.zeros((batch,), dtype=torch.long)
        with count_saved(blocks, exclude=(unet,), fake=True) as record, _autocast(amp, target):
            loss = F.mse_loss(unet(x, timesteps=timesteps).float(), x)
        del loss
        params = sum(p.numel() for p in unet.parameters())
    return DiffusionEstimate(
        latent_shape=latent, batch_size=batch, activations=record.total,
        backward_working_set=int(1.5 * 4 * record.largest_numel), parameters=4 * params, gradients=4 * params,
        optimizer_state=8 * params, ema=4 * params if df.training.ema_decay is not None else 0,
    )


# ----------------------------------------------------------------------------------------------------
# report and budget search
# ----------------------------------------------------------------------------------------------------
def report(estimate: MemoryEstimate) -> str:
    """A plain-text report: latent shape, per-level table, components, total, largest contributors."""
    lines = [
        f"latent shape: {list(estimate.latent_shape)} per volume; batch {estimate.batch_size}; "
        f"{estimate.precision}; gradient checkpointing {'on' if estimate.checkpointing else 'off'}",
        "",
        f"{'part':8s} {'resolution':>14s} {'channels':>8s} {'kept for backward':>18s}",
    ]
    for row in estimate.levels:
        lines.append(f"{row.part:8s} {'x'.join(map(str, row.resolution)):>14s} {row.channels:>8d} "
                     f"{format_bytes(row.saved_bytes):>18s}")
    parts = [
        ("autoencoder activations", estimate.autoencoder_activations),
        ("discriminator activations", estimate.discriminator_activations),
        ("perceptual network activations", estimate.perceptual_activations),
        ("backward working set (model)", estimate.backward_working_set),
        ("parameters", estimate.parameters),
        ("gradients", estimate.gradients),
        ("Adam state (2 moments)", estimate.optimizer_state),
    ]
    lines += ["", *(f"{name:32s} {format_bytes(size):>12s}" for name, size in parts)]
    lines += [f"{'autoencoder forward + backward':32s} {format_bytes(estimate.autoencoder_step):>12s}",
              f"{'training step total':32s} {format_bytes(estimate.total):>12s}",
              "", "largest contributors: "
              + "; ".join(f"{n} {format_bytes(b)}" for n, b in estimate.contributors()[:3]),
              "not included: allocator overhead/fragmentation (CUDA: often 5-20 %), CUDA context and cuDNN "
              f"workspace (~{CUDA_RESERVED_BYTES / GB:.2f} GB), data loading; --budget keeps a margin for them"]
    return "\n".join(lines)


@dataclass
class Candidate:
    """One configuration the budget search found to fit."""

    downsample_factors: list
    num_channels: list[int]
    attention_levels: list[bool]
    batch_size: int
    mixed_precision: bool
    checkpointing: bool
    total: int
    compression: int
    patch_size: list[int] | None = None  # None: whole volumes

    def overrides(self) -> dict[str, Any]:
        return {"downsample_factors": self.downsample_factors, "num_channels": self.num_channels,
                "attention_levels": self.attention_levels}


DEFAULT_FACTOR_OPTIONS: list[list[Any]] = [[2, 2], [4, 2], [8, 2], [16]]
PATCH_FRACTIONS = (0.75, 0.5, 0.375, 0.25)  # patch sizes tried, as fractions of each axis of the volume


def patch_options(image_size: tuple[int, ...], totals: tuple[int, ...], smallest: int = 1) -> list[tuple[int, ...]]:
    """Patch sizes for the budget search, largest first: fractions of the volume rounded down to the latent
    grid (at least one latent voxel per axis), each axis at least ``smallest`` voxels (what the
    discriminator needs)."""
    options: list[tuple[int, ...]] = []
    for fraction in PATCH_FRACTIONS:
        patch = tuple(max(f, int(s * fraction) // f * f) for s, f in zip(image_size, totals))
        if patch not in options and patch != tuple(image_size) and min(patch) >= smallest:
            options.append(patch)
    return options


def _factor_variant(config: Config, factors: list[Any]) -> Config | None:
    """``config`` with ``factors`` (levels cut or extended to match), or None if that does not fit the volume."""
    from monai_diffusion.config import config_from_dict, config_to_dict
    from monai_diffusion.errors import ConfigError

    levels = len(factors) + 1
    ae = config.autoencoder
    raw = config_to_dict(config)
    raw["autoencoder"].update(
        downsample_factors=factors,
        num_channels=(list(ae.num_channels) + [ae.num_channels[-1]] * levels)[:levels],
        attention_levels=(list(ae.attention_levels) + [ae.attention_levels[-1]] * levels)[: levels - 1]
        + [ae.attention_levels[-1]],
    )
    if isinstance(raw["autoencoder"]["num_res_blocks"], list):
        raw["autoencoder"]["num_res_blocks"] = raw["autoencoder"]["num_res_blocks"][:levels]
    raw["data"]["patch_size"] = None  # the search chooses the patch
    try:
        return config_from_dict(raw)
    except ConfigError:
        return None  # this factor option does not fit the volume size: not a candidate


def search_budget(
    config: Config,
    budget_bytes: float,
    factor_options: list[list[Any]] | None = None,
    batch_sizes: tuple[int, ...] = (8, 4, 2, 1),
    patches: bool | None = None,
) -> list[Candidate]:
    """The (factors, batch, mixed precision, checkpointing, patch) settings whose estimated training step fits
    ``budget_bytes`` with the GPU margin: ``estimate * (1 + FRAGMENTATION) + CUDA_RESERVED_BYTES <= budget``.

    A factor option with fewer steps than ``num_channels`` levels drops the deepest levels (``[16]`` with
    ``[32, 64, 64]`` uses ``[32, 64]``); options that do not divide ``data.image_size`` are skipped. For each
    factor option, precision setting and batch size, whole volumes are tried first and then, with
    ``patches`` (default: when the config trains on patches, or when no whole-volume setting fits),
    patch sizes from :func:`patch_options`, keeping the largest patch that fits. Ranked by least
    compression, then the largest patch, then the largest batch, then full precision, then no checkpointing.
    """
    found: list[Candidate] = []
    size = tuple(config.data.image_size)[: config.autoencoder.spatial_dims]

    def scan(with_patches: bool) -> None:
        for factors in factor_options or DEFAULT_FACTOR_OPTIONS:
            variant = _factor_variant(config, factors)
            if variant is None:
                continue
            ae = variant.autoencoder
            totals = autoencoder_totals(variant)
            compression = round(math.prod(size) / math.prod(s // f for s, f in zip(size, totals)))
            sizes: list[tuple[int, ...] | None] = [None]
            if with_patches and ae.spatial_dims == 3:
                smallest = (discriminator_min_size(ae.discriminator.num_layers_d)
                            if ae.training.use_adversarial_loss else 1)
                sizes += patch_options(size, totals, smallest)
            for batch in batch_sizes:
                for amp in (False, True):
                    for ckpt in (False, True):
                        for patch in sizes:  # the largest that fits
                            samples = batch * (config.data.patches_per_volume if patch else 1)
                            estimate = _estimate_fake(variant, patch or size, samples, amp, ckpt)
                            if with_margin(estimate.total) <= budget_bytes:
                                found.append(Candidate(factors, list(ae.num_channels), list(ae.attention_levels), batch,
                                                       amp, ckpt, estimate.total, compression,
                                                       list(patch) if patch else None))
                                break

    scan(with_patches=bool(patches) or (patches is None and config.data.patch_size is not None))
    if not found and patches is None:
        scan(with_patches=True)  # the whole volume does not fit: patch training is the way in
    found.sort(key=lambda c: (c.compression, -math.prod(c.patch_size or size), -c.batch_size, c.mixed_precision,
                              c.checkpointing))
    return found


def with_margin(estimate_bytes: float) -> float:
    """What an estimated step needs of a GPU's memory: the allocator's fragmentation and the CUDA context and
    workspaces on top of the estimate."""
    return estimate_bytes * (1 + FRAGMENTATION) + CUDA_RESERVED_BYTES


def parse_budget(text: str) -> float:
    """``24GB``, ``24 GiB``, ``500MB`` or a plain number of bytes."""
    units = {"gib": 2**30, "gb": 1e9, "mib": 2**20, "mb": 1e6, "kib": 2**10, "kb": 1e3, "b": 1}
    cleaned = text.strip().lower().replace(" ", "")
    for unit, size in units.items():
        if cleaned.endswith(unit):
            number = cleaned[: -len(unit)]
            break
    else:
        number, size = cleaned, 1
    try:
        value = float(number) * size
    except ValueError:
        raise ValueError(f"--budget {text!r}: expected a size such as 24GB, 80GiB or 500MB") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"--budget {text!r}: expected a finite size above zero, such as 24GB, 80GiB or 500MB")
    return value


@dataclass(frozen=True)
class StepMeasurement:
    """A real autoencoder training step: peak bytes (weights, gradients and Adam state included) and
    median seconds."""

    peak_bytes: int
    seconds: float


def measure_training_step(config: Config, device: torch.device | str = "cpu", repeats: int = 3) -> StepMeasurement:
    """Run and measure the training step of ``config`` (AutoencoderTask: generator and, after the warm-up,
    discriminator losses, Adam) on one batch of random volumes (patches, when the config trains on
    patches), with the config's precision and checkpointing.

    The peak is ``profiling.measure_peak_bytes`` of one step after a first step created Adam's state,
    plus the parameters and optimiser state that exist before it.
    """
    from monai_diffusion.profiling import measure_peak_bytes, time_call
    from monai_diffusion.runtime import Precision, Runtime
    from monai_diffusion.training.autoencoder import AutoencoderTask
    from monai_diffusion.training.loop import Optimization

    device = torch.device(device)
    tr = config.autoencoder.training
    precision = Precision(tr.mixed_precision, device)
    torch.manual_seed(config.seed)
    task = AutoencoderTask(config, Runtime(device), precision)
    optimization = Optimization(task.optimizers(), precision, 1)
    batch = {"image": torch.rand(training_batch(config), config.autoencoder.in_channels, *training_size(config))}

    def step() -> None:
        task.training_step(batch, epoch=tr.adversarial_warmup_epochs, optimization=optimization)
        optimization.step()

    with precision.kernel_guard():
        step()  # creates Adam's state, which then exists before the measured step
        modules = [m for m in (task.autoencoder, task.discriminator) if m is not None]
        existing = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
        existing += sum(t.numel() * t.element_size() for opt in task.optimizers().values()
                        for state in opt.state.values() for t in state.values() if torch.is_tensor(t))
        peak = measure_peak_bytes(step, device) + existing
        seconds = time_call(step, repeats=repeats, warmup=0, device=device)
    return StepMeasurement(peak, seconds)


# ----------------------------------------------------------------------------------------------------
# what estimate_memory.py prints and writes
# ----------------------------------------------------------------------------------------------------
def settings_table(config: Config) -> str:
    """The training step's estimated total for each precision / checkpointing combination."""
    lines = ["training step total by setting:"]
    for amp in (False, True):
        for ckpt in (False, True):
            total = estimate_autoencoder(config, mixed_precision=amp, checkpointing=ckpt).total
            lines.append(f"  {'mixed precision' if amp else 'fp32':15s} {'+ checkpointing' if ckpt else '':16s} "
                         f"{format_bytes(total):>12s}")
    return "\n".join(lines)


def candidates_table(candidates: list[Candidate], budget_text: str, shown: int = 15) -> str:
    """The configurations that fit, with their estimate and the margin the search kept."""
    lines = [f"{len(candidates)} configurations fit in {budget_text} (least compression and largest batch first), "
             f"keeping a margin of {FRAGMENTATION:.0%} for allocator fragmentation and "
             f"{format_bytes(CUDA_RESERVED_BYTES)} for the CUDA context and cuDNN workspace:",
             f"  {'factors':10s} {'channels':14s} {'patch':>13s} {'batch':>5s} {'precision':>9s} {'ckpt':>5s} "
             f"{'compression':>11s} {'estimate':>10s} {'+ margin':>10s}"]
    for c in candidates[:shown]:
        patch = "x".join(map(str, c.patch_size)) if c.patch_size else "whole"
        lines.append(f"  {str(c.downsample_factors):10s} {str(c.num_channels):14s} {patch:>13s} {c.batch_size:5d} "
                     f"{'mixed' if c.mixed_precision else 'fp32':>9s} {'yes' if c.checkpointing else 'no':>5s} "
                     f"{c.compression:>10d}x {format_bytes(c.total):>10s} {format_bytes(with_margin(c.total)):>10s}")
    return "\n".join(lines)


def candidate_config(config: Config, candidate: Candidate) -> dict[str, Any]:
    """``config`` with ``candidate``'s network and training settings, as a YAML mapping that loads."""
    from monai_diffusion.config import config_from_dict, config_to_dict

    raw = config_to_dict(config)
    raw["autoencoder"].update(candidate.overrides())
    raw["autoencoder"]["training"].update(batch_size=candidate.batch_size, mixed_precision=candidate.mixed_precision,
                                          use_gradient_checkpointing=candidate.checkpointing)
    raw["data"]["patch_size"] = candidate.patch_size
    config_from_dict(raw)  # the written file must load
    return raw


# ----------------------------------------------------------------------------------------------------
# the whole-volume pipeline: every phase that holds memory on the device, from training to sampling
# ----------------------------------------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """The most bytes of tensor storage alive at once while the ``with`` runs (``peak``; ``now`` for the
    current level). Every storage an operation creates is counted once, from its creation until it is
    freed; views and in-place results add nothing. Storages created inside :meth:`uncounted` are left out
    (e.g. buffers that live in host memory while the network computes on the device)."""

    def __init__(self) -> None:
        super().__init__()
        self.now = self.peak = 0
        self._live: dict[int, int] = {}  # storage id -> bytes counted
        self._counting = True

    @contextlib.contextmanager
    def uncounted(self) -> Iterator[None]:
        self._counting, before = False, self._counting
        try:
            yield
        finally:
            self._counting = before

    def _freed(self, key: int) -> None:
        self.now -= self._live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (TorchDispatchMode's API)
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)  # the storage's Python object lives exactly as long as the storage
            if key in self._live:
                continue
            # a view or in-place result of a tensor made before the ``with`` (weights, inputs): not new memory
            size = storage.nbytes() if self._counting and key not in inputs else 0
            self._live[key] = size
            self.now += size
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._freed, key)
        return out


@contextlib.contextmanager
def _host_buffers_uncounted(live: LiveBytes) -> Iterator[None]:
    """Leave the exact tiling's full-size buffers out of ``live`` unless they are on the device."""
    from generative.networks import tiling

    original = tiling._Buffers.new

    def new(self, shape, dtype):  # noqa: ANN001
        if self.where == "device":
            return original(self, shape, dtype)
        with live.uncounted():
            return original(self, shape, dtype)

    tiling._Buffers.new = new
    try:
        yield
    finally:
        tiling._Buffers.new = original


@dataclass
class PhaseEstimate:
    """One phase of the pipeline: what the device holds at its peak, and the host memory it needs."""

    name: str
    detail: str
    device_bytes: int
    host_bytes: int = 0


def _parameter_bytes(*modules: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def estimate_autoencoder_inference(
    config: Config, part: str, mixed_precision: bool = False, buffers: str = "cpu", target: str = "cuda",
    batch: int = 1,
) -> tuple[int, int, str]:
    """Peak device bytes of one whole volume's encode (``part="encode"``: the volume in, the latent out),
    decode (``"decode"``) or both (``"reconstruct"``), run as the pipeline runs it: by tiles of
    ``config.inference_tile`` with the exact method when the config sets one, else at once; no autograd.
    Counted on fake tensors with :class:`LiveBytes`: the input, every intermediate and the output, not the
    parameters (add them).

    Args:
        config: the run config (``autoencoder``, ``data.image_size``, the tiles).
        part: ``"encode"``, ``"decode"`` or ``"reconstruct"``.
        mixed_precision: under autocast, following ``target``'s rules.
        buffers: where the exact method's full-size buffers live (``"cpu"``/``"disk"``: left out of the count,
            reported apart; ``"device"``: counted).
        target: ``cuda`` or ``cpu``.
        batch: volumes passed at once (the exact method runs them one after the other; their inputs and
            outputs are all on the device).

    Returns:
        (device bytes, host buffer bytes of the exact method, how it ran).
    """
    from generative.networks.tiling import tiled_decode, tiled_encode, tiled_reconstruct

    if part not in ("encode", "decode", "reconstruct"):
        raise ValueError(f"part = {part!r}: expected 'encode', 'decode' or 'reconstruct'")
    ae = config.autoencoder
    size = tuple(config.data.image_size)[: ae.spatial_dims]
    tile = config.inference_tile
    report: dict[str, Any] = {}
    with FakeTensorMode():
        model = AutoencoderKL(**ae.model_kwargs()).eval()
        latent = model.latent_shape(size)
        live = LiveBytes()
        with torch.no_grad(), live, _host_buffers_uncounted(live), _autocast(mixed_precision, target):
            if part == "reconstruct":
                x = torch.empty((batch, ae.in_channels, *size))
                out = (tiled_reconstruct(model, x, tile, ae.tile_overlap, progress=False, buffers=buffers,
                                         report=report) if tile else model.reconstruct(x))
            elif part == "encode":
                x = torch.empty((batch, ae.in_channels, *size))
                out = (tiled_encode(model, x, tile, ae.tile_overlap, progress=False, buffers=buffers, report=report)
                       if tile else model.encode(x))
            else:
                z = torch.empty((batch, *latent))
                out = (tiled_decode(model, z, tile, ae.tile_overlap, progress=False, buffers=buffers, report=report)
                       if tile else model.decode(z))
            del out
    if not tile:
        how = "whole volume at once"
    elif report.get("method") == "exact":
        how = f"exact tiles, blocks {'x'.join(map(str, report['block']))}, buffers {buffers}"
    else:
        how = f"blended tiles {'x'.join(map(str, tile))}"
    host = report.get("buffer_peak_bytes", 0) if buffers != "device" else 0
    return live.peak, host, how


def estimate_pipeline(config: Config, target: str = "cuda") -> list[PhaseEstimate]:
    """Every phase of training and sampling that needs device memory, for ``config``'s whole volumes:

    1. the autoencoder training step (:func:`estimate_autoencoder`);
    2. its validation: whole volumes reconstructed (by tiles after patch training) while the training
       state (weights, gradients, Adam, discriminator) stays on the device;
    3. the latent cache of the diffusion stage: a batch of whole volumes encoded (fp32, as ``latents.py`` does);
    4. the diffusion training step on whole-volume latents (:func:`estimate_diffusion`);
    5. sampling: the UNet's denoising step (twice the batch under guidance) and the decode of the generated
       latents (under the diffusion stage's mixed precision), with the UNet still on the device;
    6. with ``data.num_classes``: the ControlNet training step and sampling with it
       (``monai_diffusion.controlnet_memory``).

    Validation and the latent cache take ``autoencoder.training.batch_size`` volumes at once, sampling
    ``diffusion.sampling.batch_size``.
    """
    from monai.networks.nets import DiffusionModelUNet

    ae, df = config.autoencoder, config.diffusion
    amp_ae, amp_df = ae.training.mixed_precision, df.training.mixed_precision
    size = tuple(config.data.image_size)[: ae.spatial_dims]
    volume = "x".join(map(str, size))
    with FakeTensorMode():
        ae_params = _parameter_bytes(AutoencoderKL(**ae.model_kwargs()))
    phases: list[PhaseEstimate] = []

    train = estimate_autoencoder(config, target=target)
    trained_on = "x".join(map(str, training_size(config)))
    phases.append(PhaseEstimate("autoencoder training step",
                                f"{trained_on} x {train.batch_size}, {train.precision}", train.total))

    state = train.parameters + train.gradients + train.optimizer_state
    volumes = ae.training.batch_size
    valid, host_v, how_v = estimate_autoencoder_inference(config, "reconstruct", amp_ae, target=target, batch=volumes)
    phases.append(PhaseEstimate("autoencoder validation",
                                f"{volume} x {volumes}, {how_v}; beside the training state", state + valid, host_v))

    cache, host_c, how_c = estimate_autoencoder_inference(config, "encode", False, target=target, batch=volumes)
    phases.append(PhaseEstimate("latent cache (encode)", f"{volume} x {volumes}, {how_c}, fp32", ae_params + cache,
                                host_c))

    diffusion = estimate_diffusion(config, target=target)
    phases.append(PhaseEstimate("diffusion training step",
                                f"latents {'x'.join(map(str, diffusion.latent_shape))} x {diffusion.batch_size}",
                                diffusion.total))

    unet_params = diffusion.parameters  # float32 weights, as counted for the training step
    samples = df.sampling.batch_size
    guided = bool(df.conditioning.categorical or df.conditioning.continuous) and df.sampling.guidance_scale != 1.0
    latent = diffusion.latent_shape
    with FakeTensorMode():
        unet = DiffusionModelUNet(**df.unet_kwargs(ae.latent_channels, ae.spatial_dims)).eval()
        live = LiveBytes()
        with torch.no_grad(), live, _autocast(amp_df, target):
            inputs = torch.empty((samples * (2 if guided else 1), *latent))
            prediction = unet(inputs, timesteps=torch.zeros((len(inputs),), dtype=torch.long))
            del prediction
    latents = f"{samples} latent{'s' if samples > 1 else ''}{' x 2 (guidance)' if guided else ''}"
    phases.append(PhaseEstimate("sampling: denoising", latents, ae_params + unet_params + live.peak))
    sample_decode, host_s, how_s = estimate_autoencoder_inference(config, "decode", amp_df, target=target,
                                                                  batch=samples)
    phases.append(PhaseEstimate("sampling: decode", f"{volume} x {samples}, {how_s}",
                                ae_params + unet_params + sample_decode, host_s))
    if config.data.num_classes is not None:  # label maps: the ControlNet stage and sampling from masks
        from monai_diffusion.controlnet_memory import controlnet_phases

        phases += controlnet_phases(config, target, autoencoder_bytes=ae_params)
    return phases


def pipeline_report(phases: list[PhaseEstimate]) -> str:
    """The phases with their estimated device peak, the same with the GPU margin, and host buffers."""
    lines = [f"  {'phase':28s} {'device':>10s} {'+ margin':>10s} {'host buffers':>13s}  what runs"]
    for phase in phases:
        host = format_bytes(phase.host_bytes) if phase.host_bytes else "-"
        lines.append(f"  {phase.name:28s} {format_bytes(phase.device_bytes):>10s} "
                     f"{format_bytes(with_margin(phase.device_bytes)):>10s} {host:>13s}  {phase.detail}")
    largest = max(phases, key=lambda p: p.device_bytes)
    lines += ["", f"largest phase: {largest.name}, {format_bytes(with_margin(largest.device_bytes))} of GPU memory "
              f"with the margin",
              f"margin = estimate x {1 + FRAGMENTATION:.2f} (caching allocator) + {format_bytes(CUDA_RESERVED_BYTES)} "
              f"(CUDA context, cuDNN/cuBLAS workspaces); host buffers: the exact tiled method's full-size activations "
              f"between layers, in host memory (autoencoder.tile_size; see docs/tiling.md)"]
    return "\n".join(lines)
