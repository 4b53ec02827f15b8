"""The command lines: ``monai_diffusion/3d_ldm/*.py`` and the ``ldm-*`` console commands call these.

Each parses its arguments and calls the package. Every user mistake ends as one line on stderr and exit
code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from generative.inferers.tiling.buffers import BUFFER_KINDS
from monai_diffusion.command_line import (  # noqa: F401  (resolve_config_path, run_main: public here too)
    CONFIG_DIR,
    _parser,
    _path,
    _positive_int,
    _seed,
    load_cli_config,
    resolve_config_path,
    run_main,
)
from monai_diffusion.config import Config
from monai_diffusion.errors import ConfigError

__all__ = ["resolve_config_path", "run_main", "train_autoencoder_main", "train_diffusion_main",
           "sample_main", "estimate_memory_main", "evaluate_autoencoder_main", "compare_factors_main",
           "evaluate_samples_main", "import_weights_main"]

log = logging.getLogger("monai_diffusion")


def train_autoencoder_main(argv: Sequence[str] | None = None) -> int:
    """``train_autoencoder.py`` / ``ldm-train-autoencoder``."""
    parser = _parser("Train the 3D AutoencoderKL (stage 1 of the latent diffusion model).")
    parser.add_argument("--resume", action="store_true", help="continue the run in the output folder")

    def body(args: argparse.Namespace) -> None:
        from monai_diffusion.training import train_autoencoder

        train_autoencoder(load_cli_config(args), resume=args.resume)

    return run_main(body, parser, argv)


def train_diffusion_main(argv: Sequence[str] | None = None) -> int:
    """``train_diffusion.py`` / ``ldm-train-diffusion``."""
    parser = _parser("Train the latent diffusion UNet on a trained autoencoder (stage 2).")
    parser.add_argument("--resume", action="store_true", help="continue the run in the output folder")

    def body(args: argparse.Namespace) -> None:
        from monai_diffusion.training import train_diffusion

        train_diffusion(load_cli_config(args, "diffusion"), resume=args.resume)

    return run_main(body, parser, argv)


def train_controlnet_main(argv: Sequence[str] | None = None) -> int:
    """``train_controlnet.py`` / ``ldm-train-controlnet``."""
    parser = _parser("Train a ControlNet that makes the trained diffusion UNet follow label maps (stage 3).")
    parser.add_argument("--resume", action="store_true", help="continue the run in the output folder")

    def body(args: argparse.Namespace) -> None:
        from monai_diffusion.training.controlnet import train_controlnet

        train_controlnet(load_cli_config(args, "controlnet"), resume=args.resume)

    return run_main(body, parser, argv)


def sample_main(argv: Sequence[str] | None = None) -> int:
    """``sample.py`` / ``ldm-sample``."""
    parser = _parser("Generate volumes with a trained latent diffusion model (NIfTI + PNG mosaic).")
    parser.add_argument("--run", type=_path, default=None,
                        help="diffusion run folder or checkpoint (default: <output_dir>/diffusion)")
    parser.add_argument("--num-samples", type=_positive_int, default=1)
    parser.add_argument("--output", type=_path, required=True,
                        help="new or empty folder for sample_XXX.nii.gz and samples.png")
    parser.add_argument("--scheduler", choices=["auto", "ddpm", "ddim", "dpm-solver++", "rflow"], default=None,
                        help="the sampler (default: diffusion.sampling.scheduler; auto: the one that suits the run's "
                             "training objective, see docs/sampling.md)")
    parser.add_argument("--steps", type=_positive_int, default=None,
                        help="network evaluations per sample (default: diffusion.sampling.num_inference_steps; "
                             "ddpm: every training step)")
    parser.add_argument("--batch-size", type=_positive_int, default=None, help="default: diffusion.sampling.batch_size")
    parser.add_argument("--seed", type=_seed, default=0)
    parser.add_argument("--tile-size", type=_positive_int, nargs="+", default=None, metavar="N",
                        help="decode in overlapping tiles of this size (one value or one per axis; default: as the "
                             "autoencoder's config says, by tiles after patch training)")
    parser.add_argument("--tile-overlap", type=float, default=None,
                        help="fraction of a tile shared with a neighbour (default: autoencoder.tile_overlap)")
    parser.add_argument("--buffers", choices=list(BUFFER_KINDS), default=None,
                        help="where exact tiling keeps its activations: auto (whole volume, else GPU, else "
                             "pinned host memory, by free GPU memory), device, cpu or disk (default: "
                             "autoencoder.tile_buffers)")
    parser.add_argument("--condition", action="append", nargs="+", default=None, metavar="NAME=VALUE",
                        help="conditions of a conditional model, e.g. --condition sex=F age=70 (repeatable; "
                             "age=40,70 gives one set per value); --num-samples volumes per set")
    parser.add_argument("--conditions-csv", default=None,
                        help="a CSV of condition sets: a header with the covariate names, one row per set")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance (default: diffusion.sampling.guidance_scale; 1 = as trained)")
    parser.add_argument("--mask", action="append", type=_path, default=None, metavar="LABEL.nii.gz",
                        help="generate volumes that follow this label map with a trained ControlNet (repeatable; "
                             "--num-samples per mask); writes imagesTr/, labelsTr/ and datalist.json")
    parser.add_argument("--masks", type=_path, default=None, metavar="DATALIST",
                        help="label maps from a .csv with a 'label' column or a .json datalist")
    parser.add_argument("--conditioning-scale", type=float, default=None,
                        help="strength of the ControlNet's steering (default: controlnet.conditioning_scale)")

    def body(args: argparse.Namespace) -> None:
        from monai_diffusion.generation.sampling import expand_conditions, sample_volumes

        with_masks = bool(args.mask or args.masks)
        if args.conditioning_scale is not None and not with_masks:
            raise ConfigError("--conditioning-scale: only used with --mask or --masks")
        config = load_cli_config(args, "controlnet" if with_masks else "diffusion")
        sampling = config.diffusion.sampling
        scheduler = args.scheduler or sampling.scheduler
        steps = args.steps
        if steps is None and scheduler != "ddpm":  # ddpm: all the run's training steps
            steps = sampling.num_inference_steps
        if args.guidance_scale is not None and args.guidance_scale < 0:
            raise ConfigError(f"--guidance-scale: expected a number >= 0, got {args.guidance_scale}")
        if steps is not None and steps > config.diffusion.scheduler.num_train_timesteps:
            raise ConfigError(f"--steps {steps}: exceeds diffusion.scheduler.num_train_timesteps = "
                              f"{config.diffusion.scheduler.num_train_timesteps}")
        if config.data.source == "nifti":  # the data the config trains on (sample_volumes checks the run's too)
            from monai_diffusion.runs.folders import check_outside_data

            check_outside_data(Path(args.output), config.data.paths, "--output")
        if with_masks:
            _sample_masks(args, config, scheduler, steps)
            return
        sample_volumes(
            run=args.run or config.diffusion_dir,
            num_samples=args.num_samples,
            output=args.output,
            scheduler=scheduler,
            steps=steps,
            seed=args.seed,
            batch_size=args.batch_size if args.batch_size is not None else sampling.batch_size,
            device=config.device,
            tile_size=_tile_size(args.tile_size),
            tile_overlap=args.tile_overlap,
            conditions=expand_conditions(args.condition, args.conditions_csv),
            guidance_scale=args.guidance_scale,
            buffers=args.buffers,
        )

    return run_main(body, parser, argv)


def _sample_masks(args: argparse.Namespace, config: Config, scheduler: str, steps: int) -> None:
    from monai_diffusion.generation.mask_sampling import read_mask_list, sample_from_masks
    from monai_diffusion.generation.sampling import expand_conditions

    masks = list(args.mask or []) + (read_mask_list(args.masks) if args.masks else [])
    sample_from_masks(
        run=args.run or config.controlnet_dir,
        masks=masks,
        num_samples=args.num_samples,
        output=args.output,
        scheduler=scheduler,
        steps=steps,
        seed=args.seed,
        batch_size=args.batch_size if args.batch_size is not None else config.diffusion.sampling.batch_size,
        device=config.device,
        tile_size=_tile_size(args.tile_size),
        tile_overlap=args.tile_overlap,
        conditions=expand_conditions(args.condition, args.conditions_csv),
        guidance_scale=args.guidance_scale,
        conditioning_scale=args.conditioning_scale,
    )


def estimate_memory_main(argv: Sequence[str] | None = None) -> int:
    """``estimate_memory.py`` / ``ldm-estimate-memory``."""
    parser = _parser("Estimate the memory of an autoencoder training step, or find configs for a budget.")
    parser.add_argument("--input-size", type=_positive_int, nargs="+", metavar="N",
                        help="spatial size (default data.image_size)")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="default autoencoder.training.batch_size (with --budget: search only this batch size, "
                             "else 8, 4, 2 and 1)")
    parser.add_argument("--budget", default=None, help="e.g. 24GB: list the configs that fit and write the first")
    parser.add_argument("--output", type=_path, default=None,
                        help="with --budget: YAML file to write (default <config>_<budget>.yaml)")
    parser.add_argument("--pipeline", action="store_true",
                        help="also estimate every later phase on whole volumes (validation, latent cache, diffusion "
                             "training, sampling); --budget always prints them for the configuration it writes")
    parser.add_argument("--all", action="store_true", dest="show_all",
                        help="with --budget: list every configuration that fits (default: the best of each factor "
                             "option, then the rest up to 15 rows)")
    parser.add_argument("--world-size", type=_positive_int, default=None,
                        help="GPUs of the torchrun job that will train (default: WORLD_SIZE under torchrun, else 1); "
                             "above 1, DDP's gradient buckets are counted")

    def body(args: argparse.Namespace) -> None:
        from monai_diffusion import memory

        if args.input_size:
            args.overrides.append(f"data.image_size={list(args.input_size)}")
        if args.batch_size is not None:
            args.overrides.append(f"autoencoder.training.batch_size={args.batch_size}")
        if args.output is not None and args.budget is None:
            raise ConfigError("--output: only used with --budget; add --budget (e.g. 24GB) or drop --output")
        if args.show_all and args.budget is None:
            raise ConfigError("--all: only used with --budget; add --budget (e.g. 24GB) or drop --all")
        # the pipeline's phases (--pipeline, and always beside --budget) build the UNet too: check its section
        config = load_cli_config(args, "diffusion" if args.pipeline or args.budget is not None else "autoencoder")
        if args.budget is not None:
            output = Path(args.output or f"{Path(args.config).stem}_{args.budget.replace(' ', '')}.yaml")
            memory.write_for_budget(config, args.budget, output, args.batch_size, args.world_size, args.show_all)
            return
        print(memory.report(memory.estimate_autoencoder(config, world_size=args.world_size)))
        print("\n" + memory.settings_table(config))
        if args.pipeline:
            print("\nthe whole-volume pipeline, phase by phase:\n" + memory.pipeline_report(
                memory.estimate_pipeline(config, world_size=args.world_size)))

    return run_main(body, parser, argv)


def _tile_size(values: list[int] | None) -> int | list[int] | None:
    """``--tile-size``: one size for every axis, or one per axis."""
    return None if values is None else values[0] if len(values) == 1 else values


def evaluate_autoencoder_main(argv: Sequence[str] | None = None) -> int:
    """``evaluate_autoencoder.py`` / ``ldm-evaluate-autoencoder``."""
    parser = _parser("Reconstruction quality of a trained autoencoder: L1, PSNR, SSIM, MS-SSIM per volume (CSV), "
                     "NIfTI reconstructions, a worst/best PNG and latent statistics.", with_config=False)
    parser.add_argument("--run", type=_path, required=True,
                        help="autoencoder run folder (e.g. runs/quickstart/autoencoder) or checkpoint")
    parser.add_argument("--data", type=_path, nargs="+", default=None, metavar="PATH",
                        help="NIfTI folder, glob or files to evaluate (default: the run's validation set)")
    parser.add_argument("--output", type=_path, default=None,
                        help="results folder, must be new or empty (default: <run>/evaluation)")
    parser.add_argument("--tile-size", type=_positive_int, nargs="+", default=None, metavar="N",
                        help="reconstruct in overlapping tiles of this size (one value or one per axis), for "
                             "large volumes")
    parser.add_argument("--tile-overlap", type=float, default=None,
                        help="fraction of a tile shared with a neighbour (with --tile-size; default: the run's "
                             "autoencoder.tile_overlap)")
    parser.add_argument("--buffers", choices=list(BUFFER_KINDS), default=None,
                        help="where exact tiling keeps its activations: auto (whole volume, else GPU, else "
                             "pinned host memory, by free GPU memory), device, cpu or disk (default: "
                             "autoencoder.tile_buffers)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--no-nifti", action="store_true", help="do not write the reconstructions")

    def body(args: argparse.Namespace) -> None:
        from monai_diffusion.evaluation.reconstruction import evaluate_autoencoder, format_summary

        if args.tile_overlap is not None and args.tile_size is None:
            raise ConfigError("--tile-overlap: only used with --tile-size; add --tile-size or drop --tile-overlap")
        data = args.data[0] if args.data and len(args.data) == 1 else args.data
        result = evaluate_autoencoder(args.run, args.output, data, _tile_size(args.tile_size), args.tile_overlap,
                                      args.device, save_reconstructions=not args.no_nifti, buffers=args.buffers)
        print(format_summary(result))

    return run_main(body, parser, argv)


def compare_factors_main(argv: Sequence[str] | None = None) -> int:
    """``compare_factors.py`` / ``ldm-compare-factors``."""
    parser = _parser("Train autoencoder variants that differ only in downsample_factors (same steps, data and "
                     "seed), evaluate them, and write a table and a plot of memory and time vs quality.")
    parser.add_argument("--factors", nargs="+", required=True, metavar="LIST",
                        help='downsample_factors to compare, e.g. "[2, 2]" "[4, 2]" "[8, 2]" "[16]"')
    parser.add_argument("--steps", type=_positive_int, default=None,
                        help="optimiser steps per variant (default: autoencoder.training.max_steps, else 500)")
    parser.add_argument("--adjust-latent-channels", action="store_true",
                        help="latent_channels as the guide recommends: 3 up to 4x, 4 at 8x, 8 at 16x and more")
    parser.add_argument("--output", type=_path, default=None,
                        help="results folder, new or empty (default: <output_dir>/compare_factors)")
    parser.add_argument("--device", default=None, help="overrides the config's device")

    def body(args: argparse.Namespace) -> None:
        from monai_diffusion.evaluation.factor_study import compare_factors, parse_factors

        config = load_cli_config(args)
        factor_list = [parse_factors(text) for text in args.factors]
        steps = args.steps if args.steps is not None else config.autoencoder.training.max_steps or 500
        output = Path(args.output) if args.output else Path(config.output_dir) / "compare_factors"
        compare_factors(config, factor_list, output, steps, args.adjust_latent_channels, args.device)
        print((output / "comparison.md").read_text(encoding="utf-8"))
        print(f"wrote {output}/comparison.csv, comparison.md, comparison.png and one run folder per variant")

    return run_main(body, parser, argv)


def evaluate_samples_main(argv: Sequence[str] | None = None) -> int:
    """``evaluate_samples.py`` / ``ldm-evaluate-samples``."""
    parser = _parser("Compare generated volumes with real ones: FID and MMD of MedicalNet features, diversity "
                     "(pairwise MS-SSIM) and copies of training volumes (nearest neighbour by SSIM).",
                     with_config=False)
    parser.add_argument("--run", default=None, help="the diffusion run folder (or checkpoint) that made the samples")
    parser.add_argument("--samples", required=True, help="folder of generated NIfTI volumes (sample.py's --output)")
    parser.add_argument("--masks", action="store_true",
                        help="--samples holds image/label pairs (sample.py --mask): report the Dice per class between "
                             "a segmentation of each image and its mask")
    parser.add_argument("--segmenter", default="phantom",
                        help="with --masks: a TorchScript segmentation network, or 'phantom' / 'phantom-typed' (an "
                             "intensity segmenter fitted on real phantoms with data.phantom_organs random / typed; its "
                             "Dice on real phantoms is reported as the ceiling)")
    parser.add_argument("--unconditional", default=None,
                        help="with --masks: unconditional samples of the same run (sample.py without --mask), scored "
                             "against the same masks as the chance level")
    parser.add_argument("--real", nargs="+", default=None, metavar="PATH",
                        help="real NIfTI volumes (folder, glob or files; default: the run's validation set)")
    parser.add_argument("--train", nargs="+", default=None, metavar="PATH",
                        help="volumes searched for copies (default: the run's training set)")
    parser.add_argument("--medicalnet-weights", default=None,
                        help="local MedicalNet weights for FID and MMD (default: autoencoder.perceptual.weights_path)")
    parser.add_argument("--medicalnet-network", default=None, choices=["resnet10", "resnet18", "resnet34", "resnet50"])
    parser.add_argument("--copy-threshold", type=float, default=0.95,
                        help="flag a sample whose nearest training volume has at least this SSIM")
    parser.add_argument("--output", default=None, help="results folder, new or empty (default: <samples>/evaluation)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")

    def body(args: argparse.Namespace) -> None:
        from monai_diffusion.evaluation.sample_quality import evaluate_samples, format_sample_summary

        if not 0 < args.copy_threshold <= 1:
            raise ConfigError(f"--copy-threshold: expected a number in (0, 1], got {args.copy_threshold}")
        if args.masks:
            from monai_diffusion.evaluation.mask_metrics import evaluate_masks, format_mask_summary

            print(format_mask_summary(evaluate_masks(args.samples, args.segmenter, args.unconditional, args.output)))
            return
        if args.run is None:
            raise ConfigError("--run: required (the diffusion run that made the samples), unless --masks")

        def paths(values: list[str] | None) -> str | list[str] | None:
            return values[0] if values and len(values) == 1 else values

        result = evaluate_samples(args.run, args.samples, args.output, paths(args.real), paths(args.train),
                                  args.medicalnet_weights, args.medicalnet_network, args.copy_threshold, args.device)
        print(format_sample_summary(result))

    return run_main(body, parser, argv)


def import_weights_main(argv: Sequence[str] | None = None) -> int:
    """``import_weights.py`` / ``ldm-import``: public checkpoints -> run folders (monai_diffusion/pretrained)."""
    from monai_diffusion.pretrained.command import add_arguments, import_command

    parser = _parser("Import public weights (MAISI CT autoencoder, MONAI brain LDM, MONAI Generative 0.2.3 "
                     "networks) as run folders every command accepts.", with_config=False)
    add_arguments(parser)
    return run_main(import_command, parser, argv)
