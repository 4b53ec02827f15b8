"""Image/label pairs through the command lines: the three stages on a CSV datalist of NIfTI images with label
maps, then sampling from two masks (every pair shares its mask's affine), and the Dice of the pairs beside
unconditional samples of the same run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_diffusion.cli import (
    evaluate_samples_main,
    sample_main,
    train_autoencoder_main,
    train_controlnet_main,
    train_diffusion_main,
)
from monai_diffusion.config.schema import PHANTOM_NUM_CLASSES
from monai_diffusion.data import make_labelled_phantom

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "monai_diffusion" / "config" / "ldm_config.yaml"
TINY = [
    "data.image_size=[16, 16, 16]", "data.source=nifti", f"data.num_classes={PHANTOM_NUM_CLASSES}",
    "data.val_fraction=0.25", "data.intensity_window=[0, 1]",
    "autoencoder.num_channels=[8, 8, 8]", "autoencoder.norm_num_groups=4",
    "autoencoder.discriminator.num_layers_d=1", "autoencoder.training.batch_size=2",
    "autoencoder.training.n_epochs=1",
    "diffusion.num_channels=[8]", "diffusion.attention_levels=[false]", "diffusion.num_head_channels=[8]",
    "diffusion.norm_num_groups=4", "diffusion.training.n_epochs=1", "diffusion.scheduler.num_train_timesteps=20",
    "diffusion.training.preview_inference_steps=2", "diffusion.sampling.num_inference_steps=2",
    "controlnet.training.n_epochs=1", "controlnet.training.preview_inference_steps=2",
    "controlnet.conditioning_channels=4", "device=cpu",
]
AFFINE = np.array([[2.0, 0, 0, -10.0], [0, 2.0, 0, 4.0], [0, 0, 3.0, 7.5], [0, 0, 0, 1]])


def _argv(out: Path, datalist: Path) -> list[str]:
    argv = ["--config", str(CONFIG), "--set", f"output_dir={out}", "--set", f"data.paths={datalist}"]
    for item in TINY:
        argv += ["--set", item]
    return argv


@pytest.mark.slow
def test_three_stages_on_a_labelled_datalist_then_pairs_from_masks(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = ["image,label"]
    for index in range(5):
        image, classes = make_labelled_phantom((16, 16, 16), index, organs="typed")
        nib.save(nib.Nifti1Image(image, AFFINE), data / f"ct{index}.nii.gz")
        nib.save(nib.Nifti1Image(classes, AFFINE), data / f"ct{index}_seg.nii.gz")
        rows.append(f"ct{index}.nii.gz,ct{index}_seg.nii.gz")
    (data / "train.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "runs"
    argv = _argv(out, data / "train.csv")
    assert train_autoencoder_main(argv) == 0
    assert train_diffusion_main(argv) == 0
    assert train_controlnet_main(argv) == 0
    summary = json.loads((out / "controlnet" / "summary.json").read_text())
    assert summary["num_classes"] == PHANTOM_NUM_CLASSES
    masks = []
    for index, seed in enumerate((100, 101)):  # held-out masks, each with its own affine
        _, classes = make_labelled_phantom((16, 16, 16), seed, organs="typed")
        affine = AFFINE.copy()
        affine[:3, 3] += 5.0 * (index + 1)
        nib.save(nib.Nifti1Image(classes, affine), tmp_path / f"mask{index}.nii.gz")
        masks.append((tmp_path / f"mask{index}.nii.gz", classes, affine))
    samples = tmp_path / "samples"
    assert sample_main(argv + ["--mask", str(masks[0][0]), "--mask", str(masks[1][0]), "--num-samples", "2",
                               "--output", str(samples), "--conditioning-scale", "1.5"]) == 0
    datalist = json.loads((samples / "datalist.json").read_text())["training"]
    assert len(datalist) == 4 and (samples / "samples.png").is_file()
    for index, row in enumerate(datalist):
        _, classes, affine = masks[index // 2]
        image, label = nib.load(samples / row["image"]), nib.load(samples / row["label"])
        assert row["mask"] == str(masks[index // 2][0])
        assert np.allclose(image.affine, affine) and np.allclose(label.affine, affine)
        assert np.array_equal(np.asarray(label.dataobj), classes) and image.shape == (16, 16, 16)
    unconditional = tmp_path / "unconditional"
    assert sample_main(argv + ["--num-samples", "2", "--output", str(unconditional)]) == 0
    report = tmp_path / "dice"
    assert evaluate_samples_main(["--masks", "--samples", str(samples), "--unconditional", str(unconditional),
                                  "--segmenter", "phantom-typed", "--output", str(report)]) == 0
    result = json.loads((report / "results.json").read_text())
    assert result["pairs"] == 4 and result["unconditional_samples"] == 2
    assert {"body", "1", "2", "3", "4"} <= set(result["dice"]) and 0 <= result["dice"]["body"] <= 1
    assert result["ceiling"]["body"] > 0.8 and result["ceiling"]["3"] > 0.9  # the segmenter on real phantoms


@pytest.mark.slow
def test_masks_benchmark_runs_end_to_end_and_reports_every_row(tmp_path):
    """benchmarks/masks.py with a few steps of each stage (its numbers are meaningless here; the results files of
    the full run are in benchmarks/results/masks*.md): it trains, samples, segments and writes every row."""
    out = tmp_path / "bench"
    command = [sys.executable, str(ROOT / "benchmarks" / "masks.py"), "--output", str(out), "--steps", "2", "2", "2",
               "--masks", "2", "--num-train", "4", "--sampling-steps", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["headline_classes"] == ["body", "3", "4"]  # typed organs: the segmenter names both
    assert report["settings"]["organs"] == "typed" and report["settings"]["steps"] == [2, 2, 2]
    for row in ("controlnet", "chance", "autoencoder", "ceiling"):
        assert 0.0 <= report["headline"][row] <= 1.0 and {"body", "3", "4"} <= set(report[row]), row
    assert min(report["ceiling"][c] for c in ("body", "3", "4")) > 0.95
    assert all(report["seconds"][stage] > 0 for stage in ("autoencoder", "diffusion", "controlnet"))
    assert "| autoencoder |" in (out / "results.md").read_text() and len(list((out / "pairs").rglob("*.nii.gz"))) == 4
