"""A rectified-flow model through the command lines: it trains, resumes bit-exactly after kill -9 (with its
logit-normal times drawn from the saved random streams), and ``sample.py`` samples it without a flag, fixed by
``--seed``, refusing a sampler that does not suit it."""

from __future__ import annotations

import subprocess

import nibabel as nib
import numpy as np
import pytest

from monai_diffusion.runs.checkpoints import load_checkpoint
from tests.helpers.resume import ENV, _assert_identical, _command, _kill_after_step, _run

RFLOW = ["--set", "autoencoder.training.n_epochs=1", "--set", "diffusion.scheduler.type=rflow",
         "--set", "diffusion.training.n_epochs=3", "--set", "diffusion.training.val_interval=3"]


@pytest.mark.slow
def test_rflow_trains_resumes_bit_exactly_and_samples(tmp_path):
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    _run(_command("train_autoencoder.py", reference, *RFLOW))
    diffusion = [*RFLOW, "--set", f"diffusion.autoencoder_run={reference / 'autoencoder'}"]
    _run(_command("train_diffusion.py", reference, *diffusion))
    run_dir = crashed / "diffusion"
    _kill_after_step(_command("train_diffusion.py", crashed, *diffusion), run_dir, 3)
    _kill_after_step(_command("train_diffusion.py", crashed, *diffusion, "--resume"), run_dir, 7)
    _run(_command("train_diffusion.py", crashed, *diffusion, "--resume"))
    ref, got = (load_checkpoint(p / "diffusion" / "checkpoints" / "last.pt") for p in (reference, crashed))
    assert ref["config"]["diffusion"]["scheduler"]["type"] == "rflow"  # the run stores its objective
    assert got["loop"]["global_step"] == ref["loop"]["global_step"] == 12
    _assert_identical(ref, got, ["unet", "ema", "optimizers"])

    def sample(out: str, *extra: str) -> subprocess.CompletedProcess:
        cmd = _command("sample.py", reference, "--output", str(tmp_path / out), "--num-samples", "2",
                       "--batch-size", "2", "--seed", "5", *extra)
        return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)

    first, again = sample("a", "--steps", "3"), sample("b", "--steps", "3")  # no --scheduler: rflow, as trained
    assert first.returncode == 0 == again.returncode, first.stderr[-2000:]
    volumes = [[nib.load(tmp_path / out / f"sample_00{i}.nii.gz").get_fdata() for i in range(2)] for out in "ab"]
    assert all(np.array_equal(x, y) for x, y in zip(*volumes))
    assert (tmp_path / "a" / "samples.png").is_file()
    wrong = sample("c", "--scheduler", "ddim", "--steps", "3")
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines()[-1].startswith("error: --scheduler ddim: the run ")
    assert "diffusion.scheduler.type = rflow" in wrong.stderr


@pytest.mark.slow
def test_conditional_rflow_on_a_patch_trained_autoencoder_samples_with_guidance(tmp_path):
    """Covariate conditioning, classifier-free guidance, a patch-trained autoencoder (tiled decoding) and the
    on-disk latent cache, with rectified flow."""
    import csv

    from monai_diffusion.cli import sample_main, train_autoencoder_main, train_diffusion_main
    from tests.helpers import CONFIG, PHANTOMS, cli_args

    args = cli_args(CONFIG, tmp_path, *PHANTOMS, "diffusion.scheduler.type=rflow", "data.patch_size=[8, 8, 8]",
                    "data.patches_per_volume=2", "autoencoder.tile_size=16")
    assert train_autoencoder_main(args) == 0
    assert train_diffusion_main(args) == 0
    assert train_diffusion_main(args + ["--set", "diffusion.training.n_epochs=3", "--resume"]) == 0
    out = tmp_path / "samples"
    assert sample_main(args + ["--output", str(out), "--num-samples", "1", "--batch-size", "2", "--guidance-scale",
                               "2", "--condition", "cavity=0,1", "size=0.7", "--steps", "3"]) == 0
    assert [r["cavity"] for r in csv.DictReader((out / "conditions.csv").open())] == ["0", "1"]
    volumes = [nib.load(out / f"sample_00{i}.nii.gz").get_fdata() for i in range(2)]
    assert all(v.shape == (16, 16, 16) and np.isfinite(v).all() for v in volumes)
