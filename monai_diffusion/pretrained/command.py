"""``import_weights.py`` / ``ldm-import``: public checkpoints -> run folders.

    ldm-import maisi      --autoencoder autoencoder_v1.pt --output runs/maisi_ct
    ldm-import brain-ldm  --autoencoder autoencoder.pt --unet model.pt --output runs/brain_ldm
    ldm-import generative --autoencoder ae.pt --autoencoder-args ae.yaml [--unet unet.pt --unet-args unet.yaml
                          --scale-factor F --scheduler sched.yaml --conditions a b --concat-conditions]
                          --image-size H W D --output runs/mine
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from monai_diffusion.errors import ConfigError

__all__ = ["add_arguments", "import_command"]

log = logging.getLogger("monai_diffusion")
LAYOUTS = ("maisi", "brain-ldm", "generative")


def _mapping(text: str | None, option: str) -> dict[str, Any] | None:
    """A YAML/JSON mapping given inline or as a file."""
    if text is None:
        return None
    path = Path(text)
    source = text
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise ConfigError(f"{option}: {path}: no such file")
        source = path.read_text(encoding="utf-8")
    try:  # JSON first: YAML 1.1 reads JSON's 1e-06 as text
        value = json.loads(source)
    except ValueError:
        value = None
    try:
        value = yaml.safe_load(source) if value is None else value
    except yaml.YAMLError as err:
        raise ConfigError(f"{option}: not valid YAML/JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{option}: expected a mapping of constructor arguments such as "
                          f"'{{num_channels: [64, 128], latent_channels: 3}}', got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    parser.add_argument("layout", choices=LAYOUTS,
                        help="maisi: NV-Generate-CT autoencoder_v1.pt; brain-ldm: the MONAI model-zoo brain LDM "
                             "bundle (autoencoder.pt + model.pt); generative: any MONAI Generative 0.2.3 "
                             "AutoencoderKL (+ DiffusionModelUNet) given its constructor arguments")
    parser.add_argument("--autoencoder", required=True, help="the autoencoder's weights file")
    parser.add_argument("--unet", default=None, help="the diffusion UNet's weights file")
    parser.add_argument("--output", required=True, help="new or empty folder for the run folders")
    parser.add_argument("--autoencoder-args", default=None, metavar="YAML",
                        help="AutoencoderKL constructor arguments (inline YAML/JSON or a .yaml/.json file); "
                             "maisi and brain-ldm: overrides of the published ones")
    parser.add_argument("--unet-args", default=None, metavar="YAML",
                        help="DiffusionModelUNet constructor arguments (0.2.3 names), as --autoencoder-args")
    parser.add_argument("--scheduler", default=None, metavar="YAML",
                        help="diffusion.scheduler keys the UNet was trained with (num_train_timesteps, schedule, "
                             "beta_start, beta_end, clip_sample)")
    parser.add_argument("--scale-factor", type=float, default=None,
                        help="the latents were multiplied by it in training (generative; default 1)")
    parser.add_argument("--conditions", nargs="+", default=None, metavar="NAME",
                        help="names of the UNet's cross-attention context values, in order (used as given)")
    parser.add_argument("--concat-conditions", action="store_true",
                        help="the UNet also reads the conditions as extra input channels")
    parser.add_argument("--image-size", type=int, nargs=3, default=None, metavar=("H", "W", "D"),
                        help="data.image_size of the run (maisi default 128 128 128; brain-ldm 160 224 160)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="set a key of the written config, e.g. --set autoencoder.tile_size=64 (repeatable)")


def _spec(args: argparse.Namespace) -> Any:
    from monai_diffusion.pretrained import importer as imp

    ae_args = _mapping(args.autoencoder_args, "--autoencoder-args") or {}
    unet_args = _mapping(args.unet_args, "--unet-args")
    scheduler = _mapping(args.scheduler, "--scheduler") or {}
    spec = imp.ImportSpec(layout="generative", autoencoder=Path(args.autoencoder), autoencoder_args=ae_args,
                          unet=Path(args.unet) if args.unet else None, unet_args=unet_args, scheduler=scheduler,
                          scale_factor=1.0 if args.scale_factor is None else args.scale_factor,
                          conditions=list(args.conditions or []), concat_conditions=args.concat_conditions,
                          name="MONAI Generative 0.2.3 networks", overrides=list(args.overrides))
    if args.layout == "maisi":
        if args.unet:
            raise ConfigError("--unet: the maisi layout imports the autoencoder only (MAISI's UNet is a "
                              "DiffusionModelUNetMaisi, which our diffusion stage does not hold)")
        spec.layout, spec.name = "maisi", "MAISI CT autoencoder (NV-Generate-CT autoencoder_v1.pt)"
        spec.autoencoder_args = {**imp.MAISI_CT_AUTOENCODER, **ae_args}
        spec.data = {"intensity_window": [-1000.0, 1000.0]}  # MAISI's CT scaling: HU -1000..1000 -> 0..1
    elif args.layout == "brain-ldm":
        if not args.unet:
            raise ConfigError("--unet: the brain-ldm layout needs the bundle's models/model.pt as well")
        spec.name = "MONAI model-zoo brain_image_synthesis_latent_diffusion_model"
        spec.autoencoder_args = {**imp.BRAIN_LDM_AUTOENCODER, **ae_args}
        spec.unet_args = {**imp.BRAIN_LDM_UNET, **(unet_args or {})}
        spec.scheduler = {**imp.BRAIN_LDM_SCHEDULER, **scheduler}
        spec.conditions = list(args.conditions or imp.BRAIN_LDM_CONDITIONS)
        spec.concat_conditions = True
        spec.image_size = list(imp.BRAIN_LDM_IMAGE_SIZE)
        spec.data = {"intensity_percentiles": [0.0, 100.0]}  # the bundle's images are min-max scaled to [0, 1]
    elif not ae_args:
        raise ConfigError("--autoencoder-args: the generative layout needs the AutoencoderKL's constructor "
                          "arguments, e.g. --autoencoder-args '{num_channels: [32, 64], latent_channels: 3}'")
    if args.unet and spec.unet_args is None:
        raise ConfigError("--unet-args: the UNet's constructor arguments are required with --unet")
    if args.image_size is not None:
        spec.image_size = list(args.image_size)
    return spec


def import_command(args: argparse.Namespace) -> None:
    """Run the import and say what was written and what to run next."""
    from monai_diffusion.pretrained.importer import import_weights

    written = import_weights(_spec(args), args.output)
    for stage, folder in written.items():
        log.info("%s run folder: %s", stage, folder)
    config = written.get("diffusion", written["autoencoder"]) / "config.yaml"
    log.info("next: evaluate_autoencoder.py --run %s --data <your volumes>", written["autoencoder"])
    if "diffusion" in written:
        log.info("next: sample.py --config %s --output <folder> [--condition NAME=VALUE ...]", config)
    log.info("fine-tune: train_autoencoder.py --config %s --set autoencoder.init_from=%s --set output_dir=<new>",
             config, written["autoencoder"])
    if "diffusion" in written:
        log.info("fine-tune the UNet: train_diffusion.py --config %s --set diffusion.init_from=%s "
                 "--set output_dir=<new> --set data.paths=<your datalist or folder>", config, written["diffusion"])
