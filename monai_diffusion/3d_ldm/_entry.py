"""Shared by the scripts of this folder: run a command line of ``monai_diffusion.cli`` by name, from an installed
package or, when the checkout was not pip-installed, from the checkout itself."""

import importlib
import sys
from pathlib import Path


def run(name: str) -> int:
    """Exit code of ``monai_diffusion.cli.<name>()`` on this process's arguments."""
    try:
        cli = importlib.import_module("monai_diffusion.cli")
    except ImportError:  # running from a checkout that was not pip-installed
        root = Path(__file__).resolve().parents[2]
        sys.path[:0] = [str(root), str(root / "GenerativeModels")]
        cli = importlib.import_module("monai_diffusion.cli")
    return getattr(cli, name)()
