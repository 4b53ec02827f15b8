"""The training objectives and samplers of ``monai_diffusion.generation.schedulers``: every sampler is fixed by its seed,
each lands on the right distribution where the exact prediction is known (Gaussian data), and a sampler that
does not suit the run's objective is refused."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from monai_diffusion.config import ConfigError, load_config
from monai_diffusion.generation.schedulers import Objective, ReverseProcess, make_scheduler, resolve_sampler
from tests.helpers import CONFIG


def _needs(kind: str) -> None:
    """dpm-solver++ needs diffusers (an optional dependency, in the dev extra)."""
    if kind == "dpm-solver++":
        pytest.importorskip("diffusers")


PAIRS = [("ddpm", "ddim"), ("ddpm", "ddpm"), ("ddpm", "dpm-solver++"), ("rflow", "rflow")]
TINY = ["data.image_size=[8, 8, 8]", "autoencoder.num_channels=[4, 4]", "autoencoder.attention_levels=[false, false]",
        "autoencoder.downsample_factors=[2]", "autoencoder.norm_num_groups=4",
        "autoencoder.training.use_adversarial_loss=false", "diffusion.num_channels=[4]",
        "diffusion.attention_levels=[false]", "diffusion.num_head_channels=[4]", "diffusion.norm_num_groups=4",
        "diffusion.scheduler.num_train_timesteps=20", "diffusion.sampling.num_inference_steps=4",
        "diffusion.training.preview_inference_steps=4"]


def _tiny(objective: str):
    from monai.networks.nets import DiffusionModelUNet

    from generative.networks.nets import AutoencoderKL

    config = load_config(CONFIG, TINY + [f"diffusion.scheduler.type={objective}"])
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(**config.autoencoder.model_kwargs()).eval()
    unet = DiffusionModelUNet(**config.diffusion.unet_kwargs(3, 3)).eval()
    return config, unet, autoencoder


@pytest.mark.parametrize("objective, kind", PAIRS)
def test_every_sampler_is_fixed_by_its_seed(objective, kind):
    _needs(kind)
    from monai_diffusion.generation.sampling import SamplingRequest, generate_volumes

    config, unet, autoencoder = _tiny(objective)

    def sample(seed: int, global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        return generate_volumes(unet, autoencoder, SamplingRequest(config, 1.0, 2, 3, kind, torch.Generator().manual_seed(seed)))

    first = sample(7, 1)
    assert first.shape == (2, 1, 8, 8, 8) and torch.isfinite(first).all()
    torch.testing.assert_close(sample(7, 2), first, rtol=0, atol=0)
    assert not torch.allclose(sample(8, 1), first)


# ----------------------------------------------------------------------------------------------------
# an analytically known case: Gaussian data, where the exact noise / velocity prediction is known
# ----------------------------------------------------------------------------------------------------
MEAN, STD = 0.5, 0.8  # every latent value ~ N(MEAN, STD^2), independently
SIDE = 24  # latents of 1 x 24^3 values: 2 x 13,824 independent samples


class GaussianOracle(nn.Module):
    """The exact prediction E[target | x_t] for data ~ N(MEAN, STD^2) per value (what a perfect UNet learns).

    ddpm: x_t = sqrt(a) x0 + sqrt(1 - a) n, E[n | x_t] = sqrt(1 - a) (x_t - sqrt(a) MEAN) / (a STD^2 + 1 - a).
    rflow: x_t = (1 - s) x0 + s n with s = t / T, E[x0 - n | x_t] = MEAN + ((1 - s) STD^2 - s) (x_t - (1 - s) MEAN)
    / ((1 - s)^2 STD^2 + s^2).
    """

    def __init__(self, objective: Objective) -> None:
        super().__init__()
        self.objective = objective
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the sampler a device
        if objective.type == "ddpm":
            self.alphas_cumprod = objective.scheduler.alphas_cumprod.double()

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, **_) -> torch.Tensor:
        x = x.double()
        shape = (-1,) + (1,) * (x.ndim - 1)
        if self.objective.type == "ddpm":
            a = self.alphas_cumprod[timesteps.long()].view(shape)
            return (torch.sqrt(1 - a) * (x - torch.sqrt(a) * MEAN) / (a * STD**2 + 1 - a)).float()
        s = (timesteps.double() / self.objective.num_train_timesteps).view(shape)
        variance = (1 - s) ** 2 * STD**2 + s**2
        return (MEAN + ((1 - s) * STD**2 - s) * (x - (1 - s) * MEAN) / variance).float()


class Identity(nn.Module):
    """An 'autoencoder' whose latents are the volumes."""

    def latent_shape(self, spatial):
        return (1, *spatial)

    def decode(self, z, tile_size=None, tile_overlap=None):
        return z


@pytest.mark.parametrize("objective, kind, steps", [("ddpm", "ddpm", 1000), ("ddpm", "ddim", 200),
                                                    ("ddpm", "dpm-solver++", 50), ("ddpm", "dpm-solver++", 100),
                                                    ("rflow", "rflow", 100), ("rflow", "rflow", 200)])
def test_sampler_lands_on_the_gaussian(objective, kind, steps):
    """Mean and standard deviation of the samples within 5 standard errors of the data's (the sample size
    gives them; the solver's own error must fit inside)."""
    _needs(kind)
    from monai_diffusion.generation.sampling import SamplingRequest, generate_volumes

    config = load_config(CONFIG, [f"data.image_size=[{SIDE}, {SIDE}, {SIDE}]", f"diffusion.scheduler.type={objective}"])
    oracle = GaussianOracle(Objective(config.diffusion.scheduler))
    samples = generate_volumes(oracle, Identity(), SamplingRequest(config, 1.0, 2, steps, kind, torch.Generator().manual_seed(0)))
    n = samples.numel()
    mean_error, std_error = 5 * STD / math.sqrt(n), 5 * STD / math.sqrt(2 * n)
    assert abs(float(samples.mean()) - MEAN) < mean_error, float(samples.mean())
    assert abs(float(samples.std()) - STD) < std_error, float(samples.std())


