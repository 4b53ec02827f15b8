"""Trade-off study: python compare_factors.py --config quickstart.yaml --factors "[2, 2]" "[4, 2]" "[8, 2]" "[16]"
[--steps N] [--adjust-latent-channels] [--output DIR]"""

import sys
from pathlib import Path

try:
    from monai_diffusion.cli import compare_factors_main
except ImportError:  # running from a checkout that was not pip-installed
    root = Path(__file__).resolve().parents[2]
    sys.path[:0] = [str(root), str(root / "GenerativeModels")]
    from monai_diffusion.cli import compare_factors_main

if __name__ == "__main__":
    raise SystemExit(compare_factors_main())
