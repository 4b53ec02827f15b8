"""The kill -9 / --resume machinery shared by the crash-safety tests: the tiny both-stage settings, starting a
script, killing it after a checkpoint step, and comparing two checkpoints bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from monai_diffusion.runs.checkpoints import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "monai_diffusion" / "3d_ldm"
CONFIG = ROOT / "monai_diffusion" / "config" / "ldm_config.yaml"

COMMON = [
    "data.image_size=[16, 16, 16]", "data.num_train=8", "data.num_val=2",
    "autoencoder.num_channels=[8, 8, 8]", "autoencoder.attention_levels=[false, false, true]",
    "autoencoder.norm_num_groups=4", "autoencoder.discriminator.num_layers_d=1",
    "autoencoder.discriminator.num_channels=4", "autoencoder.training.batch_size=2",
    "autoencoder.training.n_epochs=4", "autoencoder.training.adversarial_warmup_epochs=1",
    "autoencoder.training.val_interval=2", "autoencoder.training.checkpoint_every_n_steps=1",
    "diffusion.num_channels=[8, 8]", "diffusion.attention_levels=[false, true]",
    "diffusion.num_head_channels=[0, 8]", "diffusion.norm_num_groups=4",
    "diffusion.scheduler.num_train_timesteps=50", "diffusion.training.batch_size=2",
    "diffusion.training.n_epochs=6", "diffusion.training.val_interval=2",
    "diffusion.training.preview_inference_steps=2", "diffusion.training.ema_decay=0.9",
    "diffusion.training.checkpoint_every_n_steps=1", "device=cpu",
    # the autoencoder trains on random patches with augmentation: both must be drawn again exactly on resume
    "data.patch_size=[8, 8, 8]", "data.patches_per_volume=2", "data.augmentation.flip_prob=0.5",
    "autoencoder.tile_size=16", "autoencoder.training.warmup_steps=3", "autoencoder.training.lr_schedule=cosine",
    "autoencoder.training.grad_clip_norm=1.0",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}


def _command(script: str, out: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, str(SCRIPTS / script), "--config", str(CONFIG), "--set", f"output_dir={out}"]
    for item in COMMON:
        cmd += ["--set", item]
    return cmd + list(extra)


_SEEN: dict[Path, tuple[tuple[int, int, int], int]] = {}  # last.pt's identity -> its step, read once


def _last_step(run_dir: Path) -> int:
    """The step of ``run_dir``'s ``last.pt`` (-1 when there is none yet); the file is read only when it has changed,
    so polling it leaves the cores to the run being watched."""
    path = run_dir / "checkpoints" / "last.pt"
    try:
        stat = path.stat()
    except FileNotFoundError:
        return -1
    identity = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
    seen = _SEEN.get(path)
    if seen is not None and seen[0] == identity:
        return seen[1]
    try:
        step = load_checkpoint(path)["loop"]["global_step"]
    except Exception:  # noqa: BLE001 - polling a file another process is replacing; try again
        return -1
    _SEEN[path] = (identity, step)
    return step


def _kill_after_step(cmd: list[str], run_dir: Path, step: int) -> None:
    """Start ``cmd`` and SIGKILL it once a checkpoint at or past ``step`` exists (mid-way through later work)."""
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    deadline = time.time() + 300
    while _last_step(run_dir) < step:
        if process.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {process.stderr.read().decode()[-2000:]}")
        assert time.time() < deadline, "timed out waiting for a checkpoint"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _assert_identical(a: dict, b: dict, keys: list[str]) -> None:
    for key in keys:
        left, right = a[key], b[key]
        flat_left = {k: v for k, v in _flatten(left)}
        flat_right = {k: v for k, v in _flatten(right)}
        assert flat_left.keys() == flat_right.keys(), key
        for name, value in flat_left.items():
            other = flat_right[name]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), f"{key}.{name} differs"
            else:
                assert value == other, f"{key}.{name}: {value} != {other}"


def _flatten(value, prefix=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, (list, tuple)) and any(isinstance(v, (dict, torch.Tensor)) for v in value):
        for i, v in enumerate(value):
            yield from _flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, value
