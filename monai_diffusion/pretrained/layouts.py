"""Public checkpoint layouts: reading a weights file safely and mapping its keys onto our networks.

* MAISI (NV-Generate-CT ``autoencoder_v1.pt``): MONAI's ``AutoencoderKlMaisi``. Every convolution is wrapped
  once more (``MaisiConvolution.conv`` holding MONAI's ``Convolution``), so ``.conv.conv.`` becomes ``.conv.``;
  every other key, and every shape, is our ``AutoencoderKL``'s.
* MONAI Generative 0.2.3 (the model-zoo brain LDM, BrLP): our ``AutoencoderKL`` reads it as it is; a
  ``DiffusionModelUNet`` is read by the 0.2.3 drop-in and handed over to MONAI core's class, which our
  diffusion stage uses.

Every mismatch is a :class:`~monai_diffusion.errors.CheckpointError` of one line that names the file and the
first few keys.
"""

from __future__ import annotations

import inspect
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from monai.networks.blocks import SpatialAttentionBlock
from monai.networks.nets import DiffusionModelUNet

from monai_diffusion.errors import CheckpointError

__all__ = ["read_state_dict", "maisi_to_ours", "load_strictly", "unet_023_to_core", "SHOWN_KEYS"]

_UNET_023_CHANNELS = (32, 64, 64, 64)  # 0.2.3's default num_channels
_MAISI_MARK = "encoder.blocks.0.conv.conv.weight"  # MAISI's first convolution, wrapped once more than ours
SHOWN_KEYS = 3  # keys named in a one-line error
# wrappers some training scripts save around the state dict
_WRAPPERS = ("state_dict", "model", "model_state_dict", "autoencoder", "autoencoder_state_dict", "unet_state_dict")


def _first(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(repr(k) for k in keys[:SHOWN_KEYS]) + more


def read_state_dict(path: str | Path, option: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (plain data only: ``weights_only=True``, so a file cannot run code).

    A bare state dict is returned as it is; a dict holding one under a usual name (``state_dict``,
    ``unet_state_dict``, ...) is unwrapped.

    Args:
        path: the ``.pt`` / ``.pth`` file.
        option: the command-line option named in errors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{option}: {path}: no such file; download it first (see docs/pretrained.md)")
    with open(path, "rb") as handle:
        head = handle.read(2)
    if head[:2] != b"PK" and head[:1] != b"\x80":  # torch.save writes a zip archive (or a legacy pickle)
        raise CheckpointError(f"{option}: {path} is not a readable PyTorch weights file (neither a zip archive nor a "
                              f"pickle); check that the download finished")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{option}: {path} holds pickled objects other than tensors (a whole pickled model?); "
                              f"save its state_dict() and import that") from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as err:
        reason = str(err).strip().split(". ")[0][:120]
        raise CheckpointError(f"{option}: {path} is not a readable PyTorch weights file ({type(err).__name__}: "
                              f"{reason})") from None
    if isinstance(data, Mapping):
        for name in _WRAPPERS:
            if isinstance(data.get(name), Mapping):
                data = data[name]
                break
    if not isinstance(data, Mapping) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        kind = type(data).__name__
        raise CheckpointError(f"{option}: {path} holds no state dict of tensors (found a {kind}"
                              f"{' with keys ' + _first([str(k) for k in data]) if isinstance(data, Mapping) else ''})")
    return {str(k).removeprefix("module."): v for k, v in data.items()}


def maisi_to_ours(state_dict: Mapping[str, torch.Tensor], path: Path, option: str) -> dict[str, torch.Tensor]:
    """MAISI's ``AutoencoderKlMaisi`` keys as our ``AutoencoderKL``'s (``.conv.conv.`` -> ``.conv.``).

    Raises:
        CheckpointError: the file has no MAISI convolution (``...conv.conv.weight``): another layout.
    """
    if _MAISI_MARK not in state_dict:  # 0.2.3 also has '.conv.conv.' (its downsampling), never on the first conv
        raise CheckpointError(f"{option}: {path} is not in MAISI's AutoencoderKlMaisi layout (no '{_MAISI_MARK}'; "
                              f"found {_first(list(state_dict))}); a MONAI Generative 0.2.3 autoencoder is imported "
                              f"with 'ldm-import generative'")
    return {key.replace(".conv.conv.", ".conv.", 1): value for key, value in state_dict.items()}


def load_strictly(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path, option: str,
                  hint: str) -> None:
    """``model.load_state_dict(state_dict, strict=True)``, with every mismatch as one line.

    Args:
        model: the network built from the constructor arguments.
        state_dict: the (mapped) weights.
        path: the file they came from.
        option: the command-line option named in errors.
        hint: what to check, ending the message (e.g. "check --autoencoder-args").
    """
    expected = model.state_dict()
    wrong_shape = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state_dict.items()
                   if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {len(missing)} keys ({_first(missing)})"] if missing else []) + (
            [f"{len(unexpected)} unexpected keys ({_first(unexpected)})"] if unexpected else [])
        raise CheckpointError(f"{option}: {path} does not fit the network: {'; '.join(parts)}; {hint}")
    if wrong_shape:
        raise CheckpointError(f"{option}: {path}: {len(wrong_shape)} tensors have another shape than the network's "
                              f"(file vs network: {_first(wrong_shape)}); {hint}")
    model.load_state_dict(dict(state_dict), strict=True)


def core_unet_args(args_023: Mapping[str, Any]) -> dict[str, Any]:
    """MONAI core ``DiffusionModelUNet`` arguments of a 0.2.3 one (``num_channels`` is core's ``channels``)."""
    from generative.networks.nets import DiffusionModelUNet as DropIn

    defaults = {name: p.default for name, p in inspect.signature(DropIn.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty and name != "channels"}
    args = {**defaults, **args_023}  # 0.2.3's defaults where an argument is not given
    channels = args.pop("num_channels", None)
    args["channels"] = list(args.get("channels") or channels or _UNET_023_CHANNELS)
    for name in ("attention_levels", "num_res_blocks", "num_head_channels"):
        if isinstance(args.get(name), tuple):
            args[name] = list(args[name])
    return args


def unet_023_to_core(args_023: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], path: Path,
                     option: str) -> tuple[dict[str, Any], DiffusionModelUNet]:
    """A 0.2.3 ``DiffusionModelUNet`` as MONAI core's, computing the same function.

    The 0.2.3 drop-in reads the file (its layout, strictly); core's class then takes the weights by module path.
    0.2.3's spatial self-attention creates an output projection but never applies it, while core applies it: the
    projection is set to the identity, so core computes what 0.2.3 did (fine-tuning may then train it).

    Returns:
        ``(core_args, core_unet)``.
    """
    from generative.networks.nets import DiffusionModelUNet as DropIn

    try:
        dropin = DropIn(**args_023)
    except (TypeError, ValueError, AssertionError) as err:
        raise CheckpointError(f"{option}: the UNet's constructor arguments are not valid ({err})") from None
    load_strictly(dropin, state_dict, path, option, "check the UNet's constructor arguments")
    core_args = core_unet_args(args_023)
    unet = DiffusionModelUNet(**core_args)
    tensors = dict(dropin.named_parameters()) | dict(dropin.named_buffers())
    unet.load_state_dict({k: v.detach() for k, v in tensors.items()}, strict=True)
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, SpatialAttentionBlock):
                projection = module.attn.out_proj
                projection.weight.copy_(torch.eye(projection.weight.shape[0]))
                projection.bias.zero_()
    return core_args, unet
