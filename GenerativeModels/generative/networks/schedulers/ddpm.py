# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""``DDPMScheduler`` with MONAI Generative 0.2.3's timestep spacing and noise schedules."""

from __future__ import annotations

import torch
from monai.networks.schedulers import ddpm as _core
from monai.networks.schedulers.ddpm import DDPMPredictionType, DDPMVarianceType

from generative.networks.schedulers.scheduler import Scheduler, leading_timesteps

__all__ = ["DDPMScheduler", "DDPMPredictionType", "DDPMVarianceType"]


class DDPMScheduler(_core.DDPMScheduler, Scheduler):
    """MONAI core's DDPM sampler with 0.2.3's numbers.

    ``set_timesteps(n)`` spaces the steps as 0.2.3 does (``T // n`` apart, ending at 0: 10 of 1000 steps
    are ``[900, 800, ..., 0]``), and ``schedule="cosine"`` is 0.2.3's cosine (see ``scheduler.py``).
    Everything else (``step``, ``add_noise``, variance types, prediction types) is MONAI core's.

    Args:
        num_train_timesteps: number of diffusion steps used to train the model.
        schedule: member of ``NoiseSchedules``.
        variance_type: member of ``DDPMVarianceType``.
        clip_sample: clip the predicted sample to [-1, 1].
        prediction_type: member of ``DDPMPredictionType``.
        schedule_args: arguments for the schedule function.
    """

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Use ``num_inference_steps`` steps, spaced as in 0.2.3.

        Raises:
            ValueError: if ``num_inference_steps`` is not in 1..``num_train_timesteps``.
        """
        self.timesteps = leading_timesteps(self, num_inference_steps, device)
