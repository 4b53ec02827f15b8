"""Quality vs compression: train autoencoder variants that differ only in ``downsample_factors`` with the
same budget (optimiser steps, data, seed), evaluate each on the same validation volumes, and put memory
and time per training step beside PSNR and SSIM in a table and a plot.

Each variant is the base config with its factors. When the number of levels changes, ``num_channels``,
``attention_levels`` and a per-level ``num_res_blocks`` are cut to the new length or extended with their
last entry. With ``adjust_latent_channels`` the latent channels follow the guide's recommendation
(:func:`recommended_latent_channels`).
"""

from __future__ import annotations

import copy
import csv
import functools
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai_diffusion.config import Config, config_from_dict, config_to_dict
from monai_diffusion.config.geometry import autoencoder_totals, with_factors
from monai_diffusion.errors import ConfigError
from monai_diffusion.runs.folders import check_new_folder, check_outside_data, claim_output_folder
from monai_diffusion.training.measure import measure_training_step

__all__ = ["VariantResult", "recommended_latent_channels", "variant_config", "compare_factors", "parse_factors"]

log = logging.getLogger("monai_diffusion")


def recommended_latent_channels(total_factor: int) -> int:
    """The guide's advice, at the upper end of each range: up to 4x per axis 3 channels, 8x 4, 16x and more 8."""
    if total_factor <= 4:
        return 3
    if total_factor <= 8:
        return 4
    return 8


def parse_factors(text: str) -> list[Any]:
    """``"[4, 2]"`` (YAML/JSON list) to ``[4, 2]``; per-axis entries like ``"[[4, 4, 2], 2]"`` work too."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, list) or not value:
        raise ConfigError(f"--factors {text!r}: expected a list such as \"[4, 2]\" or \"[16]\"")
    return value


def _name(factors: list[Any], latent_channels: int) -> str:
    flat = "_".join("x".join(map(str, f)) if isinstance(f, list) else str(f) for f in factors)
    return f"f{flat}_c{latent_channels}"


def _validated(raw: dict[str, Any], factors: list[Any]) -> Config:
    """The variant's config, checked for the autoencoder stage (its diffusion section is not used here)."""
    try:
        return config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"--factors {factors}: {err}") from None


def variant_config(config: Config, factors: list[Any], adjust_latent_channels: bool, output: Path,
                   steps: int) -> tuple[str, Config]:
    """The base config with ``factors``, its levels resized and ``steps`` optimiser steps.

    Returns:
        ``(name, config)``; the variant's ``output_dir`` is ``output / name``, e.g. ``f4_2_c3``.

    Raises:
        ConfigError: naming ``--factors`` when the variant is not a valid config.
    """
    variant = with_factors(config, factors)  # the levels resized as the budget search resizes them
    raw = copy.deepcopy(config_to_dict(variant))
    ae = raw["autoencoder"]
    training = ae["training"]
    training.update(max_steps=steps, n_epochs=max(training["n_epochs"], steps), fast_dev_run=False)
    variant = _validated(raw, factors)  # checks the factors before they are used below
    if adjust_latent_channels:
        ae["latent_channels"] = recommended_latent_channels(max(autoencoder_totals(variant)))
    name = _name(factors, ae["latent_channels"])
    raw["output_dir"] = str(output / name)
    return name, _validated(raw, factors)


@dataclass
class VariantResult:
    """One row of the comparison."""

    name: str
    factors: list[Any]
    latent_channels: int
    latent_shape: list[int]
    compression: float
    parameters: int
    step_memory_mib: float
    step_seconds: float
    train_seconds: float
    metrics: dict[str, dict[str, float]]
    run_dir: str

    def row(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "variant": self.name, "factors": json.dumps(self.factors), "latent_channels": self.latent_channels,
            "latent_shape": "x".join(map(str, self.latent_shape)), "compression": round(self.compression, 1),
            "parameters": self.parameters, "step_memory_mib": round(self.step_memory_mib, 1),
            "step_seconds": round(self.step_seconds, 4), "train_seconds": round(self.train_seconds, 1),
        }
        for metric, stats in self.metrics.items():
            out[f"{metric}_mean"], out[f"{metric}_std"] = stats["mean"], stats["std"]
        out["run_dir"] = self.run_dir
        return out



def _cell(metrics: dict[str, dict[str, float]], key: str, digits: int) -> str:
    """``mean ± std`` of ``metrics[key]`` for a table cell (``n/a`` when missing or NaN)."""
    if key not in metrics or math.isnan(metrics[key]["mean"]):
        return "n/a"
    if not math.isfinite(metrics[key]["std"]):
        return f"{metrics[key]['mean']:.{digits}f}"
    return f"{metrics[key]['mean']:.{digits}f} ± {metrics[key]['std']:.{digits}f}"

