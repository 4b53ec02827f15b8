"""``ComponentStore`` under MONAI Generative 0.2.3's path (MONAI core's class)."""

from monai.utils.component_store import ComponentStore

__all__ = ["ComponentStore"]
