"""How well generated volumes follow their masks: Dice per class between a segmentation of each volume and the
mask it was asked to follow (``evaluate_samples.py --masks``).

The segmentation comes from a user-supplied TorchScript network (input B x 1 x H x W x D in the training
intensity range [0, 1], output B x num_classes x H x W x D logits), or, on phantoms, from
:class:`IntensitySegmenter`: a per-class Gaussian model of the intensity and its local mean, fitted on real
labelled volumes. Two references make the numbers readable: the same Dice for unconditional samples of the
same model against the same masks (chance: what following no mask at all scores), and the segmenter's Dice on
real volumes against their own label maps (the ceiling: what a perfect generator could score with this
segmenter).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from monai_diffusion.errors import ConfigError, DataError

__all__ = ["evaluate_masks", "format_mask_summary", "fit_phantom_segmenter", "IntensitySegmenter", "dice_per_class",
           "mean_dice", "load_torchscript_segmenter", "evaluate_pairs", "BODY"]

BODY = "body"  # every non-background class together
_LOCAL = 3  # the local-mean window of the intensity segmenter (voxels)
_VARIANCE_FLOOR = 1e-4


def _features(volume: torch.Tensor) -> torch.Tensor:
    """(2, H, W, D): the intensity and its local mean, of a (H, W, D) volume."""
    volume = volume.float()
    local = F.avg_pool3d(volume[None, None], _LOCAL, stride=1, padding=_LOCAL // 2, count_include_pad=False)[0, 0]
    return torch.stack([volume, local])


class IntensitySegmenter:
    """Per-class Gaussian model of (intensity, local mean intensity) with class priors, fitted on real volumes
    with their label maps; a voxel gets the most probable class.

    Args:
        num_classes: classes of the label maps.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)
        self.mean = torch.zeros(self.num_classes, 2)
        self.var = torch.ones(self.num_classes, 2)
        self.log_prior = torch.full((self.num_classes,), -math.inf)

    def fit(self, volumes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> IntensitySegmenter:
        """Fit on (H, W, D) volumes and their (H, W, D) integer label maps."""
        feats = torch.cat([_features(v).reshape(2, -1) for v in volumes], dim=1)
        classes = torch.cat([lab.reshape(-1).long() for lab in labels])
        counts = torch.bincount(classes, minlength=self.num_classes).double()
        for c in range(self.num_classes):
            chosen = feats[:, classes == c]
            if chosen.shape[1] > 1:
                self.mean[c], self.var[c] = chosen.mean(1), chosen.var(1).clamp_min(_VARIANCE_FLOOR)
        self.log_prior = torch.where(counts > 0, (counts / counts.sum()).log(), torch.tensor(-math.inf)).float()
        return self

    def __call__(self, volume: torch.Tensor) -> torch.Tensor:
        """(H, W, D) volume -> (H, W, D) long classes."""
        feats = _features(volume).reshape(2, -1).T  # N x 2
        loglik = -0.5 * (((feats[:, None, :] - self.mean[None]) ** 2) / self.var[None] + self.var.log()[None]).sum(-1)
        return (loglik + self.log_prior[None]).argmax(1).reshape(volume.shape)

    def state(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "mean": self.mean.tolist(), "var": self.var.tolist(),
                "log_prior": [float(x) for x in self.log_prior]}


def load_torchscript_segmenter(path: str | Path, device: str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """A TorchScript segmentation network as a (H, W, D) volume -> (H, W, D) classes function."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--segmenter: {path} does not exist; give a TorchScript file (torch.jit.save), "
                          f"'phantom' or 'phantom-typed'")
    try:
        network = torch.jit.load(str(path), map_location=device).eval()
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"--segmenter: cannot load {path} as TorchScript "
                          f"({str(err).splitlines()[0][:120]})") from None

    def segment(volume: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = network(volume.float()[None, None].to(device))
        return logits.argmax(1)[0].cpu()

    return segment


def dice_per_class(segmentation: torch.Tensor, mask: torch.Tensor, classes: Sequence[int]) -> dict[str, float]:
    """Dice of each class of ``classes`` (NaN where the class is in neither), and of ``body`` (every class > 0)."""
    out: dict[str, float] = {}
    for name, a, b in [(str(c), segmentation == c, mask == c) for c in classes] + [(BODY, segmentation > 0, mask > 0)]:
        total = int(a.sum()) + int(b.sum())
        out[name] = 2.0 * int((a & b).sum()) / total if total else math.nan
    return out


def mean_dice(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean over rows of each key (NaN entries skipped)."""
    keys = sorted({k for row in rows for k in row}, key=lambda k: (k != BODY, int(k) if k.isdigit() else -1))
    result = {}
    for key in keys:
        values = [row[key] for row in rows if key in row and not math.isnan(row[key])]
        result[key] = float(np.mean(values)) if values else math.nan
    return result


def _read(path: Path) -> torch.Tensor:
    try:
        return torch.from_numpy(np.asarray(nib.load(str(path)).dataobj, dtype=np.float32))
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise DataError(f"{path}: cannot read the NIfTI file ({err})") from None


def evaluate_pairs(pairs: Path, segment: Callable[[torch.Tensor], torch.Tensor], classes: Sequence[int],
                   unconditional: Path | None = None) -> dict[str, Any]:
    """Dice of the pairs folder written by ``sample.py --mask`` (its ``datalist.json``), and of the unconditional
    samples in ``unconditional`` (``sample_*.nii.gz``, each against every mask) as the chance level."""
    listing = pairs / "datalist.json"
    if not listing.is_file():
        raise ConfigError(f"--samples: {pairs} has no datalist.json; point it at the folder sample.py --mask wrote")
    rows = json.loads(listing.read_text(encoding="utf-8"))["training"]
    masks = {row["label"]: _read(pairs / row["label"]).long() for row in rows}
    per_pair = [dice_per_class(segment(_read(pairs / row["image"])), masks[row["label"]], classes) for row in rows]
    result: dict[str, Any] = {"pairs": len(rows), "dice": mean_dice(per_pair), "per_pair": per_pair}
    if unconditional is not None:
        files = sorted(unconditional.glob("sample_*.nii.gz"))
        if not files:
            raise ConfigError(f"--unconditional: {unconditional} holds no sample_*.nii.gz (sample.py without --mask)")
        chance = [dice_per_class(segment(_read(f)), mask, classes) for f in files for mask in masks.values()]
        result["chance"] = mean_dice(chance)
        result["unconditional_samples"] = len(files)
    return result


PHANTOM_FIT_SEED, PHANTOM_CEILING_SEED, PHANTOM_FIT_VOLUMES = 7000, 8000, 16


PHANTOM_SEGMENTERS = {"phantom": "random", "phantom-typed": "typed"}  # --segmenter names: data.phantom_organs


def fit_phantom_segmenter(
    shape: tuple[int, int, int], num_classes: int, num: int = PHANTOM_FIT_VOLUMES, organs: str = "random",
    covariates: bool = True,
) -> tuple[IntensitySegmenter, dict[str, float]]:
    """An :class:`IntensitySegmenter` fitted on ``num`` real labelled phantoms of ``shape`` (``organs``: their
    layout, see ``data.phantom_organs``; ``covariates``: bodies of every size, half with a cavity), and its Dice on
    ``num // 2`` other phantoms (the ceiling)."""
    from monai_diffusion.data import LABEL_KEY, SyntheticPhantomDataset

    fit = SyntheticPhantomDataset(num, shape, PHANTOM_FIT_SEED, covariates=covariates, labels=True, organs=organs)
    items = [fit[i] for i in range(num)]
    segmenter = IntensitySegmenter(num_classes).fit([it["image"][0] for it in items],
                                                    [it[LABEL_KEY][0] for it in items])
    held = SyntheticPhantomDataset(max(1, num // 2), shape, PHANTOM_CEILING_SEED, covariates=covariates,
                                   labels=True, organs=organs)
    rows = [dice_per_class(segmenter(held[i]["image"][0]), held[i][LABEL_KEY][0].long(), range(1, num_classes))
            for i in range(len(held))]
    return segmenter, mean_dice(rows)


def evaluate_masks(samples: str | Path, segmenter: str, unconditional: str | Path | None = None,
                   output: str | Path | None = None, num_classes: int | None = None) -> dict[str, Any]:
    """``evaluate_samples.py --masks``: Dice of the pairs in ``samples`` (written by ``sample.py --mask``) with
    ``segmenter`` (a TorchScript file, or ``phantom`` / ``phantom-typed`` for the intensity segmenter fitted on
    real phantoms with random / typed organs, whose ceiling is reported too), and of ``unconditional`` samples
    as the chance level; ``results.json`` goes to ``output`` (default ``<samples>/mask_evaluation``)."""
    from monai_diffusion.runs.folders import check_new_folder, make_output_folder

    samples = Path(samples)
    out = Path(output) if output is not None else samples / "mask_evaluation"
    check_new_folder(out)
    listing = samples / "datalist.json"
    if not listing.is_file():
        raise ConfigError(f"--samples: {samples} has no datalist.json; point it at the folder sample.py --mask wrote")
    rows = json.loads(listing.read_text(encoding="utf-8"))["training"]
    first = _read(samples / rows[0]["label"])
    classes = num_classes or int(max(float(_read(samples / r["label"]).max()) for r in rows)) + 1
    ceiling = None
    if segmenter in PHANTOM_SEGMENTERS:
        from monai_diffusion.config.schema import PHANTOM_NUM_CLASSES

        classes = max(classes, PHANTOM_NUM_CLASSES)
        segment, ceiling = fit_phantom_segmenter(tuple(first.shape), classes, organs=PHANTOM_SEGMENTERS[segmenter])
    else:
        segment = load_torchscript_segmenter(segmenter)
    result = evaluate_pairs(samples, segment, range(1, classes), Path(unconditional) if unconditional else None)
    result["segmenter"] = segmenter
    if ceiling is not None:
        result["ceiling"] = ceiling
    make_output_folder(out)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=float), encoding="utf-8")
    result["output"] = str(out)
    return result


def format_mask_summary(result: dict[str, Any]) -> str:
    """The Dice table: with the ControlNet, chance and ceiling (where measured), per class present."""
    keys = [k for k, v in result["dice"].items() if not math.isnan(v)]
    lines = [f"{result['pairs']} image/label pairs, segmenter: {result['segmenter']}",
             f"{'Dice':<12}" + "".join(f"{k:>8}" for k in keys)]
    for name in ("dice", "chance", "ceiling"):
        if name in result:
            values = result[name]
            label = {"dice": "masks", "chance": "chance", "ceiling": "ceiling"}[name]
            lines.append(f"{label:<12}" + "".join(f"{values.get(k, math.nan):>8.3f}" for k in keys))
    lines.append(f"results: {result.get('output', '')}/results.json")
    return "\n".join(lines)
