"""Reading a YAML config into the typed schema: type-directed conversion, ``--set`` overrides, saving.

The loader walks the YAML against the schema's type hints, so a typo or a wrong type is reported with its
full dotted path before any data is read::

    autoencoder.trainig: unknown key (did you mean 'autoencoder.training'?)
    autoencoder.training.batch_size: expected an integer, got 'two' (str)

Numbers must be finite and integers must fit in 64 bits; a key given twice in one mapping is an error.
The cross-key rules are applied afterwards, per stage (``rules.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from monai_diffusion.config.rules import STAGES, validate
from monai_diffusion.config.schema import Config
from monai_diffusion.errors import ConfigError
from monai_diffusion.runs.atomic import atomic_write

__all__ = ["load_config", "config_from_dict", "config_to_dict", "save_config", "apply_overrides", "read_yaml"]

INT64 = 2**63


# ----------------------------------------------------------------------------------------------------
# type-directed conversion
# ----------------------------------------------------------------------------------------------------
_MISMATCH = object()


def _as_number(value: Any) -> Any:
    number: Any = _MISMATCH
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value) if abs(value) < 2**1024 else math.inf
    elif isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            number = float(value)
        except ValueError:
            pass
    return number


def _as_int(value: Any) -> Any:
    return value if isinstance(value, int) and not isinstance(value, bool) else _MISMATCH


# scalar type -> (how it is described in errors, parser returning the value or _MISMATCH)
_SCALARS: dict[type, tuple[str, Any]] = {
    bool: ("true or false", lambda v: v if isinstance(v, bool) else _MISMATCH),
    int: ("an integer", _as_int),
    float: ("a number", _as_number),
    str: ("a string", lambda v: v if isinstance(v, str) else _MISMATCH),
}


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _SCALARS:
        return _SCALARS[tp][0]
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
        return f"a list (each: {_describe(args[0])})" if args else "a list"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return getattr(tp, "__name__", str(tp))


def _shown(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _convert(value: Any, tp: Any, path: str) -> Any:
    """``value`` as the schema type ``tp`` (a dataclass, union, scalar, Literal, list or tuple), or a ConfigError
    naming ``path``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path)
    if origin in (Union, types.UnionType):
        return _convert_union(value, tp, path)
    if tp in _SCALARS:
        return _convert_scalar(value, tp, path)
    if origin is Literal:
        return _convert_literal(value, tp, path)
    if origin in (list, tuple):
        return _convert_sequence(value, tp, path)
    raise TypeError(f"unsupported schema type {tp!r} at {path}")


def _convert_union(value: Any, tp: Any, path: str) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for option in sorted((a for a in args if a is not type(None)), key=_union_order):
        try:
            return _convert(value, option, path)
        except ConfigError as err:
            errors.append((option, err))
    # a list given where a list is allowed, or a number of the right type out of range (inf, beyond 64
    # bits): its own, more precise error names the bad element or the reason
    for option, err in errors:
        if isinstance(value, (list, tuple)) and typing.get_origin(option) in (list, tuple):
            raise err
        if option in (int, float) and _SCALARS[option][1](value) is not _MISMATCH:
            raise err
    raise ConfigError(f"{path}: expected {_describe(tp)}, got {_shown(value)}")


def _convert_scalar(value: Any, tp: Any, path: str) -> Any:
    description, parse = _SCALARS[tp]
    result = parse(value)
    if result is _MISMATCH:
        raise ConfigError(f"{path}: expected {description}, got {_shown(value)}")
    if tp is float and not math.isfinite(result):
        raise ConfigError(f"{path}: expected a finite number, got {value!r}")
    if tp is int and not -INT64 <= result < INT64:
        raise ConfigError(f"{path}: {result} does not fit in a 64-bit integer")
    return result


def _convert_literal(value: Any, tp: Any, path: str) -> Any:
    args = typing.get_args(tp)
    if value in args:
        return value
    close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"{path}: expected {_describe(tp)}, got {_shown(value)}{hint}")


def _convert_sequence(value: Any, tp: Any, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{path}: expected {_describe(tp)}, got {_shown(value)}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected {_describe(tp)}, got {len(value)} values {list(value)!r}")
        return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    items = [_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)] if args else list(value)
    return tuple(items) if origin is tuple else items


def _union_order(tp: Any) -> int:
    """Try scalars before containers, and int before float, so ``2`` stays an integer."""
    return {bool: 0, int: 1, float: 2, str: 3}.get(tp, 4)


def _build_dataclass(cls: type, value: Any, path: str) -> Any:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        where = path or "the config file"
        raise ConfigError(f"{where}: expected a mapping of keys (a section), got {_shown(value)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in value:
        if key not in names:
            full = f"{path}.{key}" if path else str(key)
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f" (did you mean '{path + '.' if path else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"{full}: unknown key{hint}; valid keys here: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in value:
            kwargs[name] = _convert(value[name], hints[name], f"{path}.{name}" if path else name)
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------------
# loading, overriding, saving
# ----------------------------------------------------------------------------------------------------
class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise ConfigError(f"{self.name}:{line}: duplicate key '{key}' (first given at line {seen[key]}); "
                                  f"keep one of them")
            if isinstance(key, typing.Hashable):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping of a YAML config file (ConfigError for a missing file, bad YAML or a duplicate key)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file; pass --config with a YAML file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass --config with an existing YAML file")
    try:
        loader = _UniqueKeyLoader(path.read_text(encoding="utf-8"))
        loader.name = str(path)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {err.problem or err}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a readable YAML file ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a raw config mapping."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. autoencoder.training.batch_size=1")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. autoencoder.training.batch_size=1")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r} as YAML") from None
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: '{'.'.join(parts[: depth + 1])}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def config_from_dict(data: dict[str, Any], stage: str | None = "autoencoder") -> Config:
    """Build a Config from a raw mapping and check the rules of ``stage``.

    Args:
        data: the YAML mapping (e.g. one stored in a checkpoint).
        stage: ``autoencoder`` (data and autoencoder sections), ``diffusion`` (also the diffusion section),
            or None: types only, for a config stored in a checkpoint, whose rules were checked when it was
            trained (so a rule added later cannot make an old run unloadable).
    """
    config = _build_dataclass(Config, data, "")
    return config if stage is None else validate(config, stage)


def load_config(path: str | Path, overrides: list[str] | None = None, stage: str = "autoencoder") -> Config:
    """Load a YAML config, apply ``--set`` overrides and check it for ``stage`` (raises ConfigError)."""
    if stage not in STAGES:
        raise ValueError(f"stage = {stage!r}: expected one of {STAGES}")
    return config_from_dict(apply_overrides(read_yaml(path), overrides), stage)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain YAML-friendly types."""
    return _plain(dataclasses.asdict(config))


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (a temporary file renamed over the target)."""
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False).encode("utf-8")
    atomic_write(path, lambda handle: handle.write(text))
