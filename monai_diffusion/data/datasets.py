"""Datasets and loaders for both data sources.

Every item is a dictionary of plain tensors (never MONAI ``MetaTensor``), so ``default_collate`` works::

    {"image": FloatTensor (C, H, W, D) in [0, 1], "path": "synthetic://<seed>/<i>" or the file,
     "affine": DoubleTensor (4, 4) voxel -> world (RAS, mm)}
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, partition_dataset
from monai.data import Dataset as MonaiDataset
from monai.transforms import Compose
from torch.utils.data import DataLoader, Dataset, Sampler

from monai_diffusion.config.schema import DataConfig
from monai_diffusion.data.datalist import ROW_KEY, is_datalist, read_datalist
from monai_diffusion.data.files import file_identity, find_nifti_files, split_files
from monai_diffusion.data.keys import IMAGE_KEY, LABEL_KEY, PATH_KEY
from monai_diffusion.data.phantoms import SyntheticPhantomDataset
from monai_diffusion.data.transforms import build_nifti_transforms, check_header, check_label_header
from monai_diffusion.errors import ConfigError, DataError
from monai_diffusion.profiling import physical_memory_bytes

__all__ = ["build_datasets", "build_file_dataset", "make_loader", "model_input", "default_workers", "MAX_WORKERS"]

MAX_WORKERS = 8  # data.num_workers: null uses the available cores, at most this many DataLoader workers


def default_workers(configured: int | None, processes: int = 1, device: str = "cuda") -> int:
    """DataLoader workers: ``configured`` (``data.num_workers``) when set; else, feeding an accelerator
    (``device`` not ``cpu``), the CPU cores this process may use, shared among the ``processes`` training
    processes of a node, at most :data:`MAX_WORKERS`; on the CPU, 0 (the training step uses every core
    itself, and worker processes would only compete with it)."""
    if configured is not None:
        return int(configured)
    if device == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores // max(1, processes), MAX_WORKERS))


def _nifti_dataset(files: Sequence[Path | dict[str, Any]], transform: Compose, cfg: DataConfig) -> MonaiDataset:
    """Files (or datalist items: ``image`` and covariates) through ``transform``; the covariates pass through."""
    items = [{**f, PATH_KEY: str(f[IMAGE_KEY])} if isinstance(f, dict) else {IMAGE_KEY: str(f), PATH_KEY: str(f)}
             for f in files]
    if cfg.cache is True:  # items are never changed in place, so they are handed out without a copy
        return CacheDataset(items, transform, num_workers=max(1, default_workers(cfg.num_workers)), progress=False,
                            copy_cache=False)
    return MonaiDataset(items, transform)


def item_covariates(dataset: Dataset, index: int) -> dict[str, Any]:
    """Item ``index``'s covariates and where it came from, without reading its image: a datalist row (the
    MONAI dataset's input dict) or a phantom's ``cavity`` and ``size``."""
    if hasattr(dataset, "covariates"):  # phantoms
        return dataset.covariates(index)
    item = dict(dataset.data[index])
    item.pop(IMAGE_KEY, None)
    item.pop(LABEL_KEY, None)
    return item


def build_file_dataset(cfg: DataConfig, paths: str | list[str], in_channels: int = 1, key: str = "--data") -> Dataset:
    """Every NIfTI file of ``paths`` (folder, glob or list), preprocessed like ``cfg``'s NIfTI pipeline.

    Used to evaluate a trained model on data other than its own validation split.

    Raises:
        DataError: naming ``key`` for missing paths, and the file for unreadable ones.
    """
    files = find_nifti_files(paths, key)
    for path in files:
        check_header(path, in_channels, cfg.spacing)
    return _nifti_dataset(files, build_nifti_transforms(cfg, in_channels), cfg)


def model_input(images: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """What the network sees of a batch of volumes: 2D configs take the centre slice along the last axis.

    Args:
        images: BxCxHxWxD (or already BxCxHxW).
        spatial_dims: the network's spatial dimensions.
    """
    if spatial_dims == 2 and images.dim() == 5:
        return images[..., images.shape[-1] // 2]
    return images


def _check_volume_fits(cfg: DataConfig, in_channels: int) -> None:
    """Refuse a ``data.image_size`` whose one volume cannot fit in this machine's memory (as float64, the
    phantoms' working precision), before anything is generated or loaded."""
    needed = math.prod(cfg.image_size) * in_channels * 8
    memory = physical_memory_bytes()
    if needed > memory:
        raise ConfigError(f"data.image_size: one volume of {' x '.join(map(str, cfg.image_size))} voxels needs "
                          f"{needed / 1e9:.3g} GB, more than this machine's {memory / 1e9:.3g} GB; choose a smaller "
                          f"data.image_size (ldm-estimate-memory estimates what a training step needs)")


