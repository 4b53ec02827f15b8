# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""``AdversarialTrainer`` under MONAI Generative 0.2.3's path (MONAI core's class).

MONAI's trainers are built on pytorch-ignite (the `engines` extra, also in `dev`). The name always
imports; constructing it without ignite raises one ``ImportError`` line saying what to install.
"""

from __future__ import annotations

from typing import Any

from monai.engines import trainer as _core
from monai.utils import optional_import

__all__ = ["AdversarialTrainer"]

_, HAS_IGNITE = optional_import("ignite.engine")


class AdversarialTrainer(_core.AdversarialTrainer):
    """MONAI core's generator/discriminator trainer (same arguments as 0.2.3's, see MONAI's documentation).

    Raises:
        ImportError: when pytorch-ignite is not installed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if not HAS_IGNITE:
            raise ImportError(
                "AdversarialTrainer needs pytorch-ignite, which is not installed: pip install 'pytorch-ignite>=0.4.11'"
            )
        super().__init__(*args, **kwargs)
