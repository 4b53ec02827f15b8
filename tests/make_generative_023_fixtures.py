"""Generate the MONAI Generative 0.2.3 reference fixtures used by ``tests/generative/test_dropin_*.py``.

This script must run against the REAL ``monai-generative==0.2.3`` package, which cannot be installed
beside this repository (same import name ``generative``) and whose schedulers break on monai 1.6.
Run it from the repository root in a throwaway environment outside the repository:

    python3 -m venv /tmp/gen023
    /tmp/gen023/bin/pip install torch==2.13.0
    /tmp/gen023/bin/pip install monai==1.5.2 monai-generative==0.2.3 einops scipy "numpy<2"
    cd /tmp && /tmp/gen023/bin/python /path/to/repo/tests/make_generative_023_fixtures.py \
        /path/to/repo/tests/fixtures/generative_0_2_3

(run it from a directory that is not the repository root, so that ``import generative`` finds the
installed 0.2.3 package and not ``GenerativeModels/generative``). ``lpips`` and ``torchvision``, which
``generative.losses`` imports at module level, are stubbed: no network weights are needed.

The second mode checks the other direction, that state dicts saved by OUR classes load into 0.2.3
with ``strict=True`` and give the fixture outputs (``tests/generative/test_dropin_checkpoints.py`` writes them
when ``DROPIN_EXPORT_DIR`` is set):

    cd /tmp && /tmp/gen023/bin/python /path/to/repo/tests/make_generative_023_fixtures.py --verify-ours DIR

Everything is tiny (a few thousand weights per network) and seeded; outputs are computed in float64
where the network allows it, so the committed files are deterministic up to BLAS rounding.
"""

from __future__ import annotations

import argparse
import copy
import sys
import types
from pathlib import Path

import torch

