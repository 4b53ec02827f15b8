"""Volumes larger than memory: patch training (seeded, resumable, foreground-favouring), CT windows,
augmentation, learning-rate schedules, gradient clipping, memory tools that know patches, and the bad inputs
of the new keys."""

from __future__ import annotations

import math
import re

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_diffusion.cli import estimate_memory_main, sample_main, train_autoencoder_main
from monai_diffusion.config import DataConfig, load_config
from monai_diffusion.config.schema import AugmentationConfig
from monai_diffusion.data import SyntheticPhantomDataset, build_datasets
from monai_diffusion.data.patches import EpochTaggedSampler, RandomizedVolumes, build_random_transform
from monai_diffusion.memory import (
    estimate_autoencoder,
    estimate_autoencoder_inference,
    estimate_diffusion,
    estimate_pipeline,
    search_budget,
    training_batch,
    with_margin,
)
from monai_diffusion.runtime import Precision, Runtime
from monai_diffusion.training.loop import Optimization, build_loaders, lr_factor
from tests.helpers import CONFIG, CONFIGS, cli_args, tiny


def _patched(**data) -> tuple[RandomizedVolumes, DataConfig]:
    cfg = DataConfig(image_size=(32, 32, 32), patch_size=(16, 16, 16), patches_per_volume=3, **data)
    volumes = SyntheticPhantomDataset(4, (32, 32, 32), seed=1)
    return RandomizedVolumes(volumes, build_random_transform(cfg), seed=7), cfg


def test_patches_are_seeded_by_epoch_and_index():
    dataset, _ = _patched(augmentation=AugmentationConfig(flip_prob=0.5))
    first = dataset[1]  # epoch 0, volume 1
    assert len(first) == 3 and all(p["image"].shape == (1, 16, 16, 16) for p in first)
    again = RandomizedVolumes(dataset.volumes, dataset.transform, seed=7)[1]  # a fresh process after --resume
    for a, b in zip(first, again):
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
    later = dataset[len(dataset) + 1]  # epoch 1, the same volume: other patches
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(first, later))


def test_loader_workers_draw_the_same_patches_and_batches_flatten(tmp_path):
    dataset, _ = _patched()
    runtime = Runtime(torch.device("cpu"))

    def epoch_batches(workers: int) -> list[torch.Tensor]:
        loader, _, sampler = build_loaders(dataset, [], 2, workers, 0, runtime)
        assert isinstance(sampler, EpochTaggedSampler)
        sampler.set_epoch(2)
        return [batch["image"] for batch in loader]

    main, workers = epoch_batches(0), epoch_batches(1)
    assert [b.shape for b in main] == [(6, 1, 16, 16, 16)] * 2  # 2 volumes x 3 patches per batch
    for a, b in zip(main, workers):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_patches_favour_foreground():
    """The phantoms' body fills the middle of the volume; with no random share every patch holds body, and
    more of it than patches centred anywhere."""
    def mean_foreground(fraction: float) -> tuple[float, float]:
        dataset, cfg = _patched(patch_random_fraction=fraction)
        shares = [float((p["image"] > cfg.foreground_threshold).float().mean())
                  for i in range(len(dataset) * 8) for p in dataset[i]]
        return float(np.mean(shares)), min(shares)

    focused, anywhere = mean_foreground(0.0), mean_foreground(1.0)
    assert focused[1] > 0 and focused[0] > anywhere[0]


def test_ct_window_maps_hounsfield_units(tmp_path):
    volume = np.full((8, 8, 8), -1000.0, dtype=np.float32)
    volume[2:6, 2:6, 2:6] = 40.0  # soft tissue
    volume[3, 3, 3] = 3000.0  # metal, clipped
    for name in ("ct_a.nii.gz", "ct_b.nii.gz"):  # two files: one is held out for validation
        nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / name)
    cfg = DataConfig(source="nifti", paths=str(tmp_path), image_size=(8, 8, 8), intensity_window=(-1000.0, 1000.0))
    image = build_datasets(cfg, seed=0)[0][0]["image"][0]
    assert float(image[0, 0, 0]) == 0.0 and float(image[3, 3, 3]) == 1.0
    assert float(image[2, 2, 2]) == pytest.approx(0.52)


