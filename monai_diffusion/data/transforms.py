"""The NIfTI preprocessing pipeline on MONAI transforms, with every failure reported by file name.

Load and check (readable, 3D, channel count, finite voxels) -> RAS orientation -> optional resampling to
``data.spacing`` -> scaling to [0, 1] (a fixed window or percentiles) -> pad/crop to ``data.image_size`` ->
keep the affine -> a plain float32 tensor. MONAI wraps errors raised inside a ``Compose`` in ``RuntimeError``;
the one-line :class:`DataError` is dug out again by :class:`CheckedCompose`, and any other failure while a
file is loaded or transformed becomes a :class:`DataError` that names the file.

:func:`check_header` refuses, from the header alone and before any voxel is read, what would otherwise
fail late or silently: complex or RGB data, a singular affine, more voxels than the file can hold, and
volumes (as stored, or resampled to ``data.spacing``) larger than this machine's memory.
"""

from __future__ import annotations

import math
import os
import re
import zlib
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureTyped,
    LoadImage,
    MapTransform,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from monai_diffusion.config.schema import DataConfig
from monai_diffusion.data.keys import AFFINE_KEY, IMAGE_KEY, LABEL_KEY, PATH_KEY
from monai_diffusion.errors import DataError, VolumeError
from monai_diffusion.profiling import physical_memory_bytes

__all__ = ["LoadCheckedd", "LoadLabeld", "KeepAffined", "CheckedCompose", "build_nifti_transforms", "check_header",
           "check_label_header", "check_label_values"]

_AFFINE_TOLERANCE_MM = 1e-3  # label and image affines agree to this (headers store them as float32)

# Exceptions nibabel raises for unreadable files: ImageFileError (empty file, header cut short, not gzip),
# EOFError (gzip stream cut short), OSError (raw .nii with too few bytes; gzip.BadGzipFile), zlib.error
# (corrupt deflate stream), HeaderDataError / ValueError (inconsistent header fields).
_READ_ERRORS: tuple[type[BaseException], ...] = (
    ImageFileError, HeaderDataError, EOFError, OSError, zlib.error, ValueError
)


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
    """Reject volumes containing NaN or inf, or values that become inf as float32 (training's precision)."""
    if image.is_floating_point():
        bad = int((~torch.isfinite(image)).sum())
        if bad:
            raise DataError(f"{name}: contains {bad} non-finite voxels (NaN/inf); fix or remove the file")
        if torch.finfo(image.dtype).max > _FLOAT32_MAX and image.numel():
            largest = float(image.abs().max())
            if largest > _FLOAT32_MAX:
                raise DataError(f"{name}: holds finite values up to {largest:.3g}, beyond float32's range "
                                f"(±{_FLOAT32_MAX:.3g}) in which volumes are trained; rescale the data")


_FLOAT32_MAX = float(np.finfo(np.float32).max)
_MAX_GZIP_RATIO = 1032  # deflate never compresses better than about 1032:1


def _read_error(name: str, exc: BaseException) -> DataError:
    if isinstance(exc, FileNotFoundError) or not os.path.exists(name):
        return DataError(f"{name}: the file no longer exists (deleted or moved while the run was using it); "
                         f"restore it, or start again without it")
    if isinstance(exc, MemoryError):
        return DataError(f"{name}: not enough memory to load the file; use smaller volumes or a larger machine")
    return DataError(
        f"{name}: cannot read the NIfTI file ({type(exc).__name__}: {_first_line(exc)}); "
        "the file is truncated or corrupt, re-export it or remove it from data.paths"
    )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else ""


