"""Enums of MONAI Generative 0.2.3 (MONAI core's)."""

from monai.utils.enums import AdversarialIterationEvents, AdversarialKeys, OrderingTransformations, OrderingType

__all__ = ["AdversarialIterationEvents", "AdversarialKeys", "OrderingTransformations", "OrderingType"]
