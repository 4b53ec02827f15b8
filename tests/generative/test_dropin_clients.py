"""Tutorial-style client code written only against MONAI Generative 0.2.3's public API, at tiny sizes.

One test per workflow (2D/3D LDM, 2D/3D DDPM, ControlNet, VQ-VAE + transformer, SPADE LDM, classifier-free
guidance with class labels or cross-attention, metrics, engines), one or two steps each, plus the 0.2.3
argument names and methods that tutorials use.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from generative.inferers import (
    ControlNetDiffusionInferer,
    DiffusionInferer,
    LatentDiffusionInferer,
    VQVAETransformerInferer,
)
from generative.losses import JukeboxLoss, PatchAdversarialLoss, PerceptualLoss
from generative.metrics import FIDMetric, MMDMetric, MultiScaleSSIMMetric, SSIMMetric
from generative.networks.nets import (
    VQVAE,
    AutoencoderKL,
    ControlNet,
    DecoderOnlyTransformer,
    DiffusionModelUNet,
    PatchDiscriminator,
    SPADEAutoencoderKL,
    SPADEDiffusionModelUNet,
)
from generative.networks.schedulers import DDIMScheduler, DDPMScheduler
from generative.utils.enums import OrderingType
from generative.utils.ordering import Ordering


def _importable(name: str) -> bool:
    """Whether ``name`` can be imported (a stub another test put in sys.modules counts as importable)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:
        return True


UNET = dict(num_res_blocks=1, num_channels=(8, 8), attention_levels=(False, True), norm_num_groups=8,
            num_head_channels=8)


def _train_step(model: torch.nn.Module, loss: torch.Tensor) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_ldm_workflow(spatial_dims: int) -> None:
    torch.manual_seed(0)
    shape = (2, 1) + (8,) * spatial_dims
    autoencoder = AutoencoderKL(spatial_dims=spatial_dims, in_channels=1, out_channels=1, num_channels=(8, 8),
                                latent_channels=2, num_res_blocks=1, norm_num_groups=4, attention_levels=(False, False))
    discriminator = PatchDiscriminator(spatial_dims=spatial_dims, num_layers_d=1, num_channels=4, in_channels=1)
    discriminator.apply(discriminator.initialise_weights)
    images = torch.rand(shape)
    recon, z_mu, z_sigma = autoencoder(images)
    adv = PatchAdversarialLoss(criterion="least_squares")
    g_loss = F.l1_loss(recon, images) + 0.01 * adv(discriminator(recon)[-1], target_is_real=True, for_discriminator=False)
    _train_step(autoencoder, g_loss)

    unet = DiffusionModelUNet(spatial_dims=spatial_dims, in_channels=2, out_channels=2, **UNET)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    inferer = LatentDiffusionInferer(scheduler, scale_factor=1.0)
    noise = torch.randn((2, 2) + (4,) * spatial_dims)
    timesteps = torch.randint(0, 1000, (2,))
    pred = inferer(inputs=images, autoencoder_model=autoencoder, diffusion_model=unet, noise=noise, timesteps=timesteps)
    _train_step(unet, F.mse_loss(pred, noise))
    scheduler.set_timesteps(num_inference_steps=2)
    with torch.no_grad():
        sample = inferer.sample(input_noise=noise[:1], autoencoder_model=autoencoder, diffusion_model=unet,
                                scheduler=scheduler, verbose=False)
    assert sample.shape == (1, 1) + (8,) * spatial_dims and torch.isfinite(sample).all()
    assert scheduler.timesteps.tolist() == [500, 0]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_ddpm_workflow(spatial_dims: int) -> None:
    torch.manual_seed(0)
    unet = DiffusionModelUNet(spatial_dims=spatial_dims, in_channels=1, out_channels=1, **UNET)
    scheduler = DDPMScheduler(num_train_timesteps=1000, schedule="cosine")
    inferer = DiffusionInferer(scheduler)
    images = torch.rand((2, 1) + (8,) * spatial_dims)
    noise = torch.randn_like(images)
    pred = inferer(inputs=images, diffusion_model=unet, noise=noise, timesteps=torch.randint(0, 1000, (2,)))
    _train_step(unet, F.mse_loss(pred, noise))
    scheduler.set_timesteps(2)
    with torch.no_grad():
        sample, intermediates = inferer.sample(input_noise=noise[:1], diffusion_model=unet, scheduler=scheduler,
                                               save_intermediates=True, intermediate_steps=1, verbose=False)
    assert len(intermediates) == 2 and sample.shape == noise[:1].shape


