"""Evaluation of generated volumes: FID, MMD and diversity behave on controlled inputs, an exact copy of a
training volume is flagged, and the command line writes its results (with and without MedicalNet weights)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_diffusion.cli import evaluate_samples_main, sample_main
from monai_diffusion.data import SyntheticPhantomDataset, build_datasets
from monai_diffusion.evaluation.perceptual import MedicalNetResNet, load_medicalnet_weights
from monai_diffusion.evaluation.sample_quality import (
    feature_distances,
    mean_pairwise_ms_ssim,
    medicalnet_features,
    nearest_neighbours,
)
from tests.helpers import OLD, write_medicalnet_file


@pytest.fixture(scope="module")
def phantoms() -> list[torch.Tensor]:
    dataset = SyntheticPhantomDataset(8, (32, 32, 32), seed=5)
    return [dataset[i]["image"] for i in range(len(dataset))]


def test_fid_and_mmd_are_near_zero_for_the_same_volumes_and_large_for_noise(tmp_path, phantoms):
    write_medicalnet_file(tmp_path / "w.pth", seed=1)
    network = MedicalNetResNet("resnet10")
    load_medicalnet_weights(network, tmp_path / "w.pth")
    real = medicalnet_features(phantoms, network, torch.device("cpu"))
    assert real.shape == (8, 512)
    noise = medicalnet_features([torch.rand_like(v) for v in phantoms], network, torch.device("cpu"))
    same, different = feature_distances(real, real), feature_distances(noise, real)
    # near zero: the unbiased MMD estimate of a set against itself is slightly negative (its cross term keeps the
    # self-similarities), far below the distance to noise
    assert abs(same["fid"]) < 1e-6 and different["fid"] > 1e3 * max(abs(same["fid"]), 1e-6)
    assert abs(same["mmd"]) < 0.01 * different["mmd"]


def test_diversity_of_identical_sets_and_of_copies(phantoms):
    real = mean_pairwise_ms_ssim(phantoms)
    assert 0 < real < 1 and mean_pairwise_ms_ssim(list(phantoms)) == real
    assert mean_pairwise_ms_ssim([phantoms[0]] * 4) == pytest.approx(1.0, abs=1e-5)  # no diversity at all


def test_nearest_neighbour_flags_an_exact_copy(phantoms):
    generated = [torch.rand_like(phantoms[0]), phantoms[3].clone()]
    (_, noise_score), (index, copy_score) = nearest_neighbours(generated, phantoms)
    assert index == 3 and copy_score == pytest.approx(1.0, abs=1e-5) and noise_score < 0.5


def test_command_line_with_and_without_medicalnet(tmp_path, capsys):
    samples = tmp_path / "samples"
    args = ["--config", str(OLD / "diffusion" / "config.yaml"), "--run", str(OLD / "diffusion"), "--output",
            str(samples), "--num-samples", "3", "--batch-size", "3", "--steps", "2"]
    assert sample_main(args) == 0
    config_data = load_config_of_old_run()
    copy = build_datasets(config_data.data, seed=config_data.seed)[0][1]["image"]  # a training volume
    nib.save(nib.Nifti1Image(copy[0].numpy(), np.eye(4)), samples / "copy.nii.gz")
    capsys.readouterr()
    assert evaluate_samples_main(["--run", str(OLD / "diffusion"), "--samples", str(samples)]) == 0
    out = capsys.readouterr().out
    assert "FID and MMD not computed" in out and "likely copies of training volumes (SSIM >= 0.95): copy.nii.gz" in out
    summary = json.loads((samples / "evaluation" / "summary.json").read_text())
    assert summary["copies"] == ["copy.nii.gz"] and summary["generated_volumes"] == 4
    assert (samples / "evaluation" / "closest_pairs.png").is_file()
    write_medicalnet_file(tmp_path / "w.pth")
    assert evaluate_samples_main(["--run", str(OLD / "diffusion"), "--samples", str(samples), "--output",
                                  str(tmp_path / "with_features"), "--medicalnet-weights", str(tmp_path / "w.pth")]) == 0
    summary = json.loads((tmp_path / "with_features" / "summary.json").read_text())
    assert summary["features"]["feature_count"] == 512 and summary["features"]["generated_count"] == 4
    assert np.isfinite(summary["fid"]) and "mmd" in summary
    # bad input: a sample of another size, one line and exit 2
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), samples / "small.nii.gz")
    assert evaluate_samples_main(["--run", str(OLD / "diffusion"), "--samples", str(samples), "--output",
                                  str(tmp_path / "x")]) == 2
    assert "small.nii.gz has shape [8, 8, 8] but the model generates [16, 16, 16]" in capsys.readouterr().err


def load_config_of_old_run():
    from monai_diffusion.runs.checkpoints import load_diffusion

    return load_diffusion(OLD / "diffusion").config
