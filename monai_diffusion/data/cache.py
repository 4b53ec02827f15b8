"""The training volumes, loaded and preprocessed once: in memory when they fit, else as preprocessed files.

``data.cache: auto`` (the default) puts :class:`CachedVolumes` between the deterministic preprocessing
(loading, orientation, spacing, intensity scaling, pad/crop; plus the patch-centre weights of patch
training, :class:`~monai_diffusion.data.patches.PatchWeightsd`) and the random part (patches and
augmentation, which still run afresh on every read, so they are unchanged):

* ``memory``: every training volume is prepared once when training starts (by the DataLoader workers, in
  parallel) and kept in the main process; the workers, forked afterwards, read the same memory. Chosen when
  all training volumes (over the processes of a node) fit ``data.cache_memory_gb`` (default: a quarter of
  this machine's memory).
* ``files``: else each volume is prepared the first time it is read, by whichever process reads it, and
  written atomically (a kill never leaves half a file) to ``data.cache_dir`` as one ``.pt`` file; later reads,
  later epochs and later runs load that file. The file name is a hash of the volume's real path, size and
  modification time and of the preprocessing settings (:func:`preprocessing_key`), so an edited file or a
  changed setting never reuses a stale entry. Old entries are never deleted: remove the folder to reclaim
  the space.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from monai_diffusion.config.schema import DataConfig
from monai_diffusion.data.keys import PATH_KEY
from monai_diffusion.data.patches import build_patch_weights
from monai_diffusion.errors import DataError
from monai_diffusion.profiling import physical_memory_bytes
from monai_diffusion.runs.atomic import atomic_write

__all__ = ["CACHE_VERSION", "CachedVolumes", "cache_mode", "cache_training_volumes", "default_cache_dir",
           "preprocessing_key", "memory_budget_bytes"]

log = logging.getLogger("monai_diffusion")

CACHE_VERSION = 1  # raise when the preprocessing code changes what it makes of the same settings
MEMORY_SHARE = 4  # without data.cache_memory_gb, the cache may hold 1 / MEMORY_SHARE of this machine's memory
CacheMode = Literal["memory", "files", "none"]


def preprocessing_key(cfg: DataConfig, in_channels: int) -> str:
    """Every setting that changes a prepared volume (for the same file), as one canonical string."""
    settings = {"version": CACHE_VERSION, "in_channels": in_channels, "source": cfg.source,
                "image_size": cfg.image_size, "spacing": cfg.spacing,
                "intensity_percentiles": cfg.intensity_percentiles, "intensity_window": cfg.intensity_window,
                "phantom_covariates": cfg.phantom_covariates, "phantom_organs": cfg.phantom_organs,
                "patch_size": cfg.patch_size}
    if cfg.patch_size is not None:  # the patch-centre weights are part of a prepared volume
        settings.update(patch_random_fraction=cfg.patch_random_fraction,
                        foreground_threshold=cfg.foreground_threshold)
    return json.dumps(settings, sort_keys=True)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/monai_diffusion/volumes`` (``~/.cache/monai_diffusion/volumes``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "monai_diffusion" / "volumes"


def memory_budget_bytes(cfg: DataConfig) -> float:
    """What the ``auto`` cache may hold in memory (bytes), over all processes of a node."""
    if cfg.cache_memory_gb is not None:
        return cfg.cache_memory_gb * 1e9
    return physical_memory_bytes() / MEMORY_SHARE


def prepared_bytes(cfg: DataConfig, in_channels: int) -> int:
    """Bytes of one prepared volume: the float32 image at ``cfg.image_size`` and, for patch training, its
    float32 cumulative centre weights (at most one per voxel)."""
    voxels = math.prod(cfg.image_size)
    return 4 * voxels * in_channels + (4 * voxels if cfg.patch_size is not None else 0)


def cache_mode(cfg: DataConfig, count: int, in_channels: int, processes: int = 1) -> CacheMode:
    """Where ``count`` training volumes are kept: ``memory`` when ``processes`` copies fit the budget (and
    always for ``cache: true``, whose volumes are in memory already), ``files`` beyond it, ``none`` for
    ``cache: false``."""
    if cfg.cache is False:
        return "none"
    if cfg.cache is True:
        return "memory"
    needed = count * prepared_bytes(cfg, in_channels) * processes
    return "memory" if needed <= memory_budget_bytes(cfg) else "files"


def _volume_identity(name: str) -> dict[str, Any]:
    """A file by its real path, size and modification time; a phantom (``synthetic://<seed>/<i>``) by name."""
    path = Path(name)
    if not path.is_file():
        return {"name": name}
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _item_name(volumes: Dataset, index: int) -> str:
    """Which volume item ``index`` is, without reading it: the file (MONAI datasets) or the phantom."""
    if hasattr(volumes, "data"):
        return str(volumes.data[index][PATH_KEY])
    return f"synthetic://{volumes.seed}/{index}"


class _Prepared(Dataset):
    """``volumes[i]`` through ``prepare``: what the cache keeps."""

    def __init__(self, volumes: Dataset, prepare: Callable[[dict], dict] | None) -> None:
        self.volumes, self.prepare = volumes, prepare

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.volumes[index])
        return self.prepare(item) if self.prepare is not None else item


