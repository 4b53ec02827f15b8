"""Estimate memory: python estimate_memory.py --config ldm_config.yaml [--input-size H W D] [--batch-size B]
[--budget 24GB [--all]] [--pipeline] [--world-size N]"""

from _entry import run

if __name__ == "__main__":
    raise SystemExit(run("estimate_memory_main"))
