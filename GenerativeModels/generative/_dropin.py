# Copyright (c) 2026 The monai-diffusion authors.
# Licensed under the Apache License, Version 2.0; see the LICENSE file at the root of this repository.
"""Plumbing that turns MONAI core 1.6 classes into drop-ins for MONAI Generative 0.2.3.

Three mechanisms, shared by the network adapters under ``generative.networks``:

* ``resolve_alias``: accept 0.2.3's argument name (``num_channels``) beside MONAI core's (``channels``).
* ``Layout023Mixin``: ``state_dict()`` returns 0.2.3's key names and ``load_state_dict`` accepts them
  (as well as MONAI core's). The renames are derived from the module tree, module by module, so a
  rename never touches a key of an unrelated layer that happens to share a name.
* ``LegacyPickleMixin`` and ``legacy_class``: a whole model pickled by 0.2.3 (``torch.save(model)``)
  unpickles into the class at the same path. Its internal 0.2.3 classes resolve to inert stand-ins,
  and the top-level ``__setstate__`` rebuilds a fresh model from the arguments it infers from the
  unpickled tree and loads the tree's weights with ``strict=True``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import torch.nn as nn

T = TypeVar("T")


class ArgumentError(ValueError, AssertionError):
    """A bad constructor argument where MONAI Generative 0.2.3 used an ``assert``: a ``ValueError`` with a
    message naming the argument, still caught by clients written for 0.2.3's ``AssertionError``."""


def resolve_alias(owner: str, old_name: str, old_value: T | None, new_name: str, new_value: T | None,
                  default: T | None = None) -> T:
    """The value of an argument that MONAI core renamed (``channels``) and 0.2.3 still uses (``num_channels``).

    Args:
        owner: class name, for the error message.
        old_name: MONAI Generative 0.2.3's argument name.
        old_value: its value, ``None`` when not given.
        new_name: MONAI core's argument name.
        new_value: its value, ``None`` when not given.
        default: the value when neither is given; ``None`` makes the argument required.

    Raises:
        ValueError: if both names are given, or neither when there is no default.
    """
    if old_value is not None and new_value is not None:
        raise ValueError(f"{owner}: give either {old_name} (MONAI Generative) or {new_name} (MONAI core), not both")
    value = old_value if old_value is not None else new_value if new_value is not None else default
    if value is None:
        raise ValueError(f"{owner}: {old_name} is required (the number of channels)")
    return value


# ----------------------------------------------------------------------------------------------------
# state-dict layout
# ----------------------------------------------------------------------------------------------------
# A rule maps a key prefix of ours (MONAI core's module tree) to 0.2.3's prefix for the same tensors.
# ``old`` = None: the tensors do not exist in 0.2.3 (dropped on save, kept from the model on load).
# ``distinctive``: the old prefix never occurs in MONAI core's layout, so its presence marks a 0.2.3 dict.
Rule = tuple[str, "str | None", bool]
RuleFinder = Callable[[str, nn.Module], "list[Rule]"]


def layout_rules(model: nn.Module, finders: list[RuleFinder]) -> list[Rule]:
    """Collect the prefix rules of every sub-module (paths relative to ``model``), longest first."""
    rules: list[Rule] = []
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        for finder in finders:
            rules.extend(finder(prefix, module))
    return sorted(rules, key=lambda rule: -len(rule[0]))


def _rename(key: str, pairs: list[tuple[str, str | None]]) -> str | None:
    for src, dst in pairs:
        if key.startswith(src):
            return None if dst is None else dst + key[len(src):]
    return key


