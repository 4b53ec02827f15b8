"""Reconstruction quality of a trained autoencoder: per-volume metrics, reconstructions, pictures and
latent statistics.

Metrics are those of ``monai_diffusion.evaluation.metrics`` (see there for windows and scales).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from monai_diffusion.config import Config
from monai_diffusion.config.tiles import resolve_tiles
from monai_diffusion.data import build_datasets, build_file_dataset, model_input, save_nifti
from monai_diffusion.errors import RunError
from monai_diffusion.evaluation.metrics import LatentStatistics, ReconstructionMetrics
from monai_diffusion.runs.checkpoints import load_autoencoder
from monai_diffusion.runs.folders import check_new_folder, check_outside_data, claim_output_folder, run_dir_of
from monai_diffusion.runtime import fast_kernels, resolve_device
from monai_diffusion.visualize import labelled_rows, orthogonal_slices, save_png

__all__ = ["EvaluationResult", "evaluate_autoencoder", "format_summary", "finite_json"]

log = logging.getLogger("monai_diffusion")

METRICS = ("l1", "psnr", "ssim", "ms_ssim")


@dataclass
class EvaluationResult:
    """What :func:`evaluate_autoencoder` measured and where it wrote it."""

    output_dir: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any]


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if array.size == 0:
        return {"mean": float("nan"), "std": float("nan")}
    if np.isinf(array).any():
        return {"mean": float(np.mean(array)), "std": float("nan")}
    return {"mean": float(array.mean()), "std": float(array.std())}


def _dataset(config: Config, data: str | list[str] | None) -> Dataset:
    in_channels = config.autoencoder.in_channels
    if data is None:
        return build_datasets(config.data, seed=config.seed, in_channels=in_channels)[1]
    return build_file_dataset(config.data, data, in_channels, key="--data")


def _volume_name(item: dict[str, Any], index: int) -> str:
    name = Path(str(item.get("path", ""))).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return f"volume_{index:03d}"  # synthetic phantoms


def _as_saved(recon: torch.Tensor, item: dict[str, Any], spatial_dims: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reconstruction as a NIfTI volume with its affine; a 2D reconstruction of the centre slice is
    stored as a one-slice volume placed at that slice."""
    affine = item.get("affine")
    if spatial_dims == 3:
        return recon, affine
    if affine is not None:
        affine = torch.as_tensor(affine, dtype=torch.float64).clone()
        depth = item["image"].shape[-1]
        affine[:3, 3] += affine[:3, 2] * (depth // 2)
    return recon[..., None], affine


def finite_json(value: Any) -> Any:
    """inf/nan (e.g. the PSNR of identical volumes) as strings, so summary.json stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_json(v) for v in value]
    return value


def _mosaic(
    strips: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], order: list[str], count: int
) -> tuple[np.ndarray, dict[str, list[str]]]:
    """Rows input / reconstruction / |error| x4 for the ``count`` worst and best volumes by PSNR."""
    worst, best = order[:count], order[::-1][:count]
    rows = []
    for label, names in (("worst", worst), ("best", best)):
        for part, title in enumerate(("input", "recon", "|err| x4")):
            rows.append((f"{label}: {title}", np.concatenate([strips[n][part] for n in names], axis=1)))
    return labelled_rows(rows), {"worst": worst, "best": best}


def evaluate_autoencoder(
    run: str | Path,
    output: str | Path | None = None,
    data: str | list[str] | None = None,
    tile_size: Sequence[int] | int | None = None,
    tile_overlap: float | None = None,
    device: str = "auto",
    save_reconstructions: bool = True,
    mosaic_volumes: int = 3,
    seed: int = 0,
    buffers: str | None = None,
) -> EvaluationResult:
    """Evaluate a trained autoencoder volume by volume.

    Writes to ``output`` (default ``<run>/evaluation``): ``metrics.csv`` (one row per volume),
    ``summary.json`` (mean ± std per metric, latent statistics, metric settings),
    ``reconstructions/<name>.nii.gz`` (same affine as the input) and ``worst_best.png``.

    Args:
        run: autoencoder run folder or checkpoint.
        output: folder for the results; must be new or empty.
        data: NIfTI folder, glob or files to evaluate (preprocessed like the run's data); default: the
            run's own validation set.
        tile_size: reconstruct in overlapping tiles of this size (volumes larger than memory); default: as
            the run's config says (``Config.inference_tile``: by tiles after patch training).
        tile_overlap: fraction of a tile shared with its neighbour (default: ``autoencoder.tile_overlap``).
        device: "auto", "cpu", "cuda" or "cuda:N".
        save_reconstructions: write the NIfTI reconstructions.
        mosaic_volumes: worst and best volumes shown in the PNG.
        seed: seed of the latent samples behind the scale factor.
        buffers: where exact tiling keeps its activations (default: ``autoencoder.tile_buffers``).

    The tile settings are resolved by ``config.tiles.resolve_tiles``, as everywhere else.
    """
    run = Path(run)
    torch_device = resolve_device(device)
    fast_kernels(torch_device)
    model, config = load_autoencoder(run, map_location=torch_device)
    key = "--output" if output is not None else "--output (default <run>/evaluation)"
    output = Path(output) if output is not None else run_dir_of(run) / "evaluation"
    check_new_folder(output, key)
    if data is not None:
        check_outside_data(output, data, key, "--data")
    if config.data.source == "nifti":  # the run's training data, read again by the next run
        check_outside_data(output, config.data.paths, key, f"data.paths of {run}")
    dataset = _dataset(config, data)
    if len(dataset) == 0:
        where = data if data is not None else f"the validation set of {run} (data.num_val / data.val_fraction)"
        raise RunError(f"{'--data' if data is not None else '--run'}: no volumes to evaluate in {where}")
    spatial_dims = config.autoencoder.spatial_dims
    spatial = tuple(config.data.image_size)[:spatial_dims]  # both pipelines pad/crop to it
    tiles = resolve_tiles(config, tile_size, tile_overlap, buffers, check=(spatial, model.total_factors))
    inferer = tiles.inferer(progress=True)  # with tqdm bars over the tiles: large volumes take a while
    metrics = ReconstructionMetrics(spatial_dims, spatial)
    latents = LatentStatistics(seed=seed)
    rows: list[dict[str, Any]] = []
    strips: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    lock = claim_output_folder(output, key)
    started = time.perf_counter()
    for index in tqdm(range(len(dataset)), desc="evaluating", leave=False):
        item = dataset[index]
        name = _volume_name(item, index)
        if name in strips:
            name = f"{name}_{index:03d}"
        images = model_input(item["image"][None], spatial_dims).to(torch_device).float()
        with torch.no_grad():
            if inferer is None:
                z_mu, z_sigma = model.encode(images)
                reconstruction = model.decode(z_mu).float()
            else:
                z_mu, z_sigma = inferer.encode(model, images)
                reconstruction = inferer.decode(model, z_mu).float()
        latents.update(z_mu, z_sigma)
        values = {key: float(value[0]) for key, value in metrics(reconstruction, images).items()}
        row: dict[str, Any] = {"name": name, "path": str(item.get("path", "")), **values}
        recon = reconstruction.clamp(0, 1)[0].cpu()
        if save_reconstructions:
            volume, affine = _as_saved(recon, item, spatial_dims)
            target = save_nifti(volume, output / "reconstructions" / f"{name}.nii.gz", affine)
            row["reconstruction"] = str(target.relative_to(output))
        rows.append(row)
        error = ((recon - images[0].cpu()).abs() * 4).clamp(0, 1)
        strips[name] = tuple(orthogonal_slices(v, spatial_dims=spatial_dims)  # type: ignore[assignment]
                             for v in (images[0].cpu(), recon, error))
    seconds = time.perf_counter() - started

    columns = ["name", "path", *[m for m in METRICS if m in rows[0]]]
    columns += ["reconstruction"] if save_reconstructions else []
    with (output / "metrics.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    order = [r["name"] for r in sorted(rows, key=lambda r: r["psnr"])]
    picture, shown = _mosaic(strips, order, max(1, min(mosaic_volumes, math.ceil(len(rows) / 2))))
    save_png(picture, output / "worst_best.png")
    summary = {
        "run": str(run),
        "data": data if data is not None else "validation set of the run's config",
        "volumes": len(rows),
        "metrics": {m: _mean_std([r[m] for r in rows]) for m in METRICS if m in rows[0]},
        "metric_settings": metrics.describe(),
        "latent": latents.summary(),
        "downsample_factors": [list(f) for f in model.downsample_factors],
        "compression": float(np.prod(images.shape[1:]) / np.prod(z_mu.shape[1:])),
        "tiling": tiles.summary(model, "evaluation"),
        "mosaic": shown,
        "seconds": round(seconds, 1),
    }
    (output / "summary.json").write_text(json.dumps(finite_json(summary), indent=2, allow_nan=False),
                                         encoding="utf-8")
    lock.release()
    return EvaluationResult(output, rows, summary)


def format_summary(result: EvaluationResult) -> str:
    """The summary as a few readable lines."""
    s = result.summary
    lines = [f"{s['volumes']} volumes from {s['data']}"]
    for name, stats in s["metrics"].items():
        lines.append(f"  {name:8s} {stats['mean']:.4f} ± {stats['std']:.4f}")
    latent = s["latent"]
    lines.append(f"latent {latent['latent_shape']} ({s['compression']:.0f}x fewer values): "
                 f"mean {latent['z_mean']:.3f}, "
                 f"std {latent['z_std']:.3f}, scale factor {latent['scale_factor']:.4f}")
    lines.append(f"worst by PSNR: {', '.join(s['mosaic']['worst'])}; best: {', '.join(s['mosaic']['best'])}")
    lines.append(f"wrote {result.output_dir}/metrics.csv, summary.json, worst_best.png"
                 + (", reconstructions/" if result.rows and "reconstruction" in result.rows[0] else ""))
    return "\n".join(lines)
