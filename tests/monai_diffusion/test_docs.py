"""The README and the manual: what can drift from the code is checked against it."""

from __future__ import annotations

import re
from pathlib import Path

from generative.networks.nets import AutoencoderKL
from monai_diffusion.config.reference import reference_markdown

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = {path.name: path.read_text(encoding="utf-8") for path in (ROOT / "docs").glob("*.md")}


def test_readme_is_the_front_door():
    assert len(README.splitlines()) <= 150
    for page in ("training", "configuration", "network", "memory", "large-volumes", "tiling", "conditional",
                 "evaluation", "gpus", "migration"):
        assert f"(docs/{page}.md)" in README, page


def test_configuration_reference_is_generated_from_the_schema():
    assert DOCS["configuration.md"] == reference_markdown(), (
        "docs/configuration.md is stale: python -m monai_diffusion.config.reference > docs/configuration.md")


def test_ci_runs_the_readme_test_command_and_install():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_command = ".venv/bin/python -m pytest -q"
    assert test_command in README and ci.strip().splitlines()[-1] == test_command
    assert "pip install torch==2.13.0" in README and "pip install -q torch==2.13.0" in ci


def test_links_images_and_named_files_exist():
    pages = {ROOT / "README.md": README, **{ROOT / "docs" / name: text for name, text in DOCS.items()}}
    for page, text in pages.items():
        for target in re.findall(r"\]\(([^)#:]+)\)", text):  # markdown links and images, not URLs
            assert (page.parent / target).exists(), f"{page.name}: {target}"
        for path in re.findall(r"`((?:benchmarks|monai_diffusion|tests|GenerativeModels)/[\w./-]+\.(?:py|yaml|md|sh))`", text):
            assert (ROOT / path).exists(), f"{page.name}: {path}"


def test_readme_example_shapes():
    import torch

    with torch.device("meta"):
        model = AutoencoderKL(3, num_channels=(16, 32, 64), attention_levels=(False, False, True), num_res_blocks=1,
                              norm_num_groups=16, latent_channels=3, downsample_factors=[4, 2], use_checkpointing=True)
    assert "torch.Size([1, 3, 32, 32, 8])" in README and model.latent_shape((256, 256, 64)) == (3, 32, 32, 8)


def test_the_factor_study_tables_are_the_committed_results():
    """The study tables in docs/evaluation.md are copied from what compare_factors.py wrote, row for row."""
    for name in ("comparison_adjusted.md", "comparison_plain.md"):
        result = (ROOT / "benchmarks" / "results" / "compare_factors" / name).read_text(encoding="utf-8")
        rows = [line for line in result.splitlines() if line.startswith("| [")]
        assert len(rows) == 4
        for row in rows:
            assert row in DOCS["evaluation.md"], row


def test_the_example4_pipeline_table_is_what_the_estimator_prints():
    """docs/large-volumes.md quotes estimate_memory.py --pipeline for Example 4 on a 16 GB GPU, and the measured
    CPU passes from the committed results file."""
    from monai_diffusion.config import load_config
    from monai_diffusion.memory import estimate_pipeline, format_bytes, with_margin

    config = load_config(ROOT / "monai_diffusion" / "config" / "examples" / "example4_512x512x128_16gb.yaml",
                         stage="diffusion")
    doc = DOCS["large-volumes.md"]
    for phase in estimate_pipeline(config):
        host = format_bytes(phase.host_bytes) if phase.host_bytes else "-"
        row = (f"| {phase.name} | {format_bytes(phase.device_bytes)} | {format_bytes(with_margin(phase.device_bytes))} "
               f"| {host} |")
        assert row in doc, row
    measured = (ROOT / "benchmarks" / "results" / "pipeline_example4_cpu.md").read_text(encoding="utf-8")
    for part in ("encode", "decode"):
        cells = next(line for line in measured.splitlines() if line.startswith(f"| {part} |")).split("|")[2:7]
        wall, cpu, peak, estimate, buffers = (c.strip() for c in cells)
        assert (f"| tiled {part} | {wall} | {cpu} | {peak} MiB | {estimate} MiB | {buffers} MiB |") in doc, part


def test_the_conditional_table_is_the_committed_result():
    result = (ROOT / "benchmarks" / "results" / "conditional" / "results.md").read_text(encoding="utf-8")
    rows = [line for line in result.splitlines() if line.startswith("| conditional") or line.startswith("| uncond")]
    assert len(rows) == 4
    for row in rows:
        assert row in DOCS["conditional.md"], row
