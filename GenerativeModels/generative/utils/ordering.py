"""``Ordering`` (token orderings for VQ-VAE + transformer models) under 0.2.3's path (MONAI core's class)."""

from monai.utils.ordering import Ordering

from generative.utils.enums import OrderingTransformations, OrderingType

__all__ = ["Ordering", "OrderingTransformations", "OrderingType"]
