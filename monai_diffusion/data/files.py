"""Finding NIfTI files (a folder, a glob or a list) and splitting them into training and validation sets.

Each file is taken once, by what it really is (a symlink, a hard link, a symlink loop reached by a recursive
glob, or a list naming a file twice does not repeat it), so no file is ever in both the training and the
validation set.
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai_diffusion.data.phantoms import seeded_rng
from monai_diffusion.errors import DataError

__all__ = ["find_nifti_files", "split_files", "is_nifti", "data_pattern_covers", "file_identity", "NIFTI_SUFFIXES"]

log = logging.getLogger("monai_diffusion")

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_GLOB_CHARS = frozenset("*?[")


def _paths_hint(key: str) -> str:
    """How to fix ``key`` (``data.paths``, ``--samples``, ``--real[0]``, ...), naming that key."""
    return f"point {key.split('[')[0]} at a folder, a glob like 'scans/*.nii.gz' or a list of NIfTI files"


def is_nifti(path: Path | str) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _find_in_folder(folder: Path, key: str) -> list[Path]:
    """Recursive, sorted search for NIfTI files in ``folder`` (hidden files skipped)."""
    found = sorted(
        (p for p in folder.rglob("*") if is_nifti(p.name) and not p.name.startswith(".") and p.is_file()),
        key=str,
    )
    if not found:
        raise DataError(
            f"{key}: folder '{folder}' contains no .nii or .nii.gz files (searched recursively); "
            f"add NIfTI files or {_paths_hint(key)}"
        )
    return found


def _find_by_glob(pattern: str, key: str) -> list[Path]:
    """Sorted NIfTI files matching a glob pattern (``**`` recurses)."""
    matches = sorted(glob.glob(pattern, recursive=True))
    found = [Path(m) for m in matches if is_nifti(m) and os.path.isfile(m)]
    if not matches:
        raise DataError(f"{key}: glob '{pattern}' matches nothing; check the pattern or {_paths_hint(key)}")
    if not found:
        raise DataError(
            f"{key}: glob '{pattern}' matches {len(matches)} path(s) but no .nii/.nii.gz file; "
            "narrow the pattern to NIfTI files, e.g. 'scans/*.nii.gz'"
        )
    return found


def _check_listed_file(entry: Any, key: str) -> Path:
    """Validate one entry of a list of files."""
    if not isinstance(entry, (str, os.PathLike)) or not str(entry):
        raise DataError(f"{key}: expected a file path string, got {entry!r}")
    path = Path(entry).expanduser()
    if not path.exists():
        raise DataError(f"{key}: file '{path}' does not exist; fix the path or remove it from the list")
    if path.is_dir():
        raise DataError(f"{key}: '{path}' is a folder; list NIfTI files only, or set {key.split('[')[0]} to the folder "
                        f"itself")
    if not is_nifti(path):
        raise DataError(f"{key}: '{path}' is not a NIfTI file; expected a .nii or .nii.gz file")
    return path


def file_identity(path: Path) -> tuple[int, int] | str:
    """What makes two paths the same file: device and inode (symlinks and hard links), else the real path."""
    try:
        info = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return info.st_dev, info.st_ino


def _unique(files: list[Path], key: str) -> list[Path]:
    """``files`` without the repeats of a real file (first occurrence kept, order kept); repeats are logged."""
    seen: dict[tuple[int, int] | str, Path] = {}
    repeats: list[tuple[Path, Path]] = []
    for path in files:
        identity = file_identity(path)
        if identity in seen:
            repeats.append((path, seen[identity]))
        else:
            seen[identity] = path
    if repeats:
        path, first = repeats[0]
        log.warning("%s: %d path(s) repeat a file already found (symlinks or repeated entries) and are used once, "
                    "e.g. %s = %s", key, len(repeats), path, first)
    return list(seen.values())


def find_nifti_files(paths: str | list[str] | None, key: str = "data.paths") -> list[Path]:
    """Resolve ``paths`` to a list of NIfTI files.

    Args:
        paths: A folder (searched recursively for *.nii and *.nii.gz, sorted), a glob
            pattern (sorted matches, non-NIfTI matches ignored), a single file, or a
            list of files (kept in the given order, each must exist).
        key: Config key named in error messages.

    Returns:
        The NIfTI file paths (at least one), each real file once.

    Raises:
        DataError: For None/empty input, a missing folder or file, a folder without
            NIfTI files, a glob matching nothing, or a listed non-NIfTI file.
    """
    if isinstance(paths, os.PathLike):
        paths = os.fspath(paths)
    if paths is None or (isinstance(paths, (str, list, tuple)) and len(paths) == 0):
        required = " (required when data.source is 'nifti')" if key == "data.paths" else ""
        raise DataError(f"{key}: no input given; {_paths_hint(key)}{required}")
    if isinstance(paths, (list, tuple)):
        return _unique([_check_listed_file(entry, f"{key}[{i}]") for i, entry in enumerate(paths)], key)
    if not isinstance(paths, str):
        raise DataError(f"{key}: expected a string or a list of strings, got {type(paths).__name__} {paths!r}")
    text = os.path.expanduser(paths)
    if any(ch in _GLOB_CHARS for ch in text):
        return _unique(_find_by_glob(text, key), key)
    path = Path(text)
    if path.is_dir():
        return _unique(_find_in_folder(path, key), key)
    if path.is_file():
        if not is_nifti(path):
            raise DataError(f"{key}: '{path}' is not a NIfTI file; expected a .nii or .nii.gz file")
        return [path]
    kind = "file" if is_nifti(path) else "folder"
    raise DataError(f"{key}: {kind} '{path}' does not exist; {_paths_hint(key)}")


def split_files(files: Sequence[Path], val_fraction: float, seed: int,
                key: str = "data.paths") -> tuple[list[Path], list[Path]]:
    """Deterministically split files into disjoint training and validation sets.

    The validation set holds ``round(n * val_fraction)`` files, at least 1 and at most n - 1.

    Args:
        files: The files to split (each once, as :func:`find_nifti_files` returns them).
        val_fraction: Fraction for validation, in [0, 1).
        seed: Shuffle seed; the same seed gives the same split.
        key: Config key named in errors.

    Returns:
        (train_files, val_files), each sorted.

    Raises:
        DataError: for fewer than two files (a file is never used for both training and validation).
    """
    files = list(files)
    if len(files) < 2:
        raise DataError(
            f"{key}: only {len(files)} NIfTI file ({', '.join(map(str, files))}); at least 2 are needed, since one is "
            f"held out for validation and a file is never in both sets; add files"
        )
    order = seeded_rng(seed).permutation(len(files))
    num_val = min(len(files) - 1, max(1, round(len(files) * val_fraction)))
    val = sorted((files[i] for i in order[:num_val]), key=str)
    train = sorted((files[i] for i in order[num_val:]), key=str)
    return train, val


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def data_pattern_covers(paths: str | list[str], folder: str | Path) -> bool:
    """Whether a NIfTI file written anywhere below ``folder`` would be found by ``paths`` (see
    :func:`find_nifti_files`): ``folder`` lies in a data folder (searched recursively), or a glob can reach
    into it. A list of files finds only those files."""
    if not isinstance(paths, str):
        return False
    target = os.path.realpath(os.path.expanduser(str(folder)))
    text = os.path.expanduser(paths)
    if not any(ch in _GLOB_CHARS for ch in text):
        return not is_nifti(text) and _inside(target, os.path.realpath(text))
    parts = Path(text).parts
    fixed = next(i for i, part in enumerate(parts) if any(ch in _GLOB_CHARS for ch in part))
    root = os.path.realpath(Path(*parts[:fixed])) if fixed else os.path.realpath(".")
    if not _inside(target, root):
        return False
    pattern = parts[fixed:]
    if "**" in pattern:
        return True
    below = Path(os.path.relpath(target, root)).parts if target != root else ()
    # each folder level below the fixed part must match its pattern part, with one part left for the file
    return len(below) < len(pattern) and all(fnmatch.fnmatch(name, part) for name, part in zip(below, pattern))
