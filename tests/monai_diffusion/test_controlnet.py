"""The ControlNet stage's networks: the conditioning embedding's plan, initialisation from the UNet, the
covariates reaching the ControlNet, the UNet staying frozen, and the label maps repeated for guidance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet

from monai_diffusion.generation.controlnet import ControlledUNet, build_controlnet, embedding_plan

ROOT = Path(__file__).resolve().parents[2]

UNET = dict(spatial_dims=3, in_channels=3, out_channels=3, num_res_blocks=1, channels=[8, 8],
            attention_levels=[False, True], num_head_channels=[0, 8], norm_num_groups=4)


@pytest.mark.parametrize("factors,blocks,kernel", [((4, 4, 4), 2, (1, 1, 1)), ((8, 8, 4), 2, (2, 2, 1)),
                                                   ((16, 16, 16), 4, (1, 1, 1)), ((6, 6, 6), 1, (3, 3, 3))])
def test_embedding_plan_reaches_the_latent_grid(factors, blocks, kernel):
    assert embedding_plan(factors) == (blocks, kernel)


def _nets(factors=(4, 4, 4), **extra):
    torch.manual_seed(0)
    unet = DiffusionModelUNet(**UNET, **extra).eval()
    _perturb(unet)  # a "trained" UNet: MONAI zero-initialises its output convolution
    controlnet, spec = build_controlnet(unet, {**UNET, **extra}, 5, 4, factors)
    return unet, controlnet, spec


def test_controlnet_starts_as_the_unet_and_changes_nothing():
    unet, controlnet, spec = _nets()
    shared = {k: v for k, v in unet.state_dict().items() if k in controlnet.controlnet.state_dict()}
    assert len(shared) > 10 and all(torch.equal(controlnet.controlnet.state_dict()[k], v) for k, v in shared.items())
    assert spec["controlnet_args"]["conditioning_embedding_num_channels"] == [4, 8, 16]
    x, t = torch.randn(2, 3, 4, 4, 4), torch.tensor([3, 7])
    label = torch.randint(0, 5, (2, 1, 16, 16, 16))
    with torch.no_grad():  # zero-initialised output convolutions: the steered UNet is the UNet
        assert unet(x, timesteps=t).abs().max() > 0
        assert torch.equal(ControlledUNet(unet, controlnet, label)(x, t), unet(x, timesteps=t))


def _perturb(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))


def test_label_map_and_context_reach_the_controlnet():
    """MONAI#8344: the cross-attention context must reach the ControlNet, not only the UNet."""
    extra = dict(with_conditioning=True, cross_attention_dim=3)
    unet, controlnet, _ = _nets(**extra)
    _perturb(controlnet)
    x, t = torch.randn(2, 3, 4, 4, 4), torch.tensor([3, 7])
    label = torch.randint(0, 5, (2, 1, 16, 16, 16))
    context = torch.randn(2, 1, 3)
    with torch.no_grad():
        down, mid = controlnet(x, t, label, context=context)
        down2, mid2 = controlnet(x, t, label, context=context + 1)
        assert not torch.allclose(mid, mid2)  # the context changed the ControlNet's residuals
        other = controlnet(x, t, (label + 1) % 5, context=context)[1]
        assert not torch.allclose(mid, other)  # so did the label map
        zero = controlnet(x, t, label, conditioning_scale=0.0, context=context)[1]
        assert torch.equal(zero, torch.zeros_like(zero))
        steered = ControlledUNet(unet, controlnet, label)
        assert not torch.allclose(steered(x, t, context=context), unet(x, timesteps=t, context=context))


def test_guidance_halves_share_the_label_maps():
    unet, controlnet, _ = _nets()
    _perturb(controlnet)
    x, t = torch.randn(2, 3, 4, 4, 4), torch.tensor([3, 7])
    label = torch.randint(0, 5, (2, 1, 16, 16, 16))
    steered = ControlledUNet(unet, controlnet, label)
    with torch.no_grad():
        both = steered(torch.cat([x, x]), torch.cat([t, t]))
        once = steered(x, t)
    assert torch.allclose(both[:2], once, atol=1e-6) and torch.allclose(both[2:], once, atol=1e-6)


