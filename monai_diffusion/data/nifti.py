"""Writing volumes as NIfTI files (samples, reconstructions), with the affine of the data they came from."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from monai_diffusion.data.files import is_nifti
from monai_diffusion.errors import DataError

__all__ = ["save_nifti", "centre_slice_affine"]


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
    if not is_nifti(out):
        out = out.with_name(out.name + ".nii.gz")
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, matrix), str(out))
    return out


def centre_slice_affine(affine: np.ndarray | torch.Tensor, depth: int) -> torch.Tensor:
    """The affine of the centre slice (index ``depth // 2`` along the last axis) of a volume with ``affine``:
    where a 2D model's one-slice output belongs in the volume it came from."""
    shifted = torch.as_tensor(affine, dtype=torch.float64).clone()
    shifted[:3, 3] += shifted[:3, 2] * (depth // 2)
    return shifted
