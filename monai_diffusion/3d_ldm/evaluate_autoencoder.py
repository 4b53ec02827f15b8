"""Evaluate a trained autoencoder: python evaluate_autoencoder.py --run RUN_FOLDER [--data NIFTI_FOLDER]
[--output DIR] [--tile-size 128 128 64]"""

import sys
from pathlib import Path

try:
    from monai_diffusion.cli import evaluate_autoencoder_main
except ImportError:  # running from a checkout that was not pip-installed
    root = Path(__file__).resolve().parents[2]
    sys.path[:0] = [str(root), str(root / "GenerativeModels")]
    from monai_diffusion.cli import evaluate_autoencoder_main

if __name__ == "__main__":
    raise SystemExit(evaluate_autoencoder_main())
