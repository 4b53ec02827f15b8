"""Where and how a run executes: device, DDP under torchrun, seeding, per-rank RNG state, mixed precision."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from monai_diffusion.errors import ConfigError

__all__ = ["Runtime", "resolve_device", "setup_runtime", "fast_kernels", "seed_everything", "capture_rng",
           "restore_rng", "choose_autocast_dtype", "Precision"]

log = logging.getLogger("monai_diffusion")
T = TypeVar("T")


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

    def all_gather(self, value: T) -> list[T]:
        """Every rank's ``value`` (any picklable object), in rank order."""
        if not self.distributed:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def on_main(self, fn: Callable[[], T], errors: tuple[type[BaseException], ...]) -> T | None:
        """Run ``fn`` on rank 0 and raise the same error on every rank if it raised one of ``errors``.

        Rank 0's verdict is broadcast before anyone waits at a barrier, so a refused run stops every
        process with rank 0's one-line message (and no rank hangs until the NCCL timeout).
        """
        outcome: list[Any] = [None, None]
        if self.is_main:
            try:
                outcome[0] = fn()
            except errors as err:
                outcome[1] = err
        if self.distributed:
            dist.broadcast_object_list(outcome, src=0)
        if outcome[1] is not None:
            raise outcome[1]
        return outcome[0]


def _cuda_index(spec: str, local_rank: int, world_size: int) -> int:
    """The GPU index of this process for ``cuda`` / ``cuda:N``."""
    visible = torch.cuda.device_count()
    if spec.startswith("cuda:"):
        index = int(spec.split(":", 1)[1])
        if world_size > 1:
            raise ConfigError(
                f"device: {spec!r} under torchrun would put all {world_size} processes on GPU {index}; use "
                f"device: cuda (each process takes the GPU of its LOCAL_RANK), and CUDA_VISIBLE_DEVICES to choose GPUs"
            )
        if index >= visible:
            raise ConfigError(f"device: {spec!r} but only {visible} GPU(s) are visible; use cuda:0 .. "
                              f"cuda:{visible - 1}")
        return index
    if visible == 1:
        return 0  # a launcher that shows each process only its own GPU
    if local_rank >= visible:
        raise ConfigError(
            f"device: cuda: LOCAL_RANK={local_rank} but only {visible} GPU(s) are visible to this process; "
            f"start at most {visible} processes per node (torchrun --nproc_per_node={visible})"
        )
    return local_rank


def resolve_device(spec: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` (this process' local rank) or ``"cuda:N"``."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    index = spec.split(":", 1)[1] if spec.startswith("cuda:") else "0"
    if spec not in ("cpu", "cuda") and not (spec.startswith("cuda:") and index.isdigit()):
        raise ConfigError(f"device: {spec!r} is not a device; use auto, cpu, cuda or cuda:N (e.g. cuda:0)")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {spec!r} requested but CUDA is not available; use cpu or auto")
        return torch.device("cuda", _cuda_index(spec, local_rank, world_size))
    return torch.device("cpu")


def fast_kernels(device: torch.device) -> None:
    """Kernel choices for a CUDA ``device`` (no-op elsewhere), set here once for every command:

    * ``cudnn.benchmark``: each command runs the same few shapes thousands of times (training patches of
      one size, whole volumes of ``data.image_size``, the exact tiling's blocks, which are one shape except
      at the volume's edges), so timing cuDNN's algorithms once per shape pays back at once;
    * TF32 for float32 matrix multiplications (``torch.backends.cuda.matmul.allow_tf32``; cuDNN's
      convolutions already use TF32 by default): attention and linear layers in float32 paths (training
      without mixed precision, fp32 sampling) run on tensor cores. TF32 keeps float32's range and rounds
      inputs to a 10-bit mantissa, the precision of fp16 mixed precision, which these networks train with.
    """
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True


def setup_runtime(device: str = "auto") -> Runtime:
    """Initialise DDP when launched by ``torchrun`` (WORLD_SIZE > 1), else a single process.

    On CUDA the process's GPU becomes its current device (``torch.cuda.set_device``), so kernels, NCCL and
    ``torch.cuda`` calls without an explicit device all use it.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = resolve_device(device, local_rank, world_size)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    fast_kernels(torch_device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch_device.type == "cuda" else "gloo",
                                device_id=torch_device if torch_device.type == "cuda" else None)
    return Runtime(device=torch_device, rank=rank, world_size=world_size, local_rank=local_rank)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """This process's RNG states as plain data (lists, ints, CPU tensors), loadable with ``weights_only=True``.

    Python's and NumPy's Mersenne twisters, torch's CPU generator and, when ``device`` is a GPU, that
    GPU's generator (only this process's own device, so a resume with other GPUs visible still works).
    """
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what ``capture_rng`` returned (tensors are brought back to the CPU first)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(torch.as_tensor(keys).cpu(), dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.as_tensor(state["torch"]).cpu().to(torch.uint8))
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(torch.as_tensor(state["cuda"]).cpu().to(torch.uint8), device)


def choose_autocast_dtype(device_type: str, cuda_capability: tuple[int, int] | None = None) -> torch.dtype:
    """bf16 on CPUs and on GPUs with native bf16 tensor cores (compute capability >= 8: Ampere, Hopper, ...);
    fp16 (with a GradScaler) on older GPUs (V100, T4), where bf16 is emulated and 3D convolutions leave cuDNN.

    ``torch.cuda.is_bf16_supported()`` is not used: it also counts emulated bf16.
    """
    if device_type == "cuda":
        return torch.bfloat16 if cuda_capability is not None and cuda_capability[0] >= 8 else torch.float16
    return torch.bfloat16


class Precision:
    """Autocast and loss scaling for ``mixed_precision`` (see :func:`choose_autocast_dtype`)."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self.device_type = device.type
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        self.dtype = choose_autocast_dtype(device.type, capability)
        self.scaler = torch.amp.GradScaler(device.type, enabled=enabled and self.dtype == torch.float16)

    @property
    def uses_scaler(self) -> bool:
        return self.scaler.is_enabled()

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype] if self.enabled else "fp32"

    def load_scaler_state(self, state: dict[str, Any]) -> None:
        """Restore the grad scaler; a checkpoint saved without fp16 (empty state) leaves a fresh scaler."""
        if not self.uses_scaler:
            return
        if not state:
            log.info("resuming with fp16 loss scaling from a checkpoint trained without it: the grad scaler "
                     "starts fresh")
            return
        self.scaler.load_state_dict(state)

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
