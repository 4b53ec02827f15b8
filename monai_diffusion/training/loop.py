"""The training loop, written once: epochs, gradient accumulation, mixed precision, validation,
checkpoints, DDP, progress bars and TensorBoard. What is trained lives in a *task* (``autoencoder.py``,
``diffusion.py``) that only knows how to compute its losses; ``runner.py`` sets a stage up around it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from monai_diffusion.checkpoints import checkpoint_path, confirm_checkpoint, save_checkpoint, unconfirmed_path
from monai_diffusion.data.loaders import batches_from, build_loaders  # build_loaders: re-exported
from monai_diffusion.errors import TrainingError
from monai_diffusion.runtime import Precision, Runtime, capture_rng
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
                   grad_clip_norm=section.grad_clip_norm)


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
    """What the loop trains. See ``AutoencoderTask`` for a complete example."""

    monitor: str  # validation metric to minimise for the ``best`` checkpoint

    def ddp_modules(self) -> list[nn.Module]: ...
    def optimizers(self) -> dict[str, torch.optim.Optimizer]: ...
    def train(self, mode: bool = True) -> None: ...
    def training_step(self, batch: dict[str, Any], epoch: int, optimization: Optimization) -> dict[str, float]: ...
    def validation_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]: ...
    def preview(self, batch: dict[str, Any]) -> np.ndarray: ...
    def state_dict(self) -> dict[str, Any]: ...


class Optimization:
    """Backward passes with loss scaling and accumulation, and one optimiser step per window.

    Args:
        optimizers: the task's optimisers by name.
        precision: autocast / GradScaler settings.
        accumulation_steps: micro-batches per optimiser step (losses are divided by it).
    """

    def __init__(
        self, optimizers: dict[str, torch.optim.Optimizer], precision: Precision, accumulation_steps: int,
        grad_clip_norm: float | None = None,
    ) -> None:
        self.optimizers = optimizers
        self.precision = precision
        self.accumulation_steps = accumulation_steps
        self.grad_clip_norm = grad_clip_norm
        self.schedulers: list[torch.optim.lr_scheduler.LRScheduler] = []
        self.step_index = 0
        self.skipped = 0
        self.window = accumulation_steps  # micro-batches in the current window (fewer in an epoch's last one)
        self._pending: set[str] = set()

    def backward(self, loss: torch.Tensor, optimizer: str, terms: dict[str, float]) -> None:
        """Accumulate gradients of ``loss / window`` for ``optimizer`` (the window's mean loss); stop on a
        non-finite loss (unless fp16 scaling skips the step)."""
        if not self.precision.uses_scaler and not torch.isfinite(loss.detach()):
            shown = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
            error = TrainingError(
                f"non-finite {optimizer} loss at optimiser step {self.step_index + 1} "
                f"(loss={float(loss.detach()):.4g}; "
                f"{shown}); stopped, the last good checkpoint is kept; check the loss weights and the learning rate"
            )
            error.rank_local = True  # this process's own batch (gradients, weights, validation are shared)
            raise error
        self.precision.scaler.scale(loss / self.window).backward()
        self._pending.add(optimizer)

    def schedule(self, factor: Callable[[int], float]) -> None:
        """Scale every learning rate by ``factor(step)`` (torch's ``LambdaLR``), from the current step on.

        The factor depends on the step alone, so a resumed run continues the schedule where it stopped; the
        configured learning rate (already in the optimisers) is the base, also when it changed on resume.
        """
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["initial_lr"] = group["lr"]
            self.schedulers.append(torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=self.step_index - 1))

    def _grads_finite(self, optimizer: torch.optim.Optimizer) -> bool:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        return all_finite(grads)

    def step(self) -> None:
        """Step every optimiser that received gradients in this window, then clear them."""
        scaler = self.precision.scaler
        scale_before = scaler.get_scale() if self.precision.uses_scaler else None
        for name in sorted(self._pending):
            optimizer = self.optimizers[name]
            if not self.precision.uses_scaler and not self._grads_finite(optimizer):
                raise TrainingError(
                    f"non-finite gradients for {name} at optimiser step {self.step_index + 1}; stopped, the last "
                    f"good checkpoint is kept"
                )
            if self.grad_clip_norm is not None:
                scaler.unscale_(optimizer)  # clip the true gradients (a no-op without fp16 scaling)
                params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm)
            scaler.step(optimizer)
            weights = [p for group in optimizer.param_groups for p in group["params"]]
            moments = [v for p in weights for v in optimizer.state.get(p, {}).values()
                       if isinstance(v, torch.Tensor) and v.is_floating_point()]
            if not all_finite(weights + moments):  # e.g. a learning rate so large that Adam overflows: never save this
                raise TrainingError(
                    f"non-finite {name} weights or optimiser state after optimiser step {self.step_index + 1} "
                    f"(finite loss and gradients); stopped, the last good checkpoint is kept; lower the learning rate"
                )
        if self.precision.uses_scaler:
            scaler.update()
            if scaler.get_scale() < scale_before:
                self.skipped += 1  # fp16 overflow: the scaler skipped this step, as designed
        for name in self._pending:
            self.optimizers[name].zero_grad(set_to_none=True)
        self._pending.clear()
        self.step_index += 1
        for scheduler in self.schedulers:
            scheduler.step()


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of ``tensors`` is finite: one fused check per device and dtype, one host sync.

    (The loss scaler's own kernel; multiplying by the scale 1 leaves the tensors as they are.)
    """
    if not tensors:
        return True
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor.detach())
    found = []
    for (device, _), group in groups.items():
        flag = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, flag, torch.ones(1, device=device))
        found.append(flag)
    return not bool(torch.stack(found).sum().item())


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
    """Running means of the step logs for the progress bar and TensorBoard."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, logs: dict[str, float]) -> None:
        for key, value in logs.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def means(self) -> dict[str, float]:
        return {key: value / max(self.count, 1) for key, value in self.sums.items()}


def _validate(
    task: Task, loader: DataLoader, settings: LoopSettings, runtime: Runtime
) -> tuple[dict[str, float], np.ndarray | None]:
    task.train(False)
    if hasattr(task, "on_validation_start"):  # e.g. reseed the validation noise
        task.on_validation_start()
    sums: dict[str, torch.Tensor] = {}
    preview = None
    with torch.no_grad():
        for index, batch in enumerate(tqdm(loader, desc="validation", leave=False, disable=not runtime.is_main)):
            if settings.fast_dev_run and index >= settings.fast_dev_run_batches:
                break
            for key, value in task.validation_step(batch).items():
                sums[key] = sums.get(key, 0) + value.detach().double().cpu()
            if preview is None and runtime.is_main:
                preview = task.preview(batch)
    task.train(True)
    reduced: dict[str, float] = {}
    for part in runtime.all_gather({k: float(v) for k, v in sums.items()}):  # a rank may have had no volume
        for key, value in part.items():
            reduced[key] = reduced.get(key, 0.0) + value
    if not reduced:
        return {}, preview
    count = max(reduced.pop("count", 1.0), 1.0)
    return {f"val/{k}": v / count for k, v in reduced.items()}, preview


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
    """Train ``task`` from ``state`` to the end (or ``max_steps`` / ``fast_dev_run``); returns the final state."""
    if settings.max_steps is not None and state.global_step >= settings.max_steps:
        log.info("already at max_steps = %d: nothing to train (raise max_steps to continue)", settings.max_steps)
        return state
    train_loader, val_loader, sampler = loaders
    optimization = Optimization(task.optimizers(), precision, settings.accumulation_steps, settings.grad_clip_norm)
    optimization.step_index = state.global_step
    optimization.skipped = state.skipped_steps
    batches_per_epoch = len(train_loader)
    if settings.fast_dev_run:
        batches_per_epoch = min(batches_per_epoch, settings.fast_dev_run_batches)
    if settings.warmup_steps or settings.lr_schedule != "constant":
        steps_per_epoch = -(-batches_per_epoch // settings.accumulation_steps)
        total = settings.max_steps if settings.max_steps is not None else settings.n_epochs * steps_per_epoch
        optimization.schedule(lambda step: lr_factor(step, settings.warmup_steps, settings.lr_schedule, total,
                                                     settings.min_lr_ratio))

    # ``last.pt`` names only a state whose weights were seen to compute finite values: finite weights and
    # optimiser state are not enough (a huge learning rate gives finite weights of 1e30 whose next forward
    # pass is NaN). A ``step`` or ``last`` checkpoint is written at once, hidden as unconfirmed, and named by
    # ``last.pt`` once confirmed: by the next optimiser step (finite losses, gradients and weights) or by a
    # finite validation of those weights. A run stopped in between never names it (runner.py deletes it).
    unconfirmed: list[Path] = []

    def confirm() -> None:
        for path in unconfirmed:  # in order (an older one is a predecessor of the state confirmed): last.pt ends
            confirm_checkpoint(path, settings.keep_last_checkpoints)  # on the newest
        unconfirmed.clear()

    def save(name: str, epoch: int, batch_in_epoch: int, confirmed: bool = False) -> None:
        """``name``: ``last``, ``best`` (after a finite validation), or ``step`` (a rotated step checkpoint that
        ``last`` then points to); ``confirmed``: the weights were just validated, finite."""
        state.epoch, state.batch_in_epoch = epoch, batch_in_epoch
        state.global_step, state.skipped_steps = optimization.step_index, optimization.skipped
        rng = runtime.all_gather(capture_rng(runtime.device))  # every rank's own streams, restored per rank
        if runtime.is_main:
            payload = {**task.state_dict(), "loop": dict(vars(state)), "rng": rng,
                       "scaler": precision.scaler.state_dict()}
            if name == "best":
                save_checkpoint(payload, checkpoint_path(run_dir, name))
            else:
                label = f"step_{state.global_step:08d}" if name == "step" else "last"
                unconfirmed.append(save_checkpoint(payload, unconfirmed_path(run_dir, label)))
                if confirmed:
                    confirm()
        runtime.barrier()

    task.train(True)
    stop = False
    resume_at = 0  # where a run stopped by max_steps in mid-epoch would continue in that epoch
    for epoch in range(state.epoch, settings.n_epochs):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        skip = state.batch_in_epoch if epoch == state.epoch else 0
        running = _Running()
        progress = tqdm(total=batches_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{settings.n_epochs}",
                        disable=not runtime.is_main, dynamic_ncols=True)
        started, seen = time.perf_counter(), 0
        # the bar is closed (ending its line) on errors too, so an error message starts on a line of its own
        with progress as bar:
            for index, batch in batches_from(train_loader, skip):  # the skipped batches are not loaded
                if index >= batches_per_epoch:
                    break
                # 1. forward + backward of one micro-batch (gradients synchronised only at the window's end)
                window_start = index - index % settings.accumulation_steps
                optimization.window = min(settings.accumulation_steps, batches_per_epoch - window_start)
                boundary = (index + 1) % settings.accumulation_steps == 0 or index + 1 == batches_per_epoch
                with _no_sync(task.ddp_modules(), active=not boundary):
                    logs = task.training_step(batch, epoch, optimization)
                running.add(logs)
                seen += len(next(iter(batch.values())))
                bar.update(1)
                bar.set_postfix({k: f"{v:.4f}" for k, v in running.means().items()})
                if not boundary:
                    continue
                # 2. optimiser step, logging, periodic checkpoint
                optimization.step()
                confirm()  # the unconfirmed checkpoint's weights computed this window's finite values
                if hasattr(task, "after_optimizer_step"):  # e.g. an EMA update
                    task.after_optimizer_step()
                step = optimization.step_index
                if writer is not None and step % settings.log_every_n_steps == 0:
                    for key, value in running.means().items():
                        writer.add_scalar(f"train/{key}", value, step)
                    for name, optimizer in task.optimizers().items():
                        writer.add_scalar(f"train/lr_{name}", optimizer.param_groups[0]["lr"], step)
                    if precision.uses_scaler:
                        writer.add_scalar("train/skipped_steps", optimization.skipped, step)
                if settings.checkpoint_every_n_steps and step % settings.checkpoint_every_n_steps == 0:
                    save("step", epoch, index + 1)
                if settings.max_steps is not None and step >= settings.max_steps:
                    stop = True
                    resume_at = index + 1 if index + 1 < batches_per_epoch else 0
                    break
        elapsed = time.perf_counter() - started
        record = {"epoch": epoch + 1, "step": optimization.step_index, **running.means(),
                  "volumes_per_second": seen * runtime.world_size / elapsed if elapsed > 0 else 0.0}
        # 3. validation, preview, best checkpoint
        last_epoch = stop or settings.fast_dev_run or epoch + 1 == settings.n_epochs
        validated = False
        if last_epoch or (epoch + 1) % settings.val_interval == 0:
            metrics, preview = _validate(task, val_loader, settings, runtime)
            _check_validation(metrics, task.monitor, epoch)
            validated = bool(metrics)
            record.update(metrics)
            if runtime.is_main:
                log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
                if preview is not None:
                    save_png(preview, run_dir / "previews" / f"epoch_{epoch + 1:04d}.png")
                if writer is not None:
                    for key, value in metrics.items():
                        writer.add_scalar(key, value, optimization.step_index)
                    if preview is not None:
                        writer.add_image("val/preview", preview, optimization.step_index, dataformats="HW")
        state.history.append(record)
        if record.get(task.monitor, math.inf) < state.best_metric:
            state.best_metric = record[task.monitor]
            save("best", epoch + 1, 0)
        # a run stopped in mid-epoch resumes there (e.g. with a larger max_steps), not at the next epoch
        save("last", epoch if resume_at else epoch + 1, resume_at, confirmed=validated or last_epoch)
        if last_epoch:
            break
    state.global_step, state.skipped_steps = optimization.step_index, optimization.skipped
    if writer is not None:
        writer.flush()
    return state
