"""Estimate memory: python estimate_memory.py --config ldm_config.yaml [--input-size H W D] [--batch-size B]
[--budget 24GB]"""

import sys
from pathlib import Path

try:
    from monai_diffusion.cli import estimate_memory_main
except ImportError:  # running from a checkout that was not pip-installed
    root = Path(__file__).resolve().parents[2]
    sys.path[:0] = [str(root), str(root / "GenerativeModels")]
    from monai_diffusion.cli import estimate_memory_main

if __name__ == "__main__":
    raise SystemExit(estimate_memory_main())
