"""One optimiser step per window of micro-batches: loss scaling, accumulation, clipping, and the checks that
stop training on non-finite values, read from the device in one host sync per step (:func:`to_host`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from monai_diffusion.errors import TrainingError
from monai_diffusion.runtime import Precision

__all__ = ["Optimization", "to_host", "non_finite_flag", "all_finite", "meeting_device"]


def to_host(tensor: torch.Tensor) -> list[float]:
    """``tensor``'s values on the host: the one place where the training loop waits for the device.

    The loop calls it once per optimiser step (one vector of flags) and once per logging interval (the
    running means); tests with fake CUDA tensors, which have no values, replace it to run everything else.
    """
    return tensor.detach().double().flatten().tolist()


class Optimization:
    """Backward passes with loss scaling and accumulation, and one optimiser step per window.

    The checks for non-finite losses, gradients and weights stay on the device until the optimiser step,
    where one host synchronisation (:func:`to_host`) reads them all (a GPU is never waited for per loss).

    Args:
        optimizers: the task's optimisers by name.
        precision: autocast / GradScaler settings.
        accumulation_steps: micro-batches per optimiser step (losses are divided by it).
        grad_clip_norm: clip each optimiser's gradients to this total norm (None: no clipping).
    """

    def __init__(
        self, optimizers: dict[str, torch.optim.Optimizer], precision: Precision, accumulation_steps: int,
        grad_clip_norm: float | None = None,
    ) -> None:
        self.optimizers = optimizers
        self.precision = precision
        self.accumulation_steps = accumulation_steps
        self.grad_clip_norm = grad_clip_norm
        self._factor: Callable[[int], float] | None = None  # the learning-rate schedule (see schedule())
        self._base_lr: list[tuple[dict[str, Any], float]] = []
        self.step_index = 0
        self.window = accumulation_steps  # micro-batches in the current window (fewer in an epoch's last one)
        self._pending: set[str] = set()
        self._losses: list[tuple[str, torch.Tensor, dict[str, Any]]] = []  # this window's, checked at the step
        self._skipped_before = 0  # skipped steps counted on the host
        self._skipped_device: torch.Tensor | None = None  # fp16 steps skipped since, counted on the device

    @property
    def skipped(self) -> int:
        """Optimiser steps the fp16 loss scaler skipped (an overflow), in all (reading it syncs the device)."""
        if self._skipped_device is not None:
            self._skipped_before += int(to_host(self._skipped_device)[0])
            self._skipped_device = None
        return self._skipped_before

    @skipped.setter
    def skipped(self, value: int) -> None:
        self._skipped_before, self._skipped_device = int(value), None

    def backward(self, loss: torch.Tensor, optimizer: str, terms: dict[str, Any]) -> None:
        """Accumulate gradients of ``loss / window`` for ``optimizer`` (the window's mean loss).

        A non-finite loss (unless fp16 scaling skips the step) stops training at this window's :meth:`step`,
        with ``terms`` (the loss's named parts, floats or tensors) in the message.
        """
        if not self.precision.uses_scaler:
            self._losses.append((optimizer, loss.detach(), terms))
        self.precision.scaler.scale(loss / self.window).backward()
        self._pending.add(optimizer)

    def schedule(self, factor: Callable[[int], float]) -> None:
        """Scale every learning rate by ``factor(step)``, from the current step on (what torch's ``LambdaLR``
        computes, set directly: an optimiser that does not step in a window, such as the discriminator's in its
        warm-up epochs, still follows the schedule, without ``LambdaLR``'s "step() before optimizer.step()").

        The factor depends on the step alone, so a resumed run continues the schedule where it stopped; the
        configured learning rate (already in the optimisers) is the base, also when it changed on resume.
        """
        self._factor = factor
        self._base_lr = [(group, group["lr"]) for optimizer in self.optimizers.values()
                         for group in optimizer.param_groups]
        self._apply_schedule()

    def _apply_schedule(self) -> None:
        if self._factor is not None:
            scale = self._factor(self.step_index)
            for group, base in self._base_lr:
                group["lr"] = base * scale

    def step(self) -> None:
        """Step every optimiser that received gradients in this window, then clear them.

        Raises:
            TrainingError: a non-finite loss, gradient, weight or optimiser state (one host sync reads them).
        """
        scaler = self.precision.scaler
        scale_before = _scale_of(scaler)
        checks: list[tuple[torch.Tensor, Callable[[], TrainingError]]] = [
            (~torch.isfinite(loss).all(), self._loss_error(name, loss, terms)) for name, loss, terms in self._losses
        ]
        for name in sorted(self._pending):
            optimizer = self.optimizers[name]
            with_grads = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if not self.precision.uses_scaler:
                checks.append((non_finite_flag([p.grad for p in with_grads]), self._grads_error(name)))
            if self.grad_clip_norm is not None:
                scaler.unscale_(optimizer)  # clip the true gradients (a no-op without fp16 scaling)
                torch.nn.utils.clip_grad_norm_(with_grads, self.grad_clip_norm)
            scaler.step(optimizer)
            weights = [p for group in optimizer.param_groups for p in group["params"]]
            moments = [v for p in weights for v in optimizer.state.get(p, {}).values()
                       if isinstance(v, torch.Tensor) and v.is_floating_point()]
            # e.g. a learning rate so large that Adam overflows: never save this
            checks.append((non_finite_flag(weights + moments), self._weights_error(name)))
        if self.precision.uses_scaler:
            scaler.update()
            skipped = (_scale_of(scaler) < scale_before).to(torch.int64)  # fp16 overflow: skipped, as designed
            self._skipped_device = skipped if self._skipped_device is None else self._skipped_device + skipped
        self._raise_first([error for flag, error in zip(self._flags(checks), checks) if flag])
        for name in self._pending:
            self.optimizers[name].zero_grad(set_to_none=True)
        self._pending.clear()
        self._losses.clear()
        self.step_index += 1
        self._apply_schedule()

    @staticmethod
    def _flags(checks: list[tuple[torch.Tensor, Any]]) -> list[bool]:
        """The checks' flags on the host, read in one synchronisation."""
        if not checks:
            return []
        device = meeting_device([flag.device for flag, _ in checks])
        return [bool(v) for v in to_host(torch.stack([flag.reshape(()).to(device) for flag, _ in checks]))]

    @staticmethod
    def _raise_first(failed: list[tuple[torch.Tensor, Callable[[], TrainingError]]]) -> None:
        if failed:
            raise failed[0][1]()  # the earliest cause: a loss before its gradients before the weights

    def _loss_error(self, optimizer: str, loss: torch.Tensor, terms: dict[str, Any]) -> Callable[[], TrainingError]:
        def error() -> TrainingError:
            shown = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
            err = TrainingError(
                f"non-finite {optimizer} loss at optimiser step {self.step_index + 1} (loss={float(loss):.4g}; "
                f"{shown}); stopped, the last good checkpoint is kept; check the loss weights and the learning rate"
            )
            err.rank_local = True  # this process's own batch (gradients, weights, validation are shared)
            return err

        return error

    def _grads_error(self, name: str) -> Callable[[], TrainingError]:
        return lambda: TrainingError(f"non-finite gradients for {name} at optimiser step {self.step_index + 1}; "
                                     f"stopped, the last good checkpoint is kept")

    def _weights_error(self, name: str) -> Callable[[], TrainingError]:
        return lambda: TrainingError(
            f"non-finite {name} weights or optimiser state after optimiser step {self.step_index + 1} (finite loss "
            f"and gradients); stopped, the last good checkpoint is kept; lower the learning rate"
        )


def _scale_of(scaler: torch.amp.GradScaler) -> torch.Tensor | None:
    """The fp16 loss scale as a device tensor (no host sync; ``get_scale()`` would wait for the GPU)."""
    if not scaler.is_enabled():
        return None
    scale = getattr(scaler, "_scale", None)  # created by the first scale(); a float before it
    return scale.detach().clone() if isinstance(scale, torch.Tensor) else torch.tensor(scaler.get_scale())


def non_finite_flag(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A one-element tensor, non-zero when a value of ``tensors`` is not finite; no host sync.

    One fused check per device and dtype (the loss scaler's own kernel; multiplying by the scale 1 leaves
    the tensors as they are). The flags of several devices are summed on the accelerator, if any:
    optimiser state mixes devices (Adam keeps ``state["step"]`` on the CPU for CUDA parameters).
    """
    if not tensors:
        return torch.zeros(1)
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor.detach())
    home = meeting_device([device for device, _ in groups])
    total = torch.zeros(1, device=home)
    for (device, _), group in groups.items():
        flag = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, flag, torch.ones(1, device=device))
        total = total + flag.to(home)  # host to device only (see meeting_device), which does not wait
    return total


def meeting_device(devices: list[torch.device]) -> torch.device:
    """Where flags of several devices meet: an accelerator if there is one (a copy from the host to it is
    queued without waiting; the other way round would wait), else the CPU."""
    return next((d for d in devices if d.type != "cpu"), devices[0])


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of ``tensors`` is finite (one host sync; see :func:`non_finite_flag`)."""
    return not to_host(non_finite_flag(tensors))[0]
