"""GPU smoke run: the code paths only a GPU takes, through the command lines, in about 3 minutes.

    bash benchmarks/gpu_smoke.sh                        # on a CUDA machine; log in benchmarks/results/gpu_smoke.log
    python benchmarks/gpu_smoke.py --device cpu --tiny  # the same checks on a CPU, fewer steps (the slow test)

Checks, each printed as PASS/FAIL with its numbers; the exit code is the number of failures (0 = all passed):
1. both training stages a few steps with mixed precision (the precision chosen for this device is shown);
2. kill -9 of each stage after a checkpoint, then ``--resume`` to the planned step;
3. ``sample.py`` with DDIM and with DDPM and a seed, each twice: the two runs must agree;
4. real process groups under ``torchrun``: ``train_autoencoder.py`` with two processes and gloo on CPU
   tensors (world size 2 in its summary); one process with NCCL on a GPU (gloo on a CPU) running a DDP step
   and an all_reduce (the training scripts create a process group only above world size 1); and, with two or
   more GPUs, ``train_autoencoder.py`` with two processes and NCCL. NCCL refuses two ranks on one GPU
   ("Duplicate GPU detected"), so on one GPU that last check is skipped with that reason;
5. the memory estimator against the measured peak (``torch.cuda.max_memory_allocated`` on a GPU) of one
   training step of a 64x64x32 config. On a GPU, the reserved memory (``torch.cuda.max_memory_reserved``,
   ``memory_reserved``) is printed beside the allocated peaks, here and for both stages.

On a CPU the script checks itself with smaller volumes (16^3; 32^3 for the estimator) in fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "monai_diffusion" / "3d_ldm"
CONFIG = ROOT / "monai_diffusion" / "config" / "ldm_config.yaml"
sys.path[:0] = [str(ROOT), str(ROOT / "GenerativeModels")]

TINY = [
    "data.image_size=[32, 32, 32]", "data.num_train=8", "data.num_val=2",
    "autoencoder.num_channels=[16, 16, 32]", "autoencoder.attention_levels=[false, false, true]",
    "autoencoder.norm_num_groups=8", "autoencoder.discriminator.num_layers_d=2",
    "autoencoder.discriminator.num_channels=8", "autoencoder.training.batch_size=2",
    "autoencoder.training.n_epochs=2", "autoencoder.training.adversarial_warmup_epochs=1",
    "autoencoder.training.val_interval=1", "autoencoder.training.checkpoint_every_n_steps=1",
    "autoencoder.training.mixed_precision=true",
    "diffusion.num_channels=[16, 32]", "diffusion.attention_levels=[false, true]",
    "diffusion.num_head_channels=[0, 16]", "diffusion.norm_num_groups=8",
    "diffusion.scheduler.num_train_timesteps=100", "diffusion.training.batch_size=4",
    "diffusion.training.n_epochs=4", "diffusion.training.val_interval=2",
    "diffusion.training.preview_inference_steps=5", "diffusion.training.checkpoint_every_n_steps=1",
    "diffusion.training.mixed_precision=true", "diffusion.training.ema_decay=0.9",
]


# a CPU check of the script itself: smaller volumes, and fp32 (CPU bf16 runs on slow native kernels)
CPU = ["data.image_size=[16, 16, 16]", "autoencoder.training.mixed_precision=false",
       "diffusion.training.mixed_precision=false", "autoencoder.discriminator.num_layers_d=1"]

# --tiny (the slow CPU test): fewer steps (4 per stage, killed after 2) and 20 diffusion timesteps
TINY_RUN = ["data.num_train=4", "diffusion.training.batch_size=2", "diffusion.training.n_epochs=2",
            "diffusion.scheduler.num_train_timesteps=20", "diffusion.training.preview_inference_steps=2",
            "diffusion.sampling.num_inference_steps=10"]


# with gpu_suite.py's 270 s, the two scripts take at most 8 minutes on one GPU; no check starts after it, and
# each command's timeout is what is left of it
BUDGET_S = 210.0
COMMAND_TIMEOUT_S = 300


class Smoke:
    def __init__(self, device: str, workdir: Path, tiny: bool = False, budget_s: float = BUDGET_S) -> None:
        self.device, self.workdir, self.failures = device, workdir, 0
        self.deadline = time.perf_counter() + budget_s
        self.on_cpu = device == "cpu"
        self.tiny = tiny
        self.steps = 4 if tiny else 8  # optimiser steps of each stage (TINY, TINY_RUN)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}

    def command(self, script: str, *extra: str, out: Path | None = None) -> list[str]:
        cmd = [sys.executable, str(SCRIPTS / script), "--config", str(CONFIG),
               "--set", f"output_dir={out or self.workdir / 'run'}", "--set", f"device={self.device}"]
        for item in TINY + (CPU if self.on_cpu else []) + (TINY_RUN if self.tiny else []):
            cmd += ["--set", item]
        return cmd + list(extra)

    def left(self) -> float:
        """Seconds left of the budget, for a command's timeout (at least one second)."""
        return max(1.0, min(COMMAND_TIMEOUT_S, self.deadline - time.perf_counter()))

    def run(self, cmd: list[str]) -> subprocess.CompletedProcess:
        result = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=self.left())
        if result.returncode != 0:
            raise RuntimeError(f"exit {result.returncode}: {result.stderr.strip()[-1500:]}")
        return result

    def check(self, name: str, body: Callable[[], str]) -> None:
        started = time.perf_counter()
        if started > self.deadline:
            self.failures += 1
            print(f"FAIL {name}: not run, the time budget is spent (--budget-s)", flush=True)
            return
        try:
            detail = body()
            print(f"PASS {name} ({time.perf_counter() - started:.0f} s): {detail}", flush=True)
        except Exception as err:  # noqa: BLE001 - every failure is reported and counted, the run goes on
            self.failures += 1
            print(f"FAIL {name} ({time.perf_counter() - started:.0f} s): {type(err).__name__}: {err}", flush=True)

    def kill_after(self, cmd: list[str], run_dir: Path, step: int) -> None:
        from monai_diffusion.runs.checkpoints import load_checkpoint

        process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=self.env)
        deadline = time.time() + self.left()
        while True:
            last = run_dir / "checkpoints" / "last.pt"
            try:
                if last.is_file() and load_checkpoint(last)["loop"]["global_step"] >= step:
                    break
            except Exception:  # noqa: BLE001 - the file is being replaced by the run; look again
                pass
            if process.poll() is not None:
                raise RuntimeError(f"run ended before step {step}: {process.stderr.read().decode()[-1500:]}")
            if time.time() > deadline:
                process.kill()
                raise RuntimeError(f"no checkpoint at step {step} within the time budget")
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()

    # -- the checks ------------------------------------------------------------------------------------
    def stage(self, script: str, stage: str, total_steps: int) -> Callable[[], str]:
        def body() -> str:
            run_dir = self.workdir / "run" / stage
            self.kill_after(self.command(script), run_dir, 2)
            self.run(self.command(script, "--resume"))
            summary = json.loads((run_dir / "summary.json").read_text())
            if summary["optimizer_steps"] != total_steps:
                raise RuntimeError(f"{summary['optimizer_steps']} optimiser steps after resume, expected {total_steps}")
            precision = summary.get("precision", "?")
            return (f"killed after step 2, resumed to step {summary['optimizer_steps']}; precision {precision}; "
                    f"peak {summary['peak_memory']['GiB']} GiB ({summary['peak_memory']['kind']})"
                    + (f", max reserved {summary['peak_memory']['reserved_GiB']} GiB" if not self.on_cpu else ""))
        return body

    def sampling(self, scheduler: str) -> str:
        import nibabel as nib
        import numpy as np

        outputs = []
        for attempt in range(2):
            out = self.workdir / f"samples_{scheduler}_{attempt}"
            steps = ["--steps", "10"] if scheduler == "ddim" else []  # DDPM runs every training step (--steps refused)
            self.run(self.command("sample.py", "--num-samples", "2", "--batch-size", "2", "--scheduler", scheduler,
                                  *steps, "--seed", "3", "--output", str(out)))
            outputs.append([np.asarray(nib.load(str(out / f"sample_{i:03d}.nii.gz")).dataobj) for i in range(2)])
        difference = max(float(np.abs(a - b).max()) for a, b in zip(*outputs))
        if difference > 1e-4:
            raise RuntimeError(f"two runs with --seed 3 differ by up to {difference:.2e}")
        return f"2 volumes, two runs with --seed 3 agree (max difference {difference:.1e})"

    def _torchrun(self, nproc: int, *args: str) -> list[str]:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                "--master_addr=127.0.0.1", f"--master_port={port}", *args]

    def ddp_training(self, nproc: int, device: str) -> str:
        """``train_autoencoder.py`` under ``torchrun`` with ``nproc`` processes: a real process group (gloo on a
        CPU, NCCL on GPUs), DDP, sharded data; the run's summary must report the world size."""
        out = self.workdir / f"torchrun_{nproc}_{device.replace(':', '')}"
        script = self.command("train_autoencoder.py", out=out)[1:]
        script[script.index(f"device={self.device}")] = f"device={device}"
        if device == "cpu" and not self.on_cpu:
            script += [item for pair in zip(["--set"] * len(CPU), CPU) for item in pair]
        self.run(self._torchrun(nproc, *script, "--set", "autoencoder.training.fast_dev_run=true"))
        summary = json.loads((out / "fast_dev_run" / "autoencoder" / "summary.json").read_text())
        if summary["world_size"] != nproc:
            raise RuntimeError(f"summary reports world size {summary['world_size']}, expected {nproc}")
        return (f"world size {summary['world_size']} ({'NCCL' if device.startswith('cuda') else 'gloo'}), "
                f"{summary['optimizer_steps']} steps, precision {summary['precision']}")

    def nccl_one_process(self) -> str:
        """One process, a real NCCL (gloo on a CPU) process group, which the training scripts create only for
        world sizes above 1: a DDP step and an all_reduce (``--ddp-probe``, run under ``torchrun``)."""
        result = self.run(self._torchrun(1, str(Path(__file__).resolve()), "--ddp-probe", "--device", self.device))
        return result.stdout.strip().splitlines()[-1]

    def estimator(self) -> str:
        import torch

        from monai_diffusion.config import load_config
        from monai_diffusion.memory import estimate_autoencoder
        from monai_diffusion.runtime import resolve_device
        from monai_diffusion.training.measure import measure_training_step

        device = resolve_device(self.device)
        size = "[32, 32, 32]" if self.on_cpu else "[64, 64, 32]"
        config = load_config(CONFIG, [f"data.image_size={size}", "autoencoder.training.batch_size=1",
                                      f"autoencoder.training.mixed_precision={not self.on_cpu}",
                                      f"device={self.device}"])
        measured = measure_training_step(config, device, repeats=1)
        estimate = estimate_autoencoder(config, target="cuda" if device.type == "cuda" else "cpu")
        ratio = estimate.total / measured.peak_bytes
        kind = "max_memory_allocated" if device.type == "cuda" else "profiler peak"
        if not 0.7 <= ratio <= 1.4:
            raise RuntimeError(f"estimate {estimate.total / 2**20:.0f} MiB vs measured "
                               f"{measured.peak_bytes / 2**20:.0f} MiB ({kind}): ratio {ratio:.2f} outside [0.7, 1.4]")
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        return (f"{name}: estimate {estimate.total / 2**20:.0f} MiB, measured {measured.peak_bytes / 2**20:.0f} MiB "
                f"({kind}), ratio {ratio:.2f}; step {measured.seconds * 1000:.0f} ms{memory_line(device)}")


