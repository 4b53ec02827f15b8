"""Does a conditional model follow its conditions? Phantoms with a class (``cavity``: a dark cavity at the
body's centre, or none) and a continuous covariate (``size``: the body's scale), a conditional and an
unconditional latent diffusion model trained on them, and samples measured against what was asked.

    python benchmarks/conditional.py --output benchmarks/results/conditional   # about 20 minutes on 2 CPU cores

* Class: the mean intensity of a ball at the body's centre (radius 0.3 of the body's equivalent radius)
  is low with a cavity. A threshold on it (a decision stump) is fitted on the autoencoder's
  reconstructions of 64 real phantoms of known class, so the autoencoder's blur does not count against
  the diffusion model; each sample is classified with it, and the agreement with the class that was asked
  for is printed for the conditional model, at each guidance scale, and for the unconditional one (which
  ignores the request: about 50 % is what chance gives).
* Size: the body's measured scale (cube root of the share of body voxels) against the size that was asked
  for: Pearson r.

Writes ``results.json`` and ``results.md`` (and the runs) into ``--output``; prints the same table.
Existing runs in ``--output`` are reused (delete them to retrain).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "GenerativeModels")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from monai_diffusion.cli import train_autoencoder_main, train_diffusion_main  # noqa: E402
from monai_diffusion.data import SyntheticPhantomDataset  # noqa: E402
from monai_diffusion.generation.sampling import SamplingRequest, generate_volumes  # noqa: E402
from monai_diffusion.runs.checkpoints import DiffusionBundle, load_diffusion  # noqa: E402

CONFIG = ROOT / "monai_diffusion" / "config" / "ldm_config.yaml"
FOREGROUND = 0.05  # intensity above which a voxel is body
CENTRE = 0.3  # radius of the central ball, as a share of the body's equivalent radius


def settings(size: int, ae_epochs: int, diffusion_epochs: int, conditional: bool) -> list[str]:
    """Overrides of ldm_config.yaml for the study (small networks that train in minutes on a CPU)."""
    common = [
        f"data.image_size=[{size}, {size}, {size}]", "data.num_train=64", "data.num_val=8",
        "data.phantom_covariates=true",
        "autoencoder.num_channels=[16, 32, 32]", "autoencoder.attention_levels=[false, false, false]",
        "autoencoder.norm_num_groups=16", "autoencoder.training.batch_size=4",
        f"autoencoder.training.n_epochs={ae_epochs}", "autoencoder.training.learning_rate=5e-4",
        "autoencoder.training.adversarial_warmup_epochs=1000", "autoencoder.training.val_interval=1000",
        "diffusion.num_channels=[32, 64]", "diffusion.attention_levels=[false, true]",
        "diffusion.num_head_channels=[0, 32]", "diffusion.training.batch_size=16",
        f"diffusion.training.n_epochs={diffusion_epochs}", "diffusion.training.learning_rate=5e-4",
        "diffusion.training.ema_decay=0.995", "diffusion.training.val_interval=1000", "device=cpu",
    ]
    if conditional:
        common += ["diffusion.conditioning.categorical=[cavity]", "diffusion.conditioning.continuous=[size]",
                   "diffusion.conditioning.dropout=0.1"]
    return common


def _args(output: Path, overrides: list[str]) -> list[str]:
    out = ["--config", str(CONFIG), "--set", f"output_dir={output}"]
    for item in overrides:
        out += ["--set", item]
    return out


def train(output: Path, size: int, ae_epochs: int, diffusion_epochs: int, extra: tuple[str, ...] = (),
          models: tuple[str, ...] = ("conditional", "unconditional"),
          model_overrides: dict[str, tuple[str, ...]] | None = None) -> None:
    """One autoencoder, then the diffusion ``models`` on its latents (runs that exist are kept); ``extra``
    overrides are added to every run's settings, ``model_overrides[name]`` to one model's. Every model but
    ``unconditional`` is conditional."""
    conditional = settings(size, ae_epochs, diffusion_epochs, True) + list(extra)
    if not (output / "autoencoder" / "checkpoints" / "last.pt").exists():
        if train_autoencoder_main(_args(output, conditional)) != 0:
            raise SystemExit("the autoencoder did not train")
    for name in models:
        run = output / name
        if (run / "diffusion" / "checkpoints" / "last.pt").exists():
            continue
        run.mkdir(parents=True, exist_ok=True)
        overrides = (settings(size, ae_epochs, diffusion_epochs, name != "unconditional") + list(extra)
                     + list((model_overrides or {}).get(name, ())))
        if train_diffusion_main(_args(run, overrides + [f"diffusion.autoencoder_run={output / 'autoencoder'}"])) != 0:
            raise SystemExit(f"the {name} diffusion model did not train")


def central_mean(volume: np.ndarray) -> float:
    """Mean intensity of the ball at the body's centre (the cavity's place)."""
    body = volume > FOREGROUND
    if not body.any():
        return 0.0
    points = np.nonzero(body)
    centre = np.array([axis.mean() for axis in points])
    radius = max(CENTRE * np.cbrt(3 * body.sum() / (4 * np.pi)), 1.5)
    grid = np.indices(volume.shape).reshape(volume.ndim, -1).T
    return float(volume.reshape(-1)[np.linalg.norm(grid - centre, axis=1) <= radius].mean())


def body_scale(volume: np.ndarray) -> float:
    """Cube root of the share of body voxels (proportional to the body's scale)."""
    return float(np.cbrt((volume > FOREGROUND).mean()))


def fit_stump(values: np.ndarray, positive: np.ndarray) -> float:
    """The threshold t (``value < t`` means positive) that classifies ``values`` best; the middle of the widest
    best gap."""
    order = np.sort(values)
    cuts = (order[1:] + order[:-1]) / 2
    accuracy = np.array([np.mean((values < t) == positive) for t in cuts])
    best = np.flatnonzero(accuracy == accuracy.max())
    return float(cuts[best[len(best) // 2]])


def reconstruct_phantoms(autoencoder: torch.nn.Module, size: int, count: int,
                         seed: int = 1000) -> tuple[list[dict], list[np.ndarray]]:
    """``count`` real phantoms (with covariates) and the autoencoder's reconstructions of them, clamped to [0, 1]."""
    real = SyntheticPhantomDataset(count, (size,) * 3, seed=seed, covariates=True)
    items = [real[i] for i in range(len(real))]
    images = torch.stack([i["image"] for i in items])
    with torch.no_grad():
        reconstructions = torch.cat([autoencoder.reconstruct(images[i : i + 8]) for i in range(0, count, 8)])
    return items, [r[0].clamp(0, 1).numpy() for r in reconstructions]


def fit_classifier(autoencoder: torch.nn.Module, size: int, count: int = 64) -> dict[str, float]:
    """The cavity threshold and the size calibration, on the autoencoder's reconstructions of real phantoms."""
    items, arrays = reconstruct_phantoms(autoencoder, size, count)
    cavity = np.array([bool(i["cavity"]) for i in items])
    stats = np.array([central_mean(a) for a in arrays])
    threshold = fit_stump(stats, cavity)
    raw = np.array([central_mean(i["image"][0].numpy()) for i in items])
    sizes = np.array([i["size"] for i in items])
    scales = np.array([body_scale(a) for a in arrays])
    return {"threshold": threshold, "accuracy_on_reconstructions": float(np.mean((stats < threshold) == cavity)),
            "accuracy_on_real": float(np.mean((raw < threshold) == cavity)),
            "size_r_on_reconstructions": float(np.corrcoef(sizes, scales)[0, 1])}


def sample_requests(bundle: DiffusionBundle, requests: list[tuple[int, float]], steps: int | None, guidance: float,
                    kind: str = "ddim", seed: int = 0) -> list[np.ndarray]:
    """Samples (clamped to [0, 1]) for ``requests`` (class, size) from a loaded diffusion run, with sampler ``kind``
    (``steps`` network evaluations); ``seed`` offsets the generators' seeds."""
    volumes = []
    for start in range(0, len(requests), 8):
        chunk = requests[start : start + 8]
        conditions = (bundle.conditioning.encode([{"cavity": c, "size": s} for c, s in chunk])
                      if bundle.conditioning.active else None)
        volumes += list(generate_volumes(bundle.unet, bundle.autoencoder, SamplingRequest(
                                         bundle.config, bundle.scale_factor,
                                         len(chunk), steps, kind, torch.Generator().manual_seed(seed + start),
                                         conditions=conditions, conditioning=bundle.conditioning,
                                         guidance_scale=guidance)).clamp(0, 1))
    return [v[0].numpy() for v in volumes]


def score(arrays: list[np.ndarray], requests: list[tuple[int, float]], threshold: float) -> dict[str, float]:
    """Class agreement and size Pearson r of samples against their ``requests``."""
    agreement = float(np.mean([(central_mean(a) < threshold) == bool(c) for a, (c, _) in zip(arrays, requests)]))
    pearson = float(np.corrcoef([s for _, s in requests], [body_scale(a) for a in arrays])[0, 1])
    return {"class_agreement": agreement, "size_pearson_r": pearson}


def sample_and_score(bundle: DiffusionBundle, requests: list[tuple[int, float]], steps: int, guidance: float,
                     threshold: float) -> dict[str, float]:
    """Samples for ``requests`` (class, size) from a loaded diffusion run (DDIM); class agreement and size
    Pearson r."""
    return score(sample_requests(bundle, requests, steps, guidance), requests, threshold)


def requests_for(samples_per_class: int, seed: int = 0) -> list[tuple[int, float]]:
    """Each class, with sizes spread over the phantoms' range; the same requests for every model."""
    rng = np.random.default_rng(seed)
    return [(c, float(s)) for c in (0, 1) for s in rng.uniform(0.6, 1.0, samples_per_class)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--ae-epochs", type=int, default=50)
    parser.add_argument("--diffusion-epochs", type=int, default=400)
    parser.add_argument("--samples-per-class", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    options = parser.parse_args()
    output = Path(options.output)
    started = time.perf_counter()

    train(output, options.size, options.ae_epochs, options.diffusion_epochs)
    bundles = {name: load_diffusion(output / name / "diffusion") for name in ("conditional", "unconditional")}
    classifier = fit_classifier(bundles["conditional"].autoencoder, options.size)
    requests = requests_for(options.samples_per_class)
    rows = [("conditional", g) for g in options.guidance_scales] + [("unconditional", 1.0)]
    scores = {f"{name}, guidance {g:g}" if name == "conditional" else name:
              sample_and_score(bundles[name], requests, options.steps, g, classifier["threshold"])
              for name, g in rows}
    results = {"size": options.size, "ae_epochs": options.ae_epochs, "diffusion_epochs": options.diffusion_epochs,
               "samples_per_class": options.samples_per_class, "ddim_steps": options.steps,
               "classifier": classifier, "models": scores, "seconds": round(time.perf_counter() - started)}
    lines = ["| model | class agreement | size Pearson r |", "|---|---:|---:|"]
    lines += [f"| {n} | {s['class_agreement']:.0%} | {s['size_pearson_r']:.2f} |" for n, s in scores.items()]
    lines.append(
        f"\n{2 * options.samples_per_class} samples per model ({options.samples_per_class} per class), "
        f"{options.size}^3 phantoms, autoencoder {options.ae_epochs} epochs, diffusion {options.diffusion_epochs} "
        f"epochs of 64 volumes, DDIM {options.steps} steps. The cavity classifier (threshold "
        f"{classifier['threshold']:.3f}) agrees with {classifier['accuracy_on_reconstructions']:.0%} of 64 real "
        f"phantoms' reconstructions ({classifier['accuracy_on_real']:.0%} of the phantoms themselves); measured "
        f"against true size on those reconstructions, r = {classifier['size_r_on_reconstructions']:.2f}. "
        f"{results['seconds']} s in all.")
    print("\n".join(lines))
    (output / "results.json").write_text(json.dumps(results, indent=2))
    (output / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