# The network configurations (constructor keyword arguments of 0.2.3). The tests read them back from
# the fixture files, so they are written only here.
CONFIGS: dict[str, tuple[str, dict]] = {
    "unet_attn": ("DiffusionModelUNet", dict(
        spatial_dims=2, in_channels=1, out_channels=1, num_res_blocks=1, num_channels=(8, 8),
        attention_levels=(False, True), norm_num_groups=8, num_head_channels=4)),
    "unet_cross": ("DiffusionModelUNet", dict(
        spatial_dims=2, in_channels=1, out_channels=1, num_res_blocks=1, num_channels=(8, 8),
        attention_levels=(False, True), norm_num_groups=8, num_head_channels=4, with_conditioning=True,
        cross_attention_dim=6, num_class_embeds=3)),
    "unet_updown": ("DiffusionModelUNet", dict(
        spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=1, num_channels=(8, 8),
        attention_levels=(False, True), norm_num_groups=8, num_head_channels=8, resblock_updown=True)),
    "unet_ldm": ("DiffusionModelUNet", dict(
        spatial_dims=2, in_channels=2, out_channels=2, num_res_blocks=1, num_channels=(8, 8),
        attention_levels=(False, True), norm_num_groups=8, num_head_channels=8)),
    "controlnet": ("ControlNet", dict(
        spatial_dims=2, in_channels=1, num_res_blocks=1, num_channels=(8, 8), attention_levels=(False, True),
        norm_num_groups=8, num_head_channels=4, with_conditioning=True, cross_attention_dim=6,
        conditioning_embedding_num_channels=(8,), conditioning_embedding_in_channels=1)),
    "spade_ae": ("SPADEAutoencoderKL", dict(
        spatial_dims=2, label_nc=3, in_channels=1, out_channels=1, num_res_blocks=1, num_channels=(8, 8),
        attention_levels=(False, True), latent_channels=2, norm_num_groups=4, spade_intermediate_channels=8)),
    "spade_unet": ("SPADEDiffusionModelUNet", dict(
        spatial_dims=2, in_channels=1, out_channels=1, label_nc=3, num_res_blocks=1, num_channels=(8, 8),
        attention_levels=(False, True), norm_num_groups=8, num_head_channels=4, spade_intermediate_channels=8)),
    "transformer": ("DecoderOnlyTransformer", dict(
        num_tokens=9, max_seq_len=17, attn_layers_dim=8, attn_layers_depth=2, attn_layers_heads=2)),
    "transformer_cross": ("DecoderOnlyTransformer", dict(
        num_tokens=10, max_seq_len=12, attn_layers_dim=8, attn_layers_depth=2, attn_layers_heads=2,
        with_cross_attention=True)),
    "patchdisc": ("PatchDiscriminator", dict(spatial_dims=2, num_channels=8, in_channels=1, num_layers_d=2)),
    "multiscale": ("MultiScalePatchDiscriminator", dict(
        num_d=2, num_layers_d=2, spatial_dims=2, num_channels=4, in_channels=1, minimum_size_im=64)),
    "vqvae": ("VQVAE", dict(
        spatial_dims=2, in_channels=1, out_channels=1, num_channels=(8, 8), num_res_channels=(8, 8),
        num_res_layers=1, downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)),
        upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)), num_embeddings=8, embedding_dim=4)),
    "spadenet": ("SPADENet", dict(
        spatial_dims=2, in_channels=1, out_channels=1, label_nc=3, input_shape=(16, 16), num_channels=[8, 8],
        z_dim=4, spade_intermediate_channels=8)),
    "autoencoderkl": ("AutoencoderKL", dict(
        spatial_dims=2, in_channels=1, out_channels=1, num_res_blocks=1, num_channels=(8, 8),
        attention_levels=(False, True), latent_channels=2, norm_num_groups=4)),
}
PICKLED = ("autoencoderkl", "unet_attn", "unet_cross")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter away from its (often zero or one) initial value, reproducibly."""
    g = _gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def inputs_for(name: str) -> dict[str, torch.Tensor]:
    """Seeded inputs per network (the tests read them from the fixture)."""
    g = _gen(1)
    seg = torch.softmax(torch.randn(2, 3, 16, 16, generator=g), dim=1)
    if name.startswith("unet") or name in ("controlnet", "spade_unet"):
        spatial = (8, 8, 8) if name == "unet_updown" else (16, 16)
        channels = 2 if name == "unet_ldm" else 1
        out = {"x": torch.randn(2, channels, *spatial, generator=g), "timesteps": torch.tensor([10, 700])}
        if name in ("unet_cross", "controlnet"):
            out["context"] = torch.randn(2, 1, 6, generator=g)
        if name == "unet_cross":
            out["class_labels"] = torch.tensor([0, 2])
        if name == "controlnet":
            out["controlnet_cond"] = torch.randn(2, 1, 16, 16, generator=g)
        if name == "spade_unet":
            out["seg"] = seg
        return out
    if name.startswith("transformer"):
        out = {"x": torch.randint(0, 9, (2, 12), generator=g)}
        if name == "transformer_cross":
            out["context"] = torch.randn(2, 3, 8, generator=g)
        return out
    size = 64 if name == "multiscale" else 16
    out = {"x": torch.randn(1 if name == "multiscale" else 2, 1, size, size, generator=g)}
    if name.startswith("spade"):
        out["seg"] = seg
    return out


def outputs_for(name: str, model: torch.nn.Module, inp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Deterministic outputs (no sampling noise) of each network on its inputs."""
    with torch.no_grad():
        if name.startswith("unet") or name == "spade_unet":
            return {"out": model(**inp)}
        if name == "controlnet":
            down, mid = model(**inp, conditioning_scale=0.7)
            return {**{f"down_{i}": d for i, d in enumerate(down)}, "mid": mid}
        if name.startswith("transformer"):
            return {"out": model(**inp)}
        if name == "patchdisc":
            return {f"feat_{i}": f for i, f in enumerate(model(inp["x"]))}
        if name == "multiscale":
            outs, feats = model(inp["x"])
            res = {f"out_{i}": o for i, o in enumerate(outs)}
            for i, fl in enumerate(feats):
                res.update({f"feat_{i}_{j}": f for j, f in enumerate(fl)})
            return res
        if name == "vqvae":
            recon, qloss = model(inp["x"])
            return {"recon": recon, "qloss": qloss, "indices": model.index_quantize(inp["x"]),
                    "encoded": model.encode(inp["x"])}
        if name == "spadenet":
            z_mu, z_logvar = model.encoder(inp["x"])  # encode() samples
            torch.manual_seed(3)
            decoded, kld = model(inp["seg"], inp["x"])  # the same seed gives the same sample in the tests
            return {"z_mu": z_mu, "z_logvar": z_logvar, "decoded_mu": model.decode(inp["seg"], z_mu),
                    "decoded": decoded, "kld": kld}
        if name == "spade_ae":
            z_mu, z_sigma = model.encode(inp["x"])
            return {"z_mu": z_mu, "z_sigma": z_sigma, "decoded": model.decode(z_mu, inp["seg"]),
                    "reconstruction": model.reconstruct(inp["x"], inp["seg"])}
        if name == "autoencoderkl":
            z_mu, z_sigma = model.encode(inp["x"])
            return {"z_mu": z_mu, "z_sigma": z_sigma, "decoded": model.decode(z_mu)}
    raise KeyError(name)


