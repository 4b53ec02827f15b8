"""Shared helpers of the MONAI Generative 0.2.3 drop-in tests: fixture loading and per-network outputs."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "generative_0_2_3"
_spec = importlib.util.spec_from_file_location("make_generative_023_fixtures", Path(__file__).parents[1] / "make_generative_023_fixtures.py")
generator = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generator)  # type: ignore[union-attr]  # imports no generative module at load time
NETWORKS = list(generator.CONFIGS)


def load(name: str) -> dict[str, Any]:
    return torch.load(FIXTURES / f"{name}.pth")


def build(name: str) -> torch.nn.Module:
    """Our class at 0.2.3's path, built with the fixture's 0.2.3 arguments, weights loaded strictly."""
    from generative.networks import nets

    ref = load(name)
    model = getattr(nets, ref["class"])(**ref["kwargs"]).eval()
    model.load_state_dict(ref["state_dict"], strict=True)
    return model


def max_error(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    assert set(got) == set(expected)
    return max(float((got[k].double() - expected[k].double()).abs().max()) for k in expected)
