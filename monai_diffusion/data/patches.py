"""Random patches and augmentation of the training volumes, drawn so that a resumed run draws the same ones.

Patch training cuts ``data.patches_per_volume`` patches of ``data.patch_size`` from every whole
preprocessed volume a batch reads (drawn as MONAI's ``RandWeightedCrop`` draws them): a share
``data.patch_random_fraction`` of them centred anywhere, the rest centred on foreground voxels (above
``data.foreground_threshold``), so few patches are air. The weights behind those draws are computed once
per volume (:class:`PatchWeightsd`, kept by the cache of ``cache.py``). Augmentation (``data.augmentation``:
MONAI's ``RandFlipd`` and ``RandAffined``) runs on the patches, or on the whole volumes when training on
whole volumes. A label map (``data.num_classes``) gets the same patches, flips and affines as its image
(nearest-neighbour), so the two stay voxel-aligned.

The random state of these transforms is set, item by item, from ``(seed, epoch, index)``: the loader's
sampler tags each index with its epoch (:class:`EpochTaggedSampler`), so the same patches come out in an
uninterrupted run, after a ``--resume``, and in DataLoader workers.
"""

from __future__ import annotations

import logging
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
    SpatialCrop,
)
from monai.transforms.utils_pytorch_numpy_unification import isfinite, searchsorted, unravel_index
from monai.utils import convert_to_dst_type, fall_back_tuple
from torch.utils.data import Dataset, Sampler

from monai_diffusion.config.schema import DataConfig
from monai_diffusion.data.keys import IMAGE_KEY, LABEL_KEY

__all__ = ["CDF_KEY", "ForegroundPatchesd", "PatchWeightsd", "build_patch_weights", "build_random_transform",
           "RandomizedVolumes", "EpochTaggedSampler"]


CDF_KEY = "patch_cdf"  # an item's cumulative patch-centre weights, computed once per volume (see ForegroundPatchesd)

log = logging.getLogger("monai_diffusion")