def ddp_probe(device_name: str) -> int:
    """Run by ``torchrun``: a process group with NCCL (a GPU) or gloo (a CPU) even for one process, one DDP step
    of a small 3D convolution and an all_reduce; prints one line."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from monai_diffusion.runtime import resolve_device

    world_size, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = resolve_device(device_name, local_rank, world_size)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(torch.nn.Conv3d(1, 4, 3).to(device),
                                        device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = torch.optim.Adam(model.parameters())
        model(torch.rand(2, 1, 8, 8, 8, device=device)).square().mean().backward()
        optimizer.step()
        total = torch.ones(1, device=device)
        dist.all_reduce(total)
        if int(total.item()) != world_size:
            raise RuntimeError(f"all_reduce gave {total.item()}, expected {world_size}")
        print(f"{backend} process group, world size {world_size}, backend {dist.get_backend()}: "
              f"DDP step and all_reduce on {device}", flush=True)
    finally:
        dist.destroy_process_group()
    return 0


def memory_line(device) -> str:
    """Peak allocated and reserved (the caching allocator's total, what the driver sees) on a GPU."""
    import torch

    if device.type != "cuda":
        return ""
    return (f"; max allocated {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB, "
            f"max reserved {torch.cuda.max_memory_reserved(device) / 2**20:.0f} MiB, "
            f"reserved now {torch.cuda.memory_reserved(device) / 2**20:.0f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a new temporary folder)")
    parser.add_argument("--tiny", action="store_true", help="fewer steps and timesteps, to check the script on a CPU")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help=f"start no check after this many seconds (default {BUDGET_S:.0f}); later checks fail")
    parser.add_argument("--ddp-probe", action="store_true", help=argparse.SUPPRESS)  # run by the NCCL check
    args = parser.parse_args()
    if args.ddp_probe:
        return ddp_probe(args.device)
    import torch

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_smoke_"))
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    print(f"# gpu_smoke on {args.device} ({where}), torch {torch.__version__}, workdir {workdir}", flush=True)
    smoke = Smoke(args.device, workdir, tiny=args.tiny, budget_s=args.budget_s)
    started = time.perf_counter()
    smoke.check("autoencoder: mixed precision, kill -9, --resume",
                smoke.stage("train_autoencoder.py", "autoencoder", smoke.steps))
    smoke.check("diffusion: mixed precision, kill -9, --resume",
                smoke.stage("train_diffusion.py", "diffusion", smoke.steps))
    smoke.check("sample.py DDIM --seed twice", lambda: smoke.sampling("ddim"))
    smoke.check("sample.py DDPM --seed twice", lambda: smoke.sampling("ddpm"))
    smoke.check("torchrun --nproc_per_node=2, gloo on CPU tensors", lambda: smoke.ddp_training(2, "cpu"))
    smoke.check(f"torchrun --nproc_per_node=1, {'gloo' if smoke.on_cpu else 'NCCL'} process group",
                smoke.nccl_one_process)
    if not smoke.on_cpu:
        gpus = torch.cuda.device_count()
        if gpus >= 2:
            smoke.check("torchrun --nproc_per_node=2, NCCL training", lambda: smoke.ddp_training(2, "cuda"))
        else:
            print(f"SKIP torchrun --nproc_per_node=2 with NCCL: {gpus} GPU visible, and NCCL refuses two ranks "
                  "on one device ('Duplicate GPU detected'); two processes ran with gloo above", flush=True)
    smoke.check("estimator vs measured training step", smoke.estimator)
    print(f"# {smoke.failures} failure(s), {time.perf_counter() - started:.0f} s", flush=True)
    return smoke.failures


if __name__ == "__main__":
    raise SystemExit(main())
