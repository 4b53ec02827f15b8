"""The ``diffusion.conditioning:`` section of the schema; :mod:`monai_diffusion.config.schema` re-exports it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from monai_diffusion.config.schema_data import bounded

__all__ = ["ConditioningConfig"]


@dataclass
class ConditioningConfig:
    """Conditional diffusion on per-volume covariates (from a datalist, or the phantoms' ``cavity`` and ``size``).

    Attributes:
        categorical: covariates with a few values (e.g. sex): class embeddings (MONAI's ``num_class_embeds``);
            several combine into one class per combination of values. The values seen in training are the
            classes.
        continuous: numeric covariates (e.g. age): normalised with the training set's mean and standard
            deviation (stored in the checkpoint; see ``standardize``), given to the UNet through cross-attention
            (needs an attention level).
        dropout: probability of dropping a training sample's conditions, which teaches the UNet the
            unconditional model that classifier-free guidance needs (``sample.py --guidance-scale``).
        standardize: standardise the continuous covariates with the training set's mean and standard deviation;
            false: give them to the UNet as they are (covariates already scaled, e.g. to [0, 1], as the model-zoo
            brain LDM's; set by ``ldm-import brain-ldm``).
        presence_flag: end the cross-attention context with a flag, 1 when the conditions are present and 0 when
            they are dropped (``cross_attention_dim`` = continuous covariates + 1); false: no flag (as the brain
            LDM, trained without dropped conditions; needs ``dropout`` 0).
        concat: the UNet also reads the continuous covariates as input channels, each broadcast over the latent's
            grid and appended to the latent channels (the brain LDM's way; its ``in_channels`` = latent channels +
            continuous covariates). The ControlNet stage does not support it.
    """

    categorical: list[str] = field(default_factory=list)
    continuous: list[str] = field(default_factory=list)
    dropout: float = bounded(0.1, ge=0, lt=1)
    standardize: bool = True
    presence_flag: bool = True
    concat: bool = False

    @property
    def context_dim(self) -> int:
        """Values of the cross-attention context: the continuous covariates and the presence flag (0: none)."""
        return len(self.continuous) + int(self.presence_flag) if self.continuous else 0

    def unet_kwargs(self) -> dict[str, Any]:
        """The cross-attention arguments of the continuous covariates (what the config knows before the data
        are read: the classes of categorical covariates come from the datalist), for the memory estimate."""
        return dict(with_conditioning=True, cross_attention_dim=self.context_dim) if self.continuous else {}
