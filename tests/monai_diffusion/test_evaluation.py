"""Reconstruction metrics, evaluate_autoencoder.py and compare_factors.py."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import MultiScaleSSIMMetric

from monai_diffusion.cli import compare_factors_main, evaluate_autoencoder_main
from monai_diffusion.config import ConfigError, load_config
from monai_diffusion.evaluation.factor_study import parse_factors, recommended_latent_channels, variant_config
from monai_diffusion.evaluation.metrics import LatentStatistics, ReconstructionMetrics, ms_ssim_settings, ssim_window
from tests.helpers import CONFIGS, tiny, train, write_scans


# ---------------------------------------------------------------------------------------------- metrics
def test_identical_volumes_give_infinite_psnr_and_perfect_similarity():
    x = torch.rand(2, 1, 32, 32, 32)
    values = ReconstructionMetrics(3, (32, 32, 32))(x.clone(), x)
    assert torch.isinf(values["psnr"]).all()
    torch.testing.assert_close(values["ssim"], torch.ones(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(values["ms_ssim"], torch.ones(2), atol=1e-4, rtol=0)
    assert float(values["l1"].max()) == 0.0


def test_known_noise_gives_the_expected_psnr_and_l1():
    """x = 0.5 +- 0.1 (random signs): MSE 0.01 exactly, so PSNR = 10 log10(1 / 0.01) = 20 dB, L1 = 0.1."""
    generator = torch.Generator().manual_seed(0)
    target = torch.full((1, 1, 24, 24, 24), 0.5)
    signs = torch.randint(0, 2, target.shape, generator=generator).float() * 2 - 1
    values = ReconstructionMetrics(3, (24, 24, 24))(target + 0.1 * signs, target)
    assert float(values["psnr"][0]) == pytest.approx(20.0, abs=1e-4)
    assert float(values["l1"][0]) == pytest.approx(0.1, abs=1e-6)
    assert 0 < float(values["ssim"][0]) < 0.5  # pure noise around a flat volume has little structure


def test_reconstructions_are_clipped_to_the_data_range():
    target = torch.full((1, 1, 16, 16, 16), 1.0)
    values = ReconstructionMetrics(3, (16, 16, 16))(target + 5.0, target)  # clipped back to 1
    assert torch.isinf(values["psnr"]).all()


@pytest.mark.parametrize("size,expected", [
    (176, (11, 5)), (160, (9, 5)), (64, (7, 4)), (32, (7, 3)), (16, (7, 2)), (8, (3, 2)), (4, None),
])
def test_ms_ssim_uses_the_most_scales_that_fit_and_monai_accepts_them(size, expected):
    setting = ms_ssim_settings((size, size + 8, size))
    if expected is None:
        assert setting is None
        return
    window, weights = setting
    assert (window, len(weights)) == expected
    assert sum(weights) == pytest.approx(1.0)
    x = torch.rand(1, 1, size, size + 8, size)
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=window, weights=weights)
    assert torch.isfinite(metric(x * 0.9, x)).all()  # MONAI's own size checks pass


def test_ssim_window_is_odd_and_fits():
    assert ssim_window((64, 64, 32)) == 11 and ssim_window((8, 16, 16)) == 7 and ssim_window((5, 9, 9)) == 5


def test_latent_statistics_give_the_diffusion_scale_factor():
    generator = torch.Generator().manual_seed(1)
    stats = LatentStatistics()
    mus = [torch.randn(1, 3, 4, 4, 4, generator=generator) * 2.5 + 1.0 for _ in range(40)]
    for mu in mus:
        stats.update(mu, torch.zeros_like(mu))  # sigma = 0: the samples are the means
    summary = stats.summary()
    everything = torch.cat([m.flatten() for m in mus]).double()
    assert summary["z_std"] == pytest.approx(float(everything.std(unbiased=False)), rel=1e-9)
    assert summary["scale_factor"] == pytest.approx(1 / summary["z_std"])
    assert summary["z_mean"] == pytest.approx(float(everything.mean()), abs=1e-9)
    assert summary["latent_shape"] == [3, 4, 4, 4]
    noisy = LatentStatistics()
    noisy.update(torch.zeros(1, 3, 8, 8, 8), torch.full((1, 3, 8, 8, 8), 2.0))
    assert noisy.summary()["z_std"] == pytest.approx(2.0, rel=0.1)  # sampled z = 0 + 2 * eps


# ------------------------------------------------------------------------------------------ evaluation
@pytest.fixture(scope="module")
def nifti_run(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny autoencoder trained on NIfTI files with a non-identity affine; returns (run, folder)."""
    root = tmp_path_factory.mktemp("evaluation")
    folder = write_scans(root / "scans", (16, 16, 16), (1.5, 1.5, 2.0))
    assert train(CONFIGS / "ldm_config.yaml", root, *tiny(), "data.source=nifti", f"data.paths={folder}",
                 "data.val_fraction=0.5", "autoencoder.training.n_epochs=2") == 0
    return root / "autoencoder", folder


