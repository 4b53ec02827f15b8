"""The GPU scripts (benchmarks/gpu_smoke.sh, gpu_suite.sh) run end to end on a CPU at toy sizes, so they cannot rot
between the rare runs on a lent GPU: exit codes, every check passing, every table row written, and a failing row
recorded in the table instead of ending the suite."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bash(script: str, output: Path, **env: str) -> subprocess.CompletedProcess:
    # PYTHON: this interpreter; monai and nibabel import here, so _python.sh installs nothing
    environment = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "TINY": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / script), str(output)], capture_output=True, text=True,
                          env=environment, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_gpu_smoke_passes_its_checks_on_cpu(tmp_path: Path) -> None:
    log = tmp_path / "smoke.log"
    result = _bash("gpu_smoke.sh", log)
    text = log.read_text()
    assert result.returncode == 0, text + result.stderr[-3000:]
    passed = [line for line in text.splitlines() if line.startswith("PASS ")]
    names = " / ".join(passed)
    assert len(passed) == 7, text
    assert "resumed to step 4" in names and "world size 2 (gloo)" in names
    assert "gloo process group, world size 1" in names
    assert "FAIL" not in text and "# 0 failure(s)" in text


@pytest.mark.slow
def test_gpu_suite_writes_every_row_and_records_a_failing_one(tmp_path: Path) -> None:
    table = tmp_path / "suite.md"
    result = _bash("gpu_suite.sh", table, GPU_SUITE_FAIL="| example2_128x128x64 | whole |")
    text = table.read_text()
    assert result.returncode == 1, text + result.stderr[-3000:]  # one row failed; the others ran
    lines = text.splitlines()
    training = [line for line in lines if line.startswith("| example")]
    examples = sorted((ROOT / "monai_diffusion" / "config" / "examples").glob("*.yaml"))
    assert len(training) == 2 * len(examples)
    failed = [line for line in training if "error:" in line]
    assert len(failed) == 1 and "injected failure (GPU_SUITE_FAIL)" in failed[0], failed
    assert failed[0].startswith("| example2_128x128x64 | whole |")
    header = next(line for line in lines if line.startswith("| config |"))
    for line in training:  # every row has the header's columns, failed or not
        assert line.count("|") == header.count("|"), line
    measured = [line for line in training if line not in failed]
    assert all(float(line.split("|")[8]) > 0 for line in measured)
    phases = [line for line in lines if line.startswith(("| tiled encode", "| tiled decode", "| ControlNet step"))]
    assert len(phases) == 3 and not any("error" in line for line in phases), phases
    assert "1 row(s) failed" in lines[-1]


def _suite_module():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_suite_rows_are_written_as_they_finish_and_none_starts_after_the_budget(tmp_path: Path) -> None:
    suite = _suite_module()
    output = tmp_path / "table.md"
    table = suite.Table(str(output), budget_s=3600)
    table.add("| a | b | c |")
    table.row("| one |", 1, lambda: "1 | 2 |")
    assert output.read_text().splitlines() == ["| a | b | c |", "| one | 1 | 2 |"]  # on disk before the end

    def broken() -> str:
        raise ValueError("a | b")

    table.row("| two |", 1, broken)
    assert output.read_text().splitlines()[-1] == "| two | error: ValueError: a / b | |" and table.failures == 1
    table.deadline = 0.0  # the budget is spent: the next row is not measured
    table.row("| three |", 1, broken)
    assert output.read_text().splitlines()[-1] == "| three | skipped: time budget spent | |"
    assert table.skipped == 1 and table.failures == 1