def build(name: str) -> torch.nn.Module:
    from generative.networks import nets

    cls, kwargs = CONFIGS[name]
    torch.manual_seed(0)
    model = getattr(nets, cls)(**copy.deepcopy(kwargs))  # 0.2.3's SPADENet appends to num_channels
    perturb(model, seed=sum(map(ord, name)))
    return model.eval()


def save(obj: object, path: Path) -> None:
    """``torch.save`` in the legacy (non-zip) format: no per-tensor alignment, so tiny files."""
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def make_networks(out: Path) -> dict[str, torch.nn.Module]:
    models = {}
    for name, (cls, kwargs) in CONFIGS.items():
        model = build(name)
        inp = inputs_for(name)
        save({"class": cls, "kwargs": kwargs, "state_dict": model.state_dict(), "inputs": inp,
                    "outputs": outputs_for(name, model, inp)}, out / f"{name}.pth")
        if name in PICKLED:  # torch.save's default zip format for one, the compact legacy format for the others
            (torch.save if name == "unet_cross" else save)(model, out / f"{name}_pickled.pth")
        models[name] = model
    return models


def make_schedulers(out: Path) -> None:
    from generative.networks.schedulers import DDIMScheduler, DDPMScheduler, PNDMScheduler

    res: dict[str, torch.Tensor] = {}
    for schedule in ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"):
        s = DDPMScheduler(num_train_timesteps=1000, schedule=schedule)
        res[f"betas/{schedule}"], res[f"alphas_cumprod/{schedule}"] = s.betas, s.alphas_cumprod
    for steps in (1, 7, 10, 50, 1000):
        s = DDPMScheduler(num_train_timesteps=1000)
        s.set_timesteps(steps)
        res[f"ddpm/{steps}"] = s.timesteps
        s = DDIMScheduler(num_train_timesteps=1000)
        s.set_timesteps(steps)
        res[f"ddim/{steps}"] = s.timesteps
        s = DDIMScheduler(num_train_timesteps=1000, steps_offset=1)
        s.set_timesteps(steps)
        res[f"ddim_offset1/{steps}"] = s.timesteps
        for skip in (False, True) if steps > 1 else ():  # 0.2.3's PNDM cannot run one step
            s = PNDMScheduler(num_train_timesteps=1000, skip_prk_steps=skip)
            s.set_timesteps(steps)
            res[f"pndm_skip{int(skip)}/{steps}"] = s.timesteps

    # step-by-step numbers with a fixed "model output" sequence
    g = _gen(5)
    sample = torch.randn(2, 1, 6, 6, generator=g)
    outputs = [torch.randn(2, 1, 6, 6, generator=g) for _ in range(12)]
    res["steps/sample"] = sample
    res["steps/model_outputs"] = torch.stack(outputs)
    for key, sched in {
        "ddpm_cosine": DDPMScheduler(num_train_timesteps=1000, schedule="cosine"),
        "ddpm_v": DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction", clip_sample=False),
        "ddim": DDIMScheduler(num_train_timesteps=1000),
        "ddim_noalpha1": DDIMScheduler(num_train_timesteps=1000, set_alpha_to_one=False, clip_sample=False),
        "pndm": PNDMScheduler(num_train_timesteps=1000),
        "pndm_skip": PNDMScheduler(num_train_timesteps=1000, skip_prk_steps=True),
    }.items():
        sched.set_timesteps(10)
        x = sample.clone()
        trajectory = []
        for i, t in enumerate(sched.timesteps[: len(outputs)]):
            if key.startswith("ddpm"):
                x, _ = sched.step(outputs[i], t, x, generator=_gen(100 + i))
            elif key.startswith("ddim"):
                x, _ = sched.step(outputs[i], t, x, eta=0.5, generator=_gen(100 + i))
            else:
                x, _ = sched.step(outputs[i], t, x)
            trajectory.append(x)
        res[f"steps/{key}"] = torch.stack(trajectory)
        if key.startswith("ddim"):  # reversed (encoding) steps, up to the last one past T
            x = sample.clone()
            rev = []
            for i, t in enumerate(reversed(sched.timesteps)):
                x, _ = sched.reversed_step(outputs[i], int(t), x)
                rev.append(x)
            res[f"reversed/{key}"] = torch.stack(rev)
    save(res, out / "schedulers.pth")


