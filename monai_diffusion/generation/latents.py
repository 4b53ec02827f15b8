"""Latents of the frozen autoencoder for the diffusion stage: encoding once, the on-disk cache and the
scale factor.

The training set is encoded once (mean and standard deviation of q(z|x) per volume) and the UNet trains
from that cache, drawing a fresh latent sample z = mu + sigma * eps each time, instead of running the
frozen encoder every epoch. Latents are multiplied by the scale factor 1 / std(z) (Rombach et al.),
computed over a few batches and reduced across ranks under DDP.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from generative.networks.nets import AutoencoderKL
from monai_diffusion.config import Config, config_to_dict
from monai_diffusion.config.tiles import TileSettings, resolve_tiles
from monai_diffusion.data import LABEL_KEY, build_datasets, model_input
from monai_diffusion.data.datasets import default_workers, item_covariates
from monai_diffusion.data.loaders import node_processes
from monai_diffusion.evaluation.metrics import latent_std
from monai_diffusion.generation.conditioning import Conditioning, Conditions
from monai_diffusion.runs.atomic import atomic_write
from monai_diffusion.runs.checkpoints import weights_fingerprint
from monai_diffusion.runtime import Runtime

__all__ = ["LatentDataset", "LatentCache", "encode_latents", "shard_indices", "compute_scale_factor", "cached_latents",
           "volumes_to_encode"]

log = logging.getLogger("monai_diffusion")


class LatentDataset(Dataset):
    """Cached latent distributions: items ``{"z_mu": Cx[LATENT DIMS], "z_sigma": Cx[LATENT DIMS]}``, plus
    ``class_labels`` and/or ``context`` of a conditional model (see ``conditioning.Conditions``), plus ``label``
    (1x[SPATIAL DIMS] int16, the volume's label map at image size) with ``data.num_classes``."""

    def __init__(self, z_mu: torch.Tensor, z_sigma: torch.Tensor, conditions: Conditions | None = None,
                 labels: torch.Tensor | None = None) -> None:
        self.z_mu, self.z_sigma, self.labels = z_mu, z_sigma, labels
        self.conditions = conditions if conditions is not None else Conditions()

    def __len__(self) -> int:
        return len(self.z_mu)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"z_mu": self.z_mu[index], "z_sigma": self.z_sigma[index], **self.conditions.index(index).as_kwargs()}
        if self.labels is not None:
            item[LABEL_KEY] = self.labels[index]
        return item


def shard_indices(count: int, runtime: Runtime, pad: bool = True) -> list[int]:
    """This rank's indices; ``pad``: repeated like DistributedSampler so every rank gets the same number
    (training), else each index exactly once over all ranks (validation, so its loss does not depend on
    the number of processes)."""
    indices = list(range(count))
    if pad:
        per_rank = -(-count // runtime.world_size)
        indices += indices[: per_rank * runtime.world_size - count]
    return indices[runtime.rank :: runtime.world_size]


class _Images(Dataset):
    """The images of ``dataset[indices]`` (with ``labels``, each with its label map), for a DataLoader."""

    def __init__(self, dataset: Dataset, indices: list[int], labels: bool = False) -> None:
        self.dataset, self.indices, self.labels = dataset, indices, labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, ...]:
        item = self.dataset[self.indices[position]]
        return (item["image"], item[LABEL_KEY]) if self.labels else (item["image"],)


