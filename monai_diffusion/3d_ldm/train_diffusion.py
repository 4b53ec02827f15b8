"""Train the latent diffusion UNet: python train_diffusion.py --config ldm_config.yaml [--set key=value] [--resume]"""

import sys
from pathlib import Path

try:
    from monai_diffusion.cli import train_diffusion_main
except ImportError:  # running from a checkout that was not pip-installed
    root = Path(__file__).resolve().parents[2]
    sys.path[:0] = [str(root), str(root / "GenerativeModels")]
    from monai_diffusion.cli import train_diffusion_main

if __name__ == "__main__":
    raise SystemExit(train_diffusion_main())
