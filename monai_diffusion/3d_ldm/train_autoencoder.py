"""Train the 3D AutoencoderKL: python train_autoencoder.py --config ldm_config.yaml [--set key=value] [--resume]"""

from _entry import run

if __name__ == "__main__":
    raise SystemExit(run("train_autoencoder_main"))