def _stack_fields(items: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    """A batch of ``_Images`` items: one stacked tensor per field."""
    return [torch.stack(field) for field in zip(*items)]


def encode_latents(
    autoencoder: AutoencoderKL, dataset: Dataset, indices: list[int], batch_size: int, device: torch.device, desc: str,
    tiles: TileSettings | None = None, num_workers: int = 0, labels: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``dataset[indices]`` once; returns ``(z_mu, z_sigma)`` on the CPU, each NxCx[LATENT DIMS]
    (empty tensors when ``indices`` is empty). ``tiles``: encode each whole volume by tiles (see
    ``config.tiles.resolve_tiles``). ``num_workers``: DataLoader workers that load and preprocess the next
    volumes while one batch is encoded (in order: the same latents as with 0, which loads in this process).
    ``labels``: a list that receives each volume's label map (1x[SPATIAL DIMS] int16), read with its image."""
    inferer = tiles.inferer() if tiles is not None else None
    mus, sigmas = [], []
    spatial_dims = autoencoder.spatial_dims
    loader = DataLoader(_Images(dataset, indices, labels is not None), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_stack_fields, pin_memory=device.type == "cuda")
    with torch.no_grad():
        for fields in tqdm(loader, desc=desc, leave=False):
            images = model_input(fields[0], spatial_dims).to(device).float()
            if labels is not None:
                labels += [label.to(torch.int16) for label in model_input(fields[1], spatial_dims)]
            z_mu, z_sigma = autoencoder.encode(images) if inferer is None else inferer.encode(autoencoder, images)
            mus.append(z_mu.float().cpu())
            sigmas.append(z_sigma.float().cpu())
    if not mus:  # a rank without validation volumes
        return torch.empty(0), torch.empty(0)
    return torch.cat(mus), torch.cat(sigmas)


@dataclasses.dataclass
class LatentCache:
    """One rank's encoded training and validation sets (with their conditions), the conditioning fitted on the
    whole training set, and the affine of the training volumes."""

    train: LatentDataset
    val: LatentDataset
    affine: torch.Tensor
    encode_seconds: float
    reused: bool
    conditioning: Conditioning = dataclasses.field(default_factory=Conditioning)


def _fingerprint(config: Config, source: Path, runtime: Runtime, weights: str) -> str:
    tiles = resolve_tiles(config)
    return json.dumps({"autoencoder": str(Path(source).resolve()), "weights": weights,
                       "data": config_to_dict(config.data),
                       "tile": tiles.tile_size, "overlap": tiles.overlap,
                       "rank": runtime.rank, "world": runtime.world_size, "seed": config.seed}, sort_keys=True)


_CACHED = ("train_mu", "train_sigma", "val_mu", "val_sigma", "affine")


def _read_cache(path: Path, fingerprint: str, labelled: bool = False) -> dict[str, Any] | None:
    """The cache file's contents when it is readable and made for ``fingerprint``; a damaged file is
    reported and ignored (the latents are then encoded again and the file rewritten)."""
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - damaged bytes make the unpickler raise almost anything; the cache is rebuilt
        log.warning("latent cache %s is unreadable (%s: %s); encoding the latents again", path, type(err).__name__,
                    str(err)[:120])
        return None
    if not isinstance(cached, dict) or cached.get("fingerprint") != fingerprint:
        return None
    keys = _CACHED + (("train_label", "val_label") if labelled else ())
    if not all(isinstance(cached.get(key), torch.Tensor) for key in keys):
        log.warning("latent cache %s is incomplete; encoding the latents again", path)
        return None
    return cached


def volumes_to_encode(config: Config) -> tuple[Dataset, Dataset]:
    """The training and validation volumes of ``config`` (files found and checked, nothing loaded yet)."""
    # every volume is read once, to be encoded: nothing to gain from data.cache here
    data = dataclasses.replace(config.data, cache=False)
    return build_datasets(data, seed=config.seed, in_channels=config.autoencoder.in_channels)


def _stacked(labels: list[torch.Tensor] | None) -> torch.Tensor | None:
    if labels is None:
        return None
    return torch.stack(labels) if labels else torch.empty(0, dtype=torch.int16)


def cached_latents(config: Config, runtime: Runtime, autoencoder: AutoencoderKL, source: Path, run_dir: Path,
                   volumes: tuple[Dataset, Dataset], conditioning: Conditioning | None = None,
                   cache_on_disk: bool | None = None) -> LatentCache:
    """Encode (or reload from ``latent_cache_rank<r>.pt``) this rank's share of ``volumes`` (training, validation),
    with their label maps when ``data.num_classes`` is set.

    Args:
        conditioning: the fitted conditioning to encode the covariates with (the ControlNet stage: its diffusion
            model's); None fits it on the training set.
        cache_on_disk: write and reuse the cache file (None: ``diffusion.training.cache_latents_on_disk``).
    """
    cond = config.diffusion.conditioning
    on_disk = config.diffusion.training.cache_latents_on_disk if cache_on_disk is None else cache_on_disk
    train_ds, val_ds = volumes
    train_idx, val_idx = shard_indices(len(train_ds), runtime), shard_indices(len(val_ds), runtime, pad=False)
    # the conditions come from the covariates alone (no image is read), fitted on the whole training set
    train_items = [item_covariates(train_ds, i) for i in range(len(train_ds))]
    if conditioning is None:
        conditioning = Conditioning.fit(cond.categorical, cond.continuous, cond.dropout, train_items,
                                        cond.standardize, cond.presence_flag)
    train_conditions = conditioning.encode([train_items[i] for i in train_idx])
    val_conditions = conditioning.encode([item_covariates(val_ds, i) for i in val_idx])
    fingerprint = _fingerprint(config, source, runtime, weights_fingerprint(autoencoder.state_dict()))
    cache_file = run_dir / f"latent_cache_rank{runtime.rank}.pt"
    labelled = config.data.num_classes is not None
    cached = _read_cache(cache_file, fingerprint, labelled) if on_disk else None
    if cached is not None:
        log.info("latent cache: reusing %s", cache_file)
        return LatentCache(LatentDataset(cached["train_mu"], cached["train_sigma"], train_conditions,
                                         cached.get("train_label")),
                           LatentDataset(cached["val_mu"], cached["val_sigma"], val_conditions,
                                         cached.get("val_label")),
                           cached["affine"], 0.0, True, conditioning)
    started = time.perf_counter()
    batch = config.autoencoder.training.batch_size
    tiles = resolve_tiles(config)
    workers = default_workers(config.data.num_workers, node_processes(runtime), runtime.device.type)
    train_labels: list[torch.Tensor] | None = [] if labelled else None
    val_labels: list[torch.Tensor] | None = [] if labelled else None
    train_mu, train_sigma = encode_latents(autoencoder, train_ds, train_idx, batch, runtime.device,
                                           "encoding training set", tiles, workers, train_labels)
    val_mu, val_sigma = encode_latents(autoencoder, val_ds, val_idx, batch, runtime.device,
                                       "encoding validation set", tiles, workers, val_labels)
    seconds = time.perf_counter() - started
    affine = torch.as_tensor(train_ds[0].get("affine", torch.eye(4)), dtype=torch.float64)
    train_label, val_label = _stacked(train_labels), _stacked(val_labels)
    if on_disk:
        payload = {"fingerprint": fingerprint, "train_mu": train_mu, "train_sigma": train_sigma,
                   "val_mu": val_mu, "val_sigma": val_sigma, "affine": affine}
        if labelled:  # the label maps beside their latents
            payload.update(train_label=train_label, val_label=val_label)
        atomic_write(cache_file, lambda handle: torch.save(payload, handle))  # a kill never leaves half a file
    return LatentCache(LatentDataset(train_mu, train_sigma, train_conditions, train_label),
                       LatentDataset(val_mu, val_sigma, val_conditions, val_label), affine, seconds, False,
                       conditioning)


def compute_scale_factor(dataset: LatentDataset, batches: int, batch_size: int, runtime: Runtime, seed: int,
                         mean: bool = False) -> float:
    """1 / std of sampled latents (of the means mu with ``mean``) over ``batches`` batches, with sums reduced
    across ranks."""
    generator = torch.Generator().manual_seed(seed)
    count = min(len(dataset), batches * batch_size)
    z = dataset.z_mu[:count]
    if not mean:
        z = z + torch.randn(z.shape, generator=generator) * dataset.z_sigma[:count]
    z = z.double()
    count_z = torch.tensor(float(z.numel()), dtype=torch.float64)
    totals = runtime.all_reduce_sum(torch.stack([z.sum(), z.pow(2).sum(), count_z]))
    return float(1.0 / latent_std(*totals.tolist()))