def test_controlnet_workflow() -> None:
    torch.manual_seed(0)
    unet = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, **UNET)
    controlnet = ControlNet(spatial_dims=2, in_channels=1, conditioning_embedding_num_channels=(8,), **UNET)
    controlnet.load_state_dict(unet.state_dict(), strict=False)  # the tutorial's warm start
    for p in unet.parameters():
        p.requires_grad = False
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    inferer = ControlNetDiffusionInferer(scheduler)
    images, mask = torch.rand(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    noise = torch.randn_like(images)
    pred = inferer(inputs=images, diffusion_model=unet, controlnet=controlnet, noise=noise,
                   timesteps=torch.randint(0, 1000, (2,)), cn_cond=mask)
    _train_step(controlnet, F.mse_loss(pred, noise))
    scheduler.set_timesteps(2)
    with torch.no_grad():
        sample = inferer.sample(input_noise=noise[:1], diffusion_model=unet, controlnet=controlnet, cn_cond=mask[:1],
                                scheduler=scheduler, verbose=False)
    assert sample.shape == (1, 1, 8, 8)


def test_vqvae_transformer_workflow() -> None:
    torch.manual_seed(0)
    vqvae = VQVAE(spatial_dims=2, in_channels=1, out_channels=1, num_channels=(8, 8), num_res_channels=(8, 8),
                  num_res_layers=1, downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)),
                  upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)), num_embeddings=8, embedding_dim=4)
    images = torch.rand(2, 1, 8, 8)
    recon, quantization_loss = vqvae(images)
    _train_step(vqvae, F.l1_loss(recon, images) + quantization_loss)
    vqvae.eval()
    ordering = Ordering(ordering_type=OrderingType.RASTER_SCAN.value, spatial_dims=2, dimensions=(1, 2, 2))
    transformer = DecoderOnlyTransformer(num_tokens=9, max_seq_len=5, attn_layers_dim=8, attn_layers_depth=1,
                                         attn_layers_heads=2)
    inferer = VQVAETransformerInferer()
    logits, target, _ = inferer(images, vqvae, transformer, ordering, return_latent=True)
    _train_step(transformer, F.cross_entropy(logits.transpose(1, 2), target))
    with torch.no_grad():
        sample = inferer.sample(vqvae_model=vqvae, transformer_model=transformer, ordering=ordering,
                                latent_spatial_dim=(2, 2), starting_tokens=torch.full((1, 1), 8), verbose=False)
        likelihood = inferer.get_likelihood(images, vqvae, transformer, ordering)
    assert sample.shape == (1, 1, 8, 8) and likelihood.shape == (2, 2, 2)