def test_evaluate_writes_csv_nifti_png_and_summary(nifti_run, tmp_path, capsys):
    run, folder = nifti_run
    out = tmp_path / "eval"
    assert evaluate_autoencoder_main(["--run", str(run), "--data", str(folder), "--output", str(out)]) == 0
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows] == [f"case{i}" for i in range(4)]
    for row in rows:
        assert all(math.isfinite(float(row[key])) for key in ("l1", "psnr", "ssim", "ms_ssim"))
        written = nib.load(out / row["reconstruction"])
        np.testing.assert_allclose(written.affine, nib.load(folder / f"{row['name']}.nii.gz").affine, atol=1e-6)
        assert written.shape == (16, 16, 16)
    summary = json.loads((out / "summary.json").read_text())
    psnr = [float(r["psnr"]) for r in rows]
    assert summary["metrics"]["psnr"]["mean"] == pytest.approx(np.mean(psnr))
    assert summary["metrics"]["psnr"]["std"] == pytest.approx(np.std(psnr))
    assert summary["latent"]["latent_shape"] == [3, 4, 4, 4] and summary["latent"]["scale_factor"] > 0
    assert summary["metric_settings"]["ms_ssim"] == {"window": 7, "scales": 2, "weights": [0.1356, 0.8644]}
    assert summary["mosaic"]["worst"][0] == rows[int(np.argmin(psnr))]["name"]
    assert (out / "worst_best.png").stat().st_size > 0
    assert "psnr" in capsys.readouterr().out


