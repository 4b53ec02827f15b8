"""How good generated volumes are, compared with real ones: FID and MMD of 3D features, diversity, and copies
of training volumes.

* **FID and MMD** on 3D features of the MedicalNet ResNet (``perceptual.py``), from local weights: each
  volume is standardised as the perceptual loss does, the last stage's output is averaged over space, and
  MONAI's ``FIDMetric`` and ``MMDMetric`` (linear-kernel MMD², the same number of volumes on each side)
  compare the two feature sets: the 3D FID used by HA-GAN, WDM and 3D-MedDiffusion. FID values are only
  comparable for the same feature network and similar sample counts, so both are written beside them.
  Without MedicalNet weights these two are skipped with a message; the rest runs.
* **Diversity**: the mean MS-SSIM over pairs of generated volumes, beside the same figure for real
  volumes (a model that always draws the same volume scores close to 1; real data sets score lower).
* **Memorisation**: for every generated volume its nearest training volume by SSIM; a sample at or above
  ``copy_threshold`` is flagged as a likely copy.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.metrics import FIDMetric, MMDMetric, MultiScaleSSIMMetric, SSIMMetric
from tqdm import tqdm

from monai_diffusion.data import build_datasets, build_file_dataset, find_nifti_files
from monai_diffusion.errors import ConfigError, DataError
from monai_diffusion.evaluation.metrics import ms_ssim_settings, ssim_window
from monai_diffusion.evaluation.perceptual import MedicalNetResNet, load_medicalnet_weights
from monai_diffusion.evaluation.reconstruction import finite_json
from monai_diffusion.runs.checkpoints import load_diffusion
from monai_diffusion.runs.folders import check_new_folder, claim_output_folder
from monai_diffusion.runtime import resolve_device
from monai_diffusion.visualize import labelled_rows, orthogonal_slices, save_png

__all__ = ["SampleEvaluation", "medicalnet_features", "feature_distances", "mean_pairwise_ms_ssim",
           "nearest_neighbours", "evaluate_samples", "format_sample_summary"]

log = logging.getLogger("monai_diffusion")


def medicalnet_features(volumes: Sequence[torch.Tensor], network: MedicalNetResNet, device: torch.device,
                        batch_size: int = 2) -> torch.Tensor:
    """NxF features: each CxHxWxD volume (channels averaged, standardised) through ``network``, the last
    stage's output averaged over space."""
    rows = []
    network = network.to(device).eval()
    with torch.no_grad():
        for start in range(0, len(volumes), batch_size):
            x = torch.stack([v.float().mean(0, keepdim=True) for v in volumes[start : start + batch_size]])
            dims = tuple(range(1, x.dim()))
            x = (x - x.mean(dim=dims, keepdim=True)) / (x.std(dim=dims, keepdim=True) + 1e-6)
            rows.append(network(x.to(device))[-1].float().mean(dim=(2, 3, 4)).cpu())
    return torch.cat(rows).double()


def feature_distances(generated: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """FID (MONAI's FIDMetric) and linear-kernel MMD² (MONAI's MMDMetric, on the first ``min(N, M)`` of each)."""
    count = min(len(generated), len(real))
    if count < 2:  # a covariance of one feature vector is NaN, and the FID's matrix square root of it never ends
        return {"fid": float("nan"), "mmd": float("nan")}
    fid = float(FIDMetric()(generated, real))
    mmd = float(MMDMetric()(real[:count], generated[:count])) if count >= 2 else float("nan")
    return {"fid": fid, "mmd": mmd}


def mean_pairwise_ms_ssim(volumes: Sequence[torch.Tensor], max_pairs: int = 200, seed: int = 0) -> float:
    """Mean MS-SSIM over pairs of CxHxWxD volumes in [0, 1] (at most ``max_pairs`` pairs, drawn with ``seed``);
    NaN for fewer than two volumes or volumes too small for MS-SSIM (see ``metrics.ms_ssim_settings``)."""
    pairs = [(i, j) for i in range(len(volumes)) for j in range(i + 1, len(volumes))]
    setting = ms_ssim_settings(volumes[0].shape[1:]) if volumes else None
    if not pairs or setting is None:
        return float("nan")
    if len(pairs) > max_pairs:
        pairs = random.Random(seed).sample(pairs, max_pairs)
    window, weights = setting
    metric = MultiScaleSSIMMetric(spatial_dims=volumes[0].dim() - 1, data_range=1.0, kernel_size=window,
                                  weights=weights)
    values = [float(metric(volumes[i][None].float(), volumes[j][None].float())) for i, j in pairs]
    return float(np.mean(values))


def nearest_neighbours(generated: Sequence[torch.Tensor], training: Sequence[torch.Tensor]) -> list[tuple[int, float]]:
    """For each generated volume, ``(index, SSIM)`` of the most similar training volume."""
    metric = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=ssim_window(generated[0].shape[1:]))
    bank = torch.stack([t.float() for t in training])
    out = []
    for volume in tqdm(generated, desc="nearest training volumes", leave=False):
        scores = metric(volume[None].float().expand_as(bank), bank).flatten()
        best = int(scores.argmax())
        out.append((best, float(scores[best])))
    return out


