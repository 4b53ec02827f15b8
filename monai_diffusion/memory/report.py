"""What ``estimate_memory.py`` prints: the training step's report, the settings table, the budget's table
and the pipeline's phases."""

from __future__ import annotations

from typing import TYPE_CHECKING

from monai_diffusion.config import Config
from monai_diffusion.memory.counting import (
    CUDA_CONTEXT_BYTES,
    FRAGMENTATION,
    GB,
    WORKSPACE_BYTES,
    PhaseEstimate,
    format_bytes,
    margin_text,
    with_margin,
)
from monai_diffusion.memory.estimates import MemoryEstimate, estimate_autoencoder

if TYPE_CHECKING:
    from monai_diffusion.memory.budget import Candidate

__all__ = ["report", "settings_table", "SHOWN_ROWS", "table_order", "candidates_table", "pipeline_report"]


def report(estimate: MemoryEstimate) -> str:
    """A plain-text report: latent shape, per-level table, components, total, largest contributors."""
    lines = [
        f"latent shape: {list(estimate.latent_shape)} per volume; batch {estimate.batch_size}; "
        f"{estimate.precision}; gradient checkpointing {'on' if estimate.checkpointing else 'off'}",
        "",
        f"{'part':8s} {'resolution':>14s} {'channels':>8s} {'kept for backward':>18s}",
    ]
    for row in estimate.levels:
        lines.append(f"{row.part:8s} {'x'.join(map(str, row.resolution)):>14s} {row.channels:>8d} "
                     f"{format_bytes(row.saved_bytes):>18s}")
    parts = [
        ("autoencoder activations", estimate.autoencoder_activations),
        ("discriminator activations", estimate.discriminator_activations),
        ("perceptual network activations", estimate.perceptual_activations),
        ("backward working set (model)", estimate.backward_working_set),
        ("parameters", estimate.parameters),
        ("gradients", estimate.gradients),
        ("Adam state (2 moments)", estimate.optimizer_state),
        *([("DDP gradient buckets", estimate.ddp_buckets)] if estimate.ddp_buckets else []),
    ]
    lines += ["", *(f"{name:32s} {format_bytes(size):>12s}" for name, size in parts)]
    lines += [f"{'autoencoder forward + backward':32s} {format_bytes(estimate.autoencoder_step):>12s}",
              f"{'training step total':32s} {format_bytes(estimate.total):>12s}",
              "", "largest contributors: "
              + "; ".join(f"{n} {format_bytes(b)}" for n, b in estimate.contributors()[:3]),
              "not included: the caching allocator's fragmentation (CUDA: often 5-20 %) and cuDNN/cuBLAS workspaces "
              f"(~{WORKSPACE_BYTES / GB:.2f} GB, both inside torch's allocator), the CUDA context "
              f"(~{CUDA_CONTEXT_BYTES / GB:.2f} GB, outside it), data loading; --budget keeps a margin for them"]
    return "\n".join(lines)


def settings_table(config: Config) -> str:
    """The training step's estimated total for each precision / checkpointing combination."""
    lines = ["training step total by setting:"]
    for amp in (False, True):
        for ckpt in (False, True):
            total = estimate_autoencoder(config, mixed_precision=amp, checkpointing=ckpt).total
            lines.append(f"  {'mixed precision' if amp else 'fp32':15s} {'+ checkpointing' if ckpt else '':16s} "
                         f"{format_bytes(total):>12s}")
    return "\n".join(lines)


SHOWN_ROWS = 15  # rows of the budget table without --all


def table_order(candidates: list[Candidate]) -> list[Candidate]:
    """The best configuration of each factor option (the first of it in ``candidates``' ranking), then the
    rest in ranking order."""
    best: dict[str, Candidate] = {}
    for c in candidates:
        best.setdefault(str(c.downsample_factors), c)
    firsts = list(best.values())
    return firsts + [c for c in candidates if all(c is not f for f in firsts)]


def candidates_table(candidates: list[Candidate], budget_text: str, shown: int | None = SHOWN_ROWS,
                     written: Candidate | None = None) -> str:
    """The configurations that fit, with their estimate and the margin the search kept: the best of each factor
    option first, then the rest (:func:`table_order`), at most ``shown`` rows (None: all), the ``written``
    row marked with ``*``, and how many rows were left out."""
    rows = table_order(candidates)
    options = len({str(c.downsample_factors) for c in candidates})
    lines = [f"{len(candidates)} configurations fit in {budget_text} (the best of each of the {options} factor "
             f"options first, then the rest; least compression and largest batch rank first), keeping a margin of "
             f"{FRAGMENTATION:.0%} for allocator fragmentation, {format_bytes(WORKSPACE_BYTES)} for cuDNN/cuBLAS "
             f"workspaces and {format_bytes(CUDA_CONTEXT_BYTES)} for the CUDA context:",
             f"  {'factors':10s} {'channels':14s} {'patch':>13s} {'batch':>5s} {'precision':>9s} {'ckpt':>5s} "
             f"{'compression':>11s} {'estimate':>10s} {'+ margin':>10s}"]
    for c in rows if shown is None else rows[:shown]:
        patch = "x".join(map(str, c.patch_size)) if c.patch_size else "whole"
        mark = "*" if c is written else " "
        lines.append(f"{mark} {str(c.downsample_factors):10s} {str(c.num_channels):14s} {patch:>13s} {c.batch_size:5d} "
                     f"{'mixed' if c.mixed_precision else 'fp32':>9s} {'yes' if c.checkpointing else 'no':>5s} "
                     f"{c.compression:>10d}x {format_bytes(c.total):>10s} {format_bytes(with_margin(c.total)):>10s}")
    left_out = 0 if shown is None else max(0, len(rows) - shown)
    if left_out:
        lines.append(f"  ... {left_out} more row{'s' if left_out > 1 else ''} left out; --all shows every one")
    return "\n".join(lines)


def pipeline_report(phases: list[PhaseEstimate]) -> str:
    """The phases with their estimated device peak, the same with the GPU margin, and host buffers."""
    lines = [f"  {'phase':28s} {'device':>10s} {'+ margin':>10s} {'host buffers':>13s}  what runs"]
    for phase in phases:
        host = format_bytes(phase.host_bytes) if phase.host_bytes else "-"
        lines.append(f"  {phase.name:28s} {format_bytes(phase.device_bytes):>10s} "
                     f"{format_bytes(with_margin(phase.device_bytes)):>10s} {host:>13s}  {phase.detail}")
    largest = max(phases, key=lambda p: p.device_bytes)
    lines += ["", f"largest phase: {largest.name}, {format_bytes(with_margin(largest.device_bytes))} of GPU memory "
              f"with the margin",
              f"margin = {margin_text()}; host buffers: the exact tiled method's full-size activations "
              f"between layers, in host memory (autoencoder.tile_size; see docs/tiling.md)"]
    return "\n".join(lines)
