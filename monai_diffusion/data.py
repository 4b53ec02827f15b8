"""Data pipeline: synthetic CT/MRI-like phantoms and NIfTI volume loading.

Every item produced by the datasets in this module is a dictionary::

    {
        "image": torch.FloatTensor of shape (C, H, W, D), values in [0, 1],
        "path": str,  # "synthetic://<seed>/<index>" or the NIfTI file path
        "affine": torch.DoubleTensor of shape (4, 4),  # voxel -> world (RAS, mm)
    }

All values are plain ``torch.Tensor`` objects (never MONAI ``MetaTensor``), so
``torch.utils.data.default_collate`` works for both data sources.

Bad inputs raise :class:`DataError` with a one-line message that names the
offending key, file or value, says what was expected and how to fix it.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import warnings
import zlib
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
from monai.data import CacheDataset
from monai.data import Dataset as MonaiDataset
from monai.data import MetaTensor, partition_dataset
from monai.transforms import (
    Compose,
    EnsureTyped,
    LoadImage,
    MapTransform,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "DataConfig",
    "DataError",
    "SyntheticPhantomDataset",
    "CheckedCompose",
    "KeepAffined",
    "LoadCheckedd",
    "build_datasets",
    "build_file_dataset",
    "model_input",
    "build_nifti_transforms",
    "find_nifti_files",
    "make_loader",
    "make_phantom",
    "save_nifti",
    "split_files",
    "validate_data_config",
]

IMAGE_KEY = "image"
PATH_KEY = "path"
AFFINE_KEY = "affine"

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_GLOB_CHARS = frozenset("*?[")
_PATHS_HINT = "point data.paths at a folder, a glob like 'scans/*.nii.gz' or a list of NIfTI files"

# Exceptions nibabel raises for unreadable files: ImageFileError (empty file,
# header cut short, not gzip), EOFError (gzip stream cut short), OSError (raw .nii
# with too few bytes; gzip.BadGzipFile), zlib.error (corrupt deflate stream),
# HeaderDataError / ValueError (inconsistent header fields).
_READ_ERRORS: tuple[type[BaseException], ...] = (
    ImageFileError,
    HeaderDataError,
    EOFError,
    OSError,
    zlib.error,
    ValueError,
)


class DataError(ValueError):
    """A bad data input (config value, path or file); the message is one line.

    A DataLoader worker re-raises errors as ``DataError("Caught DataError in DataLoader
    worker ... Traceback ... DataError: <message>")``; the original one-line message is
    recovered from that text.
    """

    def __init__(self, message: str) -> None:
        text = str(message)
        if "Traceback (most recent call last)" in text:
            for line in reversed(text.strip().splitlines()):
                _, found, tail = line.partition("DataError: ")
                if found:
                    text = tail
                    break
        super().__init__(" ".join(text.split()))


# --------------------------------------------------------------------------- config


@dataclass
class DataConfig:
    """The ``data:`` section of the config.

    Attributes:
        source: "synthetic" for generated phantoms, "nifti" for files given by ``paths``.
        image_size: Spatial size (H, W, D) of the volumes the network sees.
        num_train: Number of synthetic training volumes.
        num_val: Number of synthetic validation volumes.
        paths: NIfTI inputs: a folder (searched recursively for *.nii / *.nii.gz),
            a glob pattern, or a list of files. Used when source == "nifti".
        val_fraction: Fraction of NIfTI files used for validation (at least one
            file when there are two or more; split is deterministic per seed).
        spacing: Voxel spacing in mm to resample to; None keeps the file spacing.
        intensity_percentiles: Lower/upper percentiles mapped to 0 and 1 (clipped).
        cache: Cache the loaded, preprocessed volumes in memory (MONAI CacheDataset).
        num_workers: DataLoader worker processes (0 loads in the main process).
    """

    source: Literal["synthetic", "nifti"] = "synthetic"
    image_size: tuple[int, int, int] = (64, 64, 32)
    num_train: int = 16
    num_val: int = 4
    paths: str | list[str] | None = None
    val_fraction: float = 0.2
    spacing: tuple[float, float, float] | None = None
    intensity_percentiles: tuple[float, float] = (0.5, 99.5)
    cache: bool = False
    num_workers: int = 0


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_size(value: Any, key: str) -> tuple[int, int, int]:
    """Validate a spatial size (H, W, D) of three positive ints."""
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(_is_int(v) and v > 0 for v in value):
        raise DataError(f"{key}: expected three positive integers (H, W, D), got {value!r}; e.g. {key}: [64, 64, 32]")
    return (int(value[0]), int(value[1]), int(value[2]))


def _check_spacing(value: Any, key: str) -> tuple[float, float, float] | None:
    """Validate an optional voxel spacing of three positive numbers (mm)."""
    if value is None:
        return None
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or not all(_is_number(v) and math.isfinite(v) and v > 0 for v in value)
    ):
        raise DataError(
            f"{key}: expected three positive voxel sizes in mm, got {value!r}; "
            f"e.g. {key}: [1.0, 1.0, 2.5], or null to keep the file spacing"
        )
    return (float(value[0]), float(value[1]), float(value[2]))


def _check_percentiles(value: Any, key: str) -> tuple[float, float]:
    """Validate a (lower, upper) percentile pair with 0 <= lower < upper <= 100."""
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value)
    if not ok or not 0.0 <= value[0] < value[1] <= 100.0:
        raise DataError(
            f"{key}: expected [lower, upper] with 0 <= lower < upper <= 100, got {value!r}; e.g. [0.5, 99.5]"
        )
    return (float(value[0]), float(value[1]))


def _check_count(value: Any, key: str, minimum: int) -> int:
    if not _is_int(value) or value < minimum:
        raise DataError(f"{key}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def validate_data_config(cfg: DataConfig) -> DataConfig:
    """Check every field of ``cfg`` and return a normalised copy.

    Lists coming from YAML are converted to tuples; ``cfg`` itself is not modified.

    Args:
        cfg: The data config to check.

    Returns:
        A new DataConfig with tuple-typed sizes.

    Raises:
        DataError: If any field has a bad value.
    """
    if cfg.source not in ("synthetic", "nifti"):
        raise DataError(f"data.source: expected 'synthetic' or 'nifti', got {cfg.source!r}")
    fraction = cfg.val_fraction
    if not _is_number(fraction) or not 0.0 <= fraction < 1.0:
        raise DataError(f"data.val_fraction: expected a number in [0, 1), got {fraction!r}; e.g. 0.2")
    if not isinstance(cfg.cache, bool):
        raise DataError(f"data.cache: expected true or false, got {cfg.cache!r}")
    paths = cfg.paths
    if isinstance(paths, os.PathLike):
        paths = os.fspath(paths)
    elif isinstance(paths, tuple):
        paths = list(paths)
    return dataclasses.replace(
        cfg,
        image_size=_check_size(cfg.image_size, "data.image_size"),
        num_train=_check_count(cfg.num_train, "data.num_train", 1),
        num_val=_check_count(cfg.num_val, "data.num_val", 0),
        paths=paths,
        val_fraction=float(fraction),
        spacing=_check_spacing(cfg.spacing, "data.spacing"),
        intensity_percentiles=_check_percentiles(cfg.intensity_percentiles, "data.intensity_percentiles"),
        num_workers=_check_count(cfg.num_workers, "data.num_workers", 0),
    )


# --------------------------------------------------------------------------- phantoms


def _rng(*seeds: int) -> np.random.Generator:
    """A numpy Generator for arbitrary (possibly negative) integer seeds."""
    return np.random.default_rng([int(s) % 2**64 for s in seeds])


def _rotation(rng: np.random.Generator, ndim: int, max_angle: float) -> np.ndarray:
    """Random rotation matrix of shape (ndim, ndim) with angles in [-max_angle, max_angle]."""
    if ndim == 2:
        a = rng.uniform(-max_angle, max_angle)
        return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    rot = np.eye(3)
    for axes in ((0, 1), (0, 2), (1, 2)):
        a = rng.uniform(-max_angle, max_angle)
        plane = np.eye(3)
        i, j = axes
        plane[i, i], plane[i, j], plane[j, i], plane[j, j] = math.cos(a), -math.sin(a), math.sin(a), math.cos(a)
        rot = rot @ plane
    return rot


def _grid(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Broadcastable normalised coordinates in [-1, 1], one array per axis (length n_k on axis k)."""
    coords = []
    for axis, n in enumerate(shape):
        view = [1] * len(shape)
        view[axis] = n
        coords.append(np.linspace(-1.0, 1.0, n, dtype=np.float32).reshape(view))
    return coords


def _upsample_axis(arr: np.ndarray, axis: int, n: int) -> np.ndarray:
    """Smoothstep interpolation of ``arr`` along ``axis`` to length ``n`` (arr.shape[axis] >= 2)."""
    g = arr.shape[axis]
    t = np.linspace(0.0, g - 1.0, n, dtype=np.float32)
    i0 = np.minimum(np.floor(t).astype(np.int64), g - 2)
    w = t - i0
    w = w * w * (3.0 - 2.0 * w)
    view = [1] * arr.ndim
    view[axis] = n
    w = w.reshape(view)
    return np.take(arr, i0, axis=axis) * (1.0 - w) + np.take(arr, i0 + 1, axis=axis) * w


def _value_noise(shape: tuple[int, ...], cells: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth low-frequency noise of ``shape``, roughly in [-1, 1] (``cells`` periods per axis)."""
    grid_shape = tuple(max(2, min(cells, n // 2) + 1) for n in shape)
    arr = rng.uniform(-1.0, 1.0, size=grid_shape).astype(np.float32)
    for axis, n in enumerate(shape):
        arr = _upsample_axis(arr, axis, n)
    return arr


def _box(center: np.ndarray, radius: float, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Index slices covering the normalised-coordinate cube ``center +- radius``."""
    slices = []
    for c, n in zip(center, shape):
        scale = (n - 1) / 2.0
        lo = int(math.floor((c - radius + 1.0) * scale))
        hi = int(math.ceil((c + radius + 1.0) * scale)) + 1
        slices.append(slice(min(max(lo, 0), n), min(max(hi, 0), n)))
    return tuple(slices)


def _phantom_labels(shape: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Label map of an anatomy-like phantom.

    Label 0 is background, 1 the outer body shell (skin/fat), 2 the inner soft
    tissue, and 3.. organ-like ellipsoids (some with a nested inner ellipsoid).

    Args:
        shape: Spatial shape, 2D or 3D.
        rng: Random generator; fully determines the layout.

    Returns:
        (labels of ``shape`` as uint8, number of labels including background).
    """
    ndim = len(shape)
    coords = _grid(shape)
    body_center = rng.uniform(-0.05, 0.05, size=ndim)
    body_axes = rng.uniform(0.75, 0.92, size=ndim)
    body_rot = _rotation(rng, ndim, math.radians(20.0))
    # Body-frame coordinates p = R^T (x - c) / a: the body is the unit ball.
    p = [
        sum(body_rot[j, k] * (coords[j] - np.float32(body_center[j])) for j in range(ndim)) / np.float32(body_axes[k])
        for k in range(ndim)
    ]
    radius2 = sum(pk * pk for pk in p)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[radius2 <= 1.0] = 1
    labels[radius2 <= rng.uniform(0.8, 0.9) ** 2] = 2
    next_label = 3
    for _ in range(int(rng.integers(5, 10))):
        axes = np.clip(rng.uniform(0.12, 0.4) * rng.uniform(0.7, 1.3, size=ndim), 0.08, 0.5)
        direction = rng.normal(size=ndim)
        direction /= np.linalg.norm(direction) + 1e-12
        center = direction * (0.84 - axes.max()) * rng.random() ** (1.0 / ndim)
        rot = _rotation(rng, ndim, math.pi)
        world_center = body_center + body_rot @ (body_axes * center)
        box = _box(world_center, float(body_axes.max() * axes.max()), shape)
        # Organ-frame coordinates u: the organ is the unit ball.
        u = [
            sum(rot[j, k] * (p[j][box] - np.float32(center[j])) for j in range(ndim)) / np.float32(axes[k])
            for k in range(ndim)
        ]
        sub = labels[box]
        sub[sum(uk * uk for uk in u) <= 1.0] = next_label
        next_label += 1
        if rng.random() < 0.5:
            scale = rng.uniform(0.3, 0.6)
            offset = rng.normal(size=ndim)
            offset *= rng.uniform(0.0, 0.8 * (1.0 - scale)) / (np.linalg.norm(offset) + 1e-12)
            inner = sum((uk - np.float32(offset[k])) ** 2 for k, uk in enumerate(u)) <= scale**2
            sub[inner] = next_label
            next_label += 1
    return labels, next_label


def _intensities(num_labels: int, rng: np.random.Generator) -> np.ndarray:
    """Per-label mean intensity, shape (num_labels,); background 0, organs well separated."""
    lut = np.zeros(num_labels, dtype=np.float32)
    lut[1] = rng.uniform(0.15, 0.3)
    lut[2] = rng.uniform(0.35, 0.5)
    num_organs = num_labels - 3
    if num_organs > 0:
        levels = np.linspace(0.1, 1.0, num_organs) + rng.uniform(-0.02, 0.02, size=num_organs)
        lut[3:] = rng.permutation(levels)
    return lut


def _phantom_channels(shape: tuple[int, ...], seed: int, num_channels: int) -> np.ndarray:
    """Render ``num_channels`` contrasts of one phantom, shape (num_channels, *shape), float32 in [0, 1]."""
    if len(shape) not in (2, 3) or not all(_is_int(n) and n > 0 for n in shape):
        raise DataError(f"phantom shape: expected 2 or 3 positive integers, got {tuple(shape)!r}")
    shape = tuple(int(n) for n in shape)
    rng = _rng(seed)
    labels, num_labels = _phantom_labels(shape, rng)
    texture = 0.6 * _value_noise(shape, 4, rng) + 0.4 * _value_noise(shape, 8, rng)
    inside = labels > 0
    out = np.empty((num_channels, *shape), dtype=np.float32)
    for channel in range(num_channels):
        chan_rng = rng if channel == 0 else _rng(seed, channel)
        lut = _intensities(num_labels, chan_rng)
        image = lut[labels] * (1.0 + 0.15 * texture)
        image += 0.01 * chan_rng.standard_normal(shape, dtype=np.float32)
        np.clip(np.where(inside, image, np.float32(0.0)), 0.0, 1.0, out=out[channel])
    return out


def make_phantom(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Generate a deterministic anatomy-like phantom.

    A rotated/shifted body ellipsoid (outer shell and inner soft tissue) with
    several organ-like ellipsoids of distinct intensities, some containing a
    nested ellipsoid, modulated by a smooth low-frequency texture plus a little
    fine noise. The background is exactly 0.

    Args:
        shape: Spatial shape, (H, W) or (H, W, D).
        seed: Any integer; the same seed always gives the same array.

    Returns:
        float32 array of exactly ``shape`` with values in [0, 1].

    Raises:
        DataError: If ``shape`` is not 2 or 3 positive integers.
    """
    return _phantom_channels(tuple(shape), seed, 1)[0]


class SyntheticPhantomDataset(Dataset):
    """Phantom volumes generated on the fly (item ``i`` uses seed ``seed * 100003 + i``).

    Items are ``{"image": FloatTensor (in_channels, H, W, D), "path": "synthetic://{seed}/{i}",
    "affine": identity DoubleTensor (4, 4)}``. Extra channels show the same anatomy
    with different (deterministic) tissue contrasts.
    """

    def __init__(self, num: int, shape: tuple[int, int, int], seed: int, in_channels: int = 1) -> None:
        """Create the dataset.

        Args:
            num: Number of volumes (>= 0).
            shape: Spatial shape (H, W, D).
            seed: Base seed.
            in_channels: Channels per volume (>= 1).

        Raises:
            DataError: On a bad argument.
        """
        self.num = _check_count(num, "synthetic num", 0)
        self.shape = _check_size(shape, "data.image_size")
        self.seed = int(seed)
        self.in_channels = _check_count(in_channels, "in_channels", 1)

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.num <= index < self.num:
            raise IndexError(f"index {index} out of range for {self.num} synthetic volumes")
        index = int(index) % self.num
        volume = _phantom_channels(self.shape, self.seed * 100003 + index, self.in_channels)
        return {
            IMAGE_KEY: torch.from_numpy(volume),
            PATH_KEY: f"synthetic://{self.seed}/{index}",
            AFFINE_KEY: torch.eye(4, dtype=torch.float64),
        }


# --------------------------------------------------------------------------- file discovery


def _is_nifti(path: Path | str) -> bool:
    return str(path).lower().endswith(_NIFTI_SUFFIXES)


def _find_in_folder(folder: Path, key: str) -> list[Path]:
    """Recursive, sorted search for NIfTI files in ``folder`` (hidden files skipped)."""
    found = sorted(
        (p for p in folder.rglob("*") if _is_nifti(p.name) and not p.name.startswith(".") and p.is_file()),
        key=str,
    )
    if not found:
        raise DataError(
            f"{key}: folder '{folder}' contains no .nii or .nii.gz files (searched recursively); "
            f"add NIfTI files or {_PATHS_HINT}"
        )
    return found


def _find_by_glob(pattern: str, key: str) -> list[Path]:
    """Sorted NIfTI files matching a glob pattern (``**`` recurses)."""
    matches = sorted(glob.glob(pattern, recursive=True))
    found = [Path(m) for m in matches if _is_nifti(m) and os.path.isfile(m)]
    if not matches:
        raise DataError(f"{key}: glob '{pattern}' matches nothing; check the pattern or {_PATHS_HINT}")
    if not found:
        raise DataError(
            f"{key}: glob '{pattern}' matches {len(matches)} path(s) but no .nii/.nii.gz file; "
            "narrow the pattern to NIfTI files, e.g. 'scans/*.nii.gz'"
        )
    return found


def _check_listed_file(entry: Any, key: str) -> Path:
    """Validate one entry of a list of files."""
    if not isinstance(entry, (str, os.PathLike)) or not str(entry):
        raise DataError(f"{key}: expected a file path string, got {entry!r}")
    path = Path(entry).expanduser()
    if not path.exists():
        raise DataError(f"{key}: file '{path}' does not exist; fix the path or remove it from the list")
    if path.is_dir():
        raise DataError(f"{key}: '{path}' is a folder; list NIfTI files only, or set data.paths to the folder itself")
    if not _is_nifti(path):
        raise DataError(f"{key}: '{path}' is not a NIfTI file; expected a .nii or .nii.gz file")
    return path


def find_nifti_files(paths: str | list[str] | None, key: str = "data.paths") -> list[Path]:
    """Resolve ``paths`` to a list of NIfTI files.

    Args:
        paths: A folder (searched recursively for *.nii and *.nii.gz, sorted), a glob
            pattern (sorted matches, non-NIfTI matches ignored), a single file, or a
            list of files (kept in the given order, each must exist).
        key: Config key named in error messages.

    Returns:
        The NIfTI file paths (at least one).

    Raises:
        DataError: For None/empty input, a missing folder or file, a folder without
            NIfTI files, a glob matching nothing, or a listed non-NIfTI file.
    """
    if isinstance(paths, os.PathLike):
        paths = os.fspath(paths)
    if paths is None or (isinstance(paths, (str, list, tuple)) and len(paths) == 0):
        raise DataError(f"{key}: no input given; {_PATHS_HINT} (required when data.source is 'nifti')")
    if isinstance(paths, (list, tuple)):
        return [_check_listed_file(entry, f"{key}[{i}]") for i, entry in enumerate(paths)]
    if not isinstance(paths, str):
        raise DataError(f"{key}: expected a string or a list of strings, got {type(paths).__name__} {paths!r}")
    text = os.path.expanduser(paths)
    if any(ch in _GLOB_CHARS for ch in text):
        return _find_by_glob(text, key)
    path = Path(text)
    if path.is_dir():
        return _find_in_folder(path, key)
    if path.is_file():
        if not _is_nifti(path):
            raise DataError(f"{key}: '{path}' is not a NIfTI file; expected a .nii or .nii.gz file")
        return [path]
    kind = "file" if _is_nifti(path) else "folder"
    raise DataError(f"{key}: {kind} '{path}' does not exist; {_PATHS_HINT}")


def split_files(files: Sequence[Path], val_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Deterministically split files into training and validation sets.

    With two or more files the validation set holds ``round(n * val_fraction)``
    files, at least 1 and at most n - 1. A single file is used for both sets.

    Args:
        files: The files to split.
        val_fraction: Fraction for validation, in [0, 1).
        seed: Shuffle seed; the same seed gives the same split.

    Returns:
        (train_files, val_files), each sorted.
    """
    files = list(files)
    if len(files) < 2:
        return files, list(files)
    order = _rng(seed).permutation(len(files))
    num_val = min(len(files) - 1, max(1, round(len(files) * val_fraction)))
    val = sorted((files[i] for i in order[:num_val]), key=str)
    train = sorted((files[i] for i in order[num_val:]), key=str)
    return train, val


# --------------------------------------------------------------------------- NIfTI transforms


def _check_shape(name: str, shape: tuple[int, ...], in_channels: int) -> None:
    """Check a channel-first shape (C, H, W, D) against the expected layout."""
    spatial = tuple(int(s) for s in shape[1:])
    if len(spatial) != 3:
        raise DataError(
            f"{name}: expected a 3D volume (H, W, D), got shape {spatial}; "
            "use 3D NIfTI volumes (2D images and time series are not supported)"
        )
    if int(shape[0]) != in_channels:
        raise DataError(
            f"{name}: has {int(shape[0])} channel(s) (channel-first shape {tuple(int(s) for s in shape)}) but "
            f"in_channels={in_channels}; set the network's in_channels to {int(shape[0])} or use files with "
            f"{in_channels} channel(s)"
        )


def _check_finite(name: str, image: torch.Tensor) -> None:
    """Reject volumes containing NaN or inf."""
    if image.is_floating_point():
        bad = int((~torch.isfinite(image)).sum())
        if bad:
            raise DataError(f"{name}: contains {bad} non-finite voxels (NaN/inf); fix or remove the file")


def _read_error(name: str, exc: BaseException) -> DataError:
    return DataError(
        f"{name}: cannot read the NIfTI file ({type(exc).__name__}: {exc}); "
        "the file is truncated or corrupt, re-export it or remove it from data.paths"
    )


def _check_header(path: Path, in_channels: int) -> None:
    """Cheap header-only check of a NIfTI file (readability, dimensionality, channels).

    Raises:
        DataError: If the header cannot be read or the shape does not fit.
    """
    try:
        shape = tuple(int(s) for s in nib.load(str(path)).shape)
    except _READ_ERRORS as exc:
        raise _read_error(str(path), exc) from exc
    if len(shape) == 4:
        shape = (shape[3], *shape[:3])
    elif len(shape) in (2, 3):
        shape = (1, *shape)
    else:
        return  # other layouts are judged after loading
    _check_shape(str(path), shape, in_channels)


class LoadCheckedd(MapTransform):
    """Load NIfTI files channel-first and validate the raw array.

    The loaded ``data[key]`` is a MetaTensor of shape (C, H, W, D). Unreadable files,
    non-3D images, a channel count other than ``in_channels`` and non-finite
    voxels raise :class:`DataError` naming the file.
    """

    def __init__(self, keys: str | Sequence[str], in_channels: int = 1) -> None:
        """Create the transform.

        Args:
            keys: Keys holding file paths.
            in_channels: Expected number of channels.
        """
        super().__init__(keys)
        self.in_channels = in_channels
        self.loader = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            name = str(d[key])
            try:
                image = self.loader(d[key])
            except _READ_ERRORS as exc:
                raise _read_error(name, exc) from exc
            _check_shape(name, tuple(image.shape), self.in_channels)
            _check_finite(name, image)
            d[key] = image
        return d


class KeepAffined(MapTransform):
    """Store the (4, 4) affine of ``data[key]`` (a MetaTensor) as a plain float64 tensor."""

    def __init__(self, key: str = IMAGE_KEY, affine_key: str = AFFINE_KEY) -> None:
        """Create the transform.

        Args:
            key: Key of the image whose affine is kept.
            affine_key: Key the (4, 4) affine is written to.
        """
        super().__init__(key)
        self.affine_key = affine_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.keys[0]]
        affine = image.affine if isinstance(image, MetaTensor) else torch.eye(4)
        d[self.affine_key] = torch.as_tensor(np.asarray(affine, dtype=np.float64))
        return d


def _find_data_error(exc: BaseException) -> DataError | None:
    """Return the first DataError in the cause/context chain of ``exc`` (MONAI wraps errors)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, DataError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


class CheckedCompose(Compose):
    """Compose that raises a :class:`DataError` from a step as is.

    MONAI wraps every exception raised inside a Compose in a RuntimeError
    ("applying transform ..."); this subclass digs the DataError out again so
    callers (and Dataset / CacheDataset built on it) see the one-line message.
    """

    def __call__(
        self, input_: Any, start: int = 0, end: int | None = None, threading: bool = False, lazy: bool | None = None
    ) -> Any:
        try:
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        except RuntimeError as exc:
            err = _find_data_error(exc)
            if err is None:
                raise
            raise err from None


def build_nifti_transforms(cfg: DataConfig, in_channels: int = 1) -> CheckedCompose:
    """Build the deterministic NIfTI preprocessing pipeline on key "image".

    Load + validate -> RAS orientation -> optional resampling to ``cfg.spacing``
    (bilinear) -> percentile scaling to [0, 1] (clipped, per channel) -> pad/crop to
    ``cfg.image_size`` -> keep the affine -> plain float32 tensor.

    Args:
        cfg: Data config.
        in_channels: Channels each file must have.

    Returns:
        A CheckedCompose (raises DataError unwrapped) mapping ``{"image": path, ...}``
        to ``{"image": FloatTensor (C, H, W, D), "affine": DoubleTensor (4, 4), ...}``.
    """
    cfg = validate_data_config(cfg)
    lower, upper = cfg.intensity_percentiles
    transforms: list[Any] = [
        LoadCheckedd(IMAGE_KEY, in_channels=in_channels),
        Orientationd(IMAGE_KEY, axcodes="RAS", labels=None),
    ]
    if cfg.spacing is not None:
        transforms.append(Spacingd(IMAGE_KEY, pixdim=cfg.spacing, mode="bilinear"))
    transforms += [
        ScaleIntensityRangePercentilesd(
            IMAGE_KEY, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True, channel_wise=True
        ),
        ResizeWithPadOrCropd(IMAGE_KEY, spatial_size=cfg.image_size),
        KeepAffined(IMAGE_KEY, AFFINE_KEY),
        EnsureTyped(IMAGE_KEY, data_type="tensor", dtype=torch.float32, track_meta=False),
    ]
    return CheckedCompose(transforms)


def _nifti_dataset(files: Sequence[Path], transform: Compose, cfg: DataConfig) -> MonaiDataset:
    items = [{IMAGE_KEY: str(p), PATH_KEY: str(p)} for p in files]
    if cfg.cache:
        return CacheDataset(items, transform, num_workers=max(1, cfg.num_workers), progress=False)
    return MonaiDataset(items, transform)


def build_file_dataset(cfg: DataConfig, paths: str | list[str], in_channels: int = 1, key: str = "--data") -> Dataset:
    """Every NIfTI file of ``paths`` (folder, glob or list), preprocessed like ``cfg``'s NIfTI pipeline.

    Used to evaluate a trained model on data other than its own validation split.

    Raises:
        DataError: naming ``key`` for missing paths, and the file for unreadable ones.
    """
    files = find_nifti_files(paths, key)
    for path in files:
        _check_header(path, in_channels)
    return _nifti_dataset(files, build_nifti_transforms(cfg, in_channels), cfg)


def model_input(images: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """What the network sees of a batch of volumes: 2D configs take the centre slice along the last axis.

    Args:
        images: BxCxHxWxD (or already BxCxHxW).
        spatial_dims: the network's spatial dimensions.
    """
    if spatial_dims == 2 and images.dim() == 5:
        return images[..., images.shape[-1] // 2]
    return images


def build_datasets(
    cfg: DataConfig, seed: int, in_channels: int = 1, shard: tuple[int, int] | None = None
) -> tuple[Dataset, Dataset]:
    """Build the training and validation datasets.

    Synthetic: two :class:`SyntheticPhantomDataset` (validation uses seed ``seed + 1``).
    NIfTI: files from ``cfg.paths`` split by :func:`split_files`; every file's header
    is checked up front, voxel data is checked when loaded.

    Args:
        cfg: Data config.
        seed: Seed for phantom generation / file split.
        in_channels: Channels of every volume.
        shard: ``(rank, world_size)`` under DDP. With ``cfg.cache``, each process then caches only its own
            fixed share of the NIfTI files (MONAI's pattern: ``partition_dataset``, shuffled once with
            ``seed``; the training shares are padded to equal length, the validation shares are not),
            instead of every process caching the whole dataset.

    Returns:
        (train, val) datasets; items are ``{"image": FloatTensor (in_channels, H, W, D),
        "path": str, "affine": DoubleTensor (4, 4)}``.

    Raises:
        DataError: On a bad config value, path or file.
    """
    cfg = validate_data_config(cfg)
    in_channels = _check_count(in_channels, "in_channels", 1)
    if cfg.source == "synthetic":
        train = SyntheticPhantomDataset(cfg.num_train, cfg.image_size, seed, in_channels)
        val = SyntheticPhantomDataset(cfg.num_val, cfg.image_size, seed + 1, in_channels)
        return train, val
    files = find_nifti_files(cfg.paths, "data.paths")
    for path in files:
        _check_header(path, in_channels)
    train_files, val_files = split_files(files, cfg.val_fraction, seed)
    if len(files) == 1:
        warnings.warn(
            f"data.paths: only one NIfTI file ({files[0]}); it is used for both training and validation",
            stacklevel=2,
        )
    if cfg.cache and shard is not None and shard[1] > 1:
        rank, world = shard
        train_files = partition_dataset(train_files, num_partitions=world, shuffle=True, seed=seed,
                                        even_divisible=True)[rank]
        val_files = partition_dataset(val_files, num_partitions=world)[rank]
    transform = build_nifti_transforms(cfg, in_channels)
    return _nifti_dataset(train_files, transform, cfg), _nifti_dataset(val_files, transform, cfg)


def make_loader(
    ds: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int,
    sampler: Sampler | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """Wrap a dataset in a seeded DataLoader.

    Args:
        ds: Dataset of dict items.
        batch_size: Items per batch (>= 1).
        shuffle: Shuffle each epoch (ignored when ``sampler`` is given).
        num_workers: Worker processes (0 = main process).
        seed: Seed of the loader's torch.Generator (shuffle order).
        sampler: Optional sampler (e.g. DistributedSampler); replaces ``shuffle``.
        pin_memory: page-locked batches, so copies to a GPU with ``non_blocking=True`` overlap compute.

    Returns:
        DataLoader yielding ``{"image": (B, C, H, W, D), "path": list[str], ...}``.
    """
    batch_size = _check_count(batch_size, "batch_size", 1)
    num_workers = _check_count(num_workers, "data.num_workers", 0)
    generator = torch.Generator()
    generator.manual_seed(int(seed) % 2**63)
    kwargs: dict[str, Any] = {
        "batch_size": batch_size,
        "num_workers": num_workers,
        "generator": generator,
        "persistent_workers": num_workers > 0,
        "pin_memory": pin_memory,
    }
    if sampler is not None:
        kwargs["sampler"] = sampler
    else:
        kwargs["shuffle"] = shuffle
    return DataLoader(ds, **kwargs)


# --------------------------------------------------------------------------- saving


def save_nifti(
    volume: np.ndarray | torch.Tensor,
    path: str | os.PathLike,
    affine: np.ndarray | torch.Tensor | None = None,
) -> Path:
    """Write a volume as NIfTI (float32).

    Args:
        volume: (H, W), (H, W, D) or channel-first (C, H, W, D); a single channel is
            squeezed, several channels are stored last (H, W, D, C).
        path: Output file; ".nii.gz" is appended when it has no NIfTI suffix.
            Parent folders are created.
        affine: (4, 4) voxel-to-world matrix; identity when None.

    Returns:
        The path written.
    """
    array = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    array = array.astype(np.float32, copy=False)
    if array.ndim == 4:
        array = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    elif array.ndim not in (2, 3):
        raise DataError(f"save_nifti: expected (H, W), (H, W, D) or (C, H, W, D), got shape {array.shape}")
    if affine is None:
        matrix = np.eye(4)
    elif isinstance(affine, torch.Tensor):
        matrix = affine.detach().cpu().double().numpy()
    else:
        matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise DataError(f"save_nifti: affine must have shape (4, 4), got {matrix.shape}")
    out = Path(path)
    if not _is_nifti(out):
        out = out.with_name(out.name + ".nii.gz")
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, matrix), str(out))
    return out