def _check_voxels(path: Path, image: Any, shape: tuple[int, ...], spacing: Sequence[float] | None) -> None:
    """Refuse a file whose header promises more data than the file holds, or a volume (stored, or resampled
    to ``spacing``) that cannot fit in this machine's memory as float32."""
    name = str(path)
    itemsize = image.get_data_dtype().itemsize
    data_bytes = math.prod(shape) * itemsize
    size = path.stat().st_size
    offset = int(image.header.get_data_offset())
    if name.lower().endswith(".nii") and offset + data_bytes > size:
        raise DataError(f"{name}: the header says {' x '.join(map(str, shape))} voxels ({data_bytes:,} bytes of "
                        f"data), but the file has {size:,} bytes; the file is truncated or its header is wrong, "
                        f"re-export it or remove it from data.paths")
    if name.lower().endswith(".gz") and data_bytes > size * _MAX_GZIP_RATIO:
        raise DataError(f"{name}: the header says {' x '.join(map(str, shape))} voxels ({data_bytes:,} bytes), more "
                        f"than a {size:,}-byte gzip file can hold; the file is truncated or its header is wrong, "
                        f"re-export it or remove it from data.paths")
    memory = physical_memory_bytes()
    if math.prod(shape) * 4 > memory:
        raise DataError(f"{name}: {' x '.join(map(str, shape))} voxels need {math.prod(shape) * 4 / 1e9:.3g} GB as "
                        f"float32, more than this machine's {memory / 1e9:.3g} GB; use smaller volumes")
    if spacing is not None:
        zooms = np.linalg.norm(np.asarray(image.affine, dtype=np.float64)[:3, :3], axis=0)
        voxels = math.prod(float(n) * z / s for n, z, s in zip(shape[:3], zooms, spacing))
        if voxels * max(1, math.prod(shape[3:])) * 4 > memory:
            raise DataError(
                f"{name}: resampling its {' x '.join(f'{z:.3g}' for z in zooms)} mm voxels to data.spacing "
                f"{list(spacing)} mm gives about {voxels:.3g} voxels ({voxels * 4 / 1e9:.3g} GB as float32), more "
                f"than this machine's {memory / 1e9:.3g} GB; check data.spacing (in mm, e.g. [1.0, 1.0, 1.0])"
            )


def check_header(path: Path, in_channels: int, spacing: Sequence[float] | None = None) -> None:
    """Cheap header-only check of a NIfTI file: readability, dimensionality, channels, data type, affine,
    and the size of the data (in the file, in memory, and after resampling to ``spacing``).

    Raises:
        DataError: naming the file, if the header cannot be read or the volume cannot be used.
    """
    name = str(path)
    try:
        image = nib.load(name)
        shape = tuple(int(s) for s in image.shape)
        dtype = image.get_data_dtype()
        affine = np.asarray(image.affine, dtype=np.float64)
    except _READ_ERRORS as exc:
        raise _read_error(name, exc) from exc
    if len(shape) > 4:
        raise DataError(f"{name}: has {len(shape)} dimensions (shape {shape}); expected a 3D volume (H, W, D), "
                        f"or 4D (H, W, D, C) with channels last")
    if dtype.kind == "c":
        raise DataError(f"{name}: holds complex values ({dtype}); training needs real values, e.g. save the "
                        f"magnitude (abs) of the data")
    if dtype.kind not in "biuf":
        raise DataError(f"{name}: holds voxels of type {dtype} (e.g. RGB24), not one intensity per voxel; convert "
                        f"it to a grayscale volume (or one channel per colour)")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{name}: its affine (voxel-to-world matrix, from the sform/qform of the header) is "
                        f"{'not finite' if not np.isfinite(affine).all() else 'singular (e.g. all zero)'}, so the "
                        f"voxel size and orientation are unknown; fix the header's sform or qform")
    if len(shape) == 4:
        channel_first = (shape[3], *shape[:3])
    elif len(shape) in (2, 3):
        channel_first = (1, *shape)
    else:
        channel_first = shape
    _check_shape(name, channel_first, in_channels)
    _check_voxels(path, image, shape, spacing)


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
        # the file's own data type, so values are checked before the conversion to float32
        self.loader = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True, dtype=None)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            name = str(d[key])
            try:
                image = self.loader(d[key])
            except Exception as exc:  # noqa: BLE001 - MONAI re-raises reader failures as RuntimeError
                raise _read_error(name, exc) from exc
            _check_shape(name, tuple(image.shape), self.in_channels)
            if image.is_complex():
                raise DataError(f"{name}: holds complex values; training needs real values, e.g. save the "
                                f"magnitude (abs) of the data")
            _check_finite(name, image)
            d[key] = image.to(torch.float32)
        return d


