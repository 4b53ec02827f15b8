# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""``Scheduler`` and ``NoiseSchedules`` with MONAI Generative 0.2.3's noise schedules.

The linear, scaled-linear and sigmoid beta schedules are MONAI core's functions. The cosine schedule is
0.2.3's: alphas (not betas) clipped to [1e-4, 0.9999] and the cumulative product taken from the cosine
curve itself; MONAI 1.6 clips betas to [0, 0.999] and recomputes the cumulative product, which gives
different numbers near both ends of the schedule.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from monai.networks.schedulers import scheduler as _core
from monai.utils import ComponentStore

__all__ = ["NoiseSchedules", "Scheduler"]

NoiseSchedules = ComponentStore("NoiseSchedules", "Functions to generate noise schedules (MONAI Generative 0.2.3)")
for _name in ("linear_beta", "scaled_linear_beta", "sigmoid_beta"):
    NoiseSchedules.add(_name, _core.NoiseSchedules[_name].__doc__ or _name, _core.NoiseSchedules[_name])


@NoiseSchedules.add_def("cosine", "Cosine schedule (Nichol & Dhariwal 2021), as MONAI Generative 0.2.3 computes it")
def _cosine_beta(num_train_timesteps: int, s: float = 8e-3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosine noise schedule, https://arxiv.org/abs/2102.09672, with 0.2.3's clipping.

    Args:
        num_train_timesteps: number of timesteps T.
        s: offset that keeps the first betas from being too small.

    Returns:
        ``(betas, alphas, alphas_cumprod)``, each of length T; alphas are clipped to [1e-4, 0.9999] and
        ``alphas_cumprod`` is the cosine curve at t = 0 .. T-1 (normalised to 1 at t = 0).
    """
    t = torch.linspace(0, num_train_timesteps, num_train_timesteps + 1)
    curve = torch.cos((t / num_train_timesteps + s) / (1 + s) * math.pi / 2) ** 2
    curve = curve / curve[0].item()
    alphas = torch.clip(curve[1:] / curve[:-1], 0.0001, 0.9999)
    return 1.0 - alphas, alphas, curve[:-1]


class Scheduler(_core.Scheduler):
    """Base scheduler: beta/alpha tables from a schedule of ``generative.networks.schedulers.NoiseSchedules``.

    Same API as MONAI core's ``Scheduler`` (``add_noise``, ``get_velocity``); register new schedules
    with ``NoiseSchedules.add_def(name, description)``.

    Args:
        num_train_timesteps: number of diffusion steps used to train the model.
        schedule: name of a function in ``NoiseSchedules`` returning betas or (betas, alphas, alphas_cumprod).
        schedule_args: keyword arguments for that function (e.g. ``beta_start``, ``beta_end``).

    Raises:
        ValueError: for an unknown schedule name.
    """

    def __init__(self, num_train_timesteps: int = 1000, schedule: str = "linear_beta", **schedule_args) -> None:
        if schedule not in NoiseSchedules.names:
            raise ValueError(f"schedule = {schedule!r}: expected one of {sorted(NoiseSchedules.names)}")
        nn.Module.__init__(self)
        tables = NoiseSchedules[schedule](num_train_timesteps=num_train_timesteps, **schedule_args)
        if isinstance(tables, tuple):
            self.betas, self.alphas, self.alphas_cumprod = tables
        else:
            self.betas = tables
            self.alphas = 1.0 - self.betas
            self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.num_train_timesteps = num_train_timesteps
        self.one = torch.tensor(1.0)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)


def leading_timesteps(scheduler: Scheduler, num_inference_steps: int, device: str | torch.device | None,
                      offset: int = 0) -> torch.Tensor:
    """0.2.3's ("leading") spacing: ``[0, r, 2r, ...]`` reversed, with ``r = T // num_inference_steps``, plus offset.

    For T = 1000 and 10 steps: ``[900, 800, ..., 0]`` (MONAI 1.6: ``[999, 888, ..., 0]``).

    Raises:
        ValueError: if ``num_inference_steps`` is not in 1..T.
    """
    if not 1 <= num_inference_steps <= scheduler.num_train_timesteps:
        raise ValueError(
            f"num_inference_steps = {num_inference_steps}: expected 1 to num_train_timesteps = "
            f"{scheduler.num_train_timesteps}"
        )
    scheduler.num_inference_steps = num_inference_steps
    ratio = scheduler.num_train_timesteps // num_inference_steps
    return (torch.arange(num_inference_steps - 1, -1, -1, dtype=torch.int64) * ratio + offset).to(device)