def test_evaluate_refuses_to_overwrite_and_checks_tiles(nifti_run, tmp_path, capsys):
    run, folder = nifti_run
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.csv").write_text("keep me")
    assert evaluate_autoencoder_main(["--run", str(run), "--output", str(out)]) == 2
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    assert (out / "metrics.csv").read_text() == "keep me"
    assert evaluate_autoencoder_main(["--run", str(run), "--output", str(tmp_path / "t"), "--tile-size", "6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tile-size") and "use 4 or 8" in err
    assert evaluate_autoencoder_main(["--run", str(tmp_path / "missing"), "--output", str(tmp_path / "m")]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_tiled_evaluation_through_the_cli(nifti_run, tmp_path):
    """Tiles as large as the volume reproduce whole-volume reconstructions; smaller tiles run and keep the
    shape (their agreement on a trained network is tested in test_tiling.py)."""
    run, folder = nifti_run
    outputs = {}
    for label, tile in (("whole", None), ("same", "16"), ("small", "12")):
        out = tmp_path / label
        args = ["--run", str(run), "--data", str(folder), "--output", str(out)] + (["--tile-size", tile] if tile else [])
        assert evaluate_autoencoder_main(args) == 0
        outputs[label] = [nib.load(path).get_fdata() for path in sorted((out / "reconstructions").glob("*.nii.gz"))]
    for whole, same, small in zip(outputs["whole"], outputs["same"], outputs["small"]):
        np.testing.assert_allclose(same, whole, atol=1e-5)
        assert small.shape == whole.shape and np.isfinite(small).all()
    assert json.loads((tmp_path / "small" / "summary.json").read_text())["tiling"] == {
        "tile_size": 12, "tile_overlap": 0.5, "method": "exact", "fallback": None}


def test_evaluate_a_2d_model(tmp_path):
    """2D configs train and evaluate on centre slices: one-slice NIfTI placed at that slice, 2D pictures."""
    folder = write_scans(tmp_path / "scans", (16, 16, 8), (1.0, 1.0, 3.0), count=2, seed=1, prefix="slab")
    assert train(CONFIGS / "ldm_config.yaml", tmp_path, *tiny(), "data.source=nifti", f"data.paths={folder}",
                 "data.image_size=[16, 16, 8]", "autoencoder.spatial_dims=2") == 0
    out = tmp_path / "eval"
    assert evaluate_autoencoder_main(["--run", str(tmp_path / "autoencoder"), "--data", str(folder),
                                      "--output", str(out), "--tile-size", "8", "8"]) == 0
    written = nib.load(out / "reconstructions" / "slab0.nii.gz")
    assert written.shape == (16, 16, 1)
    np.testing.assert_allclose(written.affine[:3, 3], [0.0, 0.0, 12.0])  # slice 4 of 8, 3 mm apart
    summary = json.loads((out / "summary.json").read_text())
    assert summary["latent"]["latent_shape"] == [3, 4, 4]
    from PIL import Image

    assert Image.open(out / "worst_best.png").size == (110 + 128, 6 * 128)  # one 2D image per row


def test_bad_evaluation_arguments_are_one_line_errors(nifti_run, tmp_path, capsys):
    run, _ = nifti_run
    taken = tmp_path / "a_file"
    taken.write_text("x")
    assert evaluate_autoencoder_main(["--run", str(run), "--output", str(taken)]) == 2
    assert "already exists and is not an empty folder" in capsys.readouterr().err and taken.read_text() == "x"
    assert evaluate_autoencoder_main(["--run", str(run), "--output", str(tmp_path / "d"), "--device", "gpu"]) == 2
    assert "'gpu' is not a device" in capsys.readouterr().err
    assert evaluate_autoencoder_main(["--run", str(run), "--output", str(tmp_path / "e"), "--data",
                                      str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("error: --data")


# ------------------------------------------------------------------------------------------ comparison
def test_variants_resize_levels_and_follow_the_latent_channel_advice(tmp_path):
    config = load_config(CONFIGS / "ldm_config.yaml", tiny())
    name, sixteen = variant_config(config, [16], True, tmp_path, 7)
    assert name == "f16_c8" and sixteen.output_dir == str(tmp_path / "f16_c8")
    assert sixteen.autoencoder.num_channels == [8, 8] and len(sixteen.autoencoder.attention_levels) == 2
    assert sixteen.autoencoder.latent_channels == 8 and sixteen.autoencoder.training.max_steps == 7
    name, deeper = variant_config(config, [2, 2, 2], False, tmp_path, 7)
    assert name == "f2_2_2_c3" and deeper.autoencoder.num_channels == [8, 8, 8, 8]
    assert [recommended_latent_channels(f) for f in (2, 4, 8, 16, 32)] == [3, 3, 4, 8, 8]
    assert variant_config(config, [[4, 4, 2], 2], True, tmp_path, 1)[1].autoencoder.latent_channels == 4
    with pytest.raises(ConfigError, match="--factors"):
        parse_factors("4, 2]")
    with pytest.raises(ConfigError, match=r"--factors \[3, 3\]"):
        variant_config(config, [3, 3], False, tmp_path, 1)  # 16 is not divisible by 9


def test_two_variant_comparison_at_tiny_size(tmp_path, capsys):
    out = tmp_path / "study"
    args = ["--config", str(CONFIGS / "quickstart.yaml"), "--factors", "[2, 2]", "[4]", "--steps", "3",
            "--adjust-latent-channels", "--output", str(out)]
    for item in tiny(size="[16, 16, 16]"):
        args += ["--set", item]
    assert compare_factors_main(args) == 0
    with (out / "comparison.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["variant"] for r in rows] == ["f2_2_c3", "f4_c3"]
    for row in rows:
        assert float(row["step_memory_mib"]) > 0 and float(row["step_seconds"]) > 0
        assert math.isfinite(float(row["psnr_mean"])) and 0 <= float(row["ssim_mean"]) <= 1
        run = Path(row["run_dir"])
        assert json.loads((run / "summary.json").read_text())["optimizer_steps"] == 3  # the same budget
        assert (run / "evaluation" / "metrics.csv").is_file()
    assert rows[0]["latent_shape"] == "3x4x4x4" and rows[1]["latent_shape"] == "3x4x4x4"
    assert (out / "comparison.png").stat().st_size > 0
    table = (out / "comparison.md").read_text()
    assert "| [2, 2] |" in table and "| [4] |" in table and "| [2, 2] |" in capsys.readouterr().out
    assert compare_factors_main(args) == 2  # an existing study is never overwritten
    assert "already exists" in capsys.readouterr().err
    other = [str(tmp_path / "other") if a == str(out) else a for a in args]
    assert compare_factors_main([*other, "--steps", "0"]) == 2
    assert "--steps: expected an integer >= 1, got 0" in capsys.readouterr().err and not (tmp_path / "other").exists()
