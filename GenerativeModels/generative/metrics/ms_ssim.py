"""``MultiScaleSSIMMetric`` under MONAI Generative 0.2.3's path: MONAI core's class (same arguments)."""

from monai.metrics.regression import MultiScaleSSIMMetric

__all__ = ["MultiScaleSSIMMetric"]