def test_lr_schedule_and_gradient_clipping():
    assert [lr_factor(s, 4, "constant", 20, 0.0) for s in (0, 1, 3, 10)] == [0.25, 0.5, 1.0, 1.0]
    assert lr_factor(4, 4, "cosine", 20, 0.1) == pytest.approx(1.0)
    assert lr_factor(12, 4, "cosine", 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(20, 4, "linear", 20, 0.0) == pytest.approx(0.0)
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    optimization = Optimization({"w": optimizer}, Precision(False, torch.device("cpu")), 1, grad_clip_norm=0.5)
    optimization.schedule(lambda step: lr_factor(step, 2, "constant", 10, 0.0))
    lrs = []
    for _ in range(3):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimization.backward((weight * torch.tensor([3.0, 4.0, 0.0])).sum(), "w", {})
        optimization.step()
    assert lrs == [0.5, 1.0, 1.0]
    # each step moved the weight by lr x the gradient clipped to norm 0.5 (direction (3, 4, 0) / 5)
    expected = -sum(lrs) * 0.5 * torch.tensor([0.6, 0.8, 0.0])
    torch.testing.assert_close(weight.detach(), expected)


def test_a_resumed_schedule_continues_where_it_stopped():
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    optimization = Optimization({"w": optimizer}, Precision(False, torch.device("cpu")), 1)
    optimization.step_index = 7  # as restored from a checkpoint
    optimization.schedule(lambda step: lr_factor(step, 0, "linear", 10, 0.0))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor(7, 0, "linear", 10, 0.0))


# ----------------------------------------------------------------------------------------------------
# memory tools
# ----------------------------------------------------------------------------------------------------
def test_estimator_trains_on_patches_and_budget_proposes_the_largest_patch():
    whole = load_config(CONFIG, ["data.image_size=[128, 128, 64]", "autoencoder.training.batch_size=1"])
    patched = load_config(CONFIG, ["data.image_size=[128, 128, 64]", "autoencoder.training.batch_size=1",
                                   "data.patch_size=[64, 64, 32]", "data.patches_per_volume=2"])
    assert training_batch(patched) == 2
    small, large = estimate_autoencoder(patched), estimate_autoencoder(whole)
    assert small.total < large.total and small.batch_size == 2
    budget = 1.1 * (small.total * 1.1 + 0.75e9)  # the patch fits, the whole volume does not
    found = search_budget(whole, budget, factor_options=[[2, 2]], batch_sizes=(1,))
    assert found and found[0].patch_size is not None
    assert all(c.patch_size is not None for c in found)  # no whole-volume setting fits at batch 1 fp32
    assert max(math.prod(c.patch_size) for c in found) == math.prod(found[0].patch_size)  # the largest first


def test_diffusion_estimate_counts_a_real_unet_step():
    from monai_diffusion.memory import count_saved
    from monai_diffusion.runs.checkpoints import build_unet

    config = load_config(CONFIG, ["data.image_size=[32, 32, 32]"], stage="diffusion")
    estimate = estimate_diffusion(config, batch_size=2, mixed_precision=False, target="cpu")
    unet = build_unet(config.diffusion.unet_kwargs(3, 3)).train()  # as the stage builds it (SDPA attention)
    x = torch.rand(2, 3, 8, 8, 8)
    with count_saved({}, exclude=(unet,)) as real:
        torch.nn.functional.mse_loss(unet(x, timesteps=torch.zeros(2, dtype=torch.long)), x)
    assert estimate.activations == real.total and estimate.latent_shape == (3, 8, 8, 8)
    assert estimate.parameters == 4 * sum(p.numel() for p in unet.parameters())


def test_example4_16gb_config_trains_on_patches_within_8gb():
    config = load_config(CONFIGS / "examples" / "example4_512x512x128_16gb.yaml", stage="diffusion")
    assert config.data.patch_size == (256, 256, 128) and config.inference_tile == [256, 256, 128]
    assert estimate_autoencoder(config).total <= 8e9
    assert estimate_diffusion(config).latent_shape == (4, 32, 32, 8)


# ----------------------------------------------------------------------------------------------------
# the new keys' bad inputs: one line, exit 2, nothing written
# ----------------------------------------------------------------------------------------------------
BAD = [
    (["data.patch_size=[32, 32, 32]"], r"data\.patch_size: \[32, 32, 32\] is larger than the volume data\.image_size \[16, 16, 16\]"),
    (["data.image_size=[32, 32, 32]", "data.patch_size=[10, 16, 16]"], r"data\.patch_size: \[10, 16, 16\] is not a multiple of the total downsampling factors \[4, 4, 4\].* 8 or 12 x 16 x 16"),
    (["data.patch_size=[8, 8, 8]", "data.patches_per_volume=0"], r"data\.patches_per_volume: expected an integer >= 1, got 0"),
    (["data.intensity_window=[1000, -1000]"], r"data\.intensity_window: expected \[a_min, a_max\] with a_min < a_max"),
    (["autoencoder.tile_size=10"], r"autoencoder\.tile_size: 10 is off the latent grid.* 8 or 12"),
    (["autoencoder.training.lr_schedule=cosinus"], r"lr_schedule: expected one of 'constant', 'cosine', 'linear', got 'cosinus' .*did you mean 'cosine'"),
    (["autoencoder.training.grad_clip_norm=0"], r"grad_clip_norm: expected a number > 0, got 0"),
    (["data.augmentation.flip_prob=1.5"], r"data\.augmentation\.flip_prob: expected a number >= 0 and <= 1, got 1\.5"),
]