def test_spade_ldm_workflow() -> None:
    torch.manual_seed(0)
    seg = F.one_hot(torch.randint(0, 3, (2, 8, 8)), 3).permute(0, 3, 1, 2).float()
    autoencoder = SPADEAutoencoderKL(spatial_dims=2, label_nc=3, num_channels=(8, 8), latent_channels=2,
                                     num_res_blocks=1, norm_num_groups=4, attention_levels=(False, False),
                                     spade_intermediate_channels=8)
    images = torch.rand(2, 1, 8, 8)
    recon, _, _ = autoencoder(images, seg)
    _train_step(autoencoder, F.l1_loss(recon, images))
    unet = SPADEDiffusionModelUNet(spatial_dims=2, in_channels=2, out_channels=2, label_nc=3,
                                   spade_intermediate_channels=8, **UNET)
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    inferer = LatentDiffusionInferer(scheduler)
    noise = torch.randn(2, 2, 4, 4)
    pred = inferer(inputs=images, autoencoder_model=autoencoder, diffusion_model=unet, noise=noise,
                   timesteps=torch.randint(0, 1000, (2,)), seg=seg)
    _train_step(unet, F.mse_loss(pred, noise))
    scheduler.set_timesteps(2)
    with torch.no_grad():
        sample = inferer.sample(input_noise=noise[:1], autoencoder_model=autoencoder, diffusion_model=unet,
                                scheduler=scheduler, seg=seg[:1], verbose=False)
    assert sample.shape == (1, 1, 8, 8)


@pytest.mark.parametrize("conditioning", ["class_labels", "cross_attention"])
def test_classifier_free_guidance_workflow(conditioning: str) -> None:
    torch.manual_seed(0)
    if conditioning == "class_labels":
        unet = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, num_class_embeds=3, **UNET)
    else:
        unet = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, with_conditioning=True,
                                  cross_attention_dim=4, **UNET)
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(2)
    x, labels, context = torch.randn(1, 1, 8, 8), torch.tensor([2]), torch.randn(1, 1, 4)
    guidance = 3.0
    with torch.no_grad():  # the 0.2.3 tutorials' manual guidance loop
        for t in scheduler.timesteps:
            ts = torch.tensor([t, t])
            if conditioning == "class_labels":
                out = unet(torch.cat([x, x]), ts, class_labels=torch.cat([torch.tensor([0]), labels]))
            else:
                out = unet(torch.cat([x, x]), ts, context=torch.cat([torch.zeros_like(context), context]))
            uncond, cond = out.chunk(2)
            x, _ = scheduler.step(uncond + guidance * (cond - uncond), t, x)
    assert torch.isfinite(x).all() and scheduler.timesteps.tolist() == [500, 0]


def test_metrics_workflow() -> None:
    torch.manual_seed(0)
    a, b = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    assert SSIMMetric(spatial_dims=2, data_range=1.0, kernel_size=4)(a, b).shape == (2, 1)
    assert MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0, kernel_size=3, weights=(0.5, 0.5))(a, b).shape == (2, 1)
    assert torch.allclose(MMDMetric()(a, a), torch.tensor(0.0), atol=1e-6)
    assert FIDMetric()(torch.randn(8, 3), torch.randn(8, 3)).ndim == 0
    assert JukeboxLoss(spatial_dims=2)(a, a) == 0