class ForegroundPatchesd(Randomizable, MapTransform):
    """``num_samples`` patches of ``spatial_size`` from ``data[key]`` (CxHxWxD): a share ``random_fraction``
    centred anywhere, the others on voxels whose channel mean exceeds ``threshold``. Returns a list of dicts
    (the other keys are shared, not copied). With several keys, the centres are drawn from the first key's
    volume and every key is cut at the same centres (e.g. an image and its label map).

    The centres are drawn as MONAI's ``RandWeightedCrop`` draws them (the same patches for the same random
    state), from the cumulative weights over the voxels where a whole patch fits. Those depend on the volume
    alone: an item that carries them under ``CDF_KEY`` (see :class:`PatchWeightsd`, run once per volume
    before the cache) is cut without looking at its weights again; otherwise they are computed here.
    """

    def __init__(self, key: str | list[str], spatial_size: tuple[int, ...], num_samples: int, random_fraction: float,
                 threshold: float) -> None:
        MapTransform.__init__(self, key)
        self.random_fraction, self.threshold = random_fraction, threshold
        self.spatial_size, self.num_samples = tuple(int(s) for s in spatial_size), int(num_samples)

    def randomize(self, data: Any = None) -> None:  # the centres are drawn in __call__
        pass

    def _say_no_foreground(self, name: str) -> None:
        """Warn once per volume (and process) that its patches fall back to uniform centres."""
        warned = self.__dict__.setdefault("_warned", set())
        if name not in warned:
            warned.add(name)
            log.warning("%s: no voxel above data.foreground_threshold = %g, so its patches are centred anywhere "
                        "(mostly background); lower data.foreground_threshold or check the volume's intensity "
                        "scaling", name, self.threshold)

    def weights(self, image: torch.Tensor) -> torch.Tensor:
        """Sampling weight of each voxel as a patch centre: a mixture of uniform and foreground-uniform."""
        foreground = (image.float().mean(0) > self.threshold).float()
        uniform = self.random_fraction / foreground.numel()
        if foreground.sum() == 0:
            return torch.full_like(foreground, 1.0 / foreground.numel())
        return uniform + (1.0 - self.random_fraction) * foreground / foreground.sum()

    def _window(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """The patch size (clipped to ``shape``) and the first valid centre of each axis."""
        size = np.asarray(fall_back_tuple(self.spatial_size, shape), dtype=int)
        return size, np.minimum(size, np.asarray(shape, dtype=int)) // 2

    def _valid(self, shape: tuple[int, ...]) -> tuple[slice, ...]:
        """The centres where a whole patch fits (the middle voxel on axes no longer than the patch)."""
        size, _ = self._window(shape)
        return tuple(slice(w // 2, m - w + w // 2) if m > w else slice(m // 2, m // 2 + 1)
                     for w, m in zip(size.tolist(), shape))

    def cumulative_weights(self, image: torch.Tensor, name: str = "a training volume") -> torch.Tensor:
        """The cumulative sum (1-D, float32) of the centre weights of ``image`` (CxHxWxD) over the valid
        centres, in C order: all that drawing centres needs, so it is computed once per volume (whose ``name``
        a warning gives when it has no foreground)."""
        image = torch.as_tensor(image)
        if self.random_fraction < 1 and not bool((image.float().mean(0) > self.threshold).any()):
            self._say_no_foreground(name)
        weights = self.weights(image)
        return torch.cumsum(weights[self._valid(tuple(weights.shape))].reshape(-1), 0)

    def centres(self, shape: tuple[int, ...], cdf: torch.Tensor) -> list[torch.Tensor]:
        """``num_samples`` patch centres in a volume of spatial ``shape``, drawn with ``self.R`` from ``cdf``."""
        valid = tuple(len(range(*s.indices(m))) for s, m in zip(self._valid(shape), shape))
        total = cdf[-1]
        if not total or not isfinite(total) or total < 0:  # nothing to favour: uniform
            index = self.R.randint(0, len(cdf), size=self.num_samples)
        else:
            draws = self.R.random(self.num_samples)
            index = searchsorted(cdf, convert_to_dst_type(draws, cdf, dtype=draws.dtype)[0] * total, right=True)
        index = convert_to_dst_type(index, cdf, dtype=torch.int)[0]
        offset = convert_to_dst_type(self._window(shape)[1], cdf)[0]
        return [unravel_index(i, valid) + offset for i in index]

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        rest = {k: v for k, v in data.items() if k != CDF_KEY}
        image = data[self.keys[0]]
        cdf = data.get(CDF_KEY)
        if cdf is None:
            cdf = self.cumulative_weights(image, str(data.get("path", "a training volume")))
        shape = tuple(int(s) for s in image.shape[1:])
        size = tuple(self._window(shape)[0].tolist())
        crops = [SpatialCrop(roi_center=centre, roi_size=size) for centre in self.centres(shape, cdf)]
        return [{**rest, **{key: crop(data[key]) for key in self.keys}} for crop in crops]


class PatchWeightsd(MapTransform):
    """Store the cumulative patch-centre weights of ``data[key]`` under ``CDF_KEY`` (deterministic: it runs
    once per volume, before the cache, so :class:`ForegroundPatchesd` does not recompute them per item)."""

    def __init__(self, key: str, patches: ForegroundPatchesd) -> None:
        super().__init__(key)
        self.patches = patches

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        name = str(data.get("path", "a training volume"))
        return {**data, CDF_KEY: self.patches.cumulative_weights(data[self.keys[0]], name)}


def _patches(cfg: DataConfig, keys: Any = IMAGE_KEY) -> ForegroundPatchesd:
    return ForegroundPatchesd(keys, tuple(cfg.patch_size), cfg.patches_per_volume, cfg.patch_random_fraction,
                              cfg.foreground_threshold)


def build_patch_weights(cfg: DataConfig) -> PatchWeightsd | None:
    """The once-per-volume part of patch cutting (None when ``cfg`` trains on whole volumes)."""
    return None if cfg.patch_size is None else PatchWeightsd(IMAGE_KEY, _patches(cfg))


def build_random_transform(cfg: DataConfig) -> Compose | None:
    """The random part of the training pipeline: patches (``cfg.patch_size``) and augmentation; None when
    neither is configured."""
    transforms: list[Any] = []
    keys = [IMAGE_KEY, LABEL_KEY] if cfg.num_classes is not None else [IMAGE_KEY]
    if cfg.patch_size is not None:
        transforms.append(_patches(cfg, keys))
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
