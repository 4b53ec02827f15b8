"""Does a conditional model follow its conditions? Phantoms with a class (``cavity``: a dark cavity at the
body's centre, or none) and a continuous covariate (``size``: the body's scale), a conditional and an
unconditional latent diffusion model trained on them, and samples measured against what was asked.

    python benchmarks/conditional.py --output benchmarks/results/conditional   # about 10 minutes on 2 CPU cores

* Class: a statistic of the real phantoms (the share of dark voxels in the central region of the body),
  thresholded halfway between the two classes' means, classifies each sample; the agreement with the class
  that was asked for is printed for the conditional model and for the unconditional one (which ignores the
  request, so about 50 % is what chance gives).
* Size: the body's measured scale (cube root of the share of body voxels, relative to the real phantoms of
  known size) against the size that was asked for: Pearson r.

Writes ``results.json`` and ``results.md`` (and the runs) into ``--output``; prints the same table.
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

from monai_diffusion.checkpoints import load_diffusion  # noqa: E402
from monai_diffusion.cli import train_autoencoder_main, train_diffusion_main  # noqa: E402
from monai_diffusion.data import SyntheticPhantomDataset  # noqa: E402
from monai_diffusion.sampling import generate_volumes  # noqa: E402

CONFIG = ROOT / "monai_diffusion" / "config" / "ldm_config.yaml"
FOREGROUND, DARK = 0.05, 0.1


def settings(size: int, ae_epochs: int, diffusion_epochs: int, conditional: bool) -> list[str]:
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


def args(output: Path, overrides: list[str]) -> list[str]:
    out = ["--config", str(CONFIG), "--set", f"output_dir={output}"]
    for item in overrides:
        out += ["--set", item]
    return out


def central_darkness(volume: np.ndarray) -> float:
    """Share of dark voxels in the central region of the body (the cavity's place)."""
    body = volume > FOREGROUND
    if not body.any():
        return 0.0
    centre = np.array([np.mean(np.nonzero(body)[axis]) for axis in range(3)])
    grid = np.indices(volume.shape).reshape(3, -1).T
    near = np.linalg.norm(grid - centre, axis=1) <= 0.2 * volume.shape[0]
    return float((volume.reshape(-1)[near] < DARK).mean())


def body_share(volume: np.ndarray) -> float:
    return float((volume > FOREGROUND).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--ae-epochs", type=int, default=15)
    parser.add_argument("--diffusion-epochs", type=int, default=150)
    parser.add_argument("--samples-per-class", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    options = parser.parse_args()
    output = Path(options.output)
    started = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    # 1. one autoencoder, then a conditional and an unconditional diffusion model on its latents
    conditional = settings(options.size, options.ae_epochs, options.diffusion_epochs, True)
    assert train_autoencoder_main(args(output, conditional)) == 0
    for name, overrides in (("conditional", conditional),
                            ("unconditional", settings(options.size, options.ae_epochs, options.diffusion_epochs,
                                                       False))):
        run = output / name
        run.mkdir(parents=True, exist_ok=True)
        if not (run / "diffusion").exists():
            source = f"diffusion.autoencoder_run={output / 'autoencoder'}"
            assert train_diffusion_main(args(run, overrides + [source])) == 0

    # 2. the classifier and the size scale, fitted on real phantoms
    real = SyntheticPhantomDataset(64, (options.size,) * 3, seed=1000, covariates=True)
    items = [real[i] for i in range(len(real))]
    dark = {c: np.mean([central_darkness(i["image"][0].numpy()) for i in items if i["cavity"] == c]) for c in (0, 1)}
    threshold = (dark[0] + dark[1]) / 2
    sizes = np.array([i["size"] for i in items])
    shares = np.array([body_share(i["image"][0].numpy()) for i in items])
    scale = float(np.polyfit(sizes, np.cbrt(shares), 1)[0])  # body share^(1/3) per unit of size
    real_accuracy = float(np.mean([(central_darkness(i["image"][0].numpy()) > threshold) == bool(i["cavity"])
                                   for i in items]))

    # 3. samples: each class, sizes spread over the range; the same requests for both models
    rng = np.random.default_rng(0)
    requests = [(c, float(s)) for c in (0, 1) for s in rng.uniform(0.6, 1.0, options.samples_per_class)]
    results = {"size": options.size, "samples_per_class": options.samples_per_class, "ddim_steps": options.steps,
               "guidance_scale": options.guidance_scale, "classifier_threshold": threshold,
               "classifier_accuracy_on_real": real_accuracy}
    for name in ("conditional", "unconditional"):
        bundle = load_diffusion(output / name / "diffusion")
        volumes = []
        for start in range(0, len(requests), 8):
            chunk = requests[start : start + 8]
            conditions = (bundle.conditioning.encode([{"cavity": c, "size": s} for c, s in chunk])
                          if bundle.conditioning.active else None)
            volumes += list(generate_volumes(bundle.unet, bundle.autoencoder, bundle.config, bundle.scale_factor,
                                             len(chunk), options.steps, "ddim", torch.Generator().manual_seed(start),
                                             conditions=conditions, conditioning=bundle.conditioning,
                                             guidance_scale=options.guidance_scale).clamp(0, 1))
        arrays = [v[0].numpy() for v in volumes]
        predicted = [central_darkness(a) > threshold for a in arrays]
        agreement = float(np.mean([p == bool(c) for p, (c, _) in zip(predicted, requests)]))
        measured = np.cbrt([body_share(a) for a in arrays]) / scale
        pearson = float(np.corrcoef([s for _, s in requests], measured)[0, 1])
        results[name] = {"class_agreement": agreement, "size_pearson_r": pearson}
    results["seconds"] = round(time.perf_counter() - started)
    lines = ["| model | class agreement | size Pearson r |", "|---|---:|---:|"]
    lines += [f"| {n} | {results[n]['class_agreement']:.0%} | {results[n]['size_pearson_r']:.2f} |"
              for n in ("conditional", "unconditional")]
    lines.append(f"\n{2 * options.samples_per_class} samples per model ({options.samples_per_class} per class), "
                 f"{options.size}^3 phantoms, DDIM {options.steps} steps, guidance {options.guidance_scale}; the "
                 f"classifier agrees with {real_accuracy:.0%} of 64 real phantoms; {results['seconds']} s.")
    print("\n".join(lines))
    (output / "results.json").write_text(json.dumps(results, indent=2))
    (output / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
