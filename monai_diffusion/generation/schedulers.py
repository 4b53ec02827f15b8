"""Training objectives and samplers of the latent diffusion model.

Two objectives (``diffusion.scheduler.type``):

* ``ddpm``: MONAI core's ``DDPMScheduler``; the UNet predicts the noise of ``sqrt(a_t) x0 + sqrt(1 - a_t) n``
  at integer times drawn uniformly.
* ``rflow``: rectified flow with MONAI core's ``RFlowScheduler`` (as MAISI v2): the UNet predicts the velocity
  ``x0 - n`` of the straight path ``(1 - t/T) x0 + (t/T) n``; continuous times drawn logit-normal (or uniform),
  shifted with the latent size.

Samplers (``sample.py --scheduler``), each for one objective:

* ``ddpm`` (ancestral), ``ddim`` (MONAI core) and ``dpm-solver++`` (multistep DPM-Solver++ 2M, diffusers'
  ``DPMSolverMultistepScheduler``, an optional dependency) for ``ddpm`` runs;
* ``rflow`` (MONAI core's Euler steps along the predicted velocity) for ``rflow`` runs.

Every scheduler keeps its tables and times on the CPU; only the latents live on the model's device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

from monai_diffusion.config.schema import SAMPLERS, SchedulerConfig
from monai_diffusion.errors import ConfigError

__all__ = ["SAMPLERS", "DEFAULT_SAMPLER", "Objective", "ReverseProcess", "make_scheduler", "resolve_sampler"]

# the samplers that suit each training objective, the first one being the default
DEFAULT_SAMPLER = {objective: samplers[0] for objective, samplers in SAMPLERS.items()}
_PREDICTS = {"ddpm": "noise prediction", "rflow": "velocity prediction"}


def make_scheduler(config: SchedulerConfig, kind: str = "ddpm") -> DDPMScheduler | DDIMScheduler:
    """MONAI core's DDPM (training, ancestral sampling) or DDIM (few-step sampling) scheduler of a ``ddpm`` run."""
    cls = DDPMScheduler if kind == "ddpm" else DDIMScheduler
    return cls(
        num_train_timesteps=config.num_train_timesteps,
        schedule=config.schedule,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        clip_sample=config.clip_sample,
    )


def _rflow_scheduler(config: SchedulerConfig, spatial_dims: int) -> RFlowScheduler:
    return RFlowScheduler(
        num_train_timesteps=config.num_train_timesteps,
        use_discrete_timesteps=False,
        sample_method=config.sample_method,
        use_timestep_transform=config.timestep_transform,
        base_img_size_numel=config.transform_base_numel,
        spatial_dim=spatial_dims,
    )


def resolve_sampler(config: SchedulerConfig, sampler: str, steps: int | None, run: Any = "the run") -> tuple[str, int]:
    """The sampler and step count to use with a run trained with ``config``, checked.

    Args:
        config: the run's ``diffusion.scheduler``.
        sampler: ``auto`` (the objective's default) or a sampler's name.
        steps: network evaluations (None: all training steps for ``ddpm``, else 50).
        run: names the run in messages.

    Raises:
        ConfigError: a sampler that does not suit the objective, fewer than 1 or more steps than the training
            timesteps, or ``dpm-solver++`` without diffusers.
    """
    suits = SAMPLERS[config.type]
    sampler = DEFAULT_SAMPLER[config.type] if sampler == "auto" else sampler
    if sampler not in suits:
        raise ConfigError(f"--scheduler {sampler}: the run {run} was trained with diffusion.scheduler.type = "
                          f"{config.type} ({_PREDICTS[config.type]}), which {sampler} cannot sample; use "
                          f"{' or '.join(suits)}")
    trained = config.num_train_timesteps
    steps = (trained if sampler == "ddpm" else 50) if steps is None else steps
    if steps < 1:
        raise ConfigError(f"--steps {steps}: expected an integer >= 1 (network evaluations per sample)")
    if steps > trained:
        raise ConfigError(f"--steps {steps} (or diffusion.sampling.num_inference_steps): exceeds the "
                          f"num_train_timesteps = {trained} the run {run} was trained with; use at most "
                          f"{trained} steps")
    if sampler == "dpm-solver++":
        _diffusers_solver()
    return sampler, steps


def _diffusers_solver() -> type:
    try:  # imported here: diffusers is optional, and its import takes seconds
        from diffusers import DPMSolverMultistepScheduler
    except ImportError:
        raise ConfigError("--scheduler dpm-solver++: needs the diffusers package; pip install "
                          "'monai-diffusion[solvers]' (or pip install diffusers), or use --scheduler ddim") from None
    return DPMSolverMultistepScheduler