def make_inferers(out: Path, models: dict[str, torch.nn.Module]) -> None:
    from generative.inferers import DiffusionInferer, LatentDiffusionInferer, VQVAETransformerInferer
    from generative.networks.schedulers import DDIMScheduler, DDPMScheduler, PNDMScheduler
    from generative.utils.ordering import Ordering

    res: dict[str, object] = {}
    unet = models["unet_attn"]
    noise = torch.randn(1, 1, 16, 16, generator=_gen(7))
    res["noise"] = noise
    for key, sched in {"ddpm": DDPMScheduler(1000), "ddim": DDIMScheduler(1000), "pndm": PNDMScheduler(1000),
                       "ddpm_cosine": DDPMScheduler(1000, schedule="cosine")}.items():
        sched.set_timesteps(10)
        torch.manual_seed(11)
        with torch.no_grad():
            image, inter = DiffusionInferer(sched).sample(noise, unet, save_intermediates=True, intermediate_steps=3)
        res[f"sample/{key}"], res[f"intermediates/{key}"] = image, torch.stack(inter)
    sched = DDPMScheduler(1000)
    sched.set_timesteps(10)
    image = torch.rand(1, 1, 16, 16, generator=_gen(8))
    torch.manual_seed(12)
    with torch.no_grad():
        total, inter = DiffusionInferer(sched).get_likelihood(image, unet, save_intermediates=True)
    res["likelihood/image"], res["likelihood/total"], res["likelihood/intermediates"] = image, total, torch.stack(inter)

    # latent diffusion: our AutoencoderKL fixture + a latent UNet, DDIM, intermediates decoded
    sched = DDIMScheduler(1000)
    sched.set_timesteps(5)
    latent_noise = torch.randn(1, 2, 8, 8, generator=_gen(9))
    res["ldm/noise"] = latent_noise
    with torch.no_grad():
        image, inter = LatentDiffusionInferer(sched, scale_factor=0.8).sample(
            latent_noise, models["autoencoderkl"], models["unet_ldm"], save_intermediates=True, intermediate_steps=2)
    res["ldm/sample"], res["ldm/intermediates"] = image, torch.stack(inter)

    # VQ-VAE + transformer likelihood with a raster-scan ordering
    ordering = Ordering(ordering_type="raster_scan", spatial_dims=2, dimensions=(1, 4, 4))
    with torch.no_grad():
        res["vq/likelihood"] = VQVAETransformerInferer().get_likelihood(
            inputs_for("vqvae")["x"], models["vqvae"], models["transformer"], ordering)
    res["vq/ordering"] = torch.as_tensor(ordering.get_sequence_ordering())
    res["vq/revert"] = torch.as_tensor(ordering.get_revert_sequence_ordering())
    save(res, out / "inferers.pth")


