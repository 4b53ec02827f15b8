"""Evaluate generated volumes: python evaluate_samples.py --run DIFFUSION_RUN --samples SAMPLES_FOLDER
[--real NIFTI] [--train NIFTI] [--medicalnet-weights resnet_10_23dataset.pth] [--output DIR]"""

import sys
from pathlib import Path

try:
    from monai_diffusion.cli import evaluate_samples_main
except ImportError:  # running from a checkout that was not pip-installed
    root = Path(__file__).resolve().parents[2]
    sys.path[:0] = [str(root), str(root / "GenerativeModels")]
    from monai_diffusion.cli import evaluate_samples_main

if __name__ == "__main__":
    raise SystemExit(evaluate_samples_main())
