"""The whole-volume pipeline: every phase that holds memory on the device, from training to sampling.

The inference passes (whole volumes, or by tiles with the exact method) are counted with
:class:`~monai_diffusion.memory.counting.LiveBytes`: every storage from its creation to its release, so the
peak is that of the real sequence of blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

from generative.inferers.tiling import BufferRequest
from generative.networks.nets import AutoencoderKL
from monai_diffusion.config import Config
from monai_diffusion.config.geometry import training_size
from monai_diffusion.config.tiles import resolve_tiles
from monai_diffusion.memory.counting import LiveBytes, PhaseEstimate, _autocast
from monai_diffusion.memory.estimates import config_unet_args, context_of, estimate_autoencoder, estimate_diffusion

__all__ = ["PhaseEstimate", "estimate_autoencoder_inference", "estimate_pipeline"]


def _host_buffers_uncounted(live: LiveBytes) -> Callable[[BufferRequest], torch.Tensor]:
    """The exact tiling's buffer allocator that leaves its full-size buffers out of ``live`` unless they are
    on the device."""

    def allocate(request: BufferRequest) -> torch.Tensor:
        if request.where == "device":
            return request.allocate()
        with live.uncounted():
            return request.allocate()

    return allocate


def _parameter_bytes(*modules: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def estimate_autoencoder_inference(
    config: Config, part: str, mixed_precision: bool = False, buffers: str = "cpu", target: str = "cuda",
    batch: int = 1,
) -> tuple[int, int, str]:
    """Peak device bytes of one whole volume's encode (``part="encode"``: the volume in, the latent out),
    decode (``"decode"``) or both (``"reconstruct"``), run as the pipeline runs it: by tiles of
    ``config.inference_tile`` with the exact method when the config sets one, else at once; no autograd.
    Counted on fake tensors with :class:`LiveBytes`: the input, every intermediate and the output, not the
    parameters (add them).

    Args:
        config: the run config (``autoencoder``, ``data.image_size``, the tiles).
        part: ``"encode"``, ``"decode"`` or ``"reconstruct"``.
        mixed_precision: under autocast, following ``target``'s rules.
        buffers: where the exact method's full-size buffers live (``"cpu"``/``"disk"``: left out of the count,
            reported apart; ``"device"``: counted).
        target: ``cuda`` or ``cpu``.
        batch: volumes passed at once (the exact method runs them one after the other; their inputs and
            outputs are all on the device).

    Returns:
        (device bytes, host buffer bytes of the exact method, how it ran).
    """
    if part not in ("encode", "decode", "reconstruct"):
        raise ValueError(f"part = {part!r}: expected 'encode', 'decode' or 'reconstruct'")
    ae = config.autoencoder
    size = tuple(config.data.image_size)[: ae.spatial_dims]
    tiles = resolve_tiles(config, buffers=buffers)
    tile = tiles.tile_size
    report: dict[str, Any] = {}
    with FakeTensorMode():
        model = AutoencoderKL(**ae.model_kwargs()).eval()
        latent = model.latent_shape(size)
        live = LiveBytes()
        inferer = tiles.inferer(allocator=_host_buffers_uncounted(live))
        with torch.no_grad(), live, _autocast(mixed_precision, target):
            if part == "reconstruct":
                x = torch.empty((batch, ae.in_channels, *size))
                out = inferer.reconstruct(model, x, report) if tile else model.reconstruct(x)
            elif part == "encode":
                x = torch.empty((batch, ae.in_channels, *size))
                out = inferer.encode(model, x, report) if tile else model.encode(x)
            else:
                z = torch.empty((batch, *latent))
                out = inferer.decode(model, z, report) if tile else model.decode(z)
            del out
    if not tile:
        how = "whole volume at once"
    elif report.get("method") == "exact":
        how = f"exact tiles, blocks {'x'.join(map(str, report['block']))}, buffers {buffers}"
    else:
        how = f"blended tiles {'x'.join(map(str, tile))}"
    host = report.get("buffer_peak_bytes", 0) if buffers != "device" else 0
    return live.peak, host, how


def estimate_pipeline(config: Config, target: str = "cuda", world_size: int | None = None) -> list[PhaseEstimate]:
    """Every phase of training and sampling that needs device memory, for ``config``'s whole volumes:

    1. the autoencoder training step (:func:`estimate_autoencoder`);
    2. its validation: whole volumes reconstructed (by tiles after patch training) while the training
       state (weights, gradients, Adam, discriminator) stays on the device;
    3. the latent cache of the diffusion stage: a batch of whole volumes encoded (fp32, as ``latents.py`` does);
    4. the diffusion training step on whole-volume latents (:func:`estimate_diffusion`);
    5. sampling: the UNet's denoising step (twice the batch under guidance) and the decode of the generated
       latents (under the diffusion stage's mixed precision), with the UNet still on the device;
    6. with ``data.num_classes``: the ControlNet training step and sampling with it
       (``monai_diffusion.memory.controlnet``).

    Validation and the latent cache take ``autoencoder.training.batch_size`` volumes at once, sampling
    ``diffusion.sampling.batch_size``. ``world_size``: as :func:`estimate_autoencoder`'s.
    """
    from monai_diffusion.runs.checkpoints import build_unet

    ae, df = config.autoencoder, config.diffusion
    amp_ae, amp_df = ae.training.mixed_precision, df.training.mixed_precision
    size = tuple(config.data.image_size)[: ae.spatial_dims]
    volume = "x".join(map(str, size))
    with FakeTensorMode():
        ae_params = _parameter_bytes(AutoencoderKL(**ae.model_kwargs()))
    phases: list[PhaseEstimate] = []

    train = estimate_autoencoder(config, target=target, world_size=world_size)
    trained_on = "x".join(map(str, training_size(config)))
    phases.append(PhaseEstimate("autoencoder training step",
                                f"{trained_on} x {train.batch_size}, {train.precision}", train.total))

    state = train.parameters + train.gradients + train.optimizer_state
    volumes = ae.training.batch_size
    valid, host_v, how_v = estimate_autoencoder_inference(config, "reconstruct", amp_ae, target=target, batch=volumes)
    phases.append(PhaseEstimate("autoencoder validation",
                                f"{volume} x {volumes}, {how_v}; beside the training state", state + valid, host_v))

    cache, host_c, how_c = estimate_autoencoder_inference(config, "encode", False, target=target, batch=volumes)
    phases.append(PhaseEstimate("latent cache (encode)", f"{volume} x {volumes}, {how_c}, fp32", ae_params + cache,
                                host_c))

    diffusion = estimate_diffusion(config, target=target, world_size=world_size)
    phases.append(PhaseEstimate("diffusion training step",
                                f"latents {'x'.join(map(str, diffusion.latent_shape))} x {diffusion.batch_size}",
                                diffusion.total))

    unet_params = diffusion.parameters  # float32 weights, as counted for the training step
    samples = df.sampling.batch_size
    guided = bool(df.conditioning.categorical or df.conditioning.continuous) and df.sampling.guidance_scale != 1.0
    latent = diffusion.latent_shape
    with FakeTensorMode():
        unet = build_unet(config_unet_args(config)).eval()
        live = LiveBytes()
        with torch.no_grad(), live, _autocast(amp_df, target):
            inputs = torch.empty((samples * (2 if guided else 1), *latent))
            prediction = unet(inputs, timesteps=torch.zeros((len(inputs),), dtype=torch.long),
                              **context_of(config, len(inputs)))
            del prediction
    latents = f"{samples} latent{'s' if samples > 1 else ''}{' x 2 (guidance)' if guided else ''}"
    phases.append(PhaseEstimate("sampling: denoising", latents, ae_params + unet_params + live.peak))
    sample_decode, host_s, how_s = estimate_autoencoder_inference(config, "decode", amp_df, target=target,
                                                                  batch=samples)
    phases.append(PhaseEstimate("sampling: decode", f"{volume} x {samples}, {how_s}",
                                ae_params + unet_params + sample_decode, host_s))
    if config.data.num_classes is not None:  # label maps: the ControlNet stage and sampling from masks
        from monai_diffusion.memory.controlnet import controlnet_phases

        phases += controlnet_phases(config, target, autoencoder_bytes=ae_params)
    return phases
