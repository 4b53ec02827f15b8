"""Sampling from label maps with a trained ControlNet run: image/label pairs a segmentation trainer can read.

Each mask is brought onto the model's grid exactly as training label maps were (RAS orientation, optional
resampling to ``data.spacing`` with nearest neighbour, pad/crop to ``data.image_size``), checked (integer
classes below ``data.num_classes``), and ``--num-samples`` volumes are generated per mask. The output is the
Medical Segmentation Decathlon layout MONAI reads::

    <output>/imagesTr/sample_000.nii.gz   generated volume
    <output>/labelsTr/sample_000.nii.gz   its mask, on the same grid, with the same affine
    <output>/datalist.json                {"training": [{"image": ..., "label": ..., "mask": <source>}, ...]}
    <output>/pairs.csv                    image,label,mask (a datalist for data.paths as well)
    <output>/samples.png                  masks above their samples
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import torch
from monai.transforms import Compose, LoadImaged, Orientationd, ResizeWithPadOrCropd, Spacingd

from monai_diffusion.config import Config
from monai_diffusion.config.tiles import resolve_tiles
from monai_diffusion.data.files import is_nifti
from monai_diffusion.data.nifti import save_nifti
from monai_diffusion.data.transforms import _READ_ERRORS, check_label_values
from monai_diffusion.errors import CheckpointError, ConfigError, DataError, RunError
from monai_diffusion.generation.controlnet import ControlNetBundle, load_controlnet
from monai_diffusion.generation.sampling import SamplingRequest, _check_disk_space, _condition_sets, generate_volumes
from monai_diffusion.runs.checkpoints import resolve_checkpoint
from monai_diffusion.runs.folders import check_new_folder, check_outside_data, make_output_folder
from monai_diffusion.runtime import resolve_device
from monai_diffusion.visualize import label_preview, save_png, volume_grid

__all__ = ["read_mask_list", "load_mask", "sample_from_masks"]

log = logging.getLogger("monai_diffusion")

MOSAIC_PAIRS = 4  # pairs shown in samples.png


def read_mask_list(path: str | Path) -> list[Path]:
    """The masks a ``--masks`` datalist names: a CSV with a ``label`` column, or a JSON datalist whose
    ``training`` / ``validation`` / ``testing`` items have a ``label`` (paths relative to the file)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"--masks: {path} does not exist; give a .csv with a 'label' column or a .json datalist")
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
        else:
            data = json.loads(path.read_text(encoding="utf-8"))
            rows = [item for key in ("training", "validation", "testing") for item in data.get(key, [])]
    except (OSError, UnicodeDecodeError, csv.Error, json.JSONDecodeError, AttributeError) as err:
        raise ConfigError(f"--masks: cannot read {path} ({err}); give a .csv with a 'label' column or a .json "
                          f"datalist") from None
    if not rows or not all(isinstance(row, dict) and str(row.get("label") or "").strip() for row in rows):
        raise ConfigError(f"--masks: {path} needs a 'label' entry in every row (one label map per row)")
    return [path.parent / str(row["label"]).strip() for row in rows]


def _mask_transform(config: Config) -> Compose:
    transforms: list[Any] = [LoadImaged("label", reader="NibabelReader", image_only=True, ensure_channel_first=True,
                                        dtype=None),
                             Orientationd("label", axcodes="RAS", labels=None)]
    if config.data.spacing is not None:
        transforms.append(Spacingd("label", pixdim=config.data.spacing, mode="nearest"))
    transforms.append(ResizeWithPadOrCropd("label", spatial_size=config.data.image_size))
    return Compose(transforms)


def load_mask(path: Path, config: Config, key: str = "--mask") -> tuple[torch.Tensor, torch.Tensor]:
    """A mask on the model's grid: ``(label 1x[SPATIAL DIMS] long, affine 4x4 float64)`` (the affine of that
    grid, where the generated volume lies). DataError naming the file for a missing, unreadable or bad mask."""
    name = str(path)
    if not is_nifti(path):
        raise DataError(f"{key}: '{name}' is not a NIfTI file; expected a .nii or .nii.gz label map")
    if not path.is_file():
        raise DataError(f"{key}: label map '{name}' does not exist")
    try:
        raw = _mask_transform(config).transforms[0]({"label": name})["label"]
    except (RuntimeError, *_READ_ERRORS) as exc:
        raise DataError(f"{name}: cannot read the label map ({type(exc).__name__}); re-export it") from None
    if raw.dim() != 4 or raw.shape[0] != 1:
        raise DataError(f"{name}: expected a 3D label map (H, W, D), got shape {tuple(raw.shape[1:])} with "
                        f"{raw.shape[0]} channel(s)")
    check_label_values(name, raw, config.data.num_classes)
    item = {"label": raw}
    for transform in _mask_transform(config).transforms[1:]:
        item = transform(item)
    label = item["label"]
    affine = torch.as_tensor(label.affine, dtype=torch.float64)
    label = torch.as_tensor(label.as_tensor() if hasattr(label, "as_tensor") else label).round().long()
    return label, affine


def _jobs(masks: Sequence[Path], sets: list[dict[str, Any]], num_samples: int) -> list[tuple[int, dict[str, Any]]]:
    return [(index, values) for index in range(len(masks)) for values in sets for _ in range(num_samples)]


def _write_pair(output: Path, name: str, volume: torch.Tensor, label: torch.Tensor, affine: torch.Tensor,
                written: int, total: int) -> tuple[Path, Path]:
    image_path, label_path = output / "imagesTr" / name, output / "labelsTr" / name
    try:
        save_nifti(volume, image_path, affine=affine)
        array = label[0].to(torch.int16).numpy()  # integer classes, not save_nifti's float32
        label_path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(array, affine.numpy()), str(label_path))
    except OSError as err:
        raise RunError(f"--output: cannot write {name} ({err.strerror}); {written} of {total} pairs were "
                       f"written") from None
    return image_path, label_path


