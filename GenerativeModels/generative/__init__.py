"""MONAI Generative, vendored and patched: AutoencoderKL with per-level ``downsample_factors``.

Every public name of MONAI Generative 0.2.3 is importable at its 0.2.3 path, with 0.2.3's argument
names, checkpoints and numbers; where MONAI core has the class, ours is a thin subclass or a re-export
of it (docs/migration.md lists every name).
"""

from generative.version import __version__

__all__ = ["__version__"]
