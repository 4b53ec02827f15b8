"""Do generated volumes follow their masks? Labelled phantoms (``data.phantom_organs: typed`` by default: a body
of shell and soft tissue with two organs of fixed kinds, bright and grey, at random places), the three
stages trained on them (autoencoder, unconditional latent diffusion, ControlNet on the label maps), then volumes
generated from the label maps of held-out phantoms (shapes never seen in training) and segmented.

    OMP_NUM_THREADS=1 python benchmarks/masks.py --output runs/masks   # about 27 minutes on one CPU core

* Segmenter: ``IntensitySegmenter`` (per-class Gaussian of intensity and local mean) fitted on real phantoms;
  its Dice on other real phantoms against their own label maps is the ceiling.
* With the ControlNet: Dice per class between the segmentation of each sample and the mask it followed. The
  headline is the mean over ``body`` and the organs (classes 3-20) whose ceiling reaches 0.8: those the
  segmenter can name (with ``--organs random`` the organs' intensities are shuffled from phantom to phantom, so
  none can); the mean over every class it can name (shell and soft tissue too) is reported beside it.
* Chance: the same diffusion model without the ControlNet (unconditional samples), against the same masks.
* Autoencoder: the segmenter on the autoencoder's reconstructions of the masks' own real phantoms: the most a
  generator that decodes through this autoencoder could score.

Writes ``results.json`` and ``results.md`` (and the runs) into ``--output``; prints the same table. Existing runs
in ``--output`` are reused (delete them to retrain).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "GenerativeModels")]

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from monai_diffusion.cli import train_autoencoder_main, train_controlnet_main, train_diffusion_main  # noqa: E402
from monai_diffusion.config.schema import PHANTOM_NUM_CLASSES, SAMPLERS  # noqa: E402
from monai_diffusion.data import LABEL_KEY, SyntheticPhantomDataset  # noqa: E402
from monai_diffusion.data.phantoms import PHANTOM_ORGANS  # noqa: E402
from monai_diffusion.evaluation.mask_metrics import (  # noqa: E402
    BODY,
    dice_per_class,
    evaluate_pairs,
    fit_phantom_segmenter,
    mean_dice,
)
from monai_diffusion.generation.mask_sampling import sample_from_masks  # noqa: E402
from monai_diffusion.generation.sampling import sample_volumes  # noqa: E402
from monai_diffusion.runs.checkpoints import load_autoencoder  # noqa: E402

CONFIG = ROOT / "monai_diffusion" / "config" / "ldm_config.yaml"
SEEN = 0.8  # a class enters the headline when the segmenter's Dice on real phantoms reaches this
MASK_SEED = 5000  # held-out phantoms (training uses seed 0, validation 1, the segmenter 7000 and 8000)
FIRST_ORGAN = 3  # classes 1 and 2 are the body's shell and soft tissue
ROWS = ("controlnet", "chance", "autoencoder", "ceiling")  # rows of the results table


def settings(size: int, steps: tuple[int, int, int], num_train: int, organs: str, covariates: bool) -> list[str]:
    """Overrides of ldm_config.yaml: small networks that train in minutes on a CPU (the autoencoder downsamples
    2x once: at 16^3 the latents are 8^3, fine enough to hold a mask's shapes)."""
    ae, diffusion, controlnet = steps
    return [
        f"data.image_size=[{size}, {size}, {size}]", f"data.num_train={num_train}", "data.num_val=4",
        f"data.phantom_covariates={str(covariates).lower()}", f"data.phantom_organs={organs}",
        f"data.num_classes={PHANTOM_NUM_CLASSES}", "seed=0", "device=cpu",
        "autoencoder.num_channels=[16, 32]", "autoencoder.attention_levels=[false, false]",
        "autoencoder.downsample_factors=[2]", "autoencoder.discriminator.num_layers_d=2",
        "autoencoder.norm_num_groups=16", "autoencoder.training.batch_size=4", "autoencoder.training.n_epochs=1000",
        f"autoencoder.training.max_steps={ae}", "autoencoder.training.learning_rate=5e-4",
        "autoencoder.training.adversarial_warmup_epochs=1000", "autoencoder.training.val_interval=1000",
        "diffusion.num_channels=[32, 64]", "diffusion.attention_levels=[false, true]",
        "diffusion.num_head_channels=[0, 32]", "diffusion.training.batch_size=8", "diffusion.training.n_epochs=1000",
        f"diffusion.training.max_steps={diffusion}", "diffusion.training.learning_rate=5e-4",
        "diffusion.training.ema_decay=0.99", "diffusion.training.val_interval=1000",
        "controlnet.training.batch_size=8", "controlnet.training.n_epochs=1000",
        f"controlnet.training.max_steps={controlnet}", "controlnet.training.learning_rate=5e-4",
        "controlnet.training.ema_decay=0.99", "controlnet.training.val_interval=1000",
    ]


def _argv(output: Path, overrides: list[str]) -> list[str]:
    argv = ["--config", str(CONFIG), "--set", f"output_dir={output}"]
    for item in overrides:
        argv += ["--set", item]
    return argv


def _phantoms(num: int, size: int, seed: int, organs: str, covariates: bool) -> SyntheticPhantomDataset:
    return SyntheticPhantomDataset(num, (size,) * 3, seed, covariates=covariates, labels=True, organs=organs)


def _train(output: Path, overrides: list[str]) -> dict[str, float]:
    """Train the stages not yet in ``output``; every stage's training seconds (from its summary.json)."""
    seconds = {}
    for name, main in (("autoencoder", train_autoencoder_main), ("diffusion", train_diffusion_main),
                       ("controlnet", train_controlnet_main)):
        summary = output / name / "summary.json"
        if not summary.is_file() and main(_argv(output, overrides)) != 0:
            raise SystemExit(f"training the {name} failed")
        seconds[name] = round(float(json.loads(summary.read_text(encoding="utf-8"))["seconds"]), 1)
    return seconds


def _write_masks(folder: Path, phantoms: SyntheticPhantomDataset) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, item in enumerate(phantoms):
        path = folder / f"mask_{index:03d}.nii.gz"
        nib.save(nib.Nifti1Image(item[LABEL_KEY][0].numpy().astype(np.int16), np.eye(4)), path)
        paths.append(path)
    return paths


def _reconstruction_dice(run: Path, phantoms: SyntheticPhantomDataset, segmenter) -> dict[str, float]:
    """The segmenter's Dice on the autoencoder's reconstructions of the masks' own phantoms: what a generator in
    this latent space could reach (the decoder's blur included)."""
    autoencoder, _ = load_autoencoder(run)
    rows = []
    with torch.no_grad():
        for item in phantoms:
            volume = autoencoder.reconstruct(item["image"][None])[0, 0].clamp(0, 1)
            rows.append(dice_per_class(segmenter(volume), item[LABEL_KEY][0].long(), range(1, PHANTOM_NUM_CLASSES)))
    return mean_dice(rows)


def _mean(dice: dict[str, float], keys: list[str]) -> float:
    values = [dice[k] for k in keys if k in dice and not math.isnan(dice[k])]
    return float(np.mean(values)) if values else math.nan


def _table(result: dict) -> str:
    keys = [k for k in result["ceiling"] if not math.isnan(result["ceiling"][k])]
    lines = ["| Dice | " + " | ".join(("class " + k) if k != BODY else BODY for k in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for row in ROWS:
        values = result[row]
        lines.append(f"| {row} | " + " | ".join("-" if math.isnan(values.get(k, math.nan)) else f"{values[k]:.3f}"
                                                 for k in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "masks")
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--num-train", type=int, default=64)
    parser.add_argument("--steps", type=int, nargs=3, default=[4500, 3000, 3000], metavar=("AE", "LDM", "CONTROLNET"))
    parser.add_argument("--masks", type=int, default=16, help="held-out masks (one sample each)")
    parser.add_argument("--organs", default="typed", choices=PHANTOM_ORGANS, help="data.phantom_organs")
    parser.add_argument("--covariates", action="store_true",
                        help="data.phantom_covariates: bodies of varying size, half with a cavity")
    parser.add_argument("--scheduler", default="ddim", choices=SAMPLERS["ddpm"],
                        help="the sampler of both rows (ddpm: ancestral, with --sampling-steps 1000)")
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--conditioning-scale", type=float, default=1.0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of every stage (after the script's own; repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    output = args.output
    overrides = settings(args.size, tuple(args.steps), args.num_train, args.organs, args.covariates) + args.overrides
    seconds = _train(output, overrides)
    held_out = _phantoms(args.masks, args.size, MASK_SEED, args.organs, args.covariates)
    masks = _write_masks(output / "masks", held_out)
    pairs, unconditional = output / "pairs", output / "unconditional"
    for folder in (pairs, unconditional):
        if folder.exists():
            for path in sorted(folder.rglob("*"), reverse=True):
                path.unlink() if path.is_file() else path.rmdir()
    started = time.perf_counter()
    sample_from_masks(output / "controlnet", masks, 1, pairs, scheduler=args.scheduler, steps=args.sampling_steps,
                      batch_size=4, device="cpu", conditioning_scale=args.conditioning_scale)
    sample_volumes(output / "diffusion", len(masks), unconditional, scheduler=args.scheduler,
                   steps=args.sampling_steps, batch_size=4, device="cpu")
    seconds["sampling"] = round(time.perf_counter() - started, 1)
    segmenter, ceiling = fit_phantom_segmenter((args.size,) * 3, PHANTOM_NUM_CLASSES, organs=args.organs,
                                               covariates=args.covariates)  # phantoms like the masks
    measured = evaluate_pairs(pairs, segmenter, range(1, PHANTOM_NUM_CLASSES), unconditional)
    # the means cover the classes the segmenter can name on real phantoms (ceiling >= SEEN) that the masks hold
    seen = [k for k in ceiling
            if k.isdigit() and ceiling[k] >= SEEN and not math.isnan(measured["dice"].get(k, math.nan))]
    headline = [BODY, *(k for k in seen if FIRST_ORGAN <= int(k) < PHANTOM_NUM_CLASSES - 1)]
    reconstructed = _reconstruction_dice(output / "autoencoder", held_out, segmenter)
    rows = tuple(zip(ROWS, (measured["dice"], measured["chance"], reconstructed, ceiling)))
    result = {**dict(rows), "headline_classes": headline,
              "headline": {row: _mean(values, headline) for row, values in rows},
              "seen_classes": [BODY, *seen], "seen": {row: _mean(values, [BODY, *seen]) for row, values in rows},
              "settings": {"size": args.size, "num_train": args.num_train, "steps": args.steps, "masks": args.masks,
                           "organs": args.organs, "covariates": args.covariates, "scheduler": args.scheduler,
                           "sampling_steps": args.sampling_steps, "conditioning_scale": args.conditioning_scale,
                           "overrides": args.overrides},
              "seconds": seconds, "segmenter": segmenter.state()}
    (output / "results.json").write_text(json.dumps(result, indent=2, default=float), encoding="utf-8")
    text = f"# Masks benchmark\n\n{args.masks} held-out masks at {args.size}^3 ({args.organs} organs)\n\n"
    for key, title in (("headline", "body and organs"), ("seen", "every class the segmenter names")):
        mean = result[key]
        text += (f"* mean Dice over {title} {result[key + '_classes']}: ControlNet {mean['controlnet']:.3f}, "
                 f"without it (chance) {mean['chance']:.3f}, the autoencoder's reconstructions "
                 f"{mean['autoencoder']:.3f}, segmenter ceiling {mean['ceiling']:.3f}\n")
    text += f"\n{_table(result)}\n\nseconds: {seconds}\n"
    (output / "results.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
