"""Patches per second the autoencoder's training loader delivers for the guide's Example 4 volumes
(512x512x128, ``config/examples/example4_512x512x128_16gb.yaml``: 256x256x128 patches), before and after
the volume cache, against the training step time of an H100.

    nice -n 10 python benchmarks/loader.py --out benchmarks/results/loader_cpu.md

What runs:

* ``--volumes`` synthetic CT-like volumes (an elliptic body with an organ and a rim in air, plus noise, in
  -1000..1000 HU; int16, gzip-compressed NIfTI, 0.7 x 0.7 x 2.5 mm) are written to a temporary folder; one
  is held out for validation (``data.val_fraction``), so ``--volumes - 1`` are training volumes. The config
  is Example 4's (16 GB) data section with ``paths`` set to that folder and a CT window
  ``intensity_window: [-1000, 1000]``.
* **before**: the code of commit ``692f571`` (the last commit before the cache), exported with ``git
  archive 692f571 monai_diffusion GenerativeModels/generative`` into a temporary folder that is put first on
  ``PYTHONPATH`` of a child process; its defaults: ``num_workers: 0``, no cache, the patch weights computed
  on every read.
* **after**: this tree, with the defaults for a GPU run (``cache: auto``, ``num_workers: null``, i.e. the
  available cores at most 8), the loaders built by ``data.loaders.training_loaders`` for a CUDA runtime
  (no GPU is touched; batches are not pinned without one). Also ``after, files``: the same with
  ``cache_memory_gb: 0``, i.e. the preprocessed-file cache used when the volumes do not fit in memory, and
  ``after, 4 patches/volume``: ``patches_per_volume: 4``.

Each run iterates the training loader for ``--epochs-*`` epochs (a fresh shuffle each). Printed per run:
the time to build the loaders (for ``after``: filling the memory cache), the first epoch's patches per
second (cold: for the file cache, preparing and writing each volume) and the later epochs' (steady state),
wall clock; the CPU seconds per patch of the later epochs (the loading process and its workers, from
``/proc``); and from those, the patches per second of this machine's cores when idle (each worker on a core
of its own). This machine is shared: the wall-clock rates depend on its load (the 1-minute load average
at the end of each run is printed), the CPU seconds much less.

The GPU side is an assumption, not a measurement: issue #19 puts an H100's Example 4 training step at
0.1-0.3 s. Taking the fast end, 0.1 s per 256x256x128 patch (``batch_size`` 1 x ``patches_per_volume`` 1 per
micro-batch), the GPU consumes 10 patches/s: the loader keeps up when it delivers at least that.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "692f571"
STEP_SECONDS = 0.1  # assumed H100 training step per 256x256x128 patch (issue #19: 0.1-0.3 s; the fast end)
HU = (-1000.0, 1000.0)


def ct_volume(shape: tuple[int, int, int], seed: int):
    """A CT-like int16 volume in HU: air around an elliptic body (soft tissue) with a denser organ and a
    bright rim, plus noise; quick to make at 512 x 512 x 128 (the phantoms' texture is not needed here)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    axes = np.ogrid[tuple(slice(-1.0, 1.0, complex(0, n)) for n in shape)]
    radii = 0.75 + 0.1 * rng.random(3)
    body = sum((a / r) ** 2 for a, r in zip(axes, radii))
    organ = sum(((a - 0.2) / (0.3 * r)) ** 2 for a, r in zip(axes, radii))
    hu = np.where(body < 1.0, 40.0, HU[0]) + np.where(organ < 1.0, 300.0, 0.0) + np.where(
        (body > 0.9) & (body < 1.0), 700.0, 0.0)
    hu = hu + rng.standard_normal(shape, dtype=np.float32) * 20.0
    return np.clip(hu, *HU).astype(np.int16)


def write_volumes(folder: Path, count: int, shape: tuple[int, int, int]) -> None:
    """``count`` CT-like volumes as int16 .nii.gz files (0.7 x 0.7 x 2.5 mm)."""
    import nibabel as nib
    import numpy as np

    for index in range(count):
        image = nib.Nifti1Image(ct_volume(shape, index), np.diag([0.7, 0.7, 2.5, 1.0]))
        nib.save(image, str(folder / f"ct_{index:02d}.nii.gz"))


def measure(spec: dict) -> dict:
    """Run in a child process whose ``PYTHONPATH`` picks the code (before or after)."""
    import torch

    from monai_diffusion.config import load_config
    from monai_diffusion.data import build_datasets
    from monai_diffusion.runtime import Runtime

    torch.set_num_threads(1)
    config = load_config(spec["config"])
    started = time.perf_counter()
    datasets = build_datasets(config.data, seed=config.seed, in_channels=1)
    try:
        from monai_diffusion.data.loaders import training_loaders
    except ImportError:  # before: the loader code lived in training/loop.py
        from monai_diffusion.data.patches import RandomizedVolumes, build_random_transform
        from monai_diffusion.training.loop import build_loaders

        train_ds = RandomizedVolumes(datasets[0], build_random_transform(config.data), config.seed)
        loaders = build_loaders(train_ds, datasets[1], config.autoencoder.training.batch_size,
                                config.data.num_workers, config.seed, Runtime(torch.device("cpu")))
    else:
        loaders = training_loaders(config.data, datasets, config.autoencoder.training.batch_size, config.seed,
                                   Runtime(torch.device("cuda", 0)), 1)  # a GPU run's defaults
    train, _, sampler = loaders
    build_seconds = time.perf_counter() - started
    epochs = []
    for epoch in range(spec["epochs"]):
        sampler.set_epoch(epoch)
        pids = [os.getpid(), *(w.pid for w in getattr(getattr(train, "_iterator", None), "_workers", []))]
        started, cpu, patches = time.perf_counter(), cpu_seconds(pids), 0
        for batch in train:
            patches += int(batch["image"].shape[0])
        pids = [os.getpid(), *(w.pid for w in getattr(getattr(train, "_iterator", None), "_workers", []))]
        epochs.append((patches, time.perf_counter() - started, cpu_seconds(pids) - cpu))
    return {"build_seconds": build_seconds, "epochs": epochs, "workers": train.num_workers,
            "volumes": len(datasets[0]), "load": os.getloadavg()[0]}


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (Linux ``/proc``; workers started during an epoch
    count from their start)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def run(label: str, pythonpath: str, config: Path, epochs: int) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    spec = json.dumps({"config": str(config), "epochs": epochs})
    print(f"running: {label} ...", flush=True)
    result = subprocess.run([sys.executable, __file__, "--measure", spec], env=env, capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise SystemExit(f"{label} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_config(path: Path, scans: Path, **data) -> Path:
    import yaml

    example = yaml.safe_load((ROOT / "monai_diffusion/config/examples/example4_512x512x128_16gb.yaml").read_text())
    example["data"].update(source="nifti", paths=str(scans), val_fraction=0.25, intensity_window=list(HU), **data)
    path.write_text(yaml.safe_dump(example))
    return path


def table(rows: list[tuple[str, dict]], cores: int) -> list[str]:
    need = 1 / STEP_SECONDS
    lines = ["| code | workers | training volumes | build loaders (s) | epoch 1 patches/s (cold) | later epochs "
             "patches/s (wall) | later epochs CPU s per patch | patches/s of {} idle cores | load average | vs the "
             "GPU's {:.0f} patches/s (wall; idle cores) |".format(cores, need), "|---" * 10 + "|"]
    for label, r in rows:
        first = r["epochs"][0][0] / r["epochs"][0][1]
        rest = r["epochs"][1:] or r["epochs"]
        patches = sum(p for p, _, _ in rest)
        later, cpu = patches / sum(s for _, s, _ in rest), sum(c for _, _, c in rest) / patches
        idle = min(cores, max(1, r["workers"])) / cpu  # each loading process on a core of its own
        verdict = "; ".join("keeps up" if rate >= need else f"GPU idle {1 - rate / need:.0%}" for rate in (later, idle))
        lines.append(f"| {label} | {r['workers']} | {r['volumes']} | {r['build_seconds']:.1f} | {first:.2f} | "
                     f"{later:.2f} | {cpu:.3f} | {idle:.1f} | {r['load']:.1f} | {verdict} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", type=int, default=4, help="NIfTI volumes written (one is for validation)")
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 128])
    parser.add_argument("--patch", type=int, nargs=3, default=None, help="patch size (default: Example 4's)")
    parser.add_argument("--epochs-before", type=int, default=2)
    parser.add_argument("--epochs-after", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as Markdown here")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return
    sys.path.insert(0, str(ROOT / "GenerativeModels"))
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="loader_bench_") as tmp:
        tmp = Path(tmp)
        scans, old = tmp / "scans", tmp / "before"
        scans.mkdir()
        old.mkdir()
        started = time.perf_counter()
        write_volumes(scans, args.volumes, tuple(args.shape))
        print(f"wrote {args.volumes} volumes of {tuple(args.shape)} in {time.perf_counter() - started:.1f} s")
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE, "monai_diffusion",
                                  "GenerativeModels/generative"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        after_path = f"{ROOT / 'GenerativeModels'}:{ROOT}"
        before_path = f"{old / 'GenerativeModels'}:{old}"
        sizes = {"image_size": list(args.shape), **({"patch_size": args.patch} if args.patch else {})}
        runs = [(f"before ({BEFORE})", before_path, {}, args.epochs_before),
                ("after (memory cache)", after_path, {}, args.epochs_after),
                ("after (file cache)", after_path, {"cache_memory_gb": 0.0, "cache_dir": str(tmp / "cache")},
                 args.epochs_after),
                ("after, 4 patches/volume", after_path, {"patches_per_volume": 4}, args.epochs_after)]
        rows = [(label, run(label, path, write_config(tmp / f"run{i}.yaml", scans, **sizes, **data), epochs))
                for i, (label, path, data, epochs) in enumerate(runs)]
    patch = " x ".join(map(str, args.patch or (256, 256, 128)))
    lines = [f"# Training loader throughput: Example 4 volumes {' x '.join(map(str, args.shape))}, "
             f"{patch} patches", "",
             f"Command: `nice -n 10 python benchmarks/loader.py` (machine: {platform.machine()}, "
             f"{len(os.sched_getaffinity(0))} cores available, shared with other work while it ran).", "",
             *table(rows, len(os.sched_getaffinity(0))), "",
             f"GPU side (an assumption, not measured): an H100 training step of {STEP_SECONDS} s per 256 x 256 x 128 "
             f"patch (issue #19's 0.1-0.3 s for Example 4, at its fast end), i.e. {1 / STEP_SECONDS:.0f} patches/s. "
             f"Epoch 1 of `before` and of the file cache includes loading and preprocessing each volume; the memory "
             f"cache does that while the loaders are built. `before` reads every volume again for every patch; "
             f"`after` cuts patches from the cached volumes."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
