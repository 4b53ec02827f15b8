"""Quality against network evaluations: DDPM, DDIM, DPM-Solver++ and rectified flow on the conditional phantom
benchmark (``benchmarks/conditional.py``: its phantoms, settings, training, classifier and scores).

    nice -n 10 python benchmarks/sampling.py --output /tmp/sampling   # ~30 min on 2 shared CPU cores

One autoencoder; three conditional diffusion models on its latents with the same UNet and the same training
budget: ``ddpm`` (noise prediction, ``diffusion.scheduler.type=ddpm``), ``rflow`` (rectified flow with the config's
defaults) and ``rflow-shifted`` (the same with MAISI v2's latent-size time shift, ``timestep_transform: true``). The
ddpm model is sampled with DDPM (1000 steps, twice: two seeds, the run-to-run noise), DDIM and DPM-Solver++; the
rflow models with their Euler sampler. For every row, on the same requests (class, size):

* class agreement and size Pearson r (``conditional.score``);
* a distribution distance on phantom features that can be trusted (body volume and mean intensity, bright-organ
  volume and mean intensity, the central ball's mean intensity), standardised on a reference set of the
  autoencoder's reconstructions of held-out real phantoms: unbiased MMD^2 (Gaussian kernel, median bandwidth)
  and the mean 1D Wasserstein distance per feature; beside them the same distances of two other sets of
  reconstructed real phantoms of the same size as the samples (the real-against-real floor);
* seconds per sample (denoising and decoding, batches of 8; on a shared CPU these are rough).

Writes ``results.json``, ``results.md`` and ``quality_vs_evaluations.png`` into ``--output``; prints the table.
Existing runs in ``--output`` are reused (delete them to retrain).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "GenerativeModels"), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402
from conditional import (  # noqa: E402
    FOREGROUND,
    central_mean,
    fit_classifier,
    reconstruct_phantoms,
    requests_for,
    sample_requests,
    score,
    train,
)
from scipy.stats import wasserstein_distance  # noqa: E402

from monai_diffusion.runs.checkpoints import load_diffusion  # noqa: E402

BRIGHT = 0.5  # intensity above which a voxel belongs to the bright organs
# the diffusion models, each trained with the same budget: its overrides of the benchmark's settings
MODELS = {
    "ddpm": (),
    "rflow": ("diffusion.scheduler.type=rflow",),  # the config's defaults: logit-normal times, not shifted
    # MAISI v2's shift by latent size: its base is a 32^3 latent; this benchmark's are 4^3, shifted to far less noise
    "rflow-shifted": ("diffusion.scheduler.type=rflow", "diffusion.scheduler.timestep_transform=true"),
}
ROWS = [("ddpm", "ddpm", 1000), ("ddpm", "ddim", 50), ("ddpm", "ddim", 20), ("ddpm", "ddim", 10),
        ("ddpm", "dpm-solver++", 20), ("ddpm", "dpm-solver++", 10), ("ddpm", "dpm-solver++", 5),
        ("rflow", "rflow", 30), ("rflow", "rflow", 10), ("rflow", "rflow", 5),
        ("rflow-shifted", "rflow", 30), ("rflow-shifted", "rflow", 10), ("rflow-shifted", "rflow", 5)]
FEATURES = ["body volume", "body mean", "bright volume", "bright mean", "centre mean"]
SECOND_SEED = 1000  # the repeated DDPM row's generator offset


def features(volume: np.ndarray) -> np.ndarray:
    """Per-tissue volume share and mean intensity, and the central ball's mean intensity, of one volume."""
    out = []
    for threshold in (FOREGROUND, BRIGHT):
        mask = volume > threshold
        out += [float(mask.mean()), float(volume[mask].mean()) if mask.any() else 0.0]
    return np.array(out + [central_mean(volume)])


def mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """Unbiased squared maximum mean discrepancy with the kernel exp(-|a - b|^2 / (2 bandwidth^2))."""
    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * bandwidth**2))

    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    n, m = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


class Distance:
    """Distances of a set of volumes to the reference reconstructions, on standardised features."""

    def __init__(self, reference: list[np.ndarray]) -> None:
        raw = np.stack([features(v) for v in reference])
        self.mean, std = raw.mean(0), raw.std(0)
        self.std = np.where(std > 1e-6, std, 1.0)  # a feature constant on the reference (an untrained autoencoder)
        self.reference = (raw - self.mean) / self.std
        pairs = np.sqrt(((self.reference[:, None] - self.reference[None]) ** 2).sum(-1))
        self.bandwidth = float(np.median(pairs[np.triu_indices(len(pairs), 1)]))

    def __call__(self, volumes: list[np.ndarray]) -> dict[str, float]:
        x = (np.stack([features(v) for v in volumes]) - self.mean) / self.std
        wasserstein = [wasserstein_distance(x[:, k], self.reference[:, k]) for k in range(x.shape[1])]
        return {"mmd2": mmd2(x, self.reference, self.bandwidth), "wasserstein": float(np.mean(wasserstein))}


def _row_name(model: str, kind: str, steps: int, seed: int) -> str:
    return f"{kind} {steps}" + (" (seed 2)" if seed else "") + (f" [{model}]" if model not in ("ddpm", kind) else "")


