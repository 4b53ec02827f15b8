"""The training and validation loaders: the volume cache, patches, shuffling per epoch, DDP shards, workers,
and resuming in mid-epoch without loading the batches already trained."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

from monai.data import DistributedSampler as UnpaddedSampler
from monai.data import list_data_collate
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from monai_diffusion.config.schema import DataConfig
from monai_diffusion.data.cache import cache_training_volumes
from monai_diffusion.data.datasets import default_workers, make_loader
from monai_diffusion.data.patches import EpochTaggedSampler, RandomizedVolumes, build_random_transform
from monai_diffusion.runtime import Runtime

__all__ = ["ResumableSampler", "batches_from", "build_loaders", "training_loaders", "node_processes"]


class ResumableSampler(Sampler[int]):
    """``sampler``, whose next pass can start ``count`` indices later (:meth:`skip`): a resumed epoch drops the
    indices of the batches already trained before any item is read. ``len`` stays the whole epoch's, and
    ``set_epoch`` reaches the wrapped sampler, so the order of the indices is the uninterrupted run's."""

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler, self._skip = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def skip(self, count: int) -> None:
        """Start the next pass (only that one) ``count`` indices later."""
        self._skip = int(count)

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        return itertools.islice(iter(self.sampler), skip, None)

    def __len__(self) -> int:
        return len(self.sampler)


def batches_from(loader: DataLoader, skip: int) -> Iterator[tuple[int, Any]]:
    """``enumerate(loader)`` from batch ``skip`` on. With a :class:`ResumableSampler` the skipped batches are
    never loaded (their indices are dropped); with any other sampler they are loaded and dropped."""
    sampler = loader.sampler
    if skip and isinstance(sampler, ResumableSampler) and loader.batch_size is not None:
        sampler.skip(skip * loader.batch_size)
        return enumerate(loader, start=skip)
    return itertools.islice(enumerate(loader), skip, None)


def build_loaders(
    train_ds: Dataset, val_ds: Dataset, batch_size: int, num_workers: int, seed: int, runtime: Runtime,
    presharded: bool = False,
) -> tuple[DataLoader, DataLoader, Sampler]:
    """Loaders with per-epoch deterministic shuffling; each rank gets its own shard under DDP.

    The validation shards are not padded (every volume is validated exactly once, whatever the number of
    processes). ``presharded``: the datasets already hold only this rank's share (cached data under DDP),
    so each rank just shuffles its own. The training loader's sampler is a :class:`ResumableSampler` around the
returned sampler (the one whose ``set_epoch`` the loop calls).
    """
    pin = runtime.device.type == "cuda"
    collate = None
    if runtime.distributed and not presharded:
        train_sampler: Sampler = DistributedSampler(train_ds, runtime.world_size, runtime.rank, shuffle=True, seed=seed)
        val_sampler: Sampler | None = UnpaddedSampler(val_ds, even_divisible=False, num_replicas=runtime.world_size,
                                                      rank=runtime.rank, shuffle=False)
    else:  # this process's data alone, reshuffled every epoch (set_epoch), the same order again on resume
        train_sampler = DistributedSampler(train_ds, num_replicas=1, rank=0, shuffle=True, seed=seed + runtime.rank)
        val_sampler = None
    if isinstance(train_ds, RandomizedVolumes):  # random patches / augmentation, seeded by (epoch, index)
        train_sampler = EpochTaggedSampler(train_sampler, len(train_ds))
        collate = list_data_collate if train_ds.patches else None  # a volume's patches join the batch
    train = make_loader(train_ds, batch_size, False, num_workers, seed, sampler=ResumableSampler(train_sampler),
                        pin_memory=pin, collate_fn=collate)
    val = make_loader(val_ds, batch_size, False, num_workers, seed, sampler=val_sampler, pin_memory=pin)
    return train, val, train_sampler


def node_processes(runtime: Runtime) -> int:
    """Training processes on this machine (torchrun's ``LOCAL_WORLD_SIZE``; else all of them)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", runtime.world_size))


def training_loaders(
    cfg: DataConfig, datasets: tuple[Dataset, Dataset], batch_size: int, seed: int, runtime: Runtime,
    in_channels: int = 1,
) -> tuple[DataLoader, DataLoader, Sampler]:
    """The autoencoder stage's loaders from ``build_datasets``' (train, val): the training volumes prepared once
    (``data.cache``), then cut into patches and augmented afresh on every read; ``data.num_workers`` workers
    (null: :func:`~monai_diffusion.data.datasets.default_workers`)."""
    train_ds, val_ds = datasets
    processes = node_processes(runtime)
    workers = default_workers(cfg.num_workers, processes, runtime.device.type)
    train_ds = cache_training_volumes(train_ds, cfg, in_channels, workers, processes)
    random_part = build_random_transform(cfg)
    if random_part is not None:  # patches and/or augmentation, drawn afresh every epoch
        train_ds = RandomizedVolumes(train_ds, random_part, seed + runtime.rank)
    presharded = runtime.distributed and cfg.cache is True and cfg.source == "nifti"
    return build_loaders(train_ds, val_ds, batch_size, workers, seed, runtime, presharded)
