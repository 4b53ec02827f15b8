"""``FIDMetric`` under MONAI Generative 0.2.3's path: MONAI core's class (same arguments and numbers)."""

from monai.metrics.fid import FIDMetric, get_fid_score

__all__ = ["FIDMetric", "get_fid_score"]