def build_datasets(
    cfg: DataConfig, seed: int, in_channels: int = 1, shard: tuple[int, int] | None = None
) -> tuple[Dataset, Dataset]:
    """Build the training and validation datasets.

    Synthetic: two :class:`SyntheticPhantomDataset` (validation uses seed ``seed + 1``).
    NIfTI: files from ``cfg.paths`` split by :func:`split_files`; every file's header
    is checked up front, voxel data is checked when loaded.

    Args:
        cfg: Data config.
        seed: Seed for phantom generation / file split.
        in_channels: Channels of every volume.
        shard: ``(rank, world_size)`` under DDP. With ``cfg.cache: true``, each process then caches only its own
            fixed share of the NIfTI files (MONAI's pattern: ``partition_dataset``, shuffled once with
            ``seed``; the training shares are padded to equal length, the validation shares are not),
            instead of every process caching the whole dataset.

    Returns:
        (train, val) datasets; items are ``{"image": FloatTensor (in_channels, H, W, D),
        "path": str, "affine": DoubleTensor (4, 4)}``.

    Raises:
        DataError: On a bad config value, path or file.
    """
    _check_volume_fits(cfg, in_channels)
    if cfg.source == "synthetic":
        labels = cfg.num_classes is not None
        train = SyntheticPhantomDataset(cfg.num_train, cfg.image_size, seed, in_channels, cfg.phantom_covariates,
                                        labels, cfg.phantom_organs)
        val = SyntheticPhantomDataset(cfg.num_val, cfg.image_size, seed + 1, in_channels, cfg.phantom_covariates,
                                      labels, cfg.phantom_organs)
        return train, val
    if is_datalist(cfg.paths):
        train_files, val_files = _datalist_split(cfg, seed, in_channels)
        return _build_nifti(cfg, train_files, val_files, seed, in_channels, shard)
    files = find_nifti_files(cfg.paths, "data.paths")
    for path in files:
        check_header(path, in_channels, cfg.spacing)
    train_files, val_files = split_files(files, cfg.val_fraction, seed)
    return _build_nifti(cfg, train_files, val_files, seed, in_channels, shard)


def _datalist_split(cfg: DataConfig, seed: int, in_channels: int) -> tuple[list[dict], list[dict]]:
    """A datalist's items, each file once, split as the file says (no file in both sets), else by
    ``val_fraction`` like files in a folder."""
    training, validation = read_datalist(cfg.paths, labels=cfg.num_classes is not None)
    by_file = {file_identity(Path(item[IMAGE_KEY])): item for item in reversed(training)}  # the first row wins
    training = [item for item in training if by_file.get(file_identity(Path(item[IMAGE_KEY]))) is item]
    for item in training + (validation or []):
        check_header(Path(item[IMAGE_KEY]), in_channels, cfg.spacing)
        if cfg.num_classes is not None:
            check_label_header(Path(item[LABEL_KEY]), Path(item[IMAGE_KEY]))
    if validation is None:
        paths = {item[IMAGE_KEY]: item for item in training}
        train_paths, val_paths = split_files([Path(p) for p in paths], cfg.val_fraction, seed)
        return [paths[str(p)] for p in train_paths], [paths[str(p)] for p in val_paths]
    for item in validation:
        twin = by_file.get(file_identity(Path(item[IMAGE_KEY])))
        if twin is not None:
            raise DataError(f"data.paths: {item[ROW_KEY]} and {twin[ROW_KEY]} name the same file {item[IMAGE_KEY]}; "
                            f"a file is never in both training and validation")
    return training, validation


def _build_nifti(cfg: DataConfig, train_files: list, val_files: list, seed: int, in_channels: int,
                 shard: tuple[int, int] | None) -> tuple[Dataset, Dataset]:
    if cfg.cache is True and shard is not None and shard[1] > 1:
        rank, world = shard
        train_files = partition_dataset(train_files, num_partitions=world, shuffle=True, seed=seed,
                                        even_divisible=True)[rank]
        val_files = partition_dataset(val_files, num_partitions=world)[rank]
    transform = build_nifti_transforms(cfg, in_channels)
    return _nifti_dataset(train_files, transform, cfg), _nifti_dataset(val_files, transform, cfg)


def make_loader(
    ds: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int,
    sampler: Sampler | None = None,
    pin_memory: bool = False,
    collate_fn: Any = None,
) -> DataLoader:
    """Wrap a dataset in a seeded DataLoader.

    Args:
        ds: Dataset of dict items.
        batch_size: Items per batch (>= 1).
        shuffle: Shuffle each epoch (ignored when ``sampler`` is given).
        num_workers: Worker processes (0 = main process).
        seed: Seed of the loader's torch.Generator (shuffle order).
        sampler: Optional sampler (e.g. DistributedSampler); replaces ``shuffle``.
        pin_memory: page-locked batches, so copies to a GPU with ``non_blocking=True`` overlap compute.
        collate_fn: how items become a batch (default: ``default_collate``).

    Returns:
        DataLoader yielding ``{"image": (B, C, H, W, D), "path": list[str], ...}``.
    """
    generator = torch.Generator()
    generator.manual_seed(int(seed) % 2**63)
    kwargs: dict[str, Any] = {
        "batch_size": batch_size,
        "num_workers": num_workers,
        "generator": generator,
        "persistent_workers": num_workers > 0,
        "pin_memory": pin_memory,
    }
    if collate_fn is not None:
        kwargs["collate_fn"] = collate_fn
    if sampler is not None:
        kwargs["sampler"] = sampler
    else:
        kwargs["shuffle"] = shuffle
    return DataLoader(ds, **kwargs)
