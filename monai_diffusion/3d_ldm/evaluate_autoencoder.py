"""Evaluate a trained autoencoder: python evaluate_autoencoder.py --run RUN_FOLDER [--data NIFTI_FOLDER]
[--output DIR] [--tile-size 128 128 64]"""

from _entry import run

if __name__ == "__main__":
    raise SystemExit(run("evaluate_autoencoder_main"))
