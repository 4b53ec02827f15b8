"""Stage 2 end to end on tiny volumes: autoencoder → diffusion → samples, scale factor, resume, errors, DDP."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_diffusion.cli import sample_main, train_autoencoder_main, train_diffusion_main
from monai_diffusion.data import build_datasets
from monai_diffusion.generation.latents import LatentDataset, compute_scale_factor, encode_latents
from monai_diffusion.runs.checkpoints import load_autoencoder, load_checkpoint
from monai_diffusion.runtime import Runtime
from tests.helpers import CONFIG, SCRIPTS, TINY_LDM, cli_args, write_scans
from tests.helpers.distributed import torchrun


def _args(out: Path, *overrides: str) -> list[str]:
    return cli_args(CONFIG, out, *TINY_LDM, *overrides)


@pytest.fixture(scope="module")
def autoencoder_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ldm")
    assert train_autoencoder_main(_args(out)) == 0
    return out


def _fresh_output(autoencoder_run: Path, tmp_path: Path) -> Path:
    """A new output_dir whose autoencoder is the shared trained one."""
    (tmp_path / "autoencoder").symlink_to(autoencoder_run / "autoencoder")
    return tmp_path


def test_pipeline_autoencoder_diffusion_samples(autoencoder_run, tmp_path):
    out = _fresh_output(autoencoder_run, tmp_path)
    assert train_diffusion_main(_args(out, "diffusion.training.ema_decay=0.9")) == 0
    run = out / "diffusion"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["optimizer_steps"] == 4 and summary["latent_shape"] == [3, 4, 4, 4]
    assert list((run / "previews").glob("*.png")) and (run / "checkpoints" / "best.pt").is_file()
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["ema"] is not None and state["autoencoder"] and state["config"]["diffusion"]["training"]["ema_decay"] == 0.9

    # the stored scale factor is 1 / std of the training latents (recomputed here independently of the run)
    autoencoder, config = load_autoencoder(out / "autoencoder")
    train_ds, _ = build_datasets(config.data, seed=config.seed)
    z_mu, z_sigma = encode_latents(autoencoder, train_ds, list(range(len(train_ds))), 2, torch.device("cpu"), "test")
    expected = compute_scale_factor(LatentDataset(z_mu, z_sigma), 4, 2, Runtime(torch.device("cpu")), config.seed)
    assert state["scale_factor"] == pytest.approx(expected, rel=1e-5)
    samples = z_mu + torch.randn(z_mu.shape, generator=torch.Generator().manual_seed(config.seed)) * z_sigma
    assert state["scale_factor"] == pytest.approx(1 / samples.double().std(unbiased=False).item(), rel=1e-4)

    # sampling: NIfTI files of the configured shape, a mosaic, reproducible with a seed, DDIM and DDPM
    assert sample_main(_args(out) + ["--num-samples", "2", "--output", str(tmp_path / "a"), "--seed", "3"]) == 0
    files = sorted((tmp_path / "a").glob("sample_*.nii.gz"))
    assert len(files) == 2 and (tmp_path / "a" / "samples.png").is_file()
    first = nib.load(files[0])
    assert first.shape == (16, 16, 16) and np.isfinite(first.get_fdata()).all()
    assert sample_main(_args(out) + ["--num-samples", "1", "--output", str(tmp_path / "b"), "--seed", "3"]) == 0
    again = nib.load(tmp_path / "b" / "sample_000.nii.gz").get_fdata()
    np.testing.assert_allclose(again, first.get_fdata(), atol=1e-6)
    assert sample_main(_args(out) + ["--num-samples", "1", "--output", str(tmp_path / "c"), "--scheduler", "ddpm"]) == 0
    # nothing is overwritten
    assert sample_main(_args(out) + ["--num-samples", "1", "--output", str(tmp_path / "b")]) == 2


def test_fast_dev_run_and_resume(autoencoder_run, tmp_path, capsys, caplog):
    out = _fresh_output(autoencoder_run, tmp_path)
    assert train_diffusion_main(_args(out, "diffusion.training.fast_dev_run=true")) == 0
    assert (out / "fast_dev_run" / "diffusion" / "checkpoints" / "last.pt").is_file()
    cache = ["diffusion.training.cache_latents_on_disk=true"]
    assert train_diffusion_main(_args(out, "diffusion.training.n_epochs=1", *cache)) == 0
    first = load_checkpoint(out / "diffusion" / "checkpoints" / "last.pt")
    assert first["loop"]["global_step"] == 2
    with caplog.at_level(logging.INFO, logger="monai_diffusion"):
        assert train_diffusion_main(_args(out, "diffusion.training.n_epochs=3", *cache) + ["--resume"]) == 0
    assert "latent cache: reusing" in caplog.text
    last = load_checkpoint(out / "diffusion" / "checkpoints" / "last.pt")
    assert last["loop"]["global_step"] == 6 and last["scale_factor"] == first["scale_factor"]
    assert all(int(s["step"]) == 6 for s in last["optimizers"]["unet"]["state"].values())
    assert train_diffusion_main(_args(out, "diffusion.num_channels=[8, 16]") + ["--resume"]) == 2
    assert "changes the UNet architecture" in capsys.readouterr().err


def test_clear_errors(autoencoder_run, tmp_path, capsys):
    assert train_diffusion_main(_args(tmp_path / "empty")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: diffusion.autoencoder_run:") and "train the autoencoder first" in err
    (tmp_path / "x").mkdir()
    out = _fresh_output(autoencoder_run, tmp_path / "x")
    assert train_diffusion_main(_args(out, "autoencoder.latent_channels=4")) == 2
    err = capsys.readouterr().err
    assert "does not match the config's autoencoder section (latent_channels: 3 -> 4)" in err
    assert train_diffusion_main(_args(out, "diffusion.num_channels=[8, 8, 8, 8]", "diffusion.attention_levels=[false, false, false, false]",
                                      "diffusion.num_head_channels=[0, 0, 0, 8]")) == 2
    assert "every latent axis must be divisible by 8" in capsys.readouterr().err
    assert sample_main(_args(tmp_path / "nothing") + ["--output", str(tmp_path / "s")]) == 2
    assert "train the diffusion model first" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["ddpm", "rflow"])
def test_ddp_two_cpu_processes(autoencoder_run, tmp_path, objective):
    out = _fresh_output(autoencoder_run, tmp_path)
    result = torchrun(SCRIPTS / "train_diffusion.py", *_args(out, "device=cpu", f"diffusion.scheduler.type={objective}"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "diffusion" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["optimizer_steps"] == 2  # 4 latents / (2 ranks x 2) x 2 epochs
    assert result.stdout.count("run folder:") == 1


def test_nifti_data_mixed_precision_accumulation_and_sample_affine(tmp_path):
    """Samples carry the training data's spacing/orientation; bf16 autocast and accumulation train."""
    folder = write_scans(tmp_path / "scans", (16, 16, 16), (0.8, 0.8, 2.5), prefix="c")
    data = ["data.source=nifti", f"data.paths={folder}", "data.val_fraction=0.25"]
    out = tmp_path / "out"
    assert train_autoencoder_main(_args(out, *data)) == 0
    assert train_diffusion_main(_args(out, *data, "diffusion.training.mixed_precision=true",
                                      "diffusion.training.gradient_accumulation_steps=2")) == 0
    summary = json.loads((out / "diffusion" / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["optimizer_steps"] == 2  # 3 latents: 2 batches / 2 per step x 2 epochs
    assert sample_main(_args(out, *data) + ["--output", str(tmp_path / "samples")]) == 0
    sample = nib.load(tmp_path / "samples" / "sample_000.nii.gz")
    np.testing.assert_allclose(sample.header.get_zooms(), (0.8, 0.8, 2.5), rtol=1e-5)
    assert nib.aff2axcodes(sample.affine) == ("R", "A", "S")
