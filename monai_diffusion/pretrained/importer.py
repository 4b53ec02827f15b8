"""Turn public checkpoints into run folders that every command accepts as if we had trained them.

An import writes ``<output>/autoencoder/`` (and ``<output>/diffusion/`` with a UNet), each holding the resolved
``config.yaml``, ``checkpoints/last.pt`` in our format (:mod:`monai_diffusion.runs.checkpoints`) and
``imported.json`` (where the weights came from, their SHA-256 and layout). The networks are built from the
written config, so the config and the weights cannot disagree. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from generative.networks.nets import AutoencoderKL
from monai_diffusion.config import (
    AutoencoderConfig,
    Config,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    save_config,
)
from monai_diffusion.config.rules import discriminator_min_size
from monai_diffusion.errors import CheckpointError, ConfigError
from monai_diffusion.generation.conditioning import Conditioning
from monai_diffusion.pretrained.layouts import load_strictly, maisi_to_ours, read_state_dict, unet_023_to_core
from monai_diffusion.pretrained.unet import CONCAT_KEY, unet_differences
from monai_diffusion.runs.checkpoints import checkpoint_path, save_checkpoint
from monai_diffusion.runs.folders import check_new_folder, make_output_folder

__all__ = ["MAISI_CT_AUTOENCODER", "BRAIN_LDM_AUTOENCODER", "BRAIN_LDM_UNET", "BRAIN_LDM_SCHEDULER",
           "BRAIN_LDM_CONDITIONS", "ImportSpec", "import_weights", "autoencoder_section"]

# NV-Generate-CT's config_network: AutoencoderKlMaisi (its num_splits / norm_float16 only change memory use)
MAISI_CT_AUTOENCODER: dict[str, Any] = dict(
    spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4, num_channels=[64, 128, 256],
    num_res_blocks=[2, 2, 2], norm_num_groups=32, norm_eps=1e-6, attention_levels=[False, False, False],
    with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)
# model-zoo brain_image_synthesis_latent_diffusion_model, configs/inference.json (0.2.3 names)
BRAIN_LDM_AUTOENCODER: dict[str, Any] = dict(
    spatial_dims=3, in_channels=1, out_channels=1, latent_channels=3, num_channels=[64, 128, 128, 128],
    num_res_blocks=2, norm_num_groups=32, norm_eps=1e-6, attention_levels=[False, False, False, False],
    with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)
BRAIN_LDM_UNET: dict[str, Any] = dict(
    spatial_dims=3, in_channels=7, out_channels=3, num_channels=[256, 512, 768], num_res_blocks=2,
    attention_levels=[False, True, True], norm_num_groups=32, norm_eps=1e-6, resblock_updown=True,
    num_head_channels=[0, 512, 768], with_conditioning=True, transformer_num_layers=1, cross_attention_dim=4,
    upcast_attention=True, use_flash_attention=False)
BRAIN_LDM_SCHEDULER: dict[str, Any] = dict(num_train_timesteps=1000, schedule="scaled_linear_beta",
                                           beta_start=0.0015, beta_end=0.0205, clip_sample=False)
# the bundle's context [gender, age, ventricular_vol, brain_vol], each already scaled to [0, 1]
BRAIN_LDM_CONDITIONS = ["sex", "age", "ventricular_vol", "brain_vol"]
BRAIN_LDM_IMAGE_SIZE = [160, 224, 160]
DISCRIMINATOR_LAYERS = 3  # the schema's default depth of the fine-tuning discriminator, at most
DATALIST = "datalist.csv"  # the template written for a conditioned UNet: image + one column per condition
MAISI_UPSAMPLE_MODE = "trilinear"  # AutoencoderKlMaisi's decoder interpolates trilinearly, ours nearest by default

log = logging.getLogger("monai_diffusion")

_AE_FIELDS = {f.name for f in dataclasses.fields(AutoencoderConfig)} - {"training", "discriminator", "perceptual",
                                                                         "tile_size", "tile_overlap"}


@dataclasses.dataclass
class ImportSpec:
    """What to import.

    Attributes:
        layout: ``maisi`` (AutoencoderKlMaisi keys) or ``generative`` (MONAI Generative 0.2.3 keys).
        autoencoder: the autoencoder's weights file.
        autoencoder_args: its constructor arguments (0.2.3 names).
        unet: the UNet's weights file (None: the autoencoder alone).
        unet_args: the UNet's 0.2.3 constructor arguments.
        scheduler: ``diffusion.scheduler`` keys the UNet was trained with.
        scale_factor: the latents were multiplied by it in training.
        conditions: names of the cross-attention context's values, in order (used as given: mean 0, std 1).
        concat_conditions: the UNet also reads the conditions as extra input channels.
        image_size: the volumes' size (H, W, D).
        data: other ``data`` keys (intensity window, spacing, ...).
        name: what the weights are, for ``imported.json``.
        overrides: ``KEY=VALUE`` config overrides (as ``--set``), applied last.
    """

    layout: str
    autoencoder: Path
    autoencoder_args: dict[str, Any]
    unet: Path | None = None
    unet_args: dict[str, Any] | None = None
    scheduler: dict[str, Any] = dataclasses.field(default_factory=dict)
    scale_factor: float = 1.0
    conditions: list[str] = dataclasses.field(default_factory=list)
    concat_conditions: bool = False
    image_size: list[int] = dataclasses.field(default_factory=lambda: [128, 128, 128])
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    name: str = "imported weights"
    overrides: list[str] = dataclasses.field(default_factory=list)


def autoencoder_section(args: Mapping[str, Any], option: str) -> dict[str, Any]:
    """``autoencoder`` config keys of an AutoencoderKL's 0.2.3 constructor arguments (ConfigError naming any
    argument our config cannot hold)."""
    given = {("num_channels" if k == "channels" else k): v for k, v in args.items()}
    defaults = {name: p.default for name, p in inspect.signature(AutoencoderKL.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty and name in _AE_FIELDS}
    section = {k: (list(v) if isinstance(v, tuple) else v) for k, v in {**defaults, **given}.items()}
    unknown = sorted(set(section) - _AE_FIELDS)
    if unknown:
        raise ConfigError(f"{option}: unknown AutoencoderKL argument(s) {unknown}; expected some of "
                          f"{sorted(_AE_FIELDS)}")
    return section  # 0.2.3's defaults where an argument is not given (downsample_factors None: 2 everywhere)


def _diffusion_section(spec: ImportSpec) -> dict[str, Any]:
    args = spec.unet_args or {}
    channels = list(args.get("num_channels", args.get("channels", [])))
    heads = args.get("num_head_channels", 8)
    res = args.get("num_res_blocks", 2)
    return {
        "num_channels": channels,
        "attention_levels": list(args.get("attention_levels", [])),
        "num_head_channels": list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(channels),
        "num_res_blocks": res if isinstance(res, int) else int(res[0]),
        "norm_num_groups": args.get("norm_num_groups", 32),
        "resblock_updown": bool(args.get("resblock_updown", False)),
        "upcast_attention": bool(args.get("upcast_attention", False)),
        "scheduler": dict(spec.scheduler),
        # the context values as given, without a presence flag (0.2.3 models had neither normalisation nor flag)
        "conditioning": {"categorical": [], "continuous": list(spec.conditions), "dropout": 0.0,
                         "standardize": False, "presence_flag": False,
                         "concat": bool(spec.concat_conditions and spec.conditions)},
    }


def _config(spec: ImportSpec, output: Path) -> Config:
    """The run's config (checked against the rules of the stages it will be used in)."""
    ae = autoencoder_section(spec.autoencoder_args, "--autoencoder-args")
    if spec.layout == "maisi":
        ae["upsample_mode"] = MAISI_UPSAMPLE_MODE
    data = {"source": "synthetic", "image_size": list(spec.image_size), **spec.data}
    if spec.conditions:  # covariates come from a datalist: a header-only template is written beside the runs
        data.update(source="nifti", paths=str(output / DATALIST))
    smallest = min(spec.image_size[: int(ae.get("spatial_dims", 3))])
    depth = max([1] + [n for n in range(1, DISCRIMINATOR_LAYERS + 1) if discriminator_min_size(n) <= smallest])
    ae["discriminator"] = {"num_layers_d": depth}  # for fine-tuning: as deep as the volumes allow
    mapping: dict[str, Any] = {"output_dir": str(output), "data": data, "autoencoder": ae}
    # the imported autoencoder stays stage 2's when output_dir is changed (fine-tuning, a new UNet on it)
    mapping["diffusion"] = {"autoencoder_run": str(output / "autoencoder")}
    if spec.unet is not None:
        mapping["diffusion"].update(_diffusion_section(spec))
    mapping = apply_overrides(mapping, spec.overrides)
    return config_from_dict(mapping, stage="diffusion" if spec.unet is not None else "autoencoder")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _provenance(spec: ImportSpec, files: Sequence[Path]) -> dict[str, Any]:
    return {"name": spec.name, "layout": spec.layout,
            "files": [{"path": str(p.resolve()), "sha256": _sha256(p)} for p in files]}


