# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""``PNDMScheduler`` under MONAI Generative 0.2.3's path, with its noise schedules.

MONAI core's PNDM spaces timesteps as 0.2.3 does, so only the schedule table (0.2.3's cosine) differs.
"""

from __future__ import annotations

from monai.networks.schedulers import pndm as _core
from monai.networks.schedulers.pndm import PNDMPredictionType

from generative.networks.schedulers.scheduler import Scheduler

__all__ = ["PNDMScheduler", "PNDMPredictionType"]


class PNDMScheduler(_core.PNDMScheduler, Scheduler):
    """MONAI core's pseudo-numerical (PNDM) sampler on 0.2.3's noise schedules.

    Args:
        num_train_timesteps: number of diffusion steps used to train the model.
        schedule: member of ``NoiseSchedules``.
        skip_prk_steps: skip the Runge-Kutta warm-up steps.
        set_alpha_to_one: use 1 as the alpha product before the first step.
        prediction_type: member of ``PNDMPredictionType``.
        steps_offset: added to every inference timestep.
        schedule_args: arguments for the schedule function.
    """
