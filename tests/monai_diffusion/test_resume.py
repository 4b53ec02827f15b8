"""Crash safety: kill -9 at random moments, --resume, and the final weights equal an uninterrupted run's,
bit for bit (CPU, deterministic settings), for the autoencoder, diffusion and ControlNet scripts: the autoencoder
on random patches with augmentation, a warm-up and a cosine schedule and gradient clipping. Also checkpoint rotation."""

from __future__ import annotations

import random

import pytest
import torch

from monai_diffusion.runs.checkpoints import load_checkpoint
from tests.helpers.resume import COMMON, CONFIG, ENV, ROOT, SCRIPTS, _assert_identical, _command, _kill_after_step, _run  # noqa: F401


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0])
def test_kill_and_resume_is_bit_exact_for_every_stage(tmp_path, seed):
    rng = random.Random(seed)
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"

    # stage 1: 4 epochs x 4 steps; three kills at random steps, each resumed
    _run(_command("train_autoencoder.py", reference))
    run_dir = crashed / "autoencoder"
    kills = sorted(rng.sample(range(1, 14), 3))
    _kill_after_step(_command("train_autoencoder.py", crashed), run_dir, kills[0])
    for step in kills[1:]:
        _kill_after_step(_command("train_autoencoder.py", crashed, "--resume"), run_dir, step)
    _run(_command("train_autoencoder.py", crashed, "--resume"))
    ref, got = (load_checkpoint(p / "autoencoder" / "checkpoints" / "last.pt") for p in (reference, crashed))
    assert got["loop"]["global_step"] == ref["loop"]["global_step"] == 16
    _assert_identical(ref, got, ["autoencoder", "discriminator", "optimizers", "scaler"])
    # rotation: the newest 3 step checkpoints are kept, and last.pt is the newest of them
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt"))
    assert steps == ["step_00000014.pt", "step_00000015.pt", "step_00000016.pt"]

    # stage 2 on the reference autoencoder: 6 epochs x 4 steps
    diffusion = ["--set", f"diffusion.autoencoder_run={reference / 'autoencoder'}"]
    _run(_command("train_diffusion.py", reference, *diffusion))
    run_dir = crashed / "diffusion"
    kills = sorted(rng.sample(range(1, 22), 3))
    _kill_after_step(_command("train_diffusion.py", crashed, *diffusion), run_dir, kills[0])
    for step in kills[1:]:
        _kill_after_step(_command("train_diffusion.py", crashed, *diffusion, "--resume"), run_dir, step)
    _run(_command("train_diffusion.py", crashed, *diffusion, "--resume"))
    ref, got = (load_checkpoint(p / "diffusion" / "checkpoints" / "last.pt") for p in (reference, crashed))
    assert got["loop"]["global_step"] == ref["loop"]["global_step"] == 24
    assert got["scale_factor"] == ref["scale_factor"]
    _assert_identical(ref, got, ["unet", "ema", "optimizers"])

    # stage 3 on the reference diffusion model: a ControlNet on the phantoms' label maps (cached beside the
    # latents on disk and reused on resume), with EMA: 2 epochs x 4 steps; killed once in the first epoch (mid-epoch)
    # and once in the second (after the first epoch's validation), each resumed
    controlnet = ["--set", f"controlnet.diffusion_run={reference / 'diffusion'}", "--set", "data.num_classes=22",
                  "--set", "controlnet.training.n_epochs=2", "--set", "controlnet.training.batch_size=2",
                  "--set", "controlnet.training.val_interval=1", "--set", "controlnet.training.ema_decay=0.9",
                  "--set", "controlnet.training.preview_inference_steps=2",
                  "--set", "controlnet.training.checkpoint_every_n_steps=1",
                  "--set", "controlnet.training.cache_latents_on_disk=true", "--set", "controlnet.conditioning_channels=4"]
    _run(_command("train_controlnet.py", reference, *controlnet))
    run_dir = crashed / "controlnet"
    kills = [rng.randrange(1, 4), rng.randrange(4, 7)]  # >= 4: after the first validation; <= 6: before the end
    _kill_after_step(_command("train_controlnet.py", crashed, *controlnet), run_dir, kills[0])
    _kill_after_step(_command("train_controlnet.py", crashed, *controlnet, "--resume"), run_dir, kills[1])
    _run(_command("train_controlnet.py", crashed, *controlnet, "--resume"))
    ref, got = (load_checkpoint(p / "controlnet" / "checkpoints" / "last.pt") for p in (reference, crashed))
    assert got["loop"]["global_step"] == ref["loop"]["global_step"] == 8
    _assert_identical(ref, got, ["controlnet", "ema", "optimizers", "unet"])
    frozen = load_checkpoint(reference / "diffusion" / "checkpoints" / "best.pt")
    assert all(torch.equal(frozen["ema"][f"module.{k}"], v) for k, v in got["unet"].items())  # the UNet stayed frozen
    assert "train_label" in torch.load(run_dir / "latent_cache_rank0.pt", weights_only=True)