def _load_autoencoder(spec: ImportSpec, config: Config) -> tuple[AutoencoderKL, dict[str, Any]]:
    state_dict = read_state_dict(spec.autoencoder, "--autoencoder")
    if spec.layout == "maisi":
        state_dict = maisi_to_ours(state_dict, spec.autoencoder, "--autoencoder")
    model_args = config.autoencoder.model_kwargs(use_checkpointing=False)
    try:
        model = AutoencoderKL(**model_args)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--autoencoder-args: not a valid AutoencoderKL ({err})") from None
    load_strictly(model, state_dict, spec.autoencoder, "--autoencoder",
                  "check --autoencoder-args (channels, levels, latent channels) against the file")
    return model.eval(), model_args


def _write(run_dir: Path, config: Config, state: dict[str, Any], provenance: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    (run_dir / "imported.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    save_checkpoint({**state, "imported": provenance, "config": config_to_dict(config), "optimizers": {}},
                    checkpoint_path(run_dir, "last"))


def import_weights(spec: ImportSpec, output: str | Path) -> dict[str, Path]:
    """Write the run folders of ``spec`` below the new or empty folder ``output``.

    Everything is read and checked before anything is written: a bad file leaves no folder behind.

    Returns:
        ``{"autoencoder": <output>/autoencoder, "diffusion": <output>/diffusion}`` (the latter with a UNet).
    """
    output = Path(output)
    check_new_folder(output, "--output")
    config = _config(spec, output)
    autoencoder, model_args = _load_autoencoder(spec, config)
    written = {"autoencoder": output / "autoencoder"}
    ae_state = {"stage": "autoencoder", "model_args": model_args, "autoencoder": autoencoder.state_dict(),
                "discriminator": None}
    diffusion_state = None
    if spec.unet is not None:
        diffusion_state = _diffusion_state(spec, config, autoencoder, model_args)
    make_output_folder(output, "--output")
    if spec.conditions:
        (output / DATALIST).write_text(",".join(["image", *spec.conditions]) + "\n", encoding="utf-8")
    _write(written["autoencoder"], config, ae_state, _provenance(spec, [spec.autoencoder]))
    if diffusion_state is not None:
        written["diffusion"] = output / "diffusion"
        _write(written["diffusion"], config, diffusion_state, _provenance(spec, [spec.autoencoder, spec.unet]))
    return written


def _warn_unless_tunable(core_args: dict[str, Any], config_args: dict[str, Any]) -> None:
    """Say when the written config cannot describe the UNet (arguments our diffusion config has no key for, e.g. a
    per-level ``num_res_blocks``): sampling works, ``diffusion.init_from`` will refuse to fine-tune it."""
    changed = unet_differences(core_args, config_args)
    if changed:
        log.warning("the written diffusion config cannot describe this UNet (%s): sample from it, but "
                    "diffusion.init_from will refuse to fine-tune it", "; ".join(changed))


def _diffusion_state(spec: ImportSpec, config: Config, autoencoder: AutoencoderKL,
                     model_args: dict[str, Any]) -> dict[str, Any]:
    if spec.unet_args is None:
        raise ConfigError("--unet-args: the UNet's constructor arguments are required with --unet")
    state_dict = read_state_dict(spec.unet, "--unet")
    core_args, unet = unet_023_to_core(spec.unet_args, state_dict, spec.unet, "--unet")
    latent = config.autoencoder.latent_channels
    extra = len(spec.conditions) if spec.concat_conditions else 0
    if core_args["out_channels"] != latent or core_args["in_channels"] != latent + extra:
        raise CheckpointError(f"--unet-args: the UNet takes {core_args['in_channels']} and gives "
                              f"{core_args['out_channels']} channels, the autoencoder's latent has {latent}"
                              f"{f' (+ {extra} condition channels)' if extra else ''}; the UNet was not trained "
                              f"on this autoencoder")
    context = core_args.get("cross_attention_dim") if core_args.get("with_conditioning") else None
    if (context or 0) != len(spec.conditions):
        raise ConfigError(f"--conditions: the UNet's context has {context or 0} values (cross_attention_dim), "
                          f"{len(spec.conditions)} condition names were given ({spec.conditions})")
    if extra:
        core_args[CONCAT_KEY] = extra
    cond = config.diffusion.conditioning
    conditioning = Conditioning({}, {name: (0.0, 1.0) for name in cond.continuous}, cond.dropout,
                                flag=cond.presence_flag)
    _warn_unless_tunable(core_args, {**config.diffusion.unet_kwargs(latent, config.autoencoder.spatial_dims),
                                     **conditioning.unet_kwargs()})
    return {
        "stage": "diffusion", "unet_args": core_args, "unet": unet.state_dict(), "ema": None,
        "scale_factor": float(spec.scale_factor), "reference_affine": torch.eye(4, dtype=torch.float64),
        "autoencoder_args": model_args, "autoencoder": autoencoder.state_dict(),
        "conditioning": conditioning.state_dict(),
    }