def sample_from_masks(
    run: str | Path,
    masks: Sequence[str | Path],
    num_samples: int,
    output: str | Path,
    scheduler: str = "ddim",
    steps: int = 50,
    seed: int = 0,
    batch_size: int = 1,
    device: str = "auto",
    tile_size: list[int] | None = None,
    tile_overlap: float | None = None,
    conditions: Sequence[dict[str, str]] | None = None,
    guidance_scale: float | None = None,
    conditioning_scale: float | None = None,
) -> list[tuple[Path, Path]]:
    """Generate ``num_samples`` volumes per mask (and condition set) into the new or empty folder ``output``.

    Args:
        run: ControlNet run folder or checkpoint.
        masks: label maps (NIfTI, integer classes below the run's ``data.num_classes``).
        num_samples: volumes per mask and condition set.
        output: results folder (see the module docstring for its layout).
        scheduler, steps, seed, batch_size, device, tile_size, tile_overlap, conditions, guidance_scale: as
            :func:`monai_diffusion.generation.sampling.sample_volumes`.
        conditioning_scale: scales the ControlNet's residuals (default: ``controlnet.conditioning_scale``).

    Returns:
        the (image, label) paths written, in order.
    """
    output = Path(output)
    check_new_folder(output)
    if not masks:
        raise ConfigError("--mask: give at least one label map (--mask FILE, repeatable, or --masks DATALIST)")
    try:
        path = resolve_checkpoint(run)
    except CheckpointError as err:
        raise CheckpointError(f"{err}; train the ControlNet first (train_controlnet.py) or point --run at its run "
                              f"folder") from None
    bundle = load_controlnet(path, resolve_device(device))
    config = bundle.config
    if config.autoencoder.spatial_dims != 3:
        raise ConfigError("--mask: sampling from masks needs a 3D model (autoencoder.spatial_dims = 3)")
    masks = [Path(m).expanduser() for m in masks]
    loaded = [load_mask(m, config) for m in masks]  # every mask is checked before anything is generated
    sets = _condition_sets(bundle.conditioning, conditions)
    guidance = config.diffusion.sampling.guidance_scale if guidance_scale is None else guidance_scale
    if conditioning_scale is not None and conditioning_scale < 0:
        raise ConfigError(f"--conditioning-scale: expected a number >= 0, got {conditioning_scale}")
    trained_steps = config.diffusion.scheduler.num_train_timesteps
    if scheduler == "ddim" and steps > trained_steps:
        raise ConfigError(f"--steps {steps}: exceeds the num_train_timesteps = {trained_steps} the run {run} was "
                          f"trained with; use at most {trained_steps} steps")
    resolve_tiles(config, tile_size, tile_overlap, check=(tuple(config.data.image_size),
                                                          bundle.autoencoder.total_factors))
    if config.data.source == "nifti":
        check_outside_data(output, config.data.paths, "--output")
    jobs = _jobs(masks, sets, num_samples)
    _check_disk_space(output, 2 * len(jobs), config)
    make_output_folder(output)
    return _generate(bundle, output, masks, loaded, jobs, scheduler, steps, seed, batch_size, tile_size, tile_overlap,
                     guidance, conditioning_scale)


def _generate(bundle: ControlNetBundle, output: Path, masks: list[Path],
              loaded: list[tuple[torch.Tensor, torch.Tensor]],
              jobs: list[tuple[int, dict[str, Any]]], scheduler: str, steps: int, seed: int, batch_size: int,
              tile_size: list[int] | None, tile_overlap: float | None, guidance: float,
              conditioning_scale: float | None) -> list[tuple[Path, Path]]:
    config, conditioning = bundle.config, bundle.conditioning
    generator = torch.Generator().manual_seed(seed)
    digits = max(3, len(str(len(jobs) - 1)))
    pairs: list[tuple[Path, Path]] = []
    rows: list[dict[str, Any]] = []
    shown_masks, shown = [], []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        log.info("sampling volumes %d-%d of %d from masks (%s)", start + 1, start + len(chunk), len(jobs), scheduler)
        labels = torch.stack([loaded[index][0] for index, _ in chunk])
        batch_conditions = conditioning.encode([values for _, values in chunk]) if conditioning.active else None
        volumes = generate_volumes(bundle.controlled(labels, conditioning_scale), bundle.autoencoder, SamplingRequest(
                                   config,
                                   bundle.scale_factor, len(chunk), steps, scheduler, generator, verbose=True,
                                   tile_size=tile_size, tile_overlap=tile_overlap, conditions=batch_conditions,
                                   conditioning=conditioning, guidance_scale=guidance)).cpu().clamp(0, 1)
        for volume, label, (index, values) in zip(volumes, labels, chunk):
            name = f"sample_{len(pairs):0{digits}d}.nii.gz"
            image_path, label_path = _write_pair(output, name, volume, label, loaded[index][1], len(pairs), len(jobs))
            pairs.append((image_path, label_path))
            rows.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}", "mask": str(masks[index]),
                         **values})
            if len(shown) < MOSAIC_PAIRS:
                shown_masks.append(label_preview(label, config.data.num_classes))
                shown.append(volume)
    (output / "datalist.json").write_text(json.dumps({"training": rows}, indent=2), encoding="utf-8")
    with (output / "pairs.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    save_png(volume_grid([("masks", shown_masks), ("samples", shown)], spatial_dims=3), output / "samples.png")
    log.info("wrote %d image/label pairs to %s (imagesTr/, labelsTr/, datalist.json)", len(pairs), output)
    return pairs
