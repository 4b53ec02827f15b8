"""Command-line plumbing shared by the scripts in ``monai_diffusion/3d_ldm/`` and the console commands.

Every user mistake ends as one line on stderr and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from monai_diffusion.config import Config, ConfigError, load_config
from monai_diffusion.data import DataError
from monai_diffusion.perceptual import PerceptualWeightsError

__all__ = ["config_parser", "resolve_config_path", "run_main", "train_autoencoder_main"]

CONFIG_DIR = Path(__file__).resolve().parent / "config"


def _user_errors() -> tuple[type[BaseException], ...]:
    from monai_diffusion.training.run import RunError
    from monai_diffusion.training.checkpoint import CheckpointError
    from monai_diffusion.training.loop import TrainingError

    return (ConfigError, DataError, PerceptualWeightsError, RunError, CheckpointError, TrainingError)



def config_parser(description: str) -> argparse.ArgumentParser:
    """--config, repeatable --set dotted.key=value, --debug."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=str(CONFIG_DIR / "ldm_config.yaml"),
                        help="YAML config (a bare name is also looked up in monai_diffusion/config/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set autoencoder.training.batch_size=1 (repeatable)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def resolve_config_path(value: str) -> Path:
    """The path as given, or else the file of that name in the package's config folder."""
    path = Path(value)
    if path.exists() or path.is_absolute():
        return path
    for candidate in (CONFIG_DIR / value, CONFIG_DIR / path.name, CONFIG_DIR / "examples" / path.name):
        if candidate.is_file():
            return candidate
    return path


