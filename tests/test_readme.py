"""The README's promises that can drift: config defaults, commands, shipped files."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from monai_diffusion.config import Config, config_to_dict

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _lookup(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


def _parse(text: str):
    value = yaml.safe_load(text)
    if isinstance(value, str):  # YAML 1.1 reads 1e-06 as a string; the loader accepts it as a number
        try:
            return float(value)
        except ValueError:
            return value
    return value


def test_config_table_matches_the_schema_defaults():
    defaults = config_to_dict(Config())
    table = README.split("<!-- config-table", 1)[1]
    rows = re.findall(r"^\| (`[^|]+`) \| (`[^|]+`) \|", table, flags=re.MULTILINE)
    assert len(rows) >= 30
    for keys, values in rows:
        names = re.findall(r"`([^`]+)`", keys)
        shown = re.findall(r"`([^`]+)`", values)
        assert len(names) == len(shown), keys
        for name, value in zip(names, shown):
            assert _lookup(defaults, name) == _parse(value), name


def test_ci_runs_the_readme_test_command_and_install():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_command = ".venv/bin/python -m pytest -q"
    assert test_command in README and ci.strip().splitlines()[-1] == test_command
    assert "pip install torch==2.13.0" in README and "pip install -q torch==2.13.0" in ci


def test_paths_named_in_the_readme_exist():
    for path in ("monai_diffusion/config/quickstart.yaml", "monai_diffusion/config/ldm_config.yaml",
                 "monai_diffusion/3d_ldm/train_autoencoder.py", "benchmarks/checkpointing.py",
                 "monai_diffusion/3d_ldm/train_diffusion.py", "monai_diffusion/3d_ldm/sample.py",
                 "monai_diffusion/3d_ldm/estimate_memory.py", "benchmarks/memory.py", "benchmarks/example3_cpu.py",
                 "monai_diffusion/config/GUIDE.md", "monai_diffusion/config/GUIDE.zh.md",
                 "monai_diffusion/3d_ldm/evaluate_autoencoder.py", "monai_diffusion/3d_ldm/compare_factors.py",
                 "benchmarks/tiling.py"):
        assert path in README and (ROOT / path).exists(), path
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README):
        assert (ROOT / image).is_file(), image


def test_the_factor_study_tables_are_the_committed_results():
    """The README's study tables are copied from what compare_factors.py wrote, row for row."""
    for name in ("comparison_adjusted.md", "comparison_plain.md"):
        result = (ROOT / "benchmarks" / "results" / "compare_factors" / name).read_text(encoding="utf-8")
        rows = [line for line in result.splitlines() if line.startswith("| [")]
        assert len(rows) == 4
        for row in rows:
            assert row in README, row