def _misaligned(name: str, image_name: str, what: str, label_value: Any, image_value: Any) -> DataError:
    return DataError(f"{name}: the label map's {what} {label_value} differs from its image {image_name}'s "
                     f"{image_value}; a label map must lie on its image's voxel grid: resample it onto the image "
                     f"(nearest neighbour) or fix the datalist row")


def check_label_header(path: Path, image_path: Path) -> None:
    """Header-only check that the label map ``path`` is readable, one channel, and has the shape and affine of
    its image ``image_path`` (DataError naming the label file)."""
    name = str(path)
    try:
        label, image = nib.load(name), nib.load(str(image_path))
        label_shape, image_shape = tuple(int(n) for n in label.shape), tuple(int(n) for n in image.shape)
        label_affine, image_affine = np.asarray(label.affine, float), np.asarray(image.affine, float)
    except _READ_ERRORS as exc:
        raise _read_error(name, exc) from exc
    if label_shape[:3] != image_shape[:3] or (len(label_shape) > 3 and math.prod(label_shape[3:]) != 1):
        raise _misaligned(name, str(image_path), "shape", label_shape, image_shape[:3])
    if not np.allclose(label_affine, image_affine, rtol=0, atol=_AFFINE_TOLERANCE_MM):
        raise _misaligned(name, str(image_path), "affine", np.round(label_affine, 3).tolist(),
                          np.round(image_affine, 3).tolist())


def check_label_values(name: str, label: torch.Tensor, num_classes: int) -> None:
    """Refuse a label map with non-integer, non-finite or negative values, or a class >= ``num_classes``."""
    values = label.detach()
    if values.is_floating_point():
        if not bool(torch.isfinite(values).all()):
            raise DataError(f"{name}: the label map holds non-finite values; a label map holds integer classes")
        fractional = values != torch.round(values)
        if bool(fractional.any()):
            raise DataError(f"{name}: the label map holds non-integer values (e.g. {float(values[fractional][0]):g}); "
                            f"a label map holds integer classes 0..{num_classes - 1}: save it as an integer "
                            f"segmentation")
    if values.numel() == 0:
        return
    low, high = float(values.min()), float(values.max())
    if low < 0:
        raise DataError(f"{name}: the label map holds negative values (min {low:g}); classes are 0 (background) "
                        f"to data.num_classes - 1 = {num_classes - 1}")
    if high >= num_classes:
        raise DataError(f"{name}: the label map holds class {high:g}, but data.num_classes = {num_classes} allows "
                        f"0..{num_classes - 1}; set data.num_classes to at least {int(high) + 1}")


class LoadLabeld(MapTransform):
    """Load the label map ``data[label_key]`` (after the image was loaded by :class:`LoadCheckedd`) and check it:
    one channel, the image's shape and affine, integer classes in ``[0, num_classes)``. The result is a float32
    MetaTensor (1, H, W, D), so MONAI's spatial transforms treat it like the image (with nearest-neighbour
    interpolation)."""

    def __init__(self, num_classes: int, label_key: str = LABEL_KEY, image_key: str = IMAGE_KEY) -> None:
        super().__init__(label_key)
        self.num_classes, self.image_key = int(num_classes), image_key
        self.loader = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True, dtype=None)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        name, image_name = str(d[self.keys[0]]), str(d.get(PATH_KEY, "the image"))
        try:
            label = self.loader(name)
        except Exception as exc:  # noqa: BLE001 - MONAI re-raises reader failures as RuntimeError
            raise _read_error(name, exc) from exc
        image = d[self.image_key]
        if label.shape[0] != 1 or tuple(label.shape[1:]) != tuple(image.shape[1:]):
            raise _misaligned(name, image_name, "shape", tuple(label.shape[1:]), tuple(image.shape[1:]))
        label_affine, image_affine = np.asarray(label.affine, float), np.asarray(image.affine, float)
        if not np.allclose(label_affine, image_affine, rtol=0, atol=_AFFINE_TOLERANCE_MM):
            raise _misaligned(name, image_name, "affine", np.round(label_affine, 3).tolist(),
                              np.round(image_affine, 3).tolist())
        check_label_values(name, label, self.num_classes)
        d[self.keys[0]] = label.to(torch.float32)
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