def make_metrics_losses(out: Path) -> None:
    from generative.losses import JukeboxLoss, PatchAdversarialLoss
    from generative.metrics import FIDMetric, MMDMetric, MultiScaleSSIMMetric, SSIMMetric

    g = _gen(13)
    a, b = torch.rand(2, 1, 24, 24, generator=g), torch.rand(2, 1, 24, 24, generator=g)
    fa, fb = torch.randn(16, 5, generator=g), torch.randn(16, 5, generator=g) + 0.3
    logits = [torch.randn(2, 1, 3, 3, generator=g), torch.randn(2, 1, 2, 2, generator=g)]
    res = {"a": a, "b": b, "fa": fa, "fb": fb, "logits": torch.stack([logits[0][:, :, :2, :2], logits[1]])}
    res["ssim"] = SSIMMetric(spatial_dims=2, data_range=1.0, kernel_size=5)(a, b)
    res["msssim"] = MultiScaleSSIMMetric(spatial_dims=2, kernel_size=3, weights=(0.5, 0.5))(a, b)
    res["mmd"] = MMDMetric(y_transform=lambda y: y * 2, y_pred_transform=lambda y: y + 1)(a, b)
    res["fid"] = FIDMetric()(fa, fb)
    res["jukebox"] = JukeboxLoss(spatial_dims=2)(a, b)
    for criterion in ("least_squares", "bce", "hinge"):
        loss = PatchAdversarialLoss(criterion=criterion)
        two = list(res["logits"])
        res[f"adv/{criterion}/real"] = loss(two, target_is_real=True, for_discriminator=True)
        res[f"adv/{criterion}/fake_g"] = loss(two, target_is_real=False, for_discriminator=False)
        res[f"adv/{criterion}/single"] = loss.forward_single(torch.sigmoid(two[0]), torch.ones_like(two[0]))
    save(res, out / "metrics_losses.pth")


def verify_ours(folder: Path) -> int:
    """Load state dicts written by our classes into 0.2.3 (strict) and compare with the fixtures."""
    fixtures = Path(__file__).resolve().parent / "fixtures" / "generative_0_2_3"
    failures = 0
    for name in CONFIGS:
        path = folder / f"{name}.pth"
        if not path.exists():
            print(f"{name}: not exported")
            failures += 1
            continue
        model = build(name)
        model.load_state_dict(torch.load(path), strict=True)
        ref = torch.load(fixtures / f"{name}.pth")
        got = outputs_for(name, model, ref["inputs"])
        err = max(float((got[k].double() - ref["outputs"][k].double()).abs().max()) for k in ref["outputs"])
        print(f"{name}: strict load into 0.2.3 ok, max |diff| vs fixture {err:.2e}")
        failures += err > 1e-5
    return failures


def _stub_optional_imports() -> None:
    """``lpips`` and ``torchvision``, which 0.2.3's ``generative.losses`` imports at module level but the
    fixtures never call: stubbed so it imports. Only the script does this (the tests import this module for
    ``CONFIGS`` and must not see a fake torchvision)."""
    lpips = types.ModuleType("lpips")
    lpips.LPIPS = type("LPIPS", (), {})
    tv = types.ModuleType("torchvision")
    tv_models = types.ModuleType("torchvision.models")
    tv_models.ResNet50_Weights = object
    tv_models.resnet50 = None
    tv_fe = types.ModuleType("torchvision.models.feature_extraction")
    tv_fe.create_feature_extractor = None
    tv.models, tv_models.feature_extraction = tv_models, tv_fe
    sys.modules.update({"lpips": lpips, "torchvision": tv, "torchvision.models": tv_models,
                        "torchvision.models.feature_extraction": tv_fe})


def main() -> None:
    _stub_optional_imports()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", type=Path, help="fixture folder to write")
    parser.add_argument("--verify-ours", type=Path, help="folder of state dicts saved by our classes")
    args = parser.parse_args()
    import generative

    if generative.__version__ != "0.2.3":
        raise SystemExit(f"generative {generative.__version__} imported from {generative.__file__}: run this with "
                         f"monai-generative 0.2.3, from outside the repository")
    if args.verify_ours:
        raise SystemExit(verify_ours(args.verify_ours))
    if args.output is None:
        raise SystemExit("give the fixture folder to write, or --verify-ours DIR")
    args.output.mkdir(parents=True, exist_ok=True)
    models = make_networks(args.output)
    make_schedulers(args.output)
    make_inferers(args.output, models)
    make_metrics_losses(args.output)
    print(f"fixtures written to {args.output}")


if __name__ == "__main__":
    main()
