# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""``DDIMScheduler`` with MONAI Generative 0.2.3's timestep spacing, schedules and reversed step."""

from __future__ import annotations

import torch
from monai.networks.schedulers import ddim as _core
from monai.networks.schedulers.ddim import DDIMPredictionType

from generative.networks.schedulers.scheduler import Scheduler, leading_timesteps

__all__ = ["DDIMScheduler", "DDIMPredictionType"]


class DDIMScheduler(_core.DDIMScheduler, Scheduler):
    """MONAI core's DDIM sampler with 0.2.3's numbers.

    * ``set_timesteps(n)``: ``T // n`` apart, ending at ``steps_offset`` (0.2.3's spacing).
    * ``reversed_step`` past the last training step uses ``first_alpha_cumprod`` (0 with
      ``set_alpha_to_one``, else the last alpha), as 0.2.3 does; MONAI 1.6 indexes past the table.
    * ``schedule="cosine"`` is 0.2.3's cosine.

    Args:
        num_train_timesteps: number of diffusion steps used to train the model.
        schedule: member of ``NoiseSchedules``.
        clip_sample: clip the predicted sample to [-1, 1].
        set_alpha_to_one: use 1 as the alpha product before the first step (and 0 after the last).
        steps_offset: added to every inference timestep.
        prediction_type: member of ``DDIMPredictionType``.
        schedule_args: arguments for the schedule function.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = DDIMPredictionType.EPSILON,
        **schedule_args,
    ) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, schedule=schedule, clip_sample=clip_sample,
                         set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset,
                         prediction_type=prediction_type, **schedule_args)
        self.first_alpha_cumprod = torch.tensor(0.0) if set_alpha_to_one else self.alphas_cumprod[-1]

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Use ``num_inference_steps`` steps, spaced as in 0.2.3.

        Raises:
            ValueError: if ``num_inference_steps`` is not in 1..``num_train_timesteps``.
        """
        self.timesteps = leading_timesteps(self, num_inference_steps, device, self.steps_offset)

    def reversed_step(
        self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One deterministic DDIM step towards noise (x_t -> x_{t+T/n}), e.g. to encode an image.

        Args:
            model_output: the model's prediction at ``timestep``, BxCx[SPATIAL DIMS].
            timestep: current timestep t.
            sample: x_t, BxCx[SPATIAL DIMS].

        Returns:
            ``(x_next, predicted x_0)``, both BxCx[SPATIAL DIMS].
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before reversed_step")
        next_timestep = timestep + self.num_train_timesteps // self.num_inference_steps
        alpha_t = self.alphas_cumprod[timestep]
        last = next_timestep >= len(self.alphas_cumprod)
        alpha_next = self.first_alpha_cumprod if last else self.alphas_cumprod[next_timestep]
        beta_t = 1 - alpha_t
        if self.prediction_type == DDIMPredictionType.EPSILON:
            x0, eps = (sample - beta_t**0.5 * model_output) / alpha_t**0.5, model_output
        elif self.prediction_type == DDIMPredictionType.SAMPLE:
            x0, eps = model_output, (sample - alpha_t**0.5 * model_output) / beta_t**0.5
        else:  # v-prediction
            x0 = alpha_t**0.5 * sample - beta_t**0.5 * model_output
            eps = alpha_t**0.5 * model_output + beta_t**0.5 * sample
        if self.clip_sample:
            x0 = torch.clamp(x0, -1, 1)
        return alpha_next**0.5 * x0 + (1 - alpha_next) ** 0.5 * eps, x0
