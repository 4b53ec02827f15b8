"""Train the latent diffusion UNet: python train_diffusion.py --config ldm_config.yaml [--set key=value] [--resume]"""

from _entry import run

if __name__ == "__main__":
    raise SystemExit(run("train_diffusion_main"))