def _own(item: dict[str, Any]) -> dict[str, Any]:
    """The item with tensors in this process's own memory (not one shared-memory segment per tensor, as
    they come from a DataLoader worker)."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in item.items()}


class CachedVolumes(Dataset):
    """``volumes`` prepared once (see the module docstring); items are those of ``volumes`` plus what
    ``prepare`` adds.

    Args:
        volumes: the deterministic, preprocessed training volumes (MONAI ``Dataset`` of files, or phantoms).
        prepare: deterministic per-volume work kept with the volume (e.g. the patch-centre weights).
        mode: ``memory``, ``files`` or ``none`` (prepare on every read).
        key: :func:`preprocessing_key` of the settings behind ``volumes`` and ``prepare`` (``files`` mode).
        folder: where ``files`` mode keeps its files.
        workers: DataLoader workers that fill the ``memory`` cache (0: this process).
    """

    def __init__(self, volumes: Dataset, prepare: Callable[[dict], dict] | None, mode: CacheMode, key: str = "",
                 folder: Path | None = None, workers: int = 0) -> None:
        self.prepared, self.mode, self.key = _Prepared(volumes, prepare), mode, key
        self.folder = Path(folder) if folder is not None else default_cache_dir()
        self.items: list[dict[str, Any]] | None = None
        if mode == "memory":
            self.items = self._fill(workers)
        elif mode == "files":
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise DataError(f"data.cache_dir: cannot create the cache folder {self.folder} ({err}); set "
                                f"data.cache_dir to a writable folder, or data.cache: false") from None

    def __len__(self) -> int:
        return len(self.prepared)

    def _fill(self, workers: int) -> list[dict[str, Any]]:
        loader = DataLoader(self.prepared, batch_size=None, num_workers=workers)  # in order
        items = tqdm(loader, total=len(self), desc="caching the training volumes", leave=False)
        return [_own(item) for item in items] if workers else list(items)

    def file_of(self, index: int) -> Path:
        """The cache file of item ``index``: a hash of the volume's identity and the preprocessing key."""
        identity = {"volume": _volume_identity(_item_name(self.prepared.volumes, index)), "preprocessing": self.key}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        return self.folder / f"{digest[:32]}.pt"

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.items is not None:
            return dict(self.items[index])
        if self.mode == "none":
            return self.prepared[index]
        path = self.file_of(index)
        item = _read(path)
        if item is None:
            item = self.prepared[index]
            try:
                atomic_write(path, lambda handle: torch.save(item, handle))
            except OSError as err:  # e.g. a full disk: train on, uncached
                log.warning("volume cache: cannot write %s (%s); this volume is not cached", path, err)
        return item


def _read(path: Path) -> dict[str, Any] | None:
    """A cache file's item; None when it is missing, or unreadable (then it is prepared and written again)."""
    if not path.is_file():
        return None
    try:
        item = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - damaged bytes make the unpickler raise almost anything; the cache is rebuilt
        log.warning("volume cache: %s is unreadable (%s); preparing the volume again", path, type(err).__name__)
        return None
    return item if isinstance(item, dict) else None


def cache_training_volumes(volumes: Dataset, cfg: DataConfig, in_channels: int, workers: int,
                           processes: int = 1) -> CachedVolumes:
    """The training volumes as the training loader reads them: prepared once (``cfg.cache``, see
    :func:`cache_mode`), with the patch-centre weights computed once per volume when training on patches.

    Args:
        volumes: the preprocessed training volumes (from ``build_datasets``).
        cfg: the data config.
        in_channels: channels of each volume.
        workers: DataLoader workers that fill a memory cache.
        processes: training processes on this node (each keeps its own memory cache).
    """
    mode = cache_mode(cfg, len(volumes), in_channels, processes)
    folder = Path(cfg.cache_dir).expanduser() if cfg.cache_dir is not None else None
    # cache: true holds the volumes in memory already (shared, not copied): only the weights are added
    fill = workers if cfg.cache == "auto" else 0
    cached = CachedVolumes(volumes, build_patch_weights(cfg), mode, preprocessing_key(cfg, in_channels), folder,
                           fill)
    if mode == "files":
        log.info("volume cache: %d training volumes beyond the %.3g GB memory budget; preprocessed files in %s",
                 len(volumes), memory_budget_bytes(cfg) / 1e9, cached.folder)
    return cached