def _table(results: dict) -> list[str]:
    lines = ["| sampler | network evaluations | class agreement | size Pearson r | feature MMD² | feature W1 | "
             "s / sample |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in results["rows"].items():
        lines.append(f"| {name} ({row['model']} model) | {row['evaluations']} | {row['class_agreement']:.0%} | "
                     f"{row['size_pearson_r']:.2f} | {row['mmd2']:.3f} | {row['wasserstein']:.3f} | "
                     f"{row['seconds_per_sample']:.3f} |")
    for index, floor in enumerate(results["real_floor"]):
        lines.append(f"| real phantoms, set {index + 1} (floor) | - | 100% | - | {floor['mmd2']:.3f} | "
                     f"{floor['wasserstein']:.3f} | - |")
    return lines


def plot(results: dict, path: Path) -> None:
    """Class agreement, size r and feature MMD² against network evaluations, one line per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("class_agreement", "class agreement"), ("size_pearson_r", "size Pearson r"), ("mmd2", "feature MMD²")]
    figure, axes = plt.subplots(1, len(metrics), figsize=(15, 4.2))
    rows = results["rows"]
    for axis, (key, label) in zip(axes, metrics):
        for model, kind in dict.fromkeys((r["model"], r["sampler"]) for r in rows.values()):
            points = sorted((r["evaluations"], r[key]) for r in rows.values()
                            if (r["model"], r["sampler"]) == (model, kind))
            axis.plot(*zip(*points), marker="o", label=kind if model in ("ddpm", kind) else f"{kind} [{model}]")
        ddpm = [r[key] for r in rows.values() if r["sampler"] == "ddpm"]
        axis.axhspan(min(ddpm), max(ddpm), color="grey", alpha=0.25, label="DDPM 1000, two seeds")
        if key == "mmd2":
            floors = [f["mmd2"] for f in results["real_floor"]]
            axis.axhspan(min(floors), max(floors), color="green", alpha=0.2, label="real vs real")
        axis.set_xscale("log")
        axis.set_xlabel("network evaluations per sample")
        axis.set_title(label)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"{results['size']}³ phantoms, {2 * results['samples_per_class']} samples per row")
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--size", type=int, default=16,
                        help="phantom side (32 in conditional.py; 16 fits ~30 min on shared cores)")
    parser.add_argument("--ae-epochs", type=int, default=20)
    parser.add_argument("--diffusion-epochs", type=int, default=150)
    parser.add_argument("--samples-per-class", type=int, default=12)
    parser.add_argument("--guidance", type=float, default=1.0)
    options = parser.parse_args()
    output = Path(options.output)
    started = time.perf_counter()

    small = ("autoencoder.discriminator.num_layers_d=2",) if options.size < 24 else ()  # (adversarial loss is off)
    train(output, options.size, options.ae_epochs, options.diffusion_epochs, small, models=tuple(MODELS),
          model_overrides=MODELS)
    trained = time.perf_counter()
    bundles = {name: load_diffusion(output / name / "diffusion") for name in MODELS}
    autoencoder = bundles["ddpm"].autoencoder
    classifier = fit_classifier(autoencoder, options.size)
    count = 2 * options.samples_per_class
    distance = Distance(reconstruct_phantoms(autoencoder, options.size, 64, seed=2000)[1])
    floors = [distance(reconstruct_phantoms(autoencoder, options.size, count, seed=seed)[1]) for seed in (3000, 4000)]
    requests = requests_for(options.samples_per_class)
    rows = {}
    for model, kind, steps in ROWS:
        for seed in ((0, SECOND_SEED) if kind == "ddpm" else (0,)):
            tic = time.perf_counter()
            arrays = sample_requests(bundles[model], requests, steps, options.guidance, kind, seed)
            seconds = (time.perf_counter() - tic) / count
            row = {"model": model, "sampler": kind, "evaluations": steps, "seed_offset": seed,
                   **score(arrays, requests, classifier["threshold"]), **distance(arrays),
                   "seconds_per_sample": seconds}
            rows[_row_name(model, kind, steps, seed)] = row
            print(f"{_row_name(model, kind, steps, seed)}: {row}", flush=True)
    results = {"size": options.size, "ae_epochs": options.ae_epochs, "diffusion_epochs": options.diffusion_epochs,
               "samples_per_class": options.samples_per_class, "guidance_scale": options.guidance,
               "features": FEATURES, "classifier": classifier, "real_floor": floors, "rows": rows,
               "training_seconds": round(trained - started), "seconds": round(time.perf_counter() - started)}
    lines = _table(results)
    lines.append(
        f"\n{count} samples per row ({options.samples_per_class} per class, the same requests and initial noise for "
        f"every sampler), {options.size}^3 phantoms, autoencoder {options.ae_epochs} epochs, the {len(MODELS)} "
        f"diffusion models {options.diffusion_epochs} epochs of 64 volumes, guidance {options.guidance:g}. The cavity "
        f"classifier agrees with {classifier['accuracy_on_reconstructions']:.0%} of 64 real phantoms' "
        f"reconstructions; size r on them {classifier['size_r_on_reconstructions']:.2f}. Distances against 64 "
        f"reconstructed held-out phantoms. Training {results['training_seconds']} s, {results['seconds']} s in all.")
    print("\n".join(lines))
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=2))
    (output / "results.md").write_text("\n".join(lines) + "\n")
    plot(results, output / "quality_vs_evaluations.png")


if __name__ == "__main__":
    main()