def test_a_wrong_oracle_misses_the_gaussian():
    """The check above can fail: velocity predictions fed to a noise sampler land far away."""
    from monai_diffusion.generation.sampling import SamplingRequest, generate_volumes

    config = load_config(CONFIG, [f"data.image_size=[{SIDE}, {SIDE}, {SIDE}]"])
    rflow = load_config(CONFIG, ["diffusion.scheduler.type=rflow"])
    oracle = GaussianOracle(Objective(rflow.diffusion.scheduler))
    samples = generate_volumes(oracle, Identity(), SamplingRequest(config, 1.0, 2, 20, "ddim", torch.Generator().manual_seed(0)))
    assert abs(float(samples.std()) - STD) > 0.1 or abs(float(samples.mean()) - MEAN) > 0.1


# ----------------------------------------------------------------------------------------------------
# the objectives
# ----------------------------------------------------------------------------------------------------
def test_rflow_objective_predicts_the_velocity_at_shifted_logit_normal_times():
    config = load_config(CONFIG, ["diffusion.scheduler.type=rflow",
                                  "diffusion.scheduler.timestep_transform=true"]).diffusion.scheduler
    objective = Objective(config)
    x0, noise = torch.randn(4, 2, 8, 8, 8), torch.randn(4, 2, 8, 8, 8)
    torch.testing.assert_close(objective.target(x0, noise), x0 - noise)
    t = torch.tensor([0.0, 250.0, 500.0, 1000.0])
    s = (t / 1000).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(objective.add_noise(x0, noise, t), (1 - s) * x0 + s * noise)
    many = torch.empty(4000, 1, 8, 8, 8)
    small = objective.sample_timesteps(many, torch.Generator().manual_seed(0))
    assert small.dtype == torch.float32 and 0 <= float(small.min()) and float(small.max()) <= 1000
    torch.testing.assert_close(objective.sample_timesteps(many, torch.Generator().manual_seed(0)), small)
    # 8^3 latents are smaller than the neutral 32^3: times shift towards less noise; 64^3 towards more
    large = objective.sample_timesteps(torch.empty(4000, 1, 64, 64, 64), torch.Generator().manual_seed(0))
    neutral = Objective(load_config(CONFIG, ["diffusion.scheduler.type=rflow",
                                             "diffusion.scheduler.timestep_transform=false"]).diffusion.scheduler)
    middle = neutral.sample_timesteps(many, torch.Generator().manual_seed(0))
    assert float(small.mean()) < float(middle.mean()) < float(large.mean())
    assert abs(float(middle.mean()) - 500) < 25  # logit-normal(0, 1) is symmetric about the middle


