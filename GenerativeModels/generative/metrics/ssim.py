# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""``SSIMMetric`` with MONAI Generative 0.2.3's ``kernel_size`` argument (MONAI core: ``win_size``)."""

from __future__ import annotations

from collections.abc import Sequence

from monai.metrics import regression as _core
from monai.metrics.regression import KernelType
from monai.utils import MetricReduction

from generative._dropin import resolve_alias

__all__ = ["SSIMMetric"]


class SSIMMetric(_core.SSIMMetric):
    """MONAI core's SSIM with 0.2.3's argument names.

    Args:
        spatial_dims: 2 or 3.
        data_range: value range of the images.
        kernel_type: ``"gaussian"`` or ``"uniform"``.
        kernel_size: window size (MONAI core's ``win_size`` also works); default 11.
        kernel_sigma: Gaussian standard deviation.
        k1: stability constant of the luminance term.
        k2: stability constant of the contrast term.
        reduction: reduction over the batch.
        get_not_nans: also return the number of non-NaN values.
        win_size: MONAI core's name for ``kernel_size``.

    ``__call__(y_pred, y)``: both BxCx[SPATIAL DIMS].
    """

    def __init__(
        self,
        spatial_dims: int,
        data_range: float = 1.0,
        kernel_type: KernelType | str = KernelType.GAUSSIAN,
        kernel_size: int | Sequence[int] | None = None,
        kernel_sigma: float | Sequence[float] = 1.5,
        k1: float = 0.01,
        k2: float = 0.03,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
        *,
        win_size: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__(
            spatial_dims=spatial_dims, data_range=data_range, kernel_type=kernel_type,
            win_size=resolve_alias("SSIMMetric", "kernel_size", kernel_size, "win_size", win_size, 11),
            kernel_sigma=kernel_sigma, k1=k1, k2=k2, reduction=reduction, get_not_nans=get_not_nans,
        )
