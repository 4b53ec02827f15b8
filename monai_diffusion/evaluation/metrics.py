"""Reconstruction metrics and latent statistics, shared by training-time validation and evaluation.

Metrics come from ``monai.metrics`` on volumes scaled to [0, 1] (the data pipeline's range), with the
reconstruction clipped to [0, 1]:

- L1: mean absolute error.
- PSNR: ``PSNRMetric(max_val=1)``; identical volumes give ``inf``.
- SSIM: ``SSIMMetric`` with a Gaussian window of ``min(11, smallest axis)`` voxels (odd).
- MS-SSIM: ``MultiScaleSSIMMetric``. The standard five scales with an 11-voxel window need at least 176
  voxels per axis; smaller volumes use the most scales (and the largest window, at least 7 where
  possible) that fit, with the standard weights truncated and renormalised. The settings used are
  written to the summary, so numbers from differently sized data are not compared by mistake.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.metrics import MultiScaleSSIMMetric, PSNRMetric, SSIMMetric

__all__ = ["ReconstructionMetrics", "LatentStatistics", "latent_std", "ssim_window", "ms_ssim_settings"]

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003


def ssim_window(spatial: Sequence[int]) -> int:
    """SSIM window: 11 voxels, or the largest odd size that fits the smallest axis."""
    window = min(11, *spatial)
    return window if window % 2 == 1 else window - 1


def ms_ssim_settings(spatial: Sequence[int]) -> tuple[int, tuple[float, ...]] | None:
    """``(window, weights)`` for MS-SSIM on volumes of ``spatial`` size, or None if none fits.

    Prefers more scales with a window of at least 7 voxels, then more scales with smaller windows. A
    setting fits when the coarsest scale (``size / 2**(scales - 1)``) still holds the window and MONAI's
    own size check (``size // (scales - 1)**2 > window - 1``) passes.
    """
    smallest = min(spatial)

    def fits(scales: int, window: int) -> bool:
        return smallest // max(1, scales - 1) ** 2 > window - 1 and smallest // 2 ** (scales - 1) >= window

    for min_window in (7, 3):
        for scales in range(len(MS_SSIM_WEIGHTS), 1, -1):
            for window in range(11, min_window - 1, -2):
                if fits(scales, window):
                    weights = MS_SSIM_WEIGHTS[:scales]
                    return window, tuple(w / sum(weights) for w in weights)
    return None


class ReconstructionMetrics:
    """L1, PSNR, SSIM and (optionally) MS-SSIM per volume, for inputs in [0, 1].

    Args:
        spatial_dims: 2 or 3.
        spatial_shape: size of the volumes (chooses the SSIM and MS-SSIM windows).
        multiscale: also compute MS-SSIM (NaN when the volume is too small for any setting).
    """

    def __init__(self, spatial_dims: int, spatial_shape: Sequence[int], multiscale: bool = True) -> None:
        self.window = ssim_window(spatial_shape)
        self.psnr = PSNRMetric(max_val=1.0, reduction="none")
        self.ssim = SSIMMetric(spatial_dims=spatial_dims, data_range=1.0, win_size=self.window, reduction="none")
        self.ms_ssim_setting = ms_ssim_settings(spatial_shape) if multiscale else None
        self.ms_ssim = None
        if self.ms_ssim_setting is not None:
            window, weights = self.ms_ssim_setting
            self.ms_ssim = MultiScaleSSIMMetric(spatial_dims=spatial_dims, data_range=1.0, kernel_size=window,
                                                weights=weights, reduction="none")

    def describe(self) -> dict[str, Any]:
        """The windows and scales used, for the summary."""
        ms = None
        if self.ms_ssim_setting is not None:
            ms = {"window": self.ms_ssim_setting[0], "scales": len(self.ms_ssim_setting[1]),
                  "weights": [round(w, 4) for w in self.ms_ssim_setting[1]]}
        return {"ssim_window": self.window, "ms_ssim": ms}

    def __call__(self, reconstruction: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-volume metrics (each a length-B tensor) of a BxCx[SPATIAL DIMS] reconstruction."""
        recon = reconstruction.float().clamp(0, 1)
        target = target.float()
        out = {
            "l1": (recon - target).abs().flatten(1).mean(dim=1),
            "psnr": self.psnr(recon, target).flatten(),
            "ssim": self.ssim(recon, target).flatten(),
        }
        if self.ms_ssim is not None:
            out["ms_ssim"] = self.ms_ssim(recon, target).flatten()
        return out


def latent_std(total: float, squares: float, count: float) -> float:
    """Standard deviation of latents from their sum, sum of squares and count (variance floored at 1e-12).

    ``1 / latent_std(...)`` is the scale factor of a latent diffusion model (Rombach et al.): the diffusion
    stage and the evaluation both compute it here.
    """
    return max(squares / count - (total / count) ** 2, 1e-12) ** 0.5


@dataclass
class LatentStatistics:
    """Running moments of the posterior mean and of sampled latents ``z = mu + sigma * eps``.

    ``scale_factor`` is ``1 / std(z)``, the factor a latent diffusion model multiplies latents by
    (Rombach et al.), computed the way ``train_diffusion.py`` computes it.
    """

    seed: int = 0
    _sums: torch.Tensor = field(default_factory=lambda: torch.zeros(6, dtype=torch.float64))
    shape: tuple[int, ...] = ()

    def update(self, z_mu: torch.Tensor, z_sigma: torch.Tensor) -> None:
        generator = torch.Generator().manual_seed(self.seed + int(self._sums[2]))
        mu, sigma = z_mu.detach().double().cpu(), z_sigma.detach().double().cpu()
        z = mu + torch.randn(mu.shape, generator=generator, dtype=torch.float64) * sigma
        self._sums += torch.stack([z.sum(), z.pow(2).sum(), torch.tensor(float(z.numel()), dtype=torch.float64),
                                   mu.sum(), mu.pow(2).sum(), sigma.sum()])
        self.shape = tuple(z_mu.shape[1:])

    def summary(self) -> dict[str, Any]:
        z_sum, z_sq, n, mu_sum, mu_sq, sigma_sum = self._sums.tolist()
        if n == 0:
            return {}
        z_std = latent_std(z_sum, z_sq, n)
        return {
            "latent_shape": list(self.shape),
            "z_mean": z_sum / n,
            "z_std": z_std,
            "z_mu_mean": mu_sum / n,
            "z_mu_std": math.sqrt(max(mu_sq / n - (mu_sum / n) ** 2, 0.0)),
            "z_sigma_mean": sigma_sum / n,
            "scale_factor": 1.0 / z_std,
        }