def _failed_step(exc: BaseException) -> tuple[str, BaseException]:
    """The transform named by MONAI's ``applying transform <...>`` wrappers, and the error beneath them."""
    step, current, seen = "a transform", exc, set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found = re.match(r"applying transform <([\w.]+) object", str(current))
        if not found:
            break
        step = found.group(1).rsplit(".", 1)[-1]
        current = current.__cause__ or current.__context__
    return step, current if current is not None else exc


class CheckedCompose(Compose):
    """Compose whose every failure names the file being processed.

    MONAI wraps every exception raised inside a Compose in a RuntimeError
    ("applying transform ..."); this subclass digs a DataError out again so
    callers (and Dataset / CacheDataset built on it) see the one-line message,
    and turns any other failure into a DataError naming the file and the step.
    """

    def __call__(
        self, input_: Any, start: int = 0, end: int | None = None, threading: bool = False, lazy: bool | None = None
    ) -> Any:
        try:
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        except RuntimeError as exc:
            err = _find_data_error(exc)
            if err is not None:
                raise VolumeError(str(err)) from err
            if not isinstance(input_, Mapping):
                raise
            step, cause = _failed_step(exc)
            name = input_.get(PATH_KEY, input_.get(IMAGE_KEY))
            raise VolumeError(f"{name}: preprocessing failed in {step} ({type(cause).__name__}: "
                              f"{_first_line(cause)}); check the file and the data settings, or remove it from "
                              f"data.paths") from exc


def build_nifti_transforms(cfg: DataConfig, in_channels: int = 1) -> CheckedCompose:
    """Build the deterministic NIfTI preprocessing pipeline on key "image" (and "label" with
    ``cfg.num_classes``).

    Load + validate -> RAS orientation -> optional resampling to ``cfg.spacing`` (bilinear; the label map
    nearest-neighbour) -> scaling to [0, 1] (``cfg.intensity_window``, else percentiles per channel; clipped;
    the image only) -> pad/crop to ``cfg.image_size`` -> keep the affine -> plain tensors.

    Args:
        cfg: Data config.
        in_channels: Channels each file must have.

    Returns:
        A CheckedCompose (raises DataError unwrapped) mapping ``{"image": path, ...}``
        to ``{"image": FloatTensor (C, H, W, D), "affine": DoubleTensor (4, 4), ...}`` (and ``"label"``:
        FloatTensor (1, H, W, D) of integer classes, voxel-aligned with the image).
    """
    lower, upper = cfg.intensity_percentiles
    labelled = cfg.num_classes is not None
    keys = [IMAGE_KEY, LABEL_KEY] if labelled else [IMAGE_KEY]
    transforms: list[Any] = [LoadCheckedd(IMAGE_KEY, in_channels=in_channels)]
    if labelled:
        transforms.append(LoadLabeld(cfg.num_classes))
    transforms.append(Orientationd(keys, axcodes="RAS", labels=None))
    if cfg.spacing is not None:
        transforms.append(Spacingd(keys, pixdim=cfg.spacing, mode=["bilinear", "nearest"][: len(keys)]))
    if cfg.intensity_window is not None:  # e.g. CT: fixed Hounsfield units
        a_min, a_max = cfg.intensity_window
        transforms.append(ScaleIntensityRanged(IMAGE_KEY, a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True))
    else:
        transforms.append(ScaleIntensityRangePercentilesd(
            IMAGE_KEY, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True, channel_wise=True
        ))
    transforms += [
        ResizeWithPadOrCropd(keys, spatial_size=cfg.image_size),
        KeepAffined(IMAGE_KEY, AFFINE_KEY),
        EnsureTyped(keys, data_type="tensor", dtype=torch.float32, track_meta=False),
    ]
    return CheckedCompose(transforms)
