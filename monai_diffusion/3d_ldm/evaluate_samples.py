"""Evaluate generated volumes: python evaluate_samples.py --run DIFFUSION_RUN --samples SAMPLES_FOLDER
[--real NIFTI] [--train NIFTI] [--medicalnet-weights resnet_10_23dataset.pth] [--output DIR]"""

from _entry import run

if __name__ == "__main__":
    raise SystemExit(run("evaluate_samples_main"))