def load_cli_config(args: argparse.Namespace) -> Config:
    return load_config(resolve_config_path(args.config), args.overrides)


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s", stream=sys.stdout)
    for noisy in ("PIL",):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_main(body: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse arguments, run ``body``, turn user errors into one line and exit code 2."""
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        body(args)
    except _user_errors() as err:
        if args.debug:
            raise
        message = " ".join(str(err).split("\n"))
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact, continue with --resume", file=sys.stderr)
        return 130
    return 0


def train_autoencoder_main(argv: Sequence[str] | None = None) -> int:
    """``train_autoencoder.py`` / ``ldm-train-autoencoder``."""
    parser = config_parser("Train the 3D AutoencoderKL (stage 1 of the latent diffusion model).")
    parser.add_argument("--resume", action="store_true", help="continue the run in the output folder")

    def body(args: argparse.Namespace) -> None:
        from monai_diffusion.training.autoencoder import train_autoencoder

        train_autoencoder(load_cli_config(args), resume=args.resume)

    return run_main(body, parser, argv)


def train_diffusion_main(argv: Sequence[str] | None = None) -> int:
    """``train_diffusion.py`` / ``ldm-train-diffusion``."""
    parser = config_parser("Train the latent diffusion UNet on a trained autoencoder (stage 2).")
    parser.add_argument("--resume", action="store_true", help="continue the run in the output folder")

    def body(args: argparse.Namespace) -> None:
        from monai_diffusion.training.diffusion import train_diffusion

        train_diffusion(load_cli_config(args), resume=args.resume)

    return run_main(body, parser, argv)


def sample_main(argv: Sequence[str] | None = None) -> int:
    """``sample.py`` / ``ldm-sample``."""
    parser = config_parser("Generate volumes with a trained latent diffusion model (NIfTI + PNG mosaic).")
    parser.add_argument("--run", default=None, help="diffusion run folder or checkpoint (default: <output_dir>/diffusion)")
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--output", required=True, help="folder for sample_XXX.nii.gz and samples.png")
    parser.add_argument("--scheduler", choices=["ddpm", "ddim"], default=None, help="default: diffusion.sampling.scheduler")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: diffusion.sampling.num_inference_steps)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: diffusion.sampling.batch_size")
    parser.add_argument("--seed", type=int, default=0)

    def body(args: argparse.Namespace) -> None:
        from monai_diffusion.sampling import sample_volumes

        config = load_cli_config(args)
        sampling = config.diffusion.sampling
        sample_volumes(
            run=args.run or config.diffusion_dir,
            num_samples=args.num_samples,
            output=args.output,
            scheduler=args.scheduler or sampling.scheduler,
            steps=args.steps or sampling.num_inference_steps,
            seed=args.seed,
            batch_size=args.batch_size or sampling.batch_size,
            device=config.device,
        )

    return run_main(body, parser, argv)


def estimate_memory_main(argv: Sequence[str] | None = None) -> int:
    """``estimate_memory.py`` / ``ldm-estimate-memory``."""
    parser = config_parser("Estimate the memory of an autoencoder training step, or find configs for a budget.")
    parser.add_argument("--input-size", type=int, nargs="+", metavar="N", help="spatial size (default data.image_size)")
    parser.add_argument("--batch-size", type=int, default=None, help="default autoencoder.training.batch_size")
    parser.add_argument("--budget", default=None, help="e.g. 24GB: list the configs that fit and write the first")
    parser.add_argument("--output", default=None, help="with --budget: YAML file to write (default <config>_<budget>.yaml)")

    def body(args: argparse.Namespace) -> None:
        from monai_diffusion.config import ConfigError, config_to_dict
        from monai_diffusion.memory import (
            CUDA_RESERVED_BYTES,
            FRAGMENTATION,
            estimate_autoencoder,
            format_bytes,
            parse_budget,
            report,
            search_budget,
            with_margin,
        )

        overrides = list(args.overrides)
        if args.input_size:
            overrides.append(f"data.image_size={list(args.input_size)}")
        if args.batch_size is not None:
            if args.batch_size < 1:
                raise ConfigError(f"--batch-size: expected an integer >= 1, got {args.batch_size}")
            overrides.append(f"autoencoder.training.batch_size={args.batch_size}")
        args.overrides = overrides
        config = load_cli_config(args)
        if args.budget is None:
            print(report(estimate_autoencoder(config)))
            print("\ntraining step total by setting:")
            for amp in (False, True):
                for ckpt in (False, True):
                    total = estimate_autoencoder(config, mixed_precision=amp, checkpointing=ckpt).total
                    print(f"  {'mixed precision' if amp else 'fp32':15s} {'+ checkpointing' if ckpt else '':16s} "
                          f"{format_bytes(total):>12s}")
            return
        try:
            budget = parse_budget(args.budget)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        candidates = search_budget(config, budget)
        if not candidates:
            raise ConfigError(
                f"--budget {args.budget}: no searched configuration fits (factors [2, 2], [4, 2], [8, 2], [16]; batch "
                f"8-1; mixed precision; checkpointing); reduce autoencoder.num_channels or data.image_size"
            )
        print(f"{len(candidates)} configurations fit in {args.budget} (least compression and largest batch first), "
              f"keeping a margin of {FRAGMENTATION:.0%} for allocator fragmentation and {format_bytes(CUDA_RESERVED_BYTES)} "
              f"for the CUDA context and cuDNN workspace:")
        print(f"  {'factors':10s} {'channels':14s} {'batch':>5s} {'precision':>9s} {'ckpt':>5s} {'compression':>11s} "
              f"{'estimate':>10s} {'+ margin':>10s}")
        for c in candidates[:15]:
            print(f"  {str(c.downsample_factors):10s} {str(c.num_channels):14s} {c.batch_size:5d} "
                  f"{'mixed' if c.mixed_precision else 'fp32':>9s} {'yes' if c.checkpointing else 'no':>5s} "
                  f"{c.compression:>10d}x {format_bytes(c.total):>10s} {format_bytes(with_margin(c.total)):>10s}")
        best = candidates[0]
        raw = config_to_dict(config)
        raw["autoencoder"].update(best.overrides())
        raw["autoencoder"]["training"].update(batch_size=best.batch_size, mixed_precision=best.mixed_precision,
                                              use_gradient_checkpointing=best.checkpointing)
        target = Path(args.output or f"{Path(args.config).stem}_{args.budget.replace(' ', '')}.yaml")
        if target.exists():
            raise ConfigError(f"--output: {target} already exists; choose another file (nothing was overwritten)")
        import yaml

        from monai_diffusion.config import config_from_dict

        config_from_dict(raw)  # the written file must load
        target.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        print(f"wrote the first one to {target}: python monai_diffusion/3d_ldm/train_autoencoder.py --config {target}")

    return run_main(body, parser, argv)


def _tile_size(values: list[int] | None) -> int | list[int] | None:
    if values is None:
        return None
    if min(values) < 1:
        raise ConfigError(f"--tile-size {' '.join(map(str, values))}: expected one size or one per axis, each >= 1")
    return values[0] if len(values) == 1 else values


def evaluate_autoencoder_main(argv: Sequence[str] | None = None) -> int:
    """``evaluate_autoencoder.py`` / ``ldm-evaluate-autoencoder``."""
    parser = argparse.ArgumentParser(
        description="Reconstruction quality of a trained autoencoder: L1, PSNR, SSIM, MS-SSIM per volume (CSV), "
                    "NIfTI reconstructions, a worst/best PNG and latent statistics.")
    parser.add_argument("--run", required=True, help="autoencoder run folder (e.g. runs/quickstart/autoencoder) or checkpoint")
    parser.add_argument("--data", nargs="+", default=None, metavar="PATH",
                        help="NIfTI folder, glob or files to evaluate (default: the run's validation set)")
    parser.add_argument("--output", default=None, help="results folder, must be new or empty (default: <run>/evaluation)")
    parser.add_argument("--tile-size", type=int, nargs="+", default=None, metavar="N",
                        help="reconstruct in overlapping tiles of this size (one value or one per axis), for large volumes")
    parser.add_argument("--tile-overlap", type=float, default=0.5, help="fraction of a tile shared with a neighbour")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--no-nifti", action="store_true", help="do not write the reconstructions")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")

    def body(args: argparse.Namespace) -> None:
        from monai_diffusion.evaluation import evaluate_autoencoder, format_summary

        data = args.data[0] if args.data and len(args.data) == 1 else args.data
        result = evaluate_autoencoder(args.run, args.output, data, _tile_size(args.tile_size), args.tile_overlap,
                                      args.device, save_reconstructions=not args.no_nifti)
        print(format_summary(result))

    return run_main(body, parser, argv)


def compare_factors_main(argv: Sequence[str] | None = None) -> int:
    """``compare_factors.py`` / ``ldm-compare-factors``."""
    parser = config_parser("Train autoencoder variants that differ only in downsample_factors (same steps, data and "
                           "seed), evaluate them, and write a table and a plot of memory and time vs quality.")
    parser.add_argument("--factors", nargs="+", required=True, metavar="LIST",
                        help='downsample_factors to compare, e.g. "[2, 2]" "[4, 2]" "[8, 2]" "[16]"')
    parser.add_argument("--steps", type=int, default=None,
                        help="optimiser steps per variant (default: autoencoder.training.max_steps, else 500)")
    parser.add_argument("--adjust-latent-channels", action="store_true",
                        help="latent_channels as the guide recommends: 3 up to 4x, 4 at 8x, 8 at 16x and more")
    parser.add_argument("--output", default=None, help="results folder, new or empty (default: <output_dir>/compare_factors)")
    parser.add_argument("--device", default=None, help="overrides the config's device")

    def body(args: argparse.Namespace) -> None:
        from monai_diffusion.compare import compare_factors, parse_factors

        config = load_cli_config(args)
        factor_list = [parse_factors(text) for text in args.factors]
        steps = args.steps if args.steps is not None else config.autoencoder.training.max_steps or 500
        output = Path(args.output) if args.output else Path(config.output_dir) / "compare_factors"
        compare_factors(config, factor_list, output, steps, args.adjust_latent_channels, args.device)
        print((output / "comparison.md").read_text(encoding="utf-8"))
        print(f"wrote {output}/comparison.csv, comparison.md, comparison.png and one run folder per variant")

    return run_main(body, parser, argv)
