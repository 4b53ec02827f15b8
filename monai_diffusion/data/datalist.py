"""Datalists: NIfTI volumes with per-volume covariates, from a MONAI-style JSON file or a CSV table.

JSON (read with MONAI's ``load_decathlon_datalist``)::

    {"training": [{"image": "scans/a.nii.gz", "age": 63, "sex": "F"}, ...],
     "validation": [{"image": "scans/b.nii.gz", "age": 71, "sex": "M"}, ...]}

A ``label`` entry (column) names the volume's integer label map (a NIfTI file of the image's shape and
affine), used when ``data.num_classes`` is set (see docs/masks.md).

CSV: an ``image`` column and one column per covariate; an optional ``split`` column (``training`` /
``validation``, also ``train`` / ``val``) gives the split. Paths are relative to the file. Without a split in
the file, ``data.val_fraction`` of the volumes are held out, as for folders.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from monai.data import load_decathlon_datalist

from monai_diffusion.data.files import is_nifti
from monai_diffusion.data.keys import LABEL_KEY
from monai_diffusion.errors import DataError

__all__ = ["DATALIST_SUFFIXES", "ROW_KEY", "is_datalist", "read_datalist", "read_csv_table"]

DATALIST_SUFFIXES = (".json", ".csv")
ROW_KEY = "row"  # where an item was given: "<file>, line 5" or "<file>, training[3]", for error messages
_SPLITS = {"training": "training", "train": "training", "validation": "validation", "val": "validation"}


def is_datalist(paths: Any) -> bool:
    """Whether ``data.paths`` names a datalist file (``.json`` or ``.csv``)."""
    return isinstance(paths, (str, os.PathLike)) and str(paths).lower().endswith(DATALIST_SUFFIXES)


def _check_image(path: str, where: str, kind: str = "image") -> str:
    if not is_nifti(path):
        raise DataError(f"{where}: {kind} '{path}' is not a NIfTI file; expected a .nii or .nii.gz file")
    if not Path(path).is_file():
        raise DataError(f"{where}: {kind} '{path}' does not exist; fix the path (relative to the datalist's folder)")
    return path


def _check_label(item: dict[str, Any], labels: bool) -> None:
    """A row's label file: required (and checked) when ``labels``; otherwise left as a covariate-free entry."""
    where = f"data.paths: {item[ROW_KEY]}"
    value = str(item.get(LABEL_KEY) or "").strip()
    if not value:
        if labels:
            raise DataError(f"{where}: no 'label' (data.num_classes is set, so every image needs its label map); "
                            f"add a label column/key or set data.num_classes: null")
        item.pop(LABEL_KEY, None)
        return
    item[LABEL_KEY] = _check_image(value, where, "label") if labels else value


def _read_json(path: Path, labels: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    try:
        keys = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"data.paths: cannot read the datalist {path} as JSON ({err})") from None
    if not isinstance(keys, dict) or not isinstance(keys.get("training"), list):
        raise DataError(f"data.paths: {path} has no 'training' list; a datalist looks like "
                        f'{{"training": [{{"image": "a.nii.gz", "age": 63}}], "validation": [...]}}')
    if not keys["training"]:
        raise DataError(f"data.paths: {path} has no training rows (its 'training' list is empty)")
    parts = []
    for key in ("training", "validation"):
        if keys.get(key) is None:  # absent, or "validation": null: the split comes from data.val_fraction
            parts.append(None)
            continue
        if not isinstance(keys[key], list):
            raise DataError(f"data.paths: {path}: '{key}' must be a list of objects with an 'image' key, got "
                            f"{type(keys[key]).__name__}")
        for row, item in enumerate(keys[key]):
            if not isinstance(item, dict) or "image" not in item:
                raise DataError(f"data.paths: {path}, {key}[{row}]: expected an object with an 'image' key, "
                                f"got {item!r}")
        items = load_decathlon_datalist(str(path), data_list_key=key, base_dir=str(path.parent))
        for row, item in enumerate(items):
            item[ROW_KEY] = f"{path}, {key}[{row}]"
            _check_image(str(item["image"]), f"data.paths: {item[ROW_KEY]}")
            _check_label(item, labels)
        parts.append([dict(item) for item in items])
    return parts[0], parts[1]


