"""The training loop, written once: epochs, gradient accumulation, mixed precision, validation,
checkpoints, DDP, progress bars and TensorBoard. What is trained lives in a *task* (``autoencoder.py``,
``diffusion.py``) that only knows how to compute its losses; ``runner.py`` sets a stage up around it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from monai_diffusion.data.loaders import batches_from, build_loaders  # build_loaders: re-exported
from monai_diffusion.errors import ConfigError, TrainingError
from monai_diffusion.runtime import Precision, Runtime
from monai_diffusion.training.keeper import CheckpointKeeper
from monai_diffusion.training.optimization import Optimization, all_finite, meeting_device, to_host
from monai_diffusion.visualize import save_png

__all__ = ["TrainingError", "LoopSettings", "LoopState", "Task", "Optimization", "fit", "build_loaders", "all_finite",
           "lr_factor"]

log = logging.getLogger("monai_diffusion")


@dataclass
class LoopSettings:
    """What the loop needs from a config section."""

    n_epochs: int
    max_steps: int | None
    accumulation_steps: int
    val_interval: int
    fast_dev_run: bool
    fast_dev_run_batches: int
    log_every_n_steps: int
    checkpoint_every_n_steps: int | None
    keep_last_checkpoints: int = 3
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0
    grad_clip_norm: float | None = None
    key: str = "training"  # the config section, named in messages

    @classmethod
    def of(cls, section: Any) -> LoopSettings:
        """The settings of a ``training`` config section (autoencoder or diffusion)."""
        return cls(n_epochs=section.n_epochs, max_steps=section.max_steps,
                   accumulation_steps=section.gradient_accumulation_steps, val_interval=section.val_interval,
                   fast_dev_run=section.fast_dev_run, fast_dev_run_batches=section.fast_dev_run_batches,
                   log_every_n_steps=section.log_every_n_steps,
                   checkpoint_every_n_steps=section.checkpoint_every_n_steps,
                   keep_last_checkpoints=section.keep_last_checkpoints, warmup_steps=section.warmup_steps,
                   lr_schedule=section.lr_schedule, min_lr_ratio=section.min_lr_ratio,
                   grad_clip_norm=section.grad_clip_norm,
                   key=f"{'diffusion' if type(section).__name__.startswith('Diffusion') else 'autoencoder'}.training")


def lr_factor(step: int, warmup: int, schedule: str, total: int, min_ratio: float) -> float:
    """The learning rate of optimiser step ``step`` (0-based) as a fraction of the configured one: a linear
    warm-up over ``warmup`` steps, then ``constant``, or a ``cosine`` / ``linear`` decay that reaches
    ``min_ratio`` at step ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


@dataclass
class LoopState:
    """The loop's position; stored in every checkpoint."""

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    best_metric: float = math.inf
    skipped_steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


