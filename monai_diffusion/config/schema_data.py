"""The schema's field helpers (:func:`bounded`, :func:`limits_of`) and its ``data:`` section; the rest of the
schema, and the whole ``Config``, is in :mod:`monai_diffusion.config.schema`, which re-exports these names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union

__all__ = ["bounded", "limits_of", "AugmentationConfig", "DataConfig", "PHANTOM_NUM_CLASSES"]


def bounded(default: Any = None, *, factory: Any = None, ge: float | None = None, gt: float | None = None,
            lt: float | None = None, le: float | None = None) -> Any:
    """A dataclass field with limits on its value (on every element, for lists): ``ge`` (>=), ``gt`` (>),
    ``lt`` (<), ``le`` (<=). ``None`` values are allowed wherever the type allows them."""
    limits = {k: v for k, v in dict(ge=ge, gt=gt, lt=lt, le=le).items() if v is not None}
    if factory is not None:
        return field(default_factory=factory, metadata={"limits": limits})
    return field(default=default, metadata={"limits": limits})


def limits_of(dataclass_field: Any) -> dict[str, float]:
    """The limits :func:`bounded` declared on a field (empty when none)."""
    return dict(dataclass_field.metadata.get("limits", {}))


# ----------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------
@dataclass
class AugmentationConfig:
    """Random augmentation of the training volumes (or patches), with MONAI's random transforms; off by default.

    Attributes:
        flip_prob: probability of flipping each axis (RandFlipd).
        affine_prob: probability of a small random rotation and scaling (RandAffined, border padding).
        rotate_degrees: largest rotation about each axis, in degrees.
        scale_range: largest relative change of scale (0.1 = between 0.9x and 1.1x).
    """

    flip_prob: float = bounded(0.0, ge=0, le=1)
    affine_prob: float = bounded(0.0, ge=0, le=1)
    rotate_degrees: float = bounded(10.0, ge=0, le=180)
    scale_range: float = bounded(0.1, ge=0, lt=1)


@dataclass
class DataConfig:
    """The ``data:`` section: where volumes come from and how they are preprocessed.

    Attributes:
        source: ``synthetic`` for the built-in phantoms, ``nifti`` for files given by ``paths``.
        image_size: spatial size (H, W, D) every volume is padded or cropped to; each axis divisible by
            the autoencoder's total downsampling factor of that axis.
        num_train: number of synthetic training volumes.
        num_val: number of synthetic validation volumes.
        paths: NIfTI inputs: a folder (searched recursively for .nii / .nii.gz), a glob pattern, a list of
            files, or a datalist with per-volume covariates (a MONAI-style ``.json`` or a ``.csv`` with an
            ``image`` column; see docs/conditional.md).
        val_fraction: fraction of the NIfTI files held out for validation (at least one file; at least
            two files are needed, and no file is in both sets; the split is fixed by the seed).
        spacing: voxel spacing in mm to resample to; null keeps the files' spacing.
        intensity_percentiles: lower and upper percentiles mapped to 0 and 1 (clipped), per channel.
        intensity_window: a fixed window instead of the percentiles, e.g. CT Hounsfield units
            [-1000, 1000]: ``a_min`` and ``a_max`` are mapped to 0 and 1 (clipped); null: percentiles.
        cache: ``auto``: training loads and preprocesses each volume once and keeps it, in memory when the
            training volumes fit ``cache_memory_gb``, else as preprocessed files in ``cache_dir`` (random
            patches and augmentation still run afresh on every read); ``true``: every volume is preprocessed
            into memory when the datasets are built (MONAI CacheDataset; under DDP each process caches its
            own share), also for validation; ``false``: every read loads the file again.
        cache_memory_gb: the memory (GB) the ``auto`` cache may hold, over all processes of a node; null:
            a quarter of this machine's memory; 0: always preprocessed files.
        cache_dir: folder of the ``auto`` cache's preprocessed files, kept between runs (one file per
            volume, keyed by its path, size, modification time and the preprocessing settings); null:
            ``$XDG_CACHE_HOME/monai_diffusion/volumes`` (``~/.cache/...``).
        num_workers: DataLoader worker processes (0 loads in the main process); null: on a GPU, the
            available CPU cores, at most 8 (divided among the processes of a node under DDP); on the CPU, 0
            (the training step itself uses every core).
        patch_size: train the autoencoder on random patches of this size (H, W, D) cut from the whole
            volumes, each axis a multiple of that axis's total downsampling factor; validation, latents and
            samples stay whole volumes (run by tiles). null: train on whole volumes.
        patches_per_volume: patches cut from each volume a training batch reads (each volume read gives
            this many patches, so a batch holds ``batch_size`` x this many).
        patch_random_fraction: share of patches centred anywhere; the others are centred on foreground
            (voxels above ``foreground_threshold``), so few patches are air.
        foreground_threshold: intensity (after scaling to [0, 1]) above which a voxel is foreground.
        augmentation: see AugmentationConfig.
        phantom_covariates: synthetic phantoms with a class ``cavity`` (0/1: a dark cavity at the body's
            centre) and a continuous ``size`` (the body's scale), for conditional diffusion.
        phantom_organs: the phantoms' organs: ``random``, 5 to 9 organ-like ellipsoids (some with a nested
            part) whose intensities are shuffled from phantom to phantom; ``typed``, two organs of fixed kinds
            (classes 3 bright, 4 grey) at random places, every tissue at a fixed intensity as in CT, so a class
            has one appearance (for masks: docs/masks.md).
        num_classes: classes of the label maps (background 0 included). Set, every volume comes with an
            integer label map that follows it through the same spatial pipeline (nearest-neighbour): a
            datalist's ``label`` column, or the phantoms' own (which need at least ``PHANTOM_NUM_CLASSES`` =
            22: background, body shell, soft tissue, 18 organ parts, cavity); see docs/masks.md.
            null: images only.
    """

    source: Literal["synthetic", "nifti"] = "synthetic"
    image_size: tuple[int, int, int] = bounded(factory=lambda: (64, 64, 32), ge=1)
    num_train: int = bounded(16, ge=1)
    num_val: int = bounded(4, ge=1)
    paths: Union[str, list[str], None] = None
    val_fraction: float = bounded(0.2, ge=0, lt=1)
    spacing: Union[tuple[float, float, float], None] = bounded(None, gt=0, le=1000)
    intensity_percentiles: tuple[float, float] = bounded(factory=lambda: (0.5, 99.5), ge=0, le=100)
    intensity_window: Union[tuple[float, float], None] = None
    cache: Union[bool, Literal["auto"]] = "auto"
    cache_memory_gb: Union[float, None] = bounded(None, ge=0)
    cache_dir: Union[str, None] = None
    num_workers: Union[int, None] = bounded(None, ge=0)
    patch_size: Union[tuple[int, int, int], None] = bounded(None, ge=1)
    patches_per_volume: int = bounded(4, ge=1)
    patch_random_fraction: float = bounded(0.25, ge=0, le=1)
    foreground_threshold: float = bounded(0.05, ge=0, lt=1)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    phantom_covariates: bool = False
    phantom_organs: Literal["random", "typed"] = "random"
    num_classes: Union[int, None] = bounded(None, ge=2, le=32767)


PHANTOM_NUM_CLASSES = 22  # classes of the phantoms' label maps (see monai_diffusion/data/phantoms.py)
