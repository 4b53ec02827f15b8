"""Shared test helpers: the shipped configs shrunk to seconds on a CPU, running the command lines, small
NIfTI folders, MedicalNet-like weight files, the stored fixtures' paths. Fixtures live in ``tests/conftest.py``;
tests import helpers from here and never from another test file. Tests marked ``slow`` start subprocesses
(scripts, torchrun, kill -9): ``pytest -m "not slow"`` is the fast loop."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "monai_diffusion" / "config"
CONFIG = CONFIGS / "ldm_config.yaml"
SCRIPTS = ROOT / "monai_diffusion" / "3d_ldm"
FIXTURES = ROOT / "tests" / "fixtures"
OLD = FIXTURES / "run_0_4_0"  # run folders written by monai-diffusion 0.4.0 (read-only: copy before writing)


def tiny(levels: int = 3, size: str = "[16, 16, 16]") -> list[str]:
    """Overrides that shrink any shipped config to seconds on a CPU (autoencoder stage)."""
    channels = [8] * levels
    return [
        f"data.image_size={size}",
        "data.num_train=4",
        "data.num_val=2",
        f"autoencoder.num_channels={channels}",
        f"autoencoder.attention_levels={[False] * (levels - 1) + [True]}",
        "autoencoder.norm_num_groups=4",
        "autoencoder.discriminator.num_layers_d=1",
        "autoencoder.discriminator.num_channels=4",
        "autoencoder.training.batch_size=2",
        "autoencoder.training.adversarial_warmup_epochs=0",
        "autoencoder.training.n_epochs=1",
        "autoencoder.training.log_every_n_steps=1",
    ]


# both stages, for the diffusion tests
TINY_LDM = [
    "data.image_size=[16, 16, 16]",
    "data.num_train=4",
    "data.num_val=2",
    "autoencoder.num_channels=[8, 8, 8]",
    "autoencoder.attention_levels=[false, false, false]",
    "autoencoder.norm_num_groups=4",
    "autoencoder.discriminator.num_layers_d=1",
    "autoencoder.discriminator.num_channels=4",
    "autoencoder.training.batch_size=2",
    "autoencoder.training.n_epochs=1",
    "diffusion.num_channels=[8, 8]",
    "diffusion.attention_levels=[false, true]",
    "diffusion.num_head_channels=[0, 8]",
    "diffusion.norm_num_groups=4",
    "diffusion.scheduler.num_train_timesteps=50",
    "diffusion.training.batch_size=2",
    "diffusion.training.n_epochs=2",
    "diffusion.training.val_interval=1",
    "diffusion.training.preview_inference_steps=3",
    "diffusion.sampling.num_inference_steps=4",
]


# the conditional phantoms (a cavity class and a size covariate), both stages at 16^3
PHANTOMS = [
    "data.image_size=[16, 16, 16]", "data.num_train=6", "data.num_val=2", "data.phantom_covariates=true",
    "autoencoder.num_channels=[8, 8, 8]", "autoencoder.attention_levels=[false, false, false]",
    "autoencoder.norm_num_groups=4", "autoencoder.discriminator.num_layers_d=1",
    "autoencoder.discriminator.num_channels=4", "autoencoder.training.batch_size=2", "autoencoder.training.n_epochs=1",
    "diffusion.num_channels=[8, 8]", "diffusion.attention_levels=[false, true]", "diffusion.num_head_channels=[0, 8]",
    "diffusion.norm_num_groups=4", "diffusion.scheduler.num_train_timesteps=20", "diffusion.training.batch_size=2",
    "diffusion.training.n_epochs=2", "diffusion.training.val_interval=1", "diffusion.training.preview_inference_steps=2",
    "diffusion.sampling.num_inference_steps=2", "diffusion.conditioning.categorical=[cavity]",
    "diffusion.conditioning.continuous=[size]", "diffusion.conditioning.dropout=0.2",
    "diffusion.training.cache_latents_on_disk=true",
]


def cli_args(config: Path | str, out: Path, *overrides: str) -> list[str]:
    """``--config C --set output_dir=OUT --set k=v ...``."""
    args = ["--config", str(config), "--set", f"output_dir={out}"]
    for item in overrides:
        args += ["--set", item]
    return args


def train(config: Path | str, out: Path, *overrides: str, resume: bool = False) -> int:
    """Run ``train_autoencoder`` in this process; returns its exit code."""
    from monai_diffusion.cli import train_autoencoder_main

    return train_autoencoder_main(cli_args(config, out, *overrides) + (["--resume"] if resume else []))


def write_scans(folder: Path, shape: tuple[int, ...], spacing: tuple[float, float, float], count: int = 4,
                seed: int = 0, prefix: str = "case") -> Path:
    """``count`` NIfTI files of uniform noise with the given voxel spacing: ``<prefix><i>.nii.gz``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        volume = rng.random(shape).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.diag([*spacing, 1.0])), folder / f"{prefix}{index}.nii.gz")
    return folder


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_medicalnet_file(path, depth: str = "resnet10", seed: int = 0) -> None:
    """A weights file laid out like MedicalNet's releases: {'state_dict': {'module.*': ...}} with a seg head."""
    from monai_diffusion.evaluation.perceptual import MedicalNetResNet

    torch.manual_seed(seed)
    state = {f"module.{k}": v for k, v in MedicalNetResNet(depth).state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, path)