class Task(Protocol):
    """What the loop trains (see ``AutoencoderTask`` and ``DiffusionTask``).

    A task subclasses ``Task`` to get the defaults of the optional hooks (``on_validation_start``,
    ``after_optimizer_step``) and defines the rest. ``training_step`` returns its logs as detached tensors
    (or floats): the loop averages them on the device and reads them once per logging interval, so a
    training step does not wait for the GPU.
    """

    monitor: str  # validation metric to minimise for the ``best`` checkpoint

    def ddp_modules(self) -> list[nn.Module]:
        """The modules wrapped in DistributedDataParallel (their gradient sync is skipped inside a window)."""

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimisers by name (the names of ``Optimization.backward``)."""

    def train(self, mode: bool = True) -> None:
        """Switch the trained modules to training (``True``) or evaluation mode."""

    def training_step(self, batch: dict[str, Any], epoch: int, optimization: Optimization) -> dict[str, Any]:
        """Forward and ``optimization.backward`` of one micro-batch; returns the logs (detached tensors)."""

    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Sums of the validation metrics over the batch, and ``count``: the number of volumes."""

    def preview(self, batch: dict[str, Any]) -> np.ndarray | None:
        """A 2D image of the batch :meth:`validation_step` has just seen (rank 0), or None."""

    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint holds of the task (weights, optimisers, its config)."""

    def on_validation_start(self) -> None:
        """Called before each validation (e.g. to reseed the validation noise); default: nothing."""
        return None

    def after_optimizer_step(self) -> None:
        """Called after each optimiser step (e.g. an EMA update); default: nothing."""
        return None


def _check_validation(metrics: dict[str, float], monitor: str, epoch: int) -> None:
    """Stop before saving weights whose validation is NaN (or whose monitored metric is not finite; an
    infinite PSNR of a perfect reconstruction is fine)."""
    bad = {k: v for k, v in metrics.items() if math.isnan(v) or (k == monitor and not math.isfinite(v))}
    if bad:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in bad.items())
        raise TrainingError(f"non-finite validation at epoch {epoch + 1} ({shown}); stopped, the last good checkpoint "
                            f"is kept; lower the learning rate")


@contextlib.contextmanager
def _no_sync(modules: list[nn.Module], active: bool) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        if active:
            for module in modules:
                if isinstance(module, nn.parallel.DistributedDataParallel):
                    stack.enter_context(module.no_sync())
        yield


class _Running:
    """Running means of the step logs, summed on the device; :meth:`means` reads them in one host sync."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.count = 0

    def add(self, logs: dict[str, Any]) -> None:
        for key, value in logs.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1

    def means(self) -> dict[str, float]:
        return {key: value / max(self.count, 1) for key, value in _read(self.sums).items()}


def _read(values: dict[str, Any]) -> dict[str, float]:
    """``values`` (tensors on any device, or floats) as floats, in one host sync."""
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    out = {k: float(v) for k, v in values.items() if k not in tensors}
    if tensors:
        home = meeting_device([t.device for t in tensors.values()])
        read = to_host(torch.stack([t.detach().double().reshape(()).to(home) for t in tensors.values()]))
        out.update(zip(tensors, read))
    return {k: out[k] for k in values}


def _validate(
    task: Task, loader: DataLoader, settings: LoopSettings, runtime: Runtime
) -> tuple[dict[str, float], np.ndarray | None]:
    task.train(False)
    task.on_validation_start()
    sums: dict[str, torch.Tensor] = {}
    preview = None
    with torch.no_grad():
        for index, batch in enumerate(tqdm(loader, desc="validation", leave=False, disable=not runtime.is_main)):
            if settings.fast_dev_run and index >= settings.fast_dev_run_batches:
                break
            for key, value in task.validation_step(batch).items():
                sums[key] = sums[key] + value.detach().double() if key in sums else value.detach().double()
            if preview is None and runtime.is_main:
                preview = task.preview(batch)
    task.train(True)
    reduced: dict[str, float] = {}
    for part in runtime.all_gather(_read(sums)):  # one host sync; a rank may have had no volume
        for key, value in part.items():
            reduced[key] = reduced.get(key, 0.0) + value
    if not reduced:
        return {}, preview
    count = max(reduced.pop("count", 1.0), 1.0)
    return {f"val/{k}": v / count for k, v in reduced.items()}, preview


@dataclass
class _Run:
    """What one call of :func:`fit` works with."""

    task: Task
    settings: LoopSettings
    runtime: Runtime
    precision: Precision
    loaders: tuple[DataLoader, DataLoader, Sampler]
    run_dir: Path
    state: LoopState
    writer: Any | None
    optimization: Optimization
    keeper: CheckpointKeeper
    batches_per_epoch: int

    def save(self, name: str, epoch: int, batch_in_epoch: int, confirmed: bool = False) -> None:
        state, optimization = self.state, self.optimization
        state.epoch, state.batch_in_epoch = epoch, batch_in_epoch
        state.global_step, state.skipped_steps = optimization.step_index, optimization.skipped
        task_state = self.task.state_dict() if self.runtime.is_main else {}
        self.keeper.save(name, task_state, dict(vars(state)), confirmed)


@dataclass
class _Epoch:
    """What an epoch's training part leaves for its end: the record, and whether ``max_steps`` stopped it."""

    record: dict[str, float]
    stop: bool = False
    resume_at: int = 0  # where a run stopped by max_steps in mid-epoch would continue in that epoch


