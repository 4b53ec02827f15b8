"""Fixtures shared by both test folders: the stored run folders of monai-diffusion 0.4.0 and the checkpoints
written by MONAI Generative 0.2.3. Helper functions live in ``tests/helpers``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import FIXTURES, OLD


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    """A writable copy of the 0.4.0 run folders (``autoencoder/`` and ``diffusion/``)."""
    copy = tmp_path / "run_0_4_0"
    shutil.copytree(OLD, copy)
    return copy


@pytest.fixture(scope="session")
def old_expected() -> dict:
    """The outputs that 0.4.0's runs gave when they were written (reconstruction, DDIM samples, scale factor)."""
    return torch.load(OLD / "expected.pt", weights_only=True)


@pytest.fixture(scope="session")
def generative_023() -> Path:
    """The folder of checkpoints written by MONAI Generative 0.2.3 (see tests/make_generative_023_fixtures.py)."""
    return FIXTURES / "generative_0_2_3"
