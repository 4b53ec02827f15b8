"""``unsqueeze_left`` / ``unsqueeze_right`` under MONAI Generative 0.2.3's path (MONAI core's functions)."""

from monai.utils.misc import unsqueeze_left, unsqueeze_right

__all__ = ["unsqueeze_left", "unsqueeze_right"]
