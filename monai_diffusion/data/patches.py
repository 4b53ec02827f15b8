"""Random patches and augmentation of the training volumes, drawn so that a resumed run draws the same ones.

Patch training cuts ``data.patches_per_volume`` patches of ``data.patch_size`` from every whole
preprocessed volume a batch reads (MONAI's ``RandWeightedCrop``): a share ``data.patch_random_fraction``
of them centred anywhere, the rest centred on foreground voxels (above ``data.foreground_threshold``), so
few patches are air. Augmentation (``data.augmentation``: MONAI's ``RandFlipd`` and ``RandAffined``) runs
on the patches, or on the whole volumes when training on whole volumes. A label map (``data.num_classes``)
gets the same patches, flips and affines as its image (nearest-neighbour), so the two stay voxel-aligned.

The random state of these transforms is set, item by item, from ``(seed, epoch, index)``: the loader's
sampler tags each index with its epoch (:class:`EpochTaggedSampler`), so the same patches come out in an
uninterrupted run, after a ``--resume``, and in DataLoader workers.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandAffined,
    RandFlipd,
    Randomizable,
    RandWeightedCrop,
)
from torch.utils.data import Dataset, Sampler

from monai_diffusion.config.schema import DataConfig
from monai_diffusion.data.keys import IMAGE_KEY, LABEL_KEY

__all__ = ["ForegroundPatchesd", "build_random_transform", "RandomizedVolumes", "EpochTaggedSampler"]


class ForegroundPatchesd(Randomizable, MapTransform):
    """``num_samples`` patches of ``spatial_size`` from ``data[key]`` (CxHxWxD): a share ``random_fraction``
    centred anywhere, the others on voxels whose channel mean exceeds ``threshold``. Returns a list of dicts
    (the other keys are shared, not copied). With several keys, the centres are drawn from the first key's
    volume and every key is cut at the same centres (e.g. an image and its label map)."""

    def __init__(self, key: str | list[str], spatial_size: tuple[int, ...], num_samples: int, random_fraction: float,
                 threshold: float) -> None:
        MapTransform.__init__(self, key)
        self.random_fraction, self.threshold = random_fraction, threshold
        self.cropper = RandWeightedCrop(spatial_size=spatial_size, num_samples=num_samples)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.cropper.set_random_state(state=self.R)
        return self

    def randomize(self, data: Any = None) -> None:  # the cropper draws the centres
        pass

    def weights(self, image: torch.Tensor) -> torch.Tensor:
        """Sampling weight of each voxel as a patch centre: a mixture of uniform and foreground-uniform."""
        foreground = (image.float().mean(0) > self.threshold).float()
        uniform = self.random_fraction / foreground.numel()
        if foreground.sum() == 0:
            return torch.full_like(foreground, 1.0 / foreground.numel())
        return uniform + (1.0 - self.random_fraction) * foreground / foreground.sum()

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        image = data[self.keys[0]]
        self.cropper.randomize(self.weights(torch.as_tensor(image))[None])
        cut = {key: self.cropper(data[key], randomize=False) for key in self.keys}
        return [{**data, **{key: cut[key][i] for key in self.keys}} for i in range(len(cut[self.keys[0]]))]


def build_random_transform(cfg: DataConfig) -> Compose | None:
    """The random part of the training pipeline: patches (``cfg.patch_size``) and augmentation; None when
    neither is configured."""
    transforms: list[Any] = []
    keys = [IMAGE_KEY, LABEL_KEY] if cfg.num_classes is not None else [IMAGE_KEY]
    if cfg.patch_size is not None:
        transforms.append(ForegroundPatchesd(keys, tuple(cfg.patch_size), cfg.patches_per_volume,
                                             cfg.patch_random_fraction, cfg.foreground_threshold))
    aug = cfg.augmentation
    if aug.flip_prob > 0:
        transforms += [RandFlipd(keys, prob=aug.flip_prob, spatial_axis=axis) for axis in range(3)]
    if aug.affine_prob > 0:
        angle = math.radians(aug.rotate_degrees)
        transforms.append(RandAffined(keys, prob=aug.affine_prob, rotate_range=(angle,) * 3,
                                      scale_range=(aug.scale_range,) * 3, mode=["bilinear", "nearest"][: len(keys)],
                                      padding_mode="border"))
    if not transforms:
        return None
    transforms.append(EnsureTyped(keys, data_type="tensor", dtype=torch.float32, track_meta=False))
    return Compose(transforms)


class RandomizedVolumes(Dataset):
    """``volumes`` with ``transform`` (random patches and/or augmentation) applied, seeded per item.

    Indices are epoch-tagged (``epoch * len(volumes) + index``, see :class:`EpochTaggedSampler`); an item
    is a list of patch dicts when ``transform`` cuts patches (collate with ``monai.data.list_data_collate``),
    else one dict.
    """

    def __init__(self, volumes: Dataset, transform: Compose, seed: int) -> None:
        self.volumes, self.transform, self.seed = volumes, transform, int(seed)
        self.patches = any(isinstance(t, ForegroundPatchesd) for t in transform.transforms)

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, tagged: int) -> Any:
        epoch, index = divmod(int(tagged), len(self.volumes))
        self.transform.set_random_state(seed=((self.seed * 1_000_003 + epoch) * 1_000_003 + index) % 2**32)
        return self.transform(dict(self.volumes[index]))


class EpochTaggedSampler(Sampler[int]):
    """Yields ``epoch * size + index`` for the indices of ``sampler``, so a dataset (also in a DataLoader
    worker) knows the epoch of each item; ``set_epoch`` reaches the wrapped sampler."""

    def __init__(self, sampler: Sampler[int], size: int) -> None:
        self.sampler, self.size, self.epoch = sampler, size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return (self.epoch * self.size + int(index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)
