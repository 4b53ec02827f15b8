"""Metrics under MONAI Generative 0.2.3's import paths (MONAI core's, with 0.2.3's argument names)."""

from generative.metrics.fid import FIDMetric
from generative.metrics.mmd import MMDMetric
from generative.metrics.ms_ssim import MultiScaleSSIMMetric
from generative.metrics.ssim import SSIMMetric

__all__ = ["FIDMetric", "MMDMetric", "MultiScaleSSIMMetric", "SSIMMetric"]
