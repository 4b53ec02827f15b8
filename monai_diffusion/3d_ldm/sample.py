"""Generate volumes: python sample.py --config ldm_config.yaml --num-samples N --output DIR
[--scheduler ddim --steps 50 --seed 0]"""

import sys
from pathlib import Path

try:
    from monai_diffusion.cli import sample_main
except ImportError:  # running from a checkout that was not pip-installed
    root = Path(__file__).resolve().parents[2]
    sys.path[:0] = [str(root), str(root / "GenerativeModels")]
    from monai_diffusion.cli import sample_main

if __name__ == "__main__":
    raise SystemExit(sample_main())
