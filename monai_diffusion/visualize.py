"""Pictures a person can look at: three orthogonal centre slices of volumes, side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["orthogonal_slices", "volume_grid", "labelled_rows", "save_png"]


def _to_uint8(plane: np.ndarray) -> np.ndarray:
    """[0, 1] to 0..255; NaN (the output of a diverged network) shows as black, without a cast warning."""
    return (np.clip(np.nan_to_num(plane, nan=0.0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _fit(plane: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize so the longer side is ``size`` pixels (small volumes stay visible)."""
    image = Image.fromarray(_to_uint8(plane))
    scale = size / max(plane.shape)
    width, height = max(1, round(plane.shape[1] * scale)), max(1, round(plane.shape[0] * scale))
    return np.asarray(image.resize((width, height), Image.NEAREST))


def orthogonal_slices(volume: torch.Tensor | np.ndarray, size: int = 128, spatial_dims: int = 3) -> np.ndarray:
    """Centre slices along the three axes of a CxHxWxD (or HxWxD) volume as one uint8 strip; for
    ``spatial_dims=2`` the CxHxW (or HxW) image itself.

    Returns:
        ``size`` x (3 * ``size``) uint8 image (``size`` x ``size`` in 2D); first channel, values clipped to [0, 1].
    """
    array = volume.detach().float().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    if array.ndim == spatial_dims + 1:
        array = array[0]
    if spatial_dims == 2:
        planes = [array]
    else:
        h, w, d = array.shape
        planes = [array[h // 2, :, :], array[:, w // 2, :], array[:, :, d // 2]]
    strip = np.zeros((size, len(planes) * size), dtype=np.uint8)
    for i, plane in enumerate(planes):
        fitted = _fit(np.rot90(plane), size)
        strip[: fitted.shape[0], i * size : i * size + fitted.shape[1]] = fitted
    return strip


def volume_grid(
    rows: Sequence[tuple[str, Sequence[torch.Tensor]]], size: int = 128, spatial_dims: int = 3
) -> np.ndarray:
    """Stack labelled rows of volumes; each volume contributes its three orthogonal slices (2D: itself).

    Args:
        rows: ``(label, volumes)`` pairs, e.g. ``[("input", x), ("reconstruction", y)]``.
        size: pixels per slice.
        spatial_dims: 2 for CxHxW images, 3 for CxHxWxD volumes.
    """
    return labelled_rows([(label, np.concatenate([orthogonal_slices(v, size, spatial_dims) for v in volumes], axis=1))
                          for label, volumes in rows])


def labelled_rows(rows: Sequence[tuple[str, np.ndarray]]) -> np.ndarray:
    """Stack uint8 image strips of equal width, each with its label on the left."""
    label_width = 110
    strips = []
    for label, strip in rows:
        canvas = Image.new("L", (label_width + strip.shape[1], strip.shape[0]), color=0)
        canvas.paste(Image.fromarray(strip), (label_width, 0))
        ImageDraw.Draw(canvas).text((4, strip.shape[0] // 2 - 6), label, fill=255)
        strips.append(np.asarray(canvas))
    return np.concatenate(strips, axis=0)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 image as PNG (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def label_preview(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label maps B x 1 x [SPATIAL DIMS] as images in [0, 1], for the previews: background black, and the classes
    present (in the whole batch) at evenly spaced greys in class order, so a few classes of many stay apart."""
    classes = label.long()
    present = torch.unique(torch.cat([classes.flatten(), classes.new_zeros(1)]))  # sorted, with background
    grey = torch.zeros(max(num_classes, int(present.max()) + 1))
    grey[present] = torch.linspace(0.0, 1.0, len(present)) if len(present) > 1 else 0.0
    return grey[classes]