@dataclass
class SampleEvaluation:
    """What :func:`evaluate_samples` measured and where it wrote it."""

    output_dir: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any]


def _check_generated(path: Path, array: np.ndarray, spatial: tuple[int, ...], channels: int) -> None:
    """One generated volume (CxHxWxD) as sample.py writes it: the model's size and channels, finite values in
    [0, 1]; anything else is named, never scored (a NaN would hang the FID's matrix square root)."""
    if tuple(array.shape[1:]) != tuple(spatial):
        raise DataError(f"--samples: {path} has shape {list(array.shape[1:])} but the model generates "
                        f"{list(spatial)}; evaluate the volumes sample.py wrote for this run")
    if array.shape[0] != channels:
        raise DataError(f"--samples: {path} has {array.shape[0]} channels but the model generates {channels}; "
                        f"evaluate the volumes sample.py wrote for this run")
    finite = np.isfinite(array)
    if not finite.all():
        raise DataError(f"--samples: {path} holds {int((~finite).sum()):,} non-finite voxels (NaN or inf) of "
                        f"{array.size:,}; remove it or sample it again")
    low, high = float(array.min()), float(array.max())
    if low < 0 - VALUE_TOLERANCE or high > 1 + VALUE_TOLERANCE:
        raise DataError(f"--samples: {path} holds values from {low:.4g} to {high:.4g}, outside the [0, 1] that "
                        f"sample.py writes (the metrics compare volumes in [0, 1]); rescale it to [0, 1] or "
                        f"evaluate the volumes sample.py wrote")


VALUE_TOLERANCE = 1e-6  # float32 rounding of values written in [0, 1]


def _load_generated(folder: str | Path, spatial: tuple[int, ...],
                    channels: int = 1) -> tuple[list[Path], list[torch.Tensor]]:
    """The generated NIfTI files of ``folder`` as CxHxWxD tensors in [0, 1] (written by sample.py in the model's
    space: no preprocessing), each checked against the model's volume size and channels and its values."""
    files = find_nifti_files(str(folder), "--samples")
    volumes = []
    for path in files:
        try:
            array = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
        except Exception as err:  # noqa: BLE001 - nibabel raises many kinds; each is the file's fault
            raise DataError(f"--samples: cannot read {path} ({type(err).__name__}: {err})") from None
        if array.ndim not in (3, 4):
            raise DataError(f"--samples: {path} has {array.ndim} dimensions (shape {list(array.shape)}); expected "
                            f"a 3D volume as sample.py writes")
        array = array[None] if array.ndim == 3 else np.moveaxis(array, -1, 0)
        _check_generated(path, array, spatial, channels)
        volumes.append(torch.from_numpy(np.clip(array, 0.0, 1.0)))
    return files, volumes


def _real_volumes(config, paths: str | list[str] | None, which: int, key: str) -> list[torch.Tensor]:
    """Preprocessed real volumes: ``paths`` (NIfTI folder, glob or files), else the run's training (0) or
    validation (1) set."""
    if paths is None:
        dataset = build_datasets(config.data, seed=config.seed, in_channels=config.autoencoder.in_channels)[which]
    else:
        dataset = build_file_dataset(config.data, paths, config.autoencoder.in_channels, key=key)
    return [dataset[i]["image"] for i in tqdm(range(len(dataset)), desc=f"loading {key}", leave=False)]