@pytest.mark.parametrize("overrides,expected", BAD)
def test_new_keys_fail_in_one_line(tmp_path, capsys, overrides, expected):
    code = train_autoencoder_main(cli_args(CONFIG, tmp_path / "out", *tiny(), *overrides))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert re.search(expected, err), err
    assert not (tmp_path / "out").exists()


def test_sample_tile_off_the_grid_fails_in_one_line(tmp_path, capsys):
    """--tile-size is checked against the trained autoencoder before any sampling."""
    from tests.helpers import OLD

    code = sample_main(["--config", str(OLD / "diffusion" / "config.yaml"), "--run", str(OLD / "diffusion"),
                        "--output", str(tmp_path / "s"), "--tile-size", "6"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and re.search(r"--tile-size/--tile-overlap: tile_size = \[6, 6, 6\]: .* 6 is not \(use 4 or 8\)", err), err


def test_estimate_memory_cli_reports_patches(capsys):
    args = ["--config", str(CONFIGS / "examples" / "example4_512x512x128_16gb.yaml")]
    assert estimate_memory_main(args) == 0
    out = capsys.readouterr().out
    assert "latent shape: [4, 16, 16, 8] per volume; batch 1" in out  # the 256x256x128 patch's latent
    assert "whole-volume pipeline" not in out
    assert estimate_memory_main([*args, "--pipeline"]) == 0
    out = capsys.readouterr().out
    for phase in PHASES:
        assert re.search(rf"^  {re.escape(phase)} +\d", out, re.M), phase
    assert "latents 4x32x32x8" in out and "exact tiles, blocks" in out


PHASES = ["autoencoder training step", "autoencoder validation", "latent cache (encode)", "diffusion training step",
          "sampling: denoising", "sampling: decode"]


def test_example4_16gb_pipeline_fits_16gb_in_every_phase():
    """The guide's hardest example on a 16 GB card: every phase, with the GPU margin, under 16 GB; the exact
    tiled passes keep their full-size buffers in host memory, which the estimate reports apart."""
    config = load_config(CONFIGS / "examples" / "example4_512x512x128_16gb.yaml", stage="diffusion")
    phases = {p.name: p for p in estimate_pipeline(config)}
    assert list(phases) == PHASES
    assert all(with_margin(p.device_bytes) <= 16e9 for p in phases.values())
    assert phases["autoencoder training step"].device_bytes == estimate_autoencoder(config).total
    assert phases["diffusion training step"].device_bytes == estimate_diffusion(config).total
    # a 16-channel activation of the whole 512x512x128 volume is 2 GiB: the buffers hold several, in host memory
    one = 16 * 512 * 512 * 128 * 4
    assert phases["sampling: decode"].host_bytes >= 2 * one and phases["latent cache (encode)"].host_bytes >= 2 * one
    # the same passes with their buffers on the device need them there too
    device, host, _ = estimate_autoencoder_inference(config, "decode", buffers="device")
    on_host, buffered, _ = estimate_autoencoder_inference(config, "decode")
    assert host == 0 and device >= on_host + one and buffered > 0
    whole = load_config(CONFIGS / "examples" / "example4_512x512x128_16gb.yaml",
                        ["data.patch_size=null"], stage="diffusion")
    assert [p.host_bytes for p in estimate_pipeline(whole)] == [0] * 6  # no tiles: nothing in host buffers


# ----------------------------------------------------------------------------------------------------
# end to end through the command lines
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_patch_trained_pipeline_runs_whole_volumes_by_tiles(tmp_path, monkeypatch):
    """64x64x48 CT volumes, 32^3 patches: the autoencoder trains on patches and validates whole volumes by
    tiles, the diffusion stage trains on whole-volume latents encoded by tiles, and sample.py decodes whole
    volumes by tiles with the training data's affine."""
    from generative.inferers.tiling import TilingInferer
    from generative.networks.nets import AutoencoderKL
    from monai_diffusion.cli import train_diffusion_main
    from monai_diffusion.data import make_phantom
    from tests.helpers import summary_of

    scans = tmp_path / "scans"
    scans.mkdir()
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    for index in range(4):
        hu = make_phantom((64, 64, 48), index) * 2000.0 - 1000.0
        nib.save(nib.Nifti1Image(hu.astype(np.float32), affine), scans / f"ct{index}.nii.gz")
    calls: list[tuple[str, tuple[int, ...], object]] = []
    for name in ("encode", "decode", "reconstruct"):
        original = getattr(AutoencoderKL, name)

        def spy(self, x, *args, _name=name, _original=original, **kwargs):
            calls.append((_name, tuple(x.shape[2:]), kwargs.get("tile_size")))
            return _original(self, x, *args, **kwargs)

        monkeypatch.setattr(AutoencoderKL, name, spy)
        tiled_original = getattr(TilingInferer, name)  # the one way into tiling (the commands use it directly)

        def tiled_spy(self, model, x, *args, _name=name, _original=tiled_original, **kwargs):
            calls.append((_name, tuple(x.shape[2:]), self.tile_size))
            return _original(self, model, x, *args, **kwargs)

        monkeypatch.setattr(TilingInferer, name, tiled_spy)
    overrides = [
        "data.source=nifti", f"data.paths={scans}", "data.image_size=[64, 64, 48]", "data.val_fraction=0.25",
        "data.patch_size=[32, 32, 32]", "data.patches_per_volume=2", "data.intensity_window=[-1000, 1000]",
        "autoencoder.num_channels=[8, 8, 8]", "autoencoder.attention_levels=[false, false, false]",
        "autoencoder.norm_num_groups=4", "autoencoder.discriminator.num_layers_d=1",
        "autoencoder.discriminator.num_channels=4", "autoencoder.training.batch_size=1",
        "autoencoder.training.n_epochs=1", "autoencoder.training.adversarial_warmup_epochs=0",
        "diffusion.num_channels=[8, 8]", "diffusion.attention_levels=[false, true]", "diffusion.num_head_channels=[0, 8]",
        "diffusion.norm_num_groups=4", "diffusion.scheduler.num_train_timesteps=20", "diffusion.training.batch_size=2",
        "diffusion.training.n_epochs=1", "diffusion.training.preview_inference_steps=2",
        "diffusion.sampling.num_inference_steps=2", "device=cpu",
    ]
    args = cli_args(CONFIG, tmp_path / "run", *overrides)
    assert train_autoencoder_main(args) == 0
    summary = summary_of(tmp_path / "run" / "autoencoder")
    assert summary["optimizer_steps"] == 3 and "val/psnr" in summary["final"]  # 3 volumes x 2 patches, batch 1
    assert ("reconstruct", (64, 64, 48), [32, 32, 32]) in calls  # validation: a whole volume, by tiles
    calls.clear()
    assert train_diffusion_main(args) == 0
    assert summary_of(tmp_path / "run" / "diffusion")["latent_shape"] == [3, 16, 16, 12]  # whole-volume latents
    tiled = [c for c in calls if c[0] == "encode" and c[2] is not None]  # (the tiles' own calls carry none)
    assert len(tiled) == 4 and all(c == ("encode", (64, 64, 48), [32, 32, 32]) for c in tiled)
    calls.clear()
    out = tmp_path / "samples"
    assert sample_main(args + ["--num-samples", "1", "--output", str(out)]) == 0
    assert ("decode", (16, 16, 12), [32, 32, 32]) in calls and ("decode", (16, 16, 12), None) not in calls
    sample = nib.load(str(out / "sample_000.nii.gz"))
    assert sample.shape == (64, 64, 48)
    np.testing.assert_allclose(sample.affine, affine, atol=1e-6)


@pytest.mark.parametrize("num_classes", [None, 22])
def test_example4_16gb_every_phase_fits_16gb_with_the_margin(num_classes):
    """Every phase of the pipeline, the ControlNet's with the phantoms' 22 label classes included."""
    from monai_diffusion.memory import estimate_pipeline, with_margin

    extra = [f"data.num_classes={num_classes}"] if num_classes else []
    config = load_config(CONFIGS / "examples" / "example4_512x512x128_16gb.yaml", extra, stage="diffusion")
    phases = {phase.name: with_margin(phase.device_bytes) for phase in estimate_pipeline(config)}
    assert ("ControlNet training step" in phases) == bool(num_classes)
    assert max(phases.values()) <= 16e9, phases
