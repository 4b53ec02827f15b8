"""Runs written by monai-diffusion 0.4.0 (tests/fixtures/run_0_4_0) still load, give the same numbers,
sample and resume: every command, config key and checkpoint from before still works."""

from __future__ import annotations

import torch

from monai_diffusion.cli import sample_main, train_autoencoder_main
from monai_diffusion.config import load_config
from monai_diffusion.data import make_phantom
from monai_diffusion.generation.sampling import SamplingRequest, generate_volumes
from monai_diffusion.runs.checkpoints import load_autoencoder, load_checkpoint, load_diffusion
from tests.helpers import OLD
from tests.helpers.tolerance import accumulated_terms, assert_close_fp32


def test_old_configs_load_for_both_stages():
    for stage in ("autoencoder", "diffusion"):
        config = load_config(OLD / stage / "config.yaml", stage="diffusion")
        assert config.data.image_size == (16, 16, 16) and config.seed == 3


def test_old_autoencoder_checkpoint_reconstructs_as_before(old_expected):
    model, config = load_autoencoder(OLD / "autoencoder" / "checkpoints" / "last.pt")
    x = torch.from_numpy(make_phantom((16, 16, 16), old_expected["phantom_seed"]))[None, None].float()
    with torch.no_grad():
        # stored on another machine: equal up to the reordering of fp32 sums (see tests/_tolerance.py)
        assert_close_fp32(model.reconstruct(x), old_expected["reconstruction"], accumulated_terms(model))


def test_old_diffusion_checkpoint_samples_as_before(tmp_path, old_expected):
    unet, autoencoder, config, scale_factor, _, conditioning = load_diffusion(OLD / "diffusion")
    assert not conditioning.active  # 0.4 models are unconditional
    assert scale_factor == old_expected["scale_factor"]
    volumes = generate_volumes(unet, autoencoder, SamplingRequest(config, scale_factor, 2, 2, "ddim", torch.Generator().manual_seed(0)))
    # two UNet passes and a decode, each accumulating its layers' products (tests/_tolerance.py)
    terms = 2 * accumulated_terms(unet) + accumulated_terms(autoencoder)
    assert_close_fp32(volumes, old_expected["ddim_2_steps_seed_0"], terms)
    out = tmp_path / "samples"
    args = ["--config", str(OLD / "diffusion" / "config.yaml"), "--run", str(OLD / "diffusion"), "--output", str(out),
            "--num-samples", "2", "--batch-size", "2", "--steps", "2"]
    assert sample_main(args) == 0 and len(list(out.glob("sample_*.nii.gz"))) == 2


def test_old_run_resumes(old_run):
    run = old_run  # a writable copy: --resume continues it in place
    args = ["--config", str(OLD / "autoencoder" / "config.yaml"), "--set", f"output_dir={run}",
            "--set", "autoencoder.training.n_epochs=3", "--resume"]
    assert train_autoencoder_main(args) == 0
    state = load_checkpoint(run / "autoencoder" / "checkpoints" / "last.pt")
    assert state["loop"]["epoch"] == 3 and state["loop"]["global_step"] == 6  # 2 steps per epoch, from epoch 2
