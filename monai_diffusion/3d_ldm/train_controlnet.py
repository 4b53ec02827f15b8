"""Train a ControlNet on label maps: python train_controlnet.py --config ldm_config.yaml [--set key=value] [--resume]"""

from _entry import run

if __name__ == "__main__":
    raise SystemExit(run("train_controlnet_main"))