def _to_023(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict`` hook: rename our keys under ``prefix`` to 0.2.3's, in place and in order."""
    pairs = [(prefix + ours, None if old is None else prefix + old) for ours, old, _ in module._layout_rules()]
    if not pairs:
        return
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        new_key = _rename(key, pairs) if key.startswith(prefix) else key
        if new_key is not None:
            state_dict[new_key] = value


def _from_023(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """Load pre-hook: a dict in 0.2.3's layout is renamed to ours (in place); MONAI core's loads as is."""
    rules = module._layout_rules()
    keys = [k for k in state_dict if k.startswith(prefix)]
    is_023 = any(k.startswith(prefix + old) for _, old, distinctive in rules if old and distinctive for k in keys)
    if not is_023:
        return
    pairs = sorted(((prefix + old, prefix + ours) for ours, old, _ in rules if old), key=lambda p: -len(p[0]))
    renamed = OrderedDict()
    for key in list(state_dict):
        if key.startswith(prefix):
            renamed[_rename(key, pairs)] = state_dict.pop(key)
    state_dict.update(renamed)
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    for ours, old, _ in rules:
        if old is None:  # tensors 0.2.3 does not have: keep the model's own values
            for name, tensor in tensors:
                if name.startswith(ours):
                    state_dict.setdefault(prefix + name, tensor.detach())


class Layout023Mixin:
    """Give a module 0.2.3's ``state_dict`` key names; subclasses list their rule finders in ``_layout_finders``."""

    _layout_finders: tuple[RuleFinder, ...] = ()

    def _layout_rules(self) -> list[Rule]:
        return layout_rules(self, list(self._layout_finders))  # type: ignore[arg-type]

    def _use_023_layout(self) -> None:
        self._register_state_dict_hook(_to_023)  # type: ignore[attr-defined]

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # called on this module before its children, with the dict they will read from
        _from_023(self, state_dict, prefix)  # type: ignore[arg-type]
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------------
# whole-model pickles written by 0.2.3
# ----------------------------------------------------------------------------------------------------
class LegacyModule(nn.Module):
    """Inert stand-in for a 0.2.3 internal class found in a pickle; only its weights are ever read."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"{type(self).__name__} is a MONAI Generative 0.2.3 internal class kept only to unpickle old models; "
            f"the model that contains it rebuilds itself on unpickling"
        )


_LEGACY_CLASSES: dict[tuple[str, str], type] = {}


def legacy_class(module_name: str, names: frozenset[str], name: str) -> type:
    """A module-level ``__getattr__`` helper: the stand-in class for a 0.2.3 internal ``name``.

    Raises:
        AttributeError: for names 0.2.3 did not have in that module.
    """
    if name not in names:
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
    key = (module_name, name)
    if key not in _LEGACY_CLASSES:
        _LEGACY_CLASSES[key] = type(name, (LegacyModule,), {"__module__": module_name, "__qualname__": name})
    return _LEGACY_CLASSES[key]


def find_modules(root: nn.Module, class_name: str) -> list[nn.Module]:
    """Sub-modules of an unpickled 0.2.3 tree whose class is called ``class_name``."""
    return [m for m in root.modules() if type(m).__name__ == class_name]


class LegacyPickleMixin:
    """Rebuild the model when unpickling a ``torch.save(model)`` file written by MONAI Generative 0.2.3.

    A subclass names in ``_own_marker`` an attribute that only its own instances have and implements
    ``_args_from_023(old)``, returning the constructor arguments for the unpickled 0.2.3 tree ``old``.
    """

    _own_marker: str = "_generative_dropin"

    @classmethod
    def _args_from_023(cls, old: nn.Module) -> dict[str, Any]:
        raise NotImplementedError

    def __setstate__(self, state: dict[str, Any]) -> None:
        if self._own_marker in state:
            nn.Module.__setstate__(self, state)  # type: ignore[arg-type]
            return
        old = nn.Module.__new__(nn.Module)
        nn.Module.__setstate__(old, state)
        old_state = nn.Module.state_dict(old)  # the plain tree walk: 0.2.3's key names
        fresh = type(self)(**self._args_from_023(old))  # type: ignore[call-arg]
        # assign: share the unpickled tensors; a legacy-format file fills their storages after this call
        fresh.load_state_dict(old_state, strict=True, assign=True)  # type: ignore[attr-defined]
        fresh.train(old.training)  # type: ignore[attr-defined]
        self.__dict__.update(fresh.__dict__)