def evaluate_samples(
    run: str | Path,
    samples: str | Path,
    output: str | Path | None = None,
    real: str | list[str] | None = None,
    train: str | list[str] | None = None,
    medicalnet_weights: str | Path | None = None,
    medicalnet_network: str | None = None,
    copy_threshold: float = 0.95,
    device: str = "auto",
) -> SampleEvaluation:
    """Compare the generated volumes in ``samples`` with real ones (see the module docstring).

    Writes into ``output`` (new or empty; default ``<samples>/evaluation``): ``summary.json``, ``samples.csv``
    (one row per generated volume: nearest training volume, its SSIM, copy flag) and ``closest_pairs.png``.

    Args:
        run: the diffusion run folder (or checkpoint) that generated the samples: its config gives the data
            pipeline, the volume size and, by default, the real and training volumes.
        samples: folder of generated NIfTI volumes (``sample.py``'s output).
        output: results folder.
        real: real volumes for FID, MMD and diversity (NIfTI folder, glob or files); default: the run's
            validation set.
        train: volumes to search for copies; default: the run's training set.
        medicalnet_weights: local MedicalNet weights for FID and MMD (default: the config's
            ``autoencoder.perceptual.weights_path``); without them FID and MMD are skipped.
        medicalnet_network: MedicalNet depth (default: the config's ``autoencoder.perceptual.network``).
        copy_threshold: SSIM to the nearest training volume at or above which a sample is flagged.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    """
    torch_device = resolve_device(device)
    samples = Path(samples)
    output = Path(output) if output is not None else samples / "evaluation"
    check_new_folder(output)
    config = load_diffusion(run).config
    if medicalnet_network is not None and not (medicalnet_weights or config.autoencoder.perceptual.weights_path):
        raise ConfigError(f"--medicalnet-network {medicalnet_network}: only used with MedicalNet weights, and none "
                          f"are given; add --medicalnet-weights FILE or drop --medicalnet-network")
    spatial = tuple(config.data.image_size)
    files, generated = _load_generated(samples, spatial, config.autoencoder.out_channels)
    real_volumes = _real_volumes(config, real, 1, "--real")
    training = _real_volumes(config, train, 0, "--train")
    summary: dict[str, Any] = {"run": str(run), "samples": str(samples), "generated_volumes": len(generated),
                               "real_volumes": len(real_volumes), "training_volumes": len(training)}
    weights = medicalnet_weights or config.autoencoder.perceptual.weights_path
    network_name = medicalnet_network or config.autoencoder.perceptual.network
    if weights is None:
        summary["features"] = ("skipped: no MedicalNet weights (pass --medicalnet-weights or set "
                               "autoencoder.perceptual.weights_path); FID and MMD not computed")
        log.warning("FID and MMD skipped: no MedicalNet weights (--medicalnet-weights)")
    else:
        network = MedicalNetResNet(network_name)
        load_medicalnet_weights(network, weights, key="--medicalnet-weights")
        fake, true = (medicalnet_features(v, network, torch_device) for v in (generated, real_volumes))
        summary.update(feature_distances(fake, true))
        summary["features"] = {"network": f"MedicalNet {network_name}", "weights": str(weights),
                               "feature_count": int(fake.shape[1]), "generated_count": len(generated),
                               "real_count": len(real_volumes), "mmd_count": min(len(generated), len(real_volumes))}
    summary["ms_ssim_generated"] = mean_pairwise_ms_ssim(generated)
    summary["ms_ssim_real"] = mean_pairwise_ms_ssim(real_volumes)
    notes = {key: _diversity_note(volumes, flag) for key, volumes, flag in
             (("generated", generated, "--samples"), ("real", real_volumes, "--real"))}
    summary["diversity_notes"] = {key: note for key, note in notes.items() if note}
    for key, note in summary["diversity_notes"].items():
        log.warning("diversity of the %s volumes not computed: %s", key, note)
    neighbours = nearest_neighbours(generated, training)
    rows = [{"sample": path.name, "nearest_training_index": index, "nearest_ssim": score,
             "copy": score >= copy_threshold} for path, (index, score) in zip(files, neighbours)]
    summary["copy_threshold"] = copy_threshold
    summary["copies"] = [r["sample"] for r in rows if r["copy"]]
    lock = claim_output_folder(output)
    with (output / "samples.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    closest = sorted(range(len(rows)), key=lambda i: -rows[i]["nearest_ssim"])[:3]
    picture = labelled_rows([(f"{rows[i]['sample']} / nearest (SSIM {rows[i]['nearest_ssim']:.3f})",
                              np.concatenate([orthogonal_slices(generated[i]),
                                              orthogonal_slices(training[neighbours[i][0]])], axis=1))
                             for i in closest])
    save_png(picture, output / "closest_pairs.png")
    (output / "summary.json").write_text(json.dumps(finite_json(summary), indent=2, allow_nan=False),
                                         encoding="utf-8")
    lock.release()
    return SampleEvaluation(output, rows, summary)


def _diversity_note(volumes: Sequence[torch.Tensor], flag: str) -> str | None:
    """Why the mean pairwise MS-SSIM of ``volumes`` is not a number (None when it is)."""
    if len(volumes) < 2:
        return f"{len(volumes)} volume(s) in {flag}; pairwise MS-SSIM needs at least 2"
    if ms_ssim_settings(volumes[0].shape[1:]) is None:
        return f"volumes of {list(volumes[0].shape[1:])} voxels are too small for MS-SSIM"
    return None


def format_sample_summary(result: SampleEvaluation) -> str:
    """The summary as a few readable lines."""
    s = result.summary
    lines = [f"{s['generated_volumes']} generated volumes vs {s['real_volumes']} real and {s['training_volumes']} "
             f"training volumes"]
    if isinstance(s["features"], dict):
        f = s["features"]
        lines.append(f"FID {s['fid']:.4f}, MMD {s['mmd']:.4g} ({f['network']} features: {f['feature_count']}; "
                     f"{f['generated_count']} generated, {f['real_count']} real)")
    else:
        lines.append(s["features"])
    notes = s.get("diversity_notes", {})
    shown = {key: f"n/a ({notes[key]})" if key in notes else f"{s[f'ms_ssim_{key}']:.4f}"
             for key in ("generated", "real")}
    lines.append(f"diversity (mean pairwise MS-SSIM, lower = more diverse): generated {shown['generated']}, "
                 f"real {shown['real']}")
    lines.append(f"likely copies of training volumes (SSIM >= {s['copy_threshold']}): "
                 f"{', '.join(s['copies']) or 'none'}")
    lines.append(f"wrote {result.output_dir}/summary.json, samples.csv, closest_pairs.png")
    return "\n".join(lines)