def _markdown(results: Sequence[VariantResult], device: str) -> str:
    lines = [
        "| factors | latent (C x spatial) | compression | parameters | memory / step MiB | time / step s "
        "| PSNR dB | SSIM | MS-SSIM | L1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        m = r.metrics
        cell = functools.partial(_cell, m)

        lines.append(
            f"| {r.factors} | {r.latent_channels} x {'x'.join(map(str, r.latent_shape[1:]))} | {r.compression:.0f}x "
            f"| {r.parameters:,} | {r.step_memory_mib:.0f} | {r.step_seconds:.3f} | {cell('psnr', 2)} "
            f"| {cell('ssim', 3)} | {cell('ms_ssim', 3)} | {cell('l1', 4)} |"
        )
    lines.append(f"\nmemory / step: measured peak of one training step on {device} (weights, gradients and Adam "
                 f"state included); time / step: median of 3 steps.")
    return "\n".join(lines)


def _plot(results: Sequence[VariantResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    for row, (metric, label) in enumerate((("psnr", "PSNR (dB)"), ("ssim", "SSIM"))):
        for col, (attr, xlabel) in enumerate((("step_memory_mib", "memory per training step (MiB)"),
                                              ("step_seconds", "time per training step (s)"))):
            ax = axes[row][col]
            for r in results:
                x, stats = getattr(r, attr), r.metrics[metric]
                ax.errorbar(x, stats["mean"], yerr=stats["std"], fmt="o", capsize=3)
                ax.annotate(f"{r.factors} c{r.latent_channels}", (x, stats["mean"]), textcoords="offset points",
                            xytext=(5, 5), fontsize=8)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_factors(
    config: Config,
    factor_list: Sequence[list[Any]],
    output: str | Path,
    steps: int,
    adjust_latent_channels: bool = False,
    device: str | None = None,
) -> list[VariantResult]:
    """Train, measure and evaluate one autoencoder per entry of ``factor_list``.

    Writes ``<output>/<variant>/`` (the run, with ``evaluation/`` inside), ``comparison.csv``,
    ``comparison.md`` and ``comparison.png``.

    Args:
        config: the base config (data, channels, training settings).
        factor_list: the ``downsample_factors`` to compare, e.g. ``[[2, 2], [4, 2], [8, 2], [16]]``.
        output: results folder; must be new or empty.
        steps: optimiser steps per variant (the shared budget).
        adjust_latent_channels: set ``latent_channels`` by the guide's recommendation for each factor.
        device: overrides ``config.device``.
    """
    from monai_diffusion.evaluation.reconstruction import evaluate_autoencoder
    from monai_diffusion.runtime import resolve_device
    from monai_diffusion.training.autoencoder import train_autoencoder

    if steps < 1:
        raise ConfigError(f"--steps {steps}: expected an integer >= 1")
    output = Path(output)
    check_new_folder(output)
    if config.data.source == "nifti":
        check_outside_data(output, config.data.paths, "--output")
    if device is not None:
        config = config_from_dict({**config_to_dict(config), "device": device})
    # every variant is validated before any training starts
    variants = [(factors, *variant_config(config, factors, adjust_latent_channels, output, steps))
                for factors in factor_list]
    names = [n for _, n, _ in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"--factors: the same variant is listed twice ({names})")
    lock = claim_output_folder(output)  # held for the whole study: a second one into it is refused
    torch_device = resolve_device(config.device)
    results = []
    for factors, name, variant in variants:
        log.info("=== %s: downsample_factors %s, latent_channels %d, %d steps", name, factors,
                 variant.autoencoder.latent_channels, steps)
        measured = measure_training_step(variant, torch_device)
        summary = train_autoencoder(variant)
        # the final weights: every variant is scored after the same number of steps (best.pt may be earlier)
        last = Path(summary["run_dir"]) / "checkpoints" / "last.pt"
        evaluation = evaluate_autoencoder(last, device=config.device, save_reconstructions=False)
        results.append(VariantResult(
            name=name, factors=factors, latent_channels=variant.autoencoder.latent_channels,
            latent_shape=list(summary["latent_shape"]), compression=summary["compression"],
            parameters=summary["autoencoder_parameters"], step_memory_mib=measured.peak_bytes / 2**20,
            step_seconds=measured.seconds, train_seconds=summary["seconds"], metrics=evaluation.summary["metrics"],
            run_dir=summary["run_dir"],
        ))
    rows = [r.row() for r in results]
    with (output / "comparison.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    size = "x".join(map(str, config.data.image_size))
    (output / "comparison.md").write_text(_markdown(results, torch_device.type) + "\n", encoding="utf-8")
    _plot(results, output / "comparison.png",
          f"{size} {config.data.source} data, {steps} steps per variant, seed {config.seed}")
    lock.release()
    return results