class Objective:
    """What the UNet learns: noisy inputs, times and targets of a training step.

    Args:
        config: ``diffusion.scheduler``.
    """

    def __init__(self, config: SchedulerConfig) -> None:
        self.type = config.type
        self.num_train_timesteps = config.num_train_timesteps
        self.scheduler = make_scheduler(config) if config.type == "ddpm" else _rflow_scheduler(config, 3)

    def sample_timesteps(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training times for a batch, on ``latents``' device (long for ddpm, float for rflow).

        Args:
            latents: BxCx[SPATIAL DIMS] clean latents (their shape sets rflow's time shift).
            generator: a CPU generator (validation: the same times every time); None: the global random streams
                (training; they are saved in checkpoints, so a resumed run draws the same times).
        """
        n = len(latents)
        if self.type == "ddpm":
            if generator is not None:
                return torch.randint(0, self.num_train_timesteps, (n,), generator=generator).to(latents.device)
            return torch.randint(0, self.num_train_timesteps, (n,), device=latents.device)
        # RFlowScheduler reads only the shape and device: a CPU stand-in without memory, so the times come from the
        # CPU streams (the same on every device)
        shape = torch.empty((1,) * latents.ndim).expand(latents.shape)
        if generator is None:
            return self.scheduler.sample_timesteps(shape).float().to(latents.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            return self.scheduler.sample_timesteps(shape).float().to(latents.device)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The UNet's input at ``timesteps``."""
        return self.scheduler.add_noise(original_samples=latents, noise=noise, timesteps=timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the UNet should predict: the noise (ddpm) or the velocity ``x0 - noise`` (rflow)."""
        return noise if self.type == "ddpm" else latents - noise


class ReverseProcess:
    """One sampler's way from noise to latents: the times at which the UNet is called, and the update.

    Args:
        config: the run's ``diffusion.scheduler``.
        sampler: a sampler that suits it (see :func:`resolve_sampler`).
        steps: network evaluations.
        latent_shape: CxHxW[xD] shape of one latent (rflow's time shift depends on its size).
        generator: generator of the ancestral sampler's per-step noise (on the model's device).
    """

    def __init__(self, config: SchedulerConfig, sampler: str, steps: int, latent_shape: Sequence[int],
                 generator: torch.Generator | None = None) -> None:
        self.sampler, self.generator = sampler, generator
        spatial = tuple(latent_shape[1:])
        if sampler == "rflow":
            self.scheduler: Any = _rflow_scheduler(config, len(spatial))
            self.scheduler.set_timesteps(num_inference_steps=steps, input_img_size_numel=math.prod(spatial))
        elif sampler == "dpm-solver++":
            self.scheduler = _dpm_solver(config)
            self.scheduler.set_timesteps(steps)
        else:
            self.scheduler = make_scheduler(config, sampler)
            self.scheduler.set_timesteps(num_inference_steps=steps)
        self.timesteps = [float(t) if sampler == "rflow" else int(t) for t in self.scheduler.timesteps]

    def model_timesteps(self, index: int, count: int, device: torch.device) -> torch.Tensor:
        """The UNet's ``timesteps`` argument at step ``index`` for ``count`` latents."""
        dtype = torch.float32 if self.sampler == "rflow" else torch.long
        return torch.full((count,), self.timesteps[index], device=device, dtype=dtype)

    def step(self, prediction: torch.Tensor, index: int, latents: torch.Tensor) -> torch.Tensor:
        """The latents after step ``index``, given the UNet's (guided) prediction at it."""
        t = self.timesteps[index]
        if self.sampler == "rflow":  # Euler along the velocity, from t to the next time (0 after the last)
            # written out: RFlowScheduler.step truncates the next time to an integer, so with the continuous
            # (shifted) times every step overshoots by up to 1/T, an error that grows with the number of steps
            # (with the Gaussian oracle of tests/monai_diffusion/test_samplers.py, 200 steps missed the data's mean)
            following = self.timesteps[index + 1] if index + 1 < len(self.timesteps) else 0.0
            return latents + prediction * ((t - following) / self.scheduler.num_train_timesteps)
        if self.sampler == "dpm-solver++":
            return self.scheduler.step(prediction, t, latents, return_dict=False)[0]
        return self.scheduler.step(prediction, t, latents, generator=self.generator)[0]


def _dpm_solver(config: SchedulerConfig) -> Any:
    """diffusers' multistep DPM-Solver++ (2M) on exactly the betas MONAI's DDPM trained with."""
    ddpm = make_scheduler(config)
    return _diffusers_solver()(
        num_train_timesteps=config.num_train_timesteps,
        trained_betas=ddpm.betas.numpy(),
        prediction_type=ddpm.prediction_type,
        algorithm_type="dpmsolver++",
        solver_order=2,
        lower_order_final=True,  # first-order last steps: stable with 10 or fewer steps
        use_karras_sigmas=True,  # denser steps at low noise: "DPM++ 2M Karras" (see docs/sampling.md)
    )
