# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""``MMDMetric`` with MONAI Generative 0.2.3's separate transforms for ``y`` and ``y_pred``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.metrics import mmd as _core

__all__ = ["MMDMetric"]


class MMDMetric(_core.MMDMetric):
    """Maximum mean discrepancy with a linear kernel, computed as 0.2.3 does.

    Args:
        y_transform: applied to ``y`` before the metric (0.2.3).
        y_pred_transform: applied to ``y_pred`` before the metric (0.2.3).
        y_mapping: MONAI core's single transform, applied to both; only without the two above.

    ``__call__(y, y_pred)``: both BxCx[SPATIAL DIMS]; returns the scalar MMD.

    Raises:
        ValueError: if ``y_mapping`` is combined with ``y_transform``/``y_pred_transform``, or if the
            transformed ``y`` and ``y_pred`` differ in shape.
    """

    def __init__(
        self,
        y_transform: Callable | None = None,
        y_pred_transform: Callable | None = None,
        *,
        y_mapping: Callable | None = None,
    ) -> None:
        if y_mapping is not None and (y_transform is not None or y_pred_transform is not None):
            raise ValueError("MMDMetric: give y_mapping (MONAI core) or y_transform/y_pred_transform (0.2.3), not both")
        super().__init__(y_mapping=y_mapping)
        self.y_transform = y_transform if y_mapping is None else y_mapping
        self.y_pred_transform = y_pred_transform if y_mapping is None else y_mapping

    def __call__(self, y: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
        if self.y_transform is not None:
            y = self.y_transform(y)
        if self.y_pred_transform is not None:
            y_pred = self.y_pred_transform(y_pred)
        if y.shape != y_pred.shape:
            raise ValueError(
                f"y and y_pred shapes differ after their transforms: {tuple(y.shape)} vs {tuple(y_pred.shape)}"
            )
        # 0.2.3's estimate: linear-kernel Gram matrices of the flattened samples, scaled by the feature count
        # (MONAI core's compute_mmd uses another normalisation, with different numbers)
        y, y_pred = y.reshape(y.shape[0], -1), y_pred.reshape(y_pred.shape[0], -1)
        features = y.shape[1]
        k_yy, k_pp, k_py = (a @ b.T / features for a, b in ((y, y), (y_pred, y_pred), (y_pred, y)))
        return k_yy.mean() + k_pp.mean() - 2.0 * k_py.mean()
