"""One runner for both training stages: the run folder, resume, the saved config, TensorBoard, the loop
and the summary. What differs between the autoencoder and the diffusion stage is a :class:`Stage`.

The order of a run (every process takes the same steps; rank 0 alone writes):
1. check the run folder (another training holding its lock, no overwrite without ``--resume``, something to
   resume with it) and the stage's inputs (e.g. the frozen autoencoder), before anything is created;
2. create the run folder and take its lock (held to the end), seed, build the task (networks, optimisers)
   and its data loaders;
3. on ``--resume``: load ``last.pt`` onto the CPU, refuse an architecture change, restore the task, the loop
   position and this rank's random streams;
4. now that the run has really started: remove what interrupted saves left, save the resolved
   ``config.yaml``, open TensorBoard, train (a run stopped by non-finite values deletes its unconfirmed
   checkpoints: ``last.pt`` stays the last good one);
5. write ``summary.json`` and log it; a last barrier, so that no rank leaves while another still talks to it.
   The process group stays up: the command lines end torchrun's processes with ``os._exit``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Sampler

from monai_diffusion.config import Config, save_config
from monai_diffusion.errors import CheckpointError, RunError, TrainingError
from monai_diffusion.profiling import peak_rss_bytes
from monai_diffusion.runs.checkpoints import checkpoint_path, load_checkpoint
from monai_diffusion.runs.folders import (
    RunLock,
    check_outside_data,
    check_run_dir,
    clear_scratch,
    create_run_dir,
    remove_orphans,
    run_folder,
)
from monai_diffusion.runtime import Precision, Runtime, restore_rng, seed_everything, setup_runtime
from monai_diffusion.training.loop import LoopSettings, LoopState, Task, fit

__all__ = ["Stage", "run_stage", "differences", "flatten", "load_for_resume", "restore_loop"]

log = logging.getLogger("monai_diffusion")

Loaders = tuple[DataLoader, DataLoader, Sampler]


class Stage(Protocol):
    """What a training stage adds to the shared run (see ``autoencoder.py`` and ``diffusion.py``)."""

    name: str  # the run folder's name and the checkpoint's ``stage``

    def section(self, config: Config) -> Any:
        """The config's ``training`` section of this stage."""

    def check_inputs(self, config: Config, runtime: Runtime) -> None:
        """Refuse a run whose inputs are unusable, before the run folder is created."""

    def build(self, config: Config, runtime: Runtime, precision: Precision, run_dir: Path,
              saved: dict[str, Any] | None) -> tuple[Task, Loaders]:
        """The task and its loaders (``saved``: the checkpoint being resumed, or None)."""

    def check_resume(self, saved: dict[str, Any], task: Task, config: Config, path: Path) -> None:
        """Refuse to resume ``saved`` with a changed architecture (RunError)."""

    def summary(self, config: Config, task: Task, state: LoopState) -> dict[str, Any]:
        """Stage-specific entries of ``summary.json``."""

    def describe(self, summary: dict[str, Any]) -> list[str]:
        """Stage-specific log lines of the summary (the runner logs the shared ones around them)."""


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def differences(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """``key: old -> new`` for every key whose value differs."""
    keys = sorted((set(old) | set(new)) - set(ignore))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def load_for_resume(run_dir: Path, stage: str) -> dict[str, Any]:
    """The ``last`` checkpoint of ``run_dir``, which must belong to ``stage``, loaded onto the CPU.

    Each state is moved to its device by the module or optimiser that loads it (``load_state_dict``); RNG
    states stay CPU tensors, as ``torch.set_rng_state`` requires. Drop the returned dict once loaded, so no
    second copy of the weights stays alive during training.
    """
    path = checkpoint_path(run_dir, "last")
    try:
        saved = load_checkpoint(path, map_location="cpu")
    except CheckpointError as err:
        raise RunError(f"--resume: {err}") from None
    if saved.get("stage") != stage:
        raise RunError(f"--resume: {path} is not {'an' if stage[0] in 'aeiou' else 'a'} {stage} checkpoint")
    if saved.get("imported"):  # weights without a training state (written by ldm-import)
        raise RunError(f"--resume: {path} holds imported weights, not a run to continue; fine-tune them in a new "
                       f"output_dir with {stage}.init_from={run_dir}")
    return saved


def restore_loop(saved: dict[str, Any], precision: Precision, runtime: Runtime, seed: int) -> LoopState:
    """Loop position, grad scaler and this rank's RNG states from a checkpoint (call after building the task).

    Every rank saved its own RNG streams; rank ``r`` restores stream ``r``. A run resumed with a different
    number of processes cannot have the same streams: each rank is then re-seeded from ``seed``, the step
    and its rank (training continues correctly, but not bit for bit as an uninterrupted run would).
    """
    precision.load_scaler_state(saved["scaler"])
    state = LoopState(**saved["loop"])
    streams = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]  # runs saved by 0.4: one
    if len(streams) == runtime.world_size:
        restore_rng(streams[runtime.rank], runtime.device)
    else:
        if runtime.is_main:
            log.warning("resuming %d process(es) from a checkpoint of %d: random streams are re-seeded per rank, so "
                        "the run continues correctly but not bit-exactly", runtime.world_size, len(streams))
        seed_everything(seed + 1_000_003 * state.global_step + runtime.rank)
    return state