def test_anisotropic_factors_pool_first():
    unet, controlnet, spec = _nets(factors=(8, 8, 4))
    assert spec["pool_kernel"] == [2, 2, 1]
    _perturb(controlnet)
    x, t = torch.randn(1, 3, 4, 4, 4), torch.tensor([5])
    with torch.no_grad():
        down, mid = controlnet(x, t, torch.randint(0, 5, (1, 1, 32, 32, 16)))
    assert mid.shape[2:] == (2, 2, 2)


def test_only_the_controlnet_learns():
    unet, controlnet, _ = _nets()
    unet.requires_grad_(False)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    optimizer = torch.optim.Adam(controlnet.parameters(), lr=1e-2)
    x, t = torch.randn(2, 3, 4, 4, 4), torch.tensor([3, 7])
    label = torch.randint(0, 5, (2, 1, 16, 16, 16))
    for _ in range(2):
        loss = ControlledUNet(unet, controlnet, label)(x, t).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert any(p.abs().sum() > 0 for n, p in controlnet.named_parameters() if "controlnet_mid_block" in n)


def test_memory_estimate_of_the_controlnet_step_and_the_pipeline():
    """The fake-tensor count of a ControlNet training step against the profiler's peak of a real one (CPU),
    and the pipeline estimate lists the stage's phases when the data has label maps."""
    from monai_diffusion.config import load_config
    from monai_diffusion.memory import estimate_pipeline
    from monai_diffusion.memory.controlnet import estimate_controlnet, measure_controlnet_step

    config = load_config(ROOT / "monai_diffusion" / "config" / "quickstart.yaml",
                         ["data.num_classes=22", "data.image_size=[16, 16, 16]", "controlnet.training.batch_size=2",
                          "autoencoder.discriminator.num_layers_d=1"],
                         stage="controlnet")
    estimate = estimate_controlnet(config, target="cpu")
    measured, _ = measure_controlnet_step(config, torch.device("cpu"), repeats=1)
    assert 0.7 < estimate.total / measured < 1.5, (estimate.total, measured)
    names = [phase.name for phase in estimate_pipeline(config, target="cpu")]
    assert names[-2:] == ["ControlNet training step", "sampling with ControlNet"]
    plain = load_config(ROOT / "monai_diffusion" / "config" / "quickstart.yaml", ["data.image_size=[16, 16, 16]", "autoencoder.discriminator.num_layers_d=1"],
                        stage="diffusion")
    assert "ControlNet training step" not in [phase.name for phase in estimate_pipeline(plain, target="cpu")]


def test_the_frozen_unet_and_the_ema_stay_in_eval_mode_through_a_preview():
    """The preview samples with the EMA ControlNet and the sampler restores the mode it found: the frozen UNet's mode
    must not turn to training after the first validation (and so differ between a run and its resumed copy)."""
    from generative.networks.nets import AutoencoderKL
    from monai_diffusion.config import load_config
    from monai_diffusion.generation.conditioning import Conditioning
    from monai_diffusion.runs.checkpoints import DiffusionBundle, build_unet
    from monai_diffusion.runtime import Precision, Runtime
    from monai_diffusion.training.controlnet import ControlNetTask
    from tests.helpers import CONFIG, TINY_LDM

    config = load_config(CONFIG, [*TINY_LDM, "data.num_classes=22", "controlnet.conditioning_channels=4",
                                  "controlnet.training.ema_decay=0.9", "controlnet.training.preview_inference_steps=2"])
    ae = config.autoencoder
    torch.manual_seed(0)
    bundle = DiffusionBundle(build_unet(config.diffusion.unet_kwargs(ae.latent_channels, ae.spatial_dims)).eval(),
                             AutoencoderKL(**ae.model_kwargs()).eval(), config, 1.0, torch.eye(4), Conditioning())
    cpu = torch.device("cpu")
    task = ControlNetTask(config, Runtime(cpu), Precision(False, cpu), bundle, torch.eye(4))
    batch = {"z_mu": torch.rand(2, 3, 4, 4, 4), "z_sigma": torch.rand(2, 3, 4, 4, 4),
             "label": torch.randint(0, 22, (2, 1, 16, 16, 16), dtype=torch.int16)}
    task.train(False)  # what the loop's validation does around the preview
    task.preview(batch)
    task.train(True)
    assert task.controlnet.training
    assert not task.unet.training and not task.ema.module.training