def read_csv_table(path: Path, key: str,
                   error: type[Exception] = DataError) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and ``(line number, row)`` pairs of a CSV table as a spreadsheet saves it: a UTF-8 byte-order
    mark is skipped, the delimiter (``,``, ``;`` or tab) is detected from the header. A repeated column name, a
    row with more fields than the header and a header without rows are refused (``error`` naming ``key``, the
    file and the line)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{key}: cannot read {path} as CSV ({err})") from None
    header_line = text.splitlines()[0] if text.strip() else ""
    counts = {d: header_line.count(d) for d in (",", ";", "\t")}
    delimiter = max(counts, key=lambda d: counts[d]) if any(counts.values()) else ","
    try:
        records = list(csv.reader(text.splitlines(), delimiter=delimiter))
    except csv.Error as err:
        raise error(f"{key}: cannot read {path} as CSV ({err})") from None
    records = [(line, r) for line, r in enumerate(records, start=1) if any(cell.strip() for cell in r)]
    if not records:
        raise error(f"{key}: {path} is empty; expected a header line, then one row per line")
    header = [name.strip() for name in records[0][1]]
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise error(f"{key}: {path}: the header repeats the column(s) {repeated}; give each column once")
    if len(records) == 1:
        raise error(f"{key}: {path} has a header ({', '.join(header)}) but no rows; add one row per line")
    rows = []
    for line, record in records[1:]:
        if len(record) > len(header):
            raise error(f"{key}: {path}, line {line}: {len(record)} fields but the header has {len(header)} "
                        f"({', '.join(header)}); remove the extra field or quote a value that holds "
                        f"'{delimiter}'")
        rows.append((line, {name: (record[i] if i < len(record) else "") for i, name in enumerate(header)}))
    return header, rows


def _read_csv(path: Path, labels: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    header, rows = read_csv_table(path, "data.paths")
    if "image" not in header:
        raise DataError(f"data.paths: {path} needs a header with an 'image' column (and one column per covariate); "
                        f"its header is {header}")
    training, validation, has_split = [], [], "split" in header
    for line, row in rows:
        where = f"data.paths: {path}, line {line}"
        image = (row.get("image") or "").strip()
        if not image:
            raise DataError(f"{where}: empty 'image'")
        item: dict[str, Any] = {k: v for k, v in row.items() if k not in ("image", "split", LABEL_KEY)}
        item["image"] = _check_image(str(path.parent / image), where)
        item[ROW_KEY] = f"{path}, line {line}"
        label = (row.get(LABEL_KEY) or "").strip()
        item[LABEL_KEY] = str(path.parent / label) if label else ""
        _check_label(item, labels)
        split = _SPLITS.get((row.get("split") or "").strip().lower()) if has_split else "training"
        if split is None:
            raise DataError(f"{where}: split {row.get('split')!r} is not training/train or validation/val")
        (training if split == "training" else validation).append(item)
    if not training:
        raise DataError(f"data.paths: {path} has no training rows")
    return training, (validation if has_split else None)


def read_datalist(path: str | os.PathLike,
                  labels: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """``(training items, validation items or None)``: dicts with an absolute ``image`` path and the covariates
    as given (numbers from JSON; strings from CSV, converted where the covariate is declared continuous).

    Args:
        path: the ``.json`` or ``.csv`` datalist.
        labels: every row must name an existing label map (``label``), kept as an absolute path.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data.paths: datalist {path} does not exist")
    return _read_json(path, labels) if path.suffix.lower() == ".json" else _read_csv(path, labels)
