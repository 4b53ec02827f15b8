"""Utilities under MONAI Generative 0.2.3's import paths (MONAI core's)."""

from generative.utils.component_store import ComponentStore
from generative.utils.enums import AdversarialIterationEvents, AdversarialKeys
from generative.utils.misc import unsqueeze_left, unsqueeze_right

__all__ = ["AdversarialIterationEvents", "AdversarialKeys", "ComponentStore", "unsqueeze_left", "unsqueeze_right"]