def _log_interval(run: _Run, running: _Running, bar: tqdm) -> None:
    """Every ``log_every_n_steps`` optimiser steps: the running means (one host sync) to the progress bar and
    TensorBoard."""
    step = run.optimization.step_index
    if step % run.settings.log_every_n_steps:
        return
    means = running.means()
    bar.set_postfix({k: f"{v:.4f}" for k, v in means.items()})
    if run.writer is None:
        return
    for key, value in means.items():
        run.writer.add_scalar(f"train/{key}", value, step)
    for name, optimizer in run.task.optimizers().items():
        run.writer.add_scalar(f"train/lr_{name}", optimizer.param_groups[0]["lr"], step)
    if run.precision.uses_scaler:
        run.writer.add_scalar("train/skipped_steps", run.optimization.skipped, step)


def _train_epoch(run: _Run, epoch: int) -> _Epoch:
    """The training part of ``epoch``: micro-batches, optimiser steps, logging, step checkpoints."""
    settings, optimization, task = run.settings, run.optimization, run.task
    train_loader, _, sampler = run.loaders
    if hasattr(sampler, "set_epoch"):  # a torch Sampler, not the task: samplers without epochs exist
        sampler.set_epoch(epoch)
    skip = run.state.batch_in_epoch if epoch == run.state.epoch else 0
    running, result = _Running(), _Epoch({})
    progress = tqdm(total=run.batches_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{settings.n_epochs}",
                    disable=not run.runtime.is_main, dynamic_ncols=True)
    started, seen = time.perf_counter(), 0
    # the bar is closed (ending its line) on errors too, so an error message starts on a line of its own
    with progress as bar:
        for index, batch in batches_from(train_loader, skip):  # the skipped batches are not loaded
            if index >= run.batches_per_epoch:
                break
            # 1. forward + backward of one micro-batch (gradients synchronised only at the window's end)
            window_start = index - index % settings.accumulation_steps
            optimization.window = min(settings.accumulation_steps, run.batches_per_epoch - window_start)
            boundary = (index + 1) % settings.accumulation_steps == 0 or index + 1 == run.batches_per_epoch
            with _no_sync(task.ddp_modules(), active=not boundary):
                running.add(task.training_step(batch, epoch, optimization))
            seen += len(next(iter(batch.values())))
            bar.update(1)
            if not boundary:
                continue
            # 2. optimiser step (one host sync), logging, periodic checkpoint
            optimization.step()
            run.keeper.confirm()  # the unconfirmed checkpoint's weights computed this window's finite values
            task.after_optimizer_step()
            _log_interval(run, running, bar)
            step = optimization.step_index
            if settings.checkpoint_every_n_steps and step % settings.checkpoint_every_n_steps == 0:
                run.save("step", epoch, index + 1)
            if settings.max_steps is not None and step >= settings.max_steps:
                result.stop = True
                result.resume_at = index + 1 if index + 1 < run.batches_per_epoch else 0
                break
    elapsed = time.perf_counter() - started
    result.record = {"epoch": epoch + 1, "step": optimization.step_index, **running.means(),
                     "volumes_per_second": seen * run.runtime.world_size / elapsed if elapsed > 0 else 0.0}
    return result


def _end_epoch(run: _Run, epoch: int, result: _Epoch) -> bool:
    """Validation, preview, the ``best`` and ``last`` checkpoints of ``epoch``; whether training ends."""
    settings, record = run.settings, result.record
    last_epoch = result.stop or settings.fast_dev_run or epoch + 1 == settings.n_epochs
    validated = False
    if last_epoch or (epoch + 1) % settings.val_interval == 0:
        metrics, preview = _validate(run.task, run.loaders[1], settings, run.runtime)
        _check_validation(metrics, run.task.monitor, epoch)
        validated = bool(metrics)
        record.update(metrics)
        if run.runtime.is_main:
            _show_validation(run, epoch, metrics, preview)
    run.state.history.append(record)
    if record.get(run.task.monitor, math.inf) < run.state.best_metric:
        run.state.best_metric = record[run.task.monitor]
        run.save("best", epoch + 1, 0)
    # a run stopped in mid-epoch resumes there (e.g. with a larger max_steps), not at the next epoch
    run.save("last", epoch if result.resume_at else epoch + 1, result.resume_at, confirmed=validated or last_epoch)
    return last_epoch


