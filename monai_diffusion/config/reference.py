"""The configuration reference, generated from the schema, so it cannot drift from the code.

    python -m monai_diffusion.config.reference > docs/configuration.md

Every key with its default, its limits and the description from the section's ``Attributes`` docstring.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any

import yaml

from monai_diffusion.config.schema import Config, limits_of

__all__ = ["attribute_docs", "reference_markdown"]

INTRO = """# Configuration reference

Generated from the schema (`monai_diffusion/config/schema.py`) by
`python -m monai_diffusion.config.reference`; `tests/monai_diffusion/test_docs.py` checks that this file is up to date.
The shipped `monai_diffusion/config/ldm_config.yaml` lists every key with a comment, and
`monai_diffusion/config/examples/` holds the guide's five examples.

A config is checked once, when it is loaded, for the stage that runs: autoencoder training, memory
estimation, evaluation and the factor study check the top-level keys, `data` and `autoencoder`;
diffusion training and sampling also check `diffusion`. Override any key on the command line with
`--set dotted.key=value` (values are YAML: `[4, 2]`, `true`, `1e-4`). Numbers must be finite, integers
must fit in 64 bits, and a key given twice in one file is an error.
"""


def attribute_docs(cls: type) -> dict[str, str]:
    """``name -> description`` from the ``Attributes:`` sections of a dataclass's docstring and of its bases
    (a subclass's description of a field wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        text = (klass.__dict__.get("__doc__") or "").split("Attributes:", 1)
        if len(text) < 2:
            continue
        name = None
        for line in text[1].splitlines():
            match = re.match(r"^ {8}(\w+): (.*)$", line)
            if match:
                name = match.group(1)
                docs[name] = match.group(2).strip()
            elif name and line.startswith(" " * 12):
                docs[name] += " " + line.strip()
    return docs


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return "`" + yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip() + "`"


def _limits(item: dataclasses.Field) -> str:
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return ", ".join(f"{symbols[k]} {v:g}" for k, v in limits_of(item).items())


def _rows(cls: type, instance: Any, prefix: str) -> tuple[list[str], list[tuple[str, type, Any]]]:
    docs = attribute_docs(cls)
    hints = typing.get_type_hints(cls)
    rows, sections = [], []
    for item in dataclasses.fields(cls):
        key = f"{prefix}{item.name}"
        value = getattr(instance, item.name)
        if dataclasses.is_dataclass(hints[item.name]):
            sections.append((key, hints[item.name], value))
            continue
        description = docs.get(item.name, "").replace("``", "`").replace("|", "\\|")
        rows.append(f"| `{key}` | {_shown(value)} | {_limits(item)} | {description} |")
    return rows, sections


def reference_markdown() -> str:
    """The whole reference page."""
    out = [INTRO]
    queue: list[tuple[str, type, Any]] = [("", Config, Config())]
    while queue:
        prefix, cls, instance = queue.pop(0)
        rows, sections = _rows(cls, instance, f"{prefix}." if prefix else "")
        title = f"`{prefix}`" if prefix else "top level"
        summary = (cls.__doc__ or "").strip().splitlines()[0].replace("``", "`")
        out += [f"## {title}", "", summary, "", "| key | default | limits | meaning |", "|---|---|---|---|", *rows, ""]
        queue[:0] = sections
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
