"""Feeding the training loop: the volume cache (memory / files), patch weights once per volume, default
workers, resuming in mid-epoch without loading the skipped batches, and the latent cache through a
DataLoader."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from monai.transforms import RandWeightedCrop

from generative.networks.nets import AutoencoderKL
from monai_diffusion.config import load_config
from monai_diffusion.config.schema import DataConfig
from monai_diffusion.data import build_datasets, default_workers
from monai_diffusion.data.cache import CachedVolumes, cache_mode, cache_training_volumes, preprocessing_key
from monai_diffusion.data.loaders import ResumableSampler, batches_from, build_loaders, training_loaders
from monai_diffusion.data.patches import (
    CDF_KEY,
    ForegroundPatchesd,
    RandomizedVolumes,
    build_patch_weights,
    build_random_transform,
)
from monai_diffusion.data.phantoms import SyntheticPhantomDataset
from monai_diffusion.errors import DataError
from monai_diffusion.generation.latents import encode_latents
from monai_diffusion.runtime import Runtime
from tests.helpers import CONFIG, write_scans

CPU = Runtime(torch.device("cpu"))


class Counting(torch.utils.data.Dataset):
    """``volumes`` that records every index read (in this process)."""

    def __init__(self, volumes) -> None:
        self.volumes, self.reads = volumes, []
        self.data = getattr(volumes, "data", None)
        if self.data is None:
            del self.data
            self.seed = volumes.seed

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int):
        self.reads.append(int(index))
        return self.volumes[index]


def _nifti(tmp_path: Path, **kw) -> tuple[DataConfig, torch.utils.data.Dataset]:
    folder = write_scans(tmp_path / "scans", (12, 10, 8), (1.0, 1.0, 2.0), count=4)
    cfg = DataConfig(source="nifti", paths=str(folder), image_size=(8, 8, 8), val_fraction=0.25, **kw)
    return cfg, build_datasets(cfg, seed=0)[0]


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_file_cache_hit_equals_a_fresh_load_and_misses_on_changes(tmp_path: Path) -> None:
    cfg, volumes = _nifti(tmp_path, patch_size=(4, 4, 4))
    counted, key = Counting(volumes), preprocessing_key(cfg, 1)
    weights = build_patch_weights(cfg)
    first = CachedVolumes(counted, weights, "files", key, tmp_path / "cache")
    fresh = [first[i] for i in range(len(first))]  # prepared and written
    assert counted.reads == [0, 1, 2] and len(list((tmp_path / "cache").glob("*.pt"))) == 3
    again = CachedVolumes(counted, weights, "files", key, tmp_path / "cache")  # e.g. the next run
    for i in range(len(again)):
        _same(again[i], fresh[i])
        _same(again[i], weights(dict(volumes[i])))  # what a fresh load and preparation gives
    assert counted.reads == [0, 1, 2]  # all hits: nothing loaded again
    assert CDF_KEY in fresh[0] and fresh[0]["image"].shape == (1, 8, 8, 8)

    # a changed preprocessing setting misses (and so does a changed patch setting, which changes the weights)
    for change in ({"intensity_window": (0.0, 1.0)}, {"foreground_threshold": 0.5}, {"image_size": (8, 8, 4)},
                   {"phantom_organs": "typed"}):
        other = preprocessing_key(dataclasses.replace(cfg, **change), 1)
        assert other != key
        assert CachedVolumes(counted, weights, "files", other, tmp_path / "cache").file_of(0) != first.file_of(0)
    # an edited file (new modification time) misses
    path, before = Path(volumes.data[0]["path"]), [first.file_of(i) for i in range(2)]
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert again.file_of(0) != before[0] and again.file_of(1) == before[1]
    again[0]
    assert counted.reads == [0, 1, 2, 0]


def test_a_damaged_cache_file_is_prepared_again(tmp_path: Path) -> None:
    cfg, volumes = _nifti(tmp_path)
    counted = Counting(volumes)
    cache = CachedVolumes(counted, None, "files", preprocessing_key(cfg, 1), tmp_path / "cache")
    expected = cache[1]
    cache.file_of(1).write_bytes(b"not a torch file")
    _same(cache[1], expected)
    assert counted.reads == [1, 1]


def test_memory_cache_loads_each_volume_once_and_the_budget_chooses_files(tmp_path: Path) -> None:
    cfg, volumes = _nifti(tmp_path)
    counted = Counting(volumes)
    cache = cache_training_volumes(counted, cfg, 1, workers=0)
    assert cache.mode == "memory" and counted.reads == [0, 1, 2]
    for _ in range(3):
        for i in range(len(cache)):
            _same(cache[i], volumes[i])
    assert counted.reads == [0, 1, 2]
    one = 8 * 8 * 8 * 4  # bytes of one float32 volume
    assert cache_mode(dataclasses.replace(cfg, cache_memory_gb=3 * one / 1e9), 3, 1) == "memory"
    assert cache_mode(dataclasses.replace(cfg, cache_memory_gb=3 * one / 1e9), 3, 1, processes=2) == "files"
    assert cache_mode(dataclasses.replace(cfg, cache_memory_gb=0.0), 3, 1) == "files"
    assert cache_mode(dataclasses.replace(cfg, cache=False), 3, 1) == "none"
    assert cache_mode(dataclasses.replace(cfg, cache=True, cache_memory_gb=0.0), 3, 1) == "memory"
    # the memory cache filled by DataLoader workers holds the same volumes
    filled = cache_training_volumes(volumes, cfg, 1, workers=2)
    for i in range(len(filled)):
        _same(filled[i], volumes[i])


def test_unwritable_cache_dir_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg, volumes = _nifti(tmp_path, cache_memory_gb=0.0, cache_dir=str(blocker / "cache"))
    with pytest.raises(DataError, match=r"^data\.cache_dir: cannot create the cache folder .*file/cache"):
        cache_training_volumes(volumes, cfg, 1, workers=0)


def test_patches_are_monai_weighted_crops_with_weights_once_per_volume(monkeypatch) -> None:
    cfg = DataConfig(image_size=(24, 24, 16), patch_size=(8, 8, 8), num_train=3)
    volumes = SyntheticPhantomDataset(3, cfg.image_size, seed=1)
    # the same patches as MONAI's RandWeightedCrop for the same random state
    patches = ForegroundPatchesd("image", cfg.patch_size, 4, cfg.patch_random_fraction, cfg.foreground_threshold)
    image = volumes[0]["image"]
    reference = RandWeightedCrop(spatial_size=cfg.patch_size, num_samples=4).set_random_state(seed=3)
    expected = reference(image, weight_map=patches.weights(image)[None])
    for ours, theirs in zip(patches.set_random_state(seed=3)({"image": image}), expected):
        assert torch.equal(ours["image"], torch.as_tensor(theirs))

    calls = []
    original = ForegroundPatchesd.weights
    monkeypatch.setattr(ForegroundPatchesd, "weights", lambda self, im: calls.append(1) or original(self, im))

    def epochs(cache) -> list[torch.Tensor]:
        calls.clear()
        loaders = training_loaders(dataclasses.replace(cfg, cache=cache, num_workers=0), (volumes, volumes), 1, 0,
                                   CPU)
        out = []
        for epoch in range(3):
            loaders[2].set_epoch(epoch)
            out += [batch["image"] for batch in loaders[0]]
        return out

    cached = epochs("auto")
    assert len(calls) == len(volumes)  # once per volume, for 3 epochs
    assert all(b.shape == (cfg.patches_per_volume, 1, 8, 8, 8) for b in cached)
    uncached = epochs(False)
    assert len(calls) == 3 * len(volumes)  # uncached: once per read
    for a, b in zip(cached, uncached):  # the same patches either way
        assert torch.equal(a, b)


def test_several_patches_per_loaded_volume_by_default() -> None:
    cfg = DataConfig(image_size=(16, 16, 16), patch_size=(8, 8, 8))
    assert cfg.patches_per_volume >= 2
    counted = Counting(SyntheticPhantomDataset(2, cfg.image_size, seed=0))
    item = RandomizedVolumes(counted, build_random_transform(cfg), seed=0)[0]
    assert len(item) == cfg.patches_per_volume and counted.reads == [0]


def test_workers_default_to_the_cores_capped(monkeypatch) -> None:
    assert DataConfig().num_workers is None and load_config(CONFIG).data.num_workers is None
    for cores, processes, expected in ((2, 1, 2), (16, 1, 8), (64, 1, 8), (16, 4, 4), (1, 2, 1)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert default_workers(None, processes, "cuda") == expected
        assert default_workers(None, processes, "cpu") == 0  # CPU training: the step uses the cores
        assert default_workers(0, processes, "cuda") == 0 and default_workers(3, processes, "cpu") == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    volumes = SyntheticPhantomDataset(2, (8, 8, 8), seed=0)
    cuda = Runtime(torch.device("cuda", 0))  # feeding a GPU (no tensor is put on it here)
    train, val, _ = training_loaders(DataConfig(image_size=(8, 8, 8)), (volumes, volumes), 1, 0, cuda)
    assert train.num_workers == val.num_workers == 3 and train.pin_memory
    train, val, _ = training_loaders(DataConfig(image_size=(8, 8, 8)), (volumes, volumes), 1, 0, CPU)
    assert train.num_workers == val.num_workers == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_skips_batches_without_loading_them(workers: int) -> None:
    cfg = DataConfig(image_size=(16, 16, 16), patch_size=(8, 8, 8), patches_per_volume=2,
                     augmentation=DataConfig().augmentation.__class__(flip_prob=0.5))
    counted = Counting(SyntheticPhantomDataset(7, cfg.image_size, seed=2))
    dataset = RandomizedVolumes(counted, build_random_transform(cfg), seed=5)

    def epoch(skip: int) -> tuple[list[int], list[torch.Tensor]]:
        loader, _, sampler = build_loaders(dataset, [], 2, workers, 0, CPU)
        assert isinstance(loader.sampler, ResumableSampler) and len(loader) == 4
        sampler.set_epoch(1)
        counted.reads.clear()
        batches = list(batches_from(loader, skip))
        return [index for index, _ in batches], [batch["image"] for _, batch in batches]

    indices, full = epoch(0)
    order = list(counted.reads)
    resumed_indices, resumed = epoch(3)
    assert indices == [0, 1, 2, 3] and resumed_indices == [3]
    if workers == 0:  # reads in a worker are not seen here
        assert len(order) == 7 and counted.reads == order[6:]  # only batch 3 (the 7th volume) is loaded
    assert torch.equal(resumed[0], full[3])  # bit-exact: the same patches and flips
    # a plain loader still skips (loading and dropping)
    plain = torch.utils.data.DataLoader(list(range(10)), batch_size=3)
    assert [i for i, _ in batches_from(plain, 2)] == [2, 3]


def test_latents_through_a_dataloader_equal_a_serial_encode() -> None:
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, num_channels=(4, 4),
                                attention_levels=(False, False), latent_channels=2, num_res_blocks=1,
                                norm_num_groups=2).eval()
    volumes = SyntheticPhantomDataset(5, (16, 16, 16), seed=4)
    indices = [4, 0, 3, 1, 2]
    with torch.no_grad():  # the old serial path: read each batch's volumes in this process, in order
        serial = [autoencoder.encode(torch.stack([volumes[i]["image"] for i in indices[s:s + 2]]))
                  for s in range(0, len(indices), 2)]
    z_mu, z_sigma = encode_latents(autoencoder, volumes, indices, 2, torch.device("cpu"), "test", num_workers=2)
    assert torch.equal(z_mu, torch.cat([mu for mu, _ in serial]))
    assert torch.equal(z_sigma, torch.cat([sigma for _, sigma in serial]))
