"""Trade-off study: python compare_factors.py --config quickstart.yaml --factors "[2, 2]" "[4, 2]" "[8, 2]" "[16]"
[--steps N] [--adjust-latent-channels] [--output DIR]"""

from _entry import run

if __name__ == "__main__":
    raise SystemExit(run("compare_factors_main"))
