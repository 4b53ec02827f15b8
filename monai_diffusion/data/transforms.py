"""The NIfTI preprocessing pipeline on MONAI transforms, with every failure reported by file name.

Load and check (readable, 3D, channel count, finite voxels) -> RAS orientation -> optional resampling to
``data.spacing`` -> scaling to [0, 1] (a fixed window or percentiles) -> pad/crop to ``data.image_size`` ->
keep the affine -> a plain float32 tensor. MONAI wraps errors raised inside a ``Compose`` in ``RuntimeError``;
the one-line :class:`DataError` is dug out again by :class:`CheckedCompose`.
"""

from __future__ import annotations

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
from monai_diffusion.data.keys import AFFINE_KEY, IMAGE_KEY
from monai_diffusion.errors import DataError

__all__ = ["LoadCheckedd", "KeepAffined", "CheckedCompose", "build_nifti_transforms", "check_header"]

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


def check_header(path: Path, in_channels: int) -> None:
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

    Load + validate -> RAS orientation -> optional resampling to ``cfg.spacing`` (bilinear) -> scaling to
    [0, 1] (``cfg.intensity_window``, else percentiles per channel; clipped) -> pad/crop to ``cfg.image_size``
    -> keep the affine -> plain float32 tensor.

    Args:
        cfg: Data config.
        in_channels: Channels each file must have.

    Returns:
        A CheckedCompose (raises DataError unwrapped) mapping ``{"image": path, ...}``
        to ``{"image": FloatTensor (C, H, W, D), "affine": DoubleTensor (4, 4), ...}``.
    """
    lower, upper = cfg.intensity_percentiles
    transforms: list[Any] = [
        LoadCheckedd(IMAGE_KEY, in_channels=in_channels),
        Orientationd(IMAGE_KEY, axcodes="RAS", labels=None),
    ]
    if cfg.spacing is not None:
        transforms.append(Spacingd(IMAGE_KEY, pixdim=cfg.spacing, mode="bilinear"))
    if cfg.intensity_window is not None:  # e.g. CT: fixed Hounsfield units
        a_min, a_max = cfg.intensity_window
        transforms.append(ScaleIntensityRanged(IMAGE_KEY, a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True))
    else:
        transforms.append(ScaleIntensityRangePercentilesd(
            IMAGE_KEY, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True, channel_wise=True
        ))
    transforms += [
        ResizeWithPadOrCropd(IMAGE_KEY, spatial_size=cfg.image_size),
        KeepAffined(IMAGE_KEY, AFFINE_KEY),
        EnsureTyped(IMAGE_KEY, data_type="tensor", dtype=torch.float32, track_meta=False),
    ]
    return CheckedCompose(transforms)
