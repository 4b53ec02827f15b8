"""Where and how a run executes: device, DDP under torchrun, seeding, RNG state, mixed precision."""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from monai_diffusion.config import ConfigError

__all__ = ["Runtime", "resolve_device", "setup_runtime", "seed_everything", "capture_rng", "restore_rng", "Precision"]


@dataclass
class Runtime:
    """The process's place in a (possibly distributed) run."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks (in place on a copy placed on the collective's device)."""
        if not self.distributed:
            return tensor
        reduced = tensor.detach().clone().to(self.device)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced

    def broadcast_object(self, value: Any) -> Any:
        if not self.distributed:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` (this process' local rank) or ``"cuda:N"``."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    index = spec.split(":", 1)[1] if spec.startswith("cuda:") else "0"
    if spec not in ("cpu", "cuda") and not (spec.startswith("cuda:") and index.isdigit()):
        raise ConfigError(f"device: {spec!r} is not a device; use auto, cpu, cuda or cuda:N (e.g. cuda:0)")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {spec!r} requested but CUDA is not available; use cpu or auto")
        return torch.device("cuda", local_rank if spec == "cuda" else int(spec.split(":", 1)[1]))
    return torch.device("cpu")


def setup_runtime(device: str = "auto") -> Runtime:
    """Initialise DDP when launched by ``torchrun`` (WORLD_SIZE > 1), else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if torch_device.type == "cuda":
            torch.cuda.set_device(torch_device)
        dist.init_process_group(backend="nccl" if torch_device.type == "cuda" else "gloo")
    return Runtime(device=torch_device, rank=rank, world_size=world_size, local_rank=local_rank)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """The RNG states of Python, NumPy and torch (CPU and CUDA), to store in a checkpoint."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what ``capture_rng`` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Precision:
    """Autocast and loss scaling for ``mixed_precision``.

    bf16 where the device supports it (CPUs, Ampere and newer GPUs), else fp16 with a GradScaler.
    """

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self.device_type = device.type
        bf16 = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
        self.dtype = torch.bfloat16 if bf16 else torch.float16
        self.scaler = torch.amp.GradScaler(device.type, enabled=enabled and self.dtype == torch.float16)

    @property
    def uses_scaler(self) -> bool:
        return self.scaler.is_enabled()

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype] if self.enabled else "fp32"

    @contextlib.contextmanager
    def kernel_guard(self) -> Iterator[None]:
        """Wrap a whole training run: avoids the oneDNN kernels for bf16 training on CPUs.

        With torch 2.13's CPU build, oneDNN's bf16 3D-convolution weight gradient sometimes returns
        non-finite values for small inputs (seen here on (2, 16, 2, 2, 2) inputs in about 4 % of calls;
        fp32 and the native kernels are fine), which would stop training with a non-finite gradient
        error. CPU bf16 runs therefore use PyTorch's native kernels. GPUs are unaffected.
        """
        if self.enabled and self.device_type == "cpu":
            with warnings.catch_warnings():  # flags() warns about TF32 on Intel GPUs, irrelevant here
                warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
                with torch.backends.mkldnn.flags(enabled=False):
                    yield
        else:
            yield

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled):
            yield
