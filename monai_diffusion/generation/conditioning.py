"""Conditions for the diffusion UNet from per-volume covariates, fitted on the training set and stored in
every checkpoint.

* Categorical covariates become one class index per combination of their values (``class_labels`` of
  MONAI's DiffusionModelUNet, ``num_class_embeds`` = combinations + 1): the extra last class means "no
  condition".
* Continuous covariates are standardised with the training set's mean and standard deviation and given as a
  cross-attention context ``Bx1x(n + 1)``: the n values and a flag, 1 when the conditions are present and 0
  (with the values 0) when they are dropped. Imported models (``ldm-import``) may have been trained without the
  flag and with the values as given (mean 0, std 1): ``flag`` False.

Dropping a training sample's conditions with probability ``dropout`` teaches the same UNet the unconditional
model, which classifier-free guidance combines with the conditional one at sampling time:
``eps = eps_uncond + scale * (eps_cond - eps_uncond)`` (Ho and Salimans, 2022).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from monai_diffusion.errors import ConfigError, DataError

__all__ = ["Conditioning", "Conditions"]


def _where(item: Mapping[str, Any]) -> str:
    return str(item.get("row") or item.get("path") or "a volume")


@dataclass
class Conditions:
    """A batch's conditions: ``class_labels`` (B,) long or None, ``context`` (B, 1, D) float or None."""

    class_labels: torch.Tensor | None = None
    context: torch.Tensor | None = None

    def __len__(self) -> int:
        tensor = self.class_labels if self.class_labels is not None else self.context
        return 0 if tensor is None else len(tensor)

    def to(self, device: torch.device) -> Conditions:
        return Conditions(*(t.to(device) if t is not None else None for t in (self.class_labels, self.context)))

    def index(self, rows: Any) -> Conditions:
        return Conditions(*(t[rows] if t is not None else None for t in (self.class_labels, self.context)))

    def cat(self, other: Conditions) -> Conditions:
        return Conditions(*(torch.cat([a, b]) if a is not None else None for a, b in
                            ((self.class_labels, other.class_labels), (self.context, other.context))))

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of ``DiffusionModelUNet.forward``."""
        kwargs = {}
        if self.class_labels is not None:
            kwargs["class_labels"] = self.class_labels
        if self.context is not None:
            kwargs["context"] = self.context
        return kwargs


@dataclass
class Conditioning:
    """The fitted conditioning of a run: ``categorical`` name -> classes (in order), ``continuous`` name ->
    (mean, std), and the training ``dropout``."""

    categorical: dict[str, list[str]] = field(default_factory=dict)
    continuous: dict[str, tuple[float, float]] = field(default_factory=dict)
    dropout: float = 0.0
    flag: bool = True  # the context ends with a "conditions present" flag (False: imported models without one)

    # -- fitting and storing --------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return bool(self.categorical or self.continuous)

    @staticmethod
    def category(value: Any) -> str:
        """A categorical value as text: a number is one class however it is written (``1``, ``1.0``, ``"1"``,
        ``"1.0"``); ``True`` is ``"true"``."""
        if isinstance(value, bool):
            return str(value).lower()
        text = str(value).strip()
        try:
            number = float(text)
        except ValueError:
            return text
        if not math.isfinite(number):
            return text
        return str(int(number)) if number.is_integer() else repr(number)

    @classmethod
    def checked_category(cls, name: str, value: Any, where: str) -> str:
        """:meth:`category`, refusing an empty cell (``""``, JSON ``null``): it is no class."""
        if value is None or not str(value).strip():
            raise DataError(f"{where}: covariate '{name}' is empty ({value!r}); give every volume a value (it is "
                            f"categorical)")
        return cls.category(value)

    @staticmethod
    def number(name: str, value: Any, where: str) -> float:
        try:
            number = math.nan if isinstance(value, bool) else float(value)  # JSON true is no age
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise DataError(f"{where}: covariate '{name}' = {value!r} is not a finite number (it is continuous)")
        return number

    @classmethod
    def fit(cls, categorical: Sequence[str], continuous: Sequence[str], dropout: float,
            items: Sequence[Mapping[str, Any]], standardize: bool = True, flag: bool = True) -> Conditioning:
        """Classes and statistics of the training ``items`` (dicts holding the covariates); ``standardize``
        False keeps the continuous values as given (mean 0, std 1), ``flag`` False gives no presence flag
        (``diffusion.conditioning.standardize`` / ``presence_flag``)."""
        for item in items:
            missing = [n for n in (*categorical, *continuous) if n not in item]
            if missing:
                raise DataError(f"{_where(item)}: no covariate {missing[0]!r} (the config conditions on "
                                f"{list(categorical) + list(continuous)}); add the column or fix "
                                f"diffusion.conditioning")
        classes = {n: sorted({cls.checked_category(n, item[n], _where(item)) for item in items}) for n in categorical}
        for name, found in classes.items():
            if len(found) < 2:
                raise DataError(f"diffusion.conditioning.categorical: covariate '{name}' has a single class {found} "
                                f"in the training set, so it cannot condition anything; drop it from "
                                f"diffusion.conditioning.categorical or add volumes of other classes")
        stats = {}
        for name in continuous:
            values = torch.tensor([cls.number(name, item[name], _where(item)) for item in items], dtype=torch.float64)
            std = float(values.std()) if len(values) > 1 else 0.0
            stats[name] = (float(values.mean()), std if std > 0 else 1.0) if standardize else (0.0, 1.0)
        return cls(classes, stats, dropout, flag)

    def state_dict(self) -> dict[str, Any]:
        return {"categorical": {k: list(v) for k, v in self.categorical.items()},
                "continuous": {k: list(v) for k, v in self.continuous.items()}, "dropout": self.dropout,
                "flag": self.flag}

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None) -> Conditioning:
        if not state:
            return cls()
        return cls({k: [cls.category(c) for c in v] for k, v in state["categorical"].items()},
                   {k: (float(v[0]), float(v[1])) for k, v in state["continuous"].items()}, float(state["dropout"]),
                   bool(state.get("flag", True)))

    # -- what the UNet sees ----------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return math.prod(len(v) for v in self.categorical.values()) if self.categorical else 0

    @property
    def context_dim(self) -> int:
        return len(self.continuous) + int(self.flag) if self.continuous else 0

    def unet_kwargs(self) -> dict[str, Any]:
        """Arguments of MONAI's DiffusionModelUNet for these conditions."""
        kwargs: dict[str, Any] = {}
        if self.categorical:
            kwargs["num_class_embeds"] = self.num_classes + 1  # + "no condition"
        if self.continuous:
            kwargs.update(with_conditioning=True, cross_attention_dim=self.context_dim)
        return kwargs

    def encode(self, items: Sequence[Mapping[str, Any]]) -> Conditions:
        """The conditions of ``items`` (DataError naming the item for an unknown class or a bad number)."""
        if not self.active:
            return Conditions()
        labels = context = None
        if self.categorical:
            indices = []
            for item in items:
                index = 0
                for name, classes in self.categorical.items():
                    value = self.checked_category(name, item.get(name), _where(item))
                    if value not in classes:
                        raise DataError(f"{_where(item)}: covariate '{name}' = {item.get(name)!r} is not one of the "
                                        f"classes {classes} seen in training")
                    index = index * len(classes) + classes.index(value)
                indices.append(index)
            labels = torch.tensor(indices, dtype=torch.long)
        if self.continuous:
            rows = [[(self.number(n, item.get(n), _where(item)) - mean) / std
                     for n, (mean, std) in self.continuous.items()] + [1.0] * self.flag for item in items]
            context = torch.tensor(rows, dtype=torch.float32)[:, None]
        return Conditions(labels, context)

    def null(self, count: int) -> Conditions:
        """``count`` empty conditions: the "no condition" class, a zero context with the flag 0."""
        labels = torch.full((count,), self.num_classes, dtype=torch.long) if self.categorical else None
        context = torch.zeros(count, 1, self.context_dim) if self.continuous else None
        return Conditions(labels, context)

    def drop(self, conditions: Conditions, generator: torch.Generator | None = None) -> Conditions:
        """``conditions`` with each sample's dropped (made null) with probability ``dropout``."""
        if not self.active or self.dropout == 0 or len(conditions) == 0:
            return conditions
        dropped = torch.rand(len(conditions), generator=generator) < self.dropout
        null = self.null(len(conditions))
        labels, context = conditions.class_labels, conditions.context
        if labels is not None:
            labels = torch.where(dropped.to(labels.device), null.class_labels.to(labels.device), labels)
        if context is not None:
            context = torch.where(dropped.to(context.device)[:, None, None], null.context.to(context.device), context)
        return Conditions(labels, context)

    def parse(self, text: Mapping[str, str], where: str) -> dict[str, Any]:
        """One ``--condition`` set (name -> text) checked against the fitted covariates (ConfigError)."""
        names = list(self.categorical) + list(self.continuous)
        unknown = [k for k in text if k not in names]
        missing = [n for n in names if n not in text]
        if unknown or missing:
            raise ConfigError(f"{where}: the model is conditioned on {names}; "
                              + (f"unknown {unknown}" if unknown else f"missing {missing}"))
        values: dict[str, Any] = {}
        for name, classes in self.categorical.items():
            if self.category(text[name]) not in classes:
                raise ConfigError(f"{where}: {name}={text[name]} is not one of the classes {classes} seen in training")
            values[name] = self.category(text[name])
        for name in self.continuous:
            try:
                values[name] = self.number(name, text[name], where)
            except DataError as err:
                raise ConfigError(str(err)) from None
        return values