def test_engines_workflow() -> None:
    from generative.engines import AdversarialTrainer, DiffusionPrepareBatch, VPredictionPrepareBatch

    batch = {"image": torch.rand(2, 1, 8, 8)}
    inputs, target, args, kwargs = DiffusionPrepareBatch(num_train_timesteps=1000)(batch)
    assert torch.equal(target, kwargs["noise"]) and kwargs["timesteps"].shape == (2,)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    _, target, _, kwargs = VPredictionPrepareBatch(scheduler, num_train_timesteps=1000)(batch)
    assert torch.allclose(target, scheduler.get_velocity(batch["image"], kwargs["noise"], kwargs["timesteps"]))
    from generative.engines import trainer as trainer_module

    with pytest.MonkeyPatch.context() as patch:  # as without ignite installed: one line saying what to install
        patch.setattr(trainer_module, "HAS_IGNITE", False)
        with pytest.raises(ImportError, match="pytorch-ignite"):
            AdversarialTrainer(device="cpu", max_epochs=1, train_data_loader=[], g_network=None, g_optimizer=None,
                               g_loss_function=None, recon_loss_function=None, d_network=None, d_optimizer=None,
                               d_loss_function=None)
    if not _importable("ignite"):
        return
    # 0.2.3's adversarial autoencoder workflow: a generator, a PatchGAN critic and the patch adversarial loss
    from generative.losses import PatchAdversarialLoss
    from generative.utils import AdversarialKeys

    torch.manual_seed(0)
    generator = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(4, 1, 1))
    critic = PatchDiscriminator(spatial_dims=2, num_layers_d=1, num_channels=4, in_channels=1, out_channels=1)
    adversarial = PatchAdversarialLoss(criterion="least_squares")
    before = [p.detach().clone() for p in (*generator.parameters(), *critic.parameters())]
    losses = []
    trainer = AdversarialTrainer(
        device="cpu", max_epochs=2, train_data_loader=[{"image": image, "label": image} for image in torch.rand(2, 2, 1, 16, 16)],
        g_network=generator, g_optimizer=torch.optim.Adam(generator.parameters(), 1e-2),
        g_loss_function=lambda fake_logits: adversarial(fake_logits[-1], target_is_real=True, for_discriminator=False),
        recon_loss_function=torch.nn.L1Loss(), d_network=critic, d_optimizer=torch.optim.Adam(critic.parameters(), 1e-2),
        d_loss_function=lambda real, fake: (adversarial(real[-1], target_is_real=True, for_discriminator=True)
                                            + adversarial(fake[-1], target_is_real=False, for_discriminator=True)) / 2,
        iteration_update=None,
    )
    from ignite.engine import Events

    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: losses.append(dict(engine.state.output)))
    trainer.run()
    keys = [AdversarialKeys.RECONSTRUCTION_LOSS, AdversarialKeys.GENERATOR_LOSS, AdversarialKeys.DISCRIMINATOR_LOSS]
    assert len(losses) == 4 and all(torch.isfinite(out[key]) for out in losses for key in keys)
    after = [*generator.parameters(), *critic.parameters()]
    assert all(not torch.equal(b, a) for b, a in zip(before, after))  # both networks trained


def test_023_argument_names_beside_monai_core_names() -> None:
    a = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, **UNET)
    kwargs = dict(UNET)
    kwargs["channels"] = kwargs.pop("num_channels")
    b = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, **kwargs)
    assert list(a.state_dict()) == list(b.state_dict())
    with pytest.raises(ValueError, match="num_channels .* or channels"):
        PatchDiscriminator(spatial_dims=2, num_channels=4, channels=4, in_channels=1)
    with pytest.raises(ValueError, match="kernel_size .* or win_size"):
        SSIMMetric(spatial_dims=2, kernel_size=5, win_size=5)
    encoder = AutoencoderKL(spatial_dims=2, num_channels=(8, 8), attention_levels=(False, True), num_res_blocks=1,
                            norm_num_groups=4).encoder
    assert (encoder.in_channels, encoder.num_res_blocks, encoder.attention_levels) == (1, (1, 1), (False, True))
    from generative.networks.nets.autoencoderkl import AttentionBlock

    block = AttentionBlock(2, 8, num_head_channels=4, norm_num_groups=4, use_flash_attention=True)
    assert block.num_heads == 2 and block(torch.rand(1, 8, 4, 4)).shape == (1, 8, 4, 4)
    with pytest.raises(ValueError, match="num_head_channels"):
        AttentionBlock(2, 8, num_head_channels=3, norm_num_groups=4)


@pytest.mark.skipif(_importable("lpips"), reason="lpips is installed here: it would download weights")
def test_perceptual_loss_offline_error_is_one_line() -> None:
    with pytest.raises(RuntimeError) as info:
        PerceptualLoss(spatial_dims=2, network_type="alex")
    assert "PerceptualLoss(network_type='alex'): could not obtain the pretrained network" in str(info.value)
    assert "\n" not in str(info.value)