def _show_validation(run: _Run, epoch: int, metrics: dict[str, float], preview: np.ndarray | None) -> None:
    log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    if preview is not None:
        save_png(preview, run.run_dir / "previews" / f"epoch_{epoch + 1:04d}.png")
    if run.writer is not None:
        step = run.optimization.step_index
        for key, value in metrics.items():
            run.writer.add_scalar(key, value, step)
        if preview is not None:
            run.writer.add_image("val/preview", preview, step, dataformats="HW")


def _optimization(task: Task, settings: LoopSettings, precision: Precision, state: LoopState,
                  batches_per_epoch: int) -> Optimization:
    """The task's optimisers at the loop's position, with the learning-rate schedule."""
    optimization = Optimization(task.optimizers(), precision, settings.accumulation_steps, settings.grad_clip_norm)
    optimization.step_index = state.global_step
    optimization.skipped = state.skipped_steps
    _schedule_learning_rate(optimization, settings, batches_per_epoch)
    return optimization


def _schedule_learning_rate(optimization: Optimization, settings: LoopSettings, batches_per_epoch: int) -> None:
    """The warm-up and decay of ``settings`` (nothing for a constant rate without warm-up); a warm-up as long as
    the run is refused (ConfigError): its learning rate would never reach the configured value."""
    if not settings.warmup_steps and settings.lr_schedule == "constant":
        return
    steps_per_epoch = -(-batches_per_epoch // settings.accumulation_steps)
    total = settings.max_steps if settings.max_steps is not None else settings.n_epochs * steps_per_epoch
    if settings.warmup_steps >= total and not settings.fast_dev_run:
        raise ConfigError(f"{settings.key}.warmup_steps: {settings.warmup_steps} warm-up steps, but the run has "
                          f"{total} optimiser steps ({settings.n_epochs} epochs of {steps_per_epoch}): the "
                          f"learning rate would never reach its configured value; use fewer warm-up steps (e.g. "
                          f"{max(1, total // 10)}) or train longer")
    optimization.schedule(lambda step: lr_factor(step, settings.warmup_steps, settings.lr_schedule, total,
                                                 settings.min_lr_ratio))


def fit(
    task: Task,
    settings: LoopSettings,
    runtime: Runtime,
    precision: Precision,
    loaders: tuple[DataLoader, DataLoader, Sampler],
    run_dir: Path,
    state: LoopState,
    writer: Any | None,
) -> LoopState:
    """Train ``task`` from ``state`` to the end (or ``max_steps`` / ``fast_dev_run``); returns the final state.

    Each epoch trains (:func:`_train_epoch`), then validates and saves (:func:`_end_epoch`); the checkpoints
    are kept by a :class:`~monai_diffusion.training.keeper.CheckpointKeeper`.
    """
    if settings.max_steps is not None and state.global_step >= settings.max_steps:
        log.info("already at max_steps = %d: nothing to train (raise max_steps to continue)", settings.max_steps)
        return state
    batches_per_epoch = len(loaders[0])
    if settings.fast_dev_run:
        batches_per_epoch = min(batches_per_epoch, settings.fast_dev_run_batches)
    optimization = _optimization(task, settings, precision, state, batches_per_epoch)
    keeper = CheckpointKeeper(run_dir, runtime, precision, settings.keep_last_checkpoints)
    run = _Run(task, settings, runtime, precision, loaders, run_dir, state, writer, optimization, keeper,
               batches_per_epoch)
    task.train(True)
    for epoch in range(state.epoch, settings.n_epochs):
        if _end_epoch(run, epoch, _train_epoch(run, epoch)):
            break
    state.global_step, state.skipped_steps = optimization.step_index, optimization.skipped
    if writer is not None:
        writer.flush()
    return state