def test_ddpm_objective_is_the_noise_prediction_of_before():
    config = load_config(CONFIG, []).diffusion.scheduler
    objective = Objective(config)
    x0, noise = torch.randn(3, 2, 4, 4, 4), torch.randn(3, 2, 4, 4, 4)
    t = objective.sample_timesteps(x0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(t, torch.randint(0, 1000, (3,), generator=torch.Generator().manual_seed(1)))
    expected = make_scheduler(config).add_noise(original_samples=x0, noise=noise, timesteps=t)
    torch.testing.assert_close(objective.add_noise(x0, noise, t), expected)
    assert objective.target(x0, noise) is noise


def test_rflow_sampler_ends_at_time_zero():
    config = load_config(CONFIG, ["diffusion.scheduler.type=rflow"]).diffusion.scheduler
    process = ReverseProcess(config, "rflow", 5, (3, 8, 8, 8))
    assert len(process.timesteps) == 5 and process.timesteps[0] == pytest.approx(1000, abs=1)
    assert all(a > b for a, b in zip(process.timesteps, process.timesteps[1:]))
    latents = torch.zeros(1, 3, 8, 8, 8)
    for index in range(5):  # a constant velocity of 1 moves the latents by the whole time span, 1
        latents = process.step(torch.ones_like(latents), index, latents)
    torch.testing.assert_close(latents, torch.ones_like(latents), atol=5e-3, rtol=0)


@pytest.mark.parametrize("objective, kind, steps, message", [
    ("ddpm", "rflow", 10, r"--scheduler rflow: the run .* diffusion\.scheduler\.type = ddpm .*use ddim or ddpm or "
                          r"dpm-solver\+\+"),
    ("rflow", "ddim", 10, r"--scheduler ddim: .*type = rflow \(velocity prediction\).*use rflow"),
    ("rflow", "dpm-solver++", 10, r"--scheduler dpm-solver\+\+: .*type = rflow"),
    ("rflow", "rflow", 0, r"--steps 0: expected an integer >= 1"),
    ("ddpm", "dpm-solver++", 1001, r"--steps 1001 .*exceeds the num_train_timesteps = 1000"),
    ("rflow", "rflow", 1001, r"--steps 1001 .*exceeds the num_train_timesteps = 1000"),
])
def test_a_sampler_against_the_wrong_objective_or_steps_is_refused(objective, kind, steps, message):
    config = load_config(CONFIG, [f"diffusion.scheduler.type={objective}"]).diffusion.scheduler
    with pytest.raises(ConfigError, match=message):
        resolve_sampler(config, kind, steps)


def test_auto_picks_the_sampler_that_suits_the_objective():
    ddpm = load_config(CONFIG, []).diffusion.scheduler
    rflow = load_config(CONFIG, ["diffusion.scheduler.type=rflow"]).diffusion.scheduler
    assert resolve_sampler(ddpm, "auto", None) == ("ddim", 50)
    assert resolve_sampler(ddpm, "ddpm", None) == ("ddpm", 1000)
    assert resolve_sampler(rflow, "auto", 7) == ("rflow", 7)


def test_config_refuses_a_sampling_scheduler_that_does_not_suit_the_objective():
    with pytest.raises(ConfigError, match=r"diffusion\.sampling\.scheduler: ddim cannot sample a model trained with "
                                          r"diffusion\.scheduler\.type = rflow"):
        load_config(CONFIG, ["diffusion.scheduler.type=rflow", "diffusion.sampling.scheduler=ddim"], "diffusion")


@pytest.mark.parametrize("objective, kind", PAIRS)
def test_every_sampler_runs_with_the_model_on_another_device(objective, kind):
    """The ``meta`` device stands in for a GPU: the schedulers' tables and times stay on the CPU, the latents
    on the model's device, and nothing mixes them."""
    _needs(kind)
    from monai_diffusion.generation.sampling import SamplingRequest, generate_volumes

    config, unet, autoencoder = _tiny(objective)
    volumes = generate_volumes(unet.to("meta"), autoencoder.to("meta"), SamplingRequest(config, 1.0, 2, 3, kind,
                               torch.Generator().manual_seed(0)))
    assert volumes.device.type == "meta" and volumes.shape == (2, 1, 8, 8, 8)
