"""Schedulers, inferers, metrics and losses under ``generative.*`` give MONAI Generative 0.2.3's numbers."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.dropin import build, generator, load

SCHEDULERS = load("schedulers")
INFERERS = load("inferers")
METRICS = load("metrics_losses")


def _scheduler(kind: str, **kwargs):
    from generative.networks.schedulers import DDIMScheduler, DDPMScheduler, PNDMScheduler

    return {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "pndm": PNDMScheduler}[kind](1000, **kwargs)


@pytest.mark.parametrize("schedule", ["linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"])
def test_noise_schedules(schedule: str) -> None:
    s = _scheduler("ddpm", schedule=schedule)
    assert torch.allclose(s.betas, SCHEDULERS[f"betas/{schedule}"], atol=1e-7)
    assert torch.allclose(s.alphas_cumprod, SCHEDULERS[f"alphas_cumprod/{schedule}"], atol=1e-7)


@pytest.mark.parametrize("key", sorted(k for k in SCHEDULERS if k.split("/")[0] in
                                       ("ddpm", "ddim", "ddim_offset1", "pndm_skip0", "pndm_skip1")))
def test_set_timesteps_spacing(key: str) -> None:
    kind, steps = key.split("/")
    kwargs = {"ddim_offset1": dict(steps_offset=1), "pndm_skip1": dict(skip_prk_steps=True)}.get(kind, {})
    s = _scheduler(kind.split("_")[0], **kwargs)
    s.set_timesteps(int(steps))
    assert s.timesteps.tolist() == SCHEDULERS[key].tolist()


def test_ten_steps_are_023s_not_monai_16s() -> None:
    s = _scheduler("ddpm")
    s.set_timesteps(10)
    assert s.timesteps.tolist()[:2] == [900, 800]


@pytest.mark.parametrize("key", ["ddpm_cosine", "ddpm_v", "ddim", "ddim_noalpha1", "pndm", "pndm_skip"])
def test_step_trajectories(key: str) -> None:
    kwargs = {"ddpm_cosine": dict(schedule="cosine"), "ddpm_v": dict(prediction_type="v_prediction", clip_sample=False),
              "ddim_noalpha1": dict(set_alpha_to_one=False, clip_sample=False), "pndm_skip": dict(skip_prk_steps=True)}
    s = _scheduler(key.split("_")[0], **kwargs.get(key, {}))
    s.set_timesteps(10)
    x, outputs = SCHEDULERS["steps/sample"].clone(), SCHEDULERS["steps/model_outputs"]
    trajectory = []
    for i, t in enumerate(s.timesteps[: len(outputs)]):
        g = torch.Generator().manual_seed(100 + i)
        if key.startswith("ddpm"):
            x, _ = s.step(outputs[i], t, x, generator=g)
        elif key.startswith("ddim"):
            x, _ = s.step(outputs[i], t, x, eta=0.5, generator=g)
        else:
            x, _ = s.step(outputs[i], t, x)
        trajectory.append(x)
    # 0.2.3 itself reaches NaN on some of these random trajectories: NaN must then match NaN
    assert torch.allclose(torch.stack(trajectory), SCHEDULERS[f"steps/{key}"], atol=1e-5, equal_nan=True)
    if key.startswith("ddim"):
        x, rev = SCHEDULERS["steps/sample"].clone(), []
        for i, t in enumerate(reversed(s.timesteps)):
            x, _ = s.reversed_step(outputs[i], int(t), x)
            rev.append(x)
        assert torch.allclose(torch.stack(rev), SCHEDULERS[f"reversed/{key}"], atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("key", ["ddpm", "ddim", "pndm", "ddpm_cosine"])
def test_diffusion_inferer_sample_and_intermediates(key: str) -> None:
    from generative.inferers import DiffusionInferer

    s = _scheduler(key.split("_")[0], **({"schedule": "cosine"} if key == "ddpm_cosine" else {}))
    s.set_timesteps(10)
    unet = build("unet_attn")  # before seeding: building draws random numbers
    torch.manual_seed(11)
    with torch.no_grad():
        image, inter = DiffusionInferer(s).sample(INFERERS["noise"], unet, save_intermediates=True,
                                                  intermediate_steps=3, verbose=False)
    # 0.2.3's cosine schedule ends in NaN here (its last alphas_cumprod step): NaN must match NaN
    assert torch.allclose(image, INFERERS[f"sample/{key}"], atol=1e-4, equal_nan=True)
    assert torch.allclose(torch.stack(inter), INFERERS[f"intermediates/{key}"], atol=1e-4, equal_nan=True)


def test_get_likelihood() -> None:
    from generative.inferers import DiffusionInferer

    s = _scheduler("ddpm")
    s.set_timesteps(10)
    unet = build("unet_attn")
    torch.manual_seed(12)
    with torch.no_grad():
        total, inter = DiffusionInferer(s).get_likelihood(INFERERS["likelihood/image"], unet,
                                                          save_intermediates=True, verbose=False)
    assert torch.allclose(total, INFERERS["likelihood/total"], rtol=1e-4, atol=1e-4)
    assert torch.allclose(torch.stack(inter), INFERERS["likelihood/intermediates"], rtol=1e-4, atol=1e-4)


def test_latent_diffusion_sample() -> None:
    from generative.inferers import LatentDiffusionInferer

    s = _scheduler("ddim")
    s.set_timesteps(5)
    with torch.no_grad():
        image, inter = LatentDiffusionInferer(s, scale_factor=0.8).sample(
            INFERERS["ldm/noise"], build("autoencoderkl"), build("unet_ldm"), save_intermediates=True,
            intermediate_steps=2, verbose=False)
    assert torch.allclose(image, INFERERS["ldm/sample"], atol=1e-4)
    assert torch.allclose(torch.stack(inter), INFERERS["ldm/intermediates"], atol=1e-4)


def test_vqvae_transformer_likelihood_and_ordering() -> None:
    from generative.inferers import VQVAETransformerInferer
    from generative.utils.ordering import Ordering

    ordering = Ordering(ordering_type="raster_scan", spatial_dims=2, dimensions=(1, 4, 4))
    assert torch.as_tensor(ordering.get_sequence_ordering()).tolist() == INFERERS["vq/ordering"].tolist()
    assert torch.as_tensor(ordering.get_revert_sequence_ordering()).tolist() == INFERERS["vq/revert"].tolist()
    with torch.no_grad():
        got = VQVAETransformerInferer().get_likelihood(generator.inputs_for("vqvae")["x"], build("vqvae"),
                                                      build("transformer"), ordering)
    assert torch.allclose(got, INFERERS["vq/likelihood"], atol=1e-5)


def test_metrics_and_losses() -> None:
    from generative.losses import JukeboxLoss, PatchAdversarialLoss
    from generative.metrics import FIDMetric, MMDMetric, MultiScaleSSIMMetric, SSIMMetric

    a, b = METRICS["a"], METRICS["b"]
    assert torch.allclose(SSIMMetric(spatial_dims=2, data_range=1.0, kernel_size=5)(a, b), METRICS["ssim"], atol=1e-6)
    assert torch.allclose(MultiScaleSSIMMetric(spatial_dims=2, kernel_size=3, weights=(0.5, 0.5))(a, b),
                          METRICS["msssim"], atol=1e-6)
    mmd = MMDMetric(y_transform=lambda y: y * 2, y_pred_transform=lambda y: y + 1)(a, b)
    assert torch.allclose(mmd, METRICS["mmd"], atol=1e-6)
    assert torch.allclose(FIDMetric()(METRICS["fa"], METRICS["fb"]).double(), METRICS["fid"].double(), atol=1e-4)
    assert torch.allclose(JukeboxLoss(spatial_dims=2)(a, b), METRICS["jukebox"], atol=1e-6)
    for criterion in ("least_squares", "bce", "hinge"):
        loss, two = PatchAdversarialLoss(criterion=criterion), list(METRICS["logits"])
        assert torch.allclose(loss(two, target_is_real=True, for_discriminator=True), METRICS[f"adv/{criterion}/real"])
        assert torch.allclose(loss(two, target_is_real=False, for_discriminator=False),
                              METRICS[f"adv/{criterion}/fake_g"])
        single = loss.forward_single(torch.sigmoid(two[0]), torch.ones_like(two[0]))
        assert torch.allclose(single, METRICS[f"adv/{criterion}/single"])
