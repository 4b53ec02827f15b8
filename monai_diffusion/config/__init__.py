"""Configuration: the shipped YAML files (``*.yaml``, ``examples/``), the typed schema (``schema.py``),
loading with ``--set`` overrides (``loading.py``) and the stage-scoped rules (``rules.py``)."""

from monai_diffusion.config.loading import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    read_yaml,
    save_config,
)
from monai_diffusion.config.rules import STAGES, validate
from monai_diffusion.config.schema import (
    AutoencoderConfig,
    AutoencoderTrainingConfig,
    Config,
    DataConfig,
    DiffusionConfig,
    DiffusionTrainingConfig,
    DiscriminatorConfig,
    PerceptualConfig,
    SamplingConfig,
    SchedulerConfig,
)
from monai_diffusion.errors import ConfigError

__all__ = [
    "ConfigError",
    "Config",
    "DataConfig",
    "AutoencoderConfig",
    "AutoencoderTrainingConfig",
    "DiscriminatorConfig",
    "PerceptualConfig",
    "DiffusionConfig",
    "DiffusionTrainingConfig",
    "SchedulerConfig",
    "SamplingConfig",
    "STAGES",
    "validate",
    "load_config",
    "read_yaml",
    "config_from_dict",
    "config_to_dict",
    "save_config",
    "apply_overrides",
]