def _open_writer(run_dir: Path, runtime: Runtime) -> Any | None:
    """A TensorBoard writer in ``run_dir/tensorboard`` on rank 0 (None elsewhere)."""
    if not runtime.is_main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        # reserved: what the caching allocator holds from the driver (allocated plus its cached blocks)
        return {"kind": "CUDA max allocated", "GiB": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
                "reserved_GiB": round(torch.cuda.max_memory_reserved(device) / 2**30, 3)}
    return {"kind": "process peak RSS", "GiB": round(peak_rss_bytes() / 2**30, 3)}


def _describe(summary: dict[str, Any], stage_lines: list[str]) -> list[str]:
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in summary["final"].items() if k.startswith("val/"))
    return [
        f"run folder:   {summary['run_dir']}" + ("  (fast_dev_run)" if summary["fast_dev_run"] else ""),
        *stage_lines,
        f"training:     {summary['epochs']} epochs, {summary['optimizer_steps']} optimiser steps "
        f"({summary['skipped_steps']} skipped), {summary['precision']}, {summary['world_size']} process(es)",
        f"validation:   {metrics or 'not run'}",
        f"peak memory:  {summary['peak_memory']['GiB']:.2f} GiB ({summary['peak_memory']['kind']})",
        f"throughput:   {summary['volumes_per_second']:.2f} volumes/s; total {summary['seconds']:.0f} s",
    ]


def run_stage(stage: Stage, config: Config, resume: bool = False) -> dict[str, Any]:
    """Train ``stage`` as ``config`` says (see the module docstring); returns the summary (also ``summary.json``)."""
    tr = stage.section(config)
    runtime = setup_runtime(config.device)
    run_dir = run_folder(config.output_dir, stage.name, tr.fast_dev_run)
    lock = RunLock(run_dir)  # taken on rank 0 only, which alone writes

    def refuse() -> None:
        if config.data.source == "nifti":
            check_outside_data(Path(config.output_dir), config.data.paths, "output_dir")
        if run_dir.is_dir():
            lock.acquire()  # a training running there is named before anything else is said
        check_run_dir(run_dir, resume, tr.fast_dev_run)

    def create() -> None:
        create_run_dir(run_dir)
        lock.acquire()
        check_run_dir(run_dir, resume, tr.fast_dev_run)  # again: a run may have finished there meanwhile
        if tr.fast_dev_run and not resume:
            clear_scratch(run_dir)

    try:
        # 1. refuse before creating anything
        runtime.on_main(refuse, (RunError,))
        stage.check_inputs(config, runtime)
        runtime.on_main(create, (RunError,))
        runtime.barrier()
        # 2. the task and its data
        seed_everything(config.seed + runtime.rank)
        precision = Precision(tr.mixed_precision, runtime.device)
        saved = load_for_resume(run_dir, stage.name) if resume else None
        task, loaders = stage.build(config, runtime, precision, run_dir, saved)
        # 3. resume
        state = LoopState()
        if saved is not None:
            stage.check_resume(saved, task, config, checkpoint_path(run_dir, "last"))
            task.load_state_dict(saved)
            state = restore_loop(saved, precision, runtime, config.seed)
            log.info("resumed %s at epoch %d, step %d", run_dir, state.epoch, state.global_step)
        del saved  # the weights now live in the task, on its device
        # 4. train
        if runtime.is_main:
            remove_orphans(run_dir)
            save_config(config, run_dir / "config.yaml")
        writer = _open_writer(run_dir, runtime)
        started = time.perf_counter()
        if runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(runtime.device)
        with precision.kernel_guard():
            state = fit(task, LoopSettings.of(tr), runtime, precision, loaders, run_dir, state, writer)
        if writer is not None:
            writer.close()
        # 5. the summary
        trained = [r for r in state.history if "volumes_per_second" in r]
        summary = {
            "run_dir": str(run_dir),
            "fast_dev_run": tr.fast_dev_run,
            "precision": precision.name,
            "world_size": runtime.world_size,
            "epochs": state.epoch,
            "optimizer_steps": state.global_step,
            "skipped_steps": state.skipped_steps,
            f"best_{task.monitor.replace('/', '_')}": state.best_metric,
            "final": state.history[-1] if state.history else {},
            "peak_memory": _peak_memory(runtime.device),
            "volumes_per_second": trained[-1]["volumes_per_second"] if trained else 0.0,
            "seconds": round(time.perf_counter() - started, 1),
            **stage.summary(config, task, state),
        }
        if runtime.is_main:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float), encoding="utf-8")
            for line in _describe(summary, stage.describe(summary)):
                log.info(line)
        runtime.barrier()  # the last collective: no rank leaves while another still talks to it
        return summary
    except TrainingError:
        if runtime.is_main:  # what was written since the last good state (``last.pt`` never named it)
            remove_orphans(run_dir, "written after the last good state")
        raise
    finally:
        lock.release()
        # the process group is left to the process' end: tearing it down (or a gloo group's destructor) waited
        # forever on a peer that had already exited, in CI and in the suite (pytorch#75097); under torchrun the
        # command lines end each process with os._exit (command_line.run_main), which frees it without waiting
