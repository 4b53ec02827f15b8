"""Generate volumes: python sample.py --config ldm_config.yaml --num-samples N --output DIR
[--scheduler ddim --steps 50 --seed 0]"""

from _entry import run

if __name__ == "__main__":
    raise SystemExit(run("sample_main"))
