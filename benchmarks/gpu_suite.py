"""GPU suite: the guide's examples trained on whole volumes and on patches, measured against the estimator.

    bash benchmarks/gpu_suite.sh                          # on a CUDA machine (about 8 minutes on one GPU)
    python benchmarks/gpu_suite.py --device cpu --tiny    # the same table at toy sizes (what the tests run)

For every shipped example config (``monai_diffusion/config/examples/*.yaml``) and two modes, whole volumes
and patches (the config's own ``data.patch_size``, else half of each axis on the latent grid), one real
autoencoder training step (generator and discriminator losses, Adam, the config's precision and
checkpointing) is run and measured: peak memory (``torch.cuda.max_memory_allocated`` on a GPU, the
profiler's peak on a CPU, plus the weights and Adam state) and median step time, beside the estimator's
count for the same step. Then the whole-volume inference of the 16 GB config of Example 4: a tiled encode
and a tiled decode, peak and time; and one ControlNet training step on its latents (22 label
classes). A row that does not fit the device is reported as out of memory; a row that fails otherwise records
its error, and the suite goes on (exit code 1 when any row failed). On a GPU, ``torch.cuda.max_memory_reserved``
is reported beside each peak. Each line goes to stdout and to ``--output`` (markdown) as soon as it is known.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "GenerativeModels")]

import torch  # noqa: E402

from monai_diffusion.config import load_config  # noqa: E402
from monai_diffusion.config.rules import autoencoder_totals  # noqa: E402
from monai_diffusion.memory import estimate_autoencoder  # noqa: E402
from monai_diffusion.profiling import measure_peak_bytes  # noqa: E402
from monai_diffusion.runtime import resolve_device  # noqa: E402
from monai_diffusion.training.measure import measure_training_step  # noqa: E402

EXAMPLES = ROOT / "monai_diffusion" / "config" / "examples"
# with gpu_smoke.py's 210 s, the two scripts take at most 8 minutes on one GPU (plus the last row's time)
BUDGET_S = 270.0
FAIL_ENV = "GPU_SUITE_FAIL"  # tests only: a row whose label contains this text raises, to check it is recorded


class Table:
    """Lines printed and appended to the output file as each one is known (flushed), so a crash or a time
    limit keeps every finished row."""

    def __init__(self, output: str | None, budget_s: float = float("inf")) -> None:
        self.path = Path(output) if output else None
        self.failures = self.skipped = 0
        self.deadline = time.perf_counter() + budget_s
        if self.path is not None:
            self.path.write_text("", encoding="utf-8")

    def add(self, *lines: str) -> None:
        print("\n".join(lines), flush=True)
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write("\n".join(lines) + "\n")
                handle.flush()

    def row(self, label: str, cells: int, measure: Callable[[], str]) -> None:
        """One row: ``label`` then what ``measure`` returns; out of memory or any other error is recorded in the
        row (``cells`` empty cells follow it) and the suite goes on."""
        if time.perf_counter() > self.deadline:  # a row started before the deadline finishes; none starts after
            self.skipped += 1
            self.add(f"{label} skipped: time budget spent |" + " |" * cells)
            return
        try:
            if os.environ.get(FAIL_ENV) and os.environ[FAIL_ENV] in label:
                raise RuntimeError(f"injected failure ({FAIL_ENV})")
            line = f"{label} {measure()}"
        except torch.OutOfMemoryError:
            line = f"{label} out of memory |" + " |" * cells
        except Exception as err:  # noqa: BLE001 - recorded in its row; the other rows still run
            self.failures += 1
            message = " ".join(f"{type(err).__name__}: {err}".split()).replace("|", "/")[:300]
            line = f"{label} error: {message} |" + " |" * cells
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self.add(line)


def tiny_overrides(path: Path) -> list[str]:
    """Toy sizes for a CPU check of the script: two latent voxels per axis (patches: one), 8 channels, fp32,
    no discriminator (it needs 6 voxels per axis)."""
    config = load_config(path)
    totals = autoencoder_totals(config)
    levels = len(config.autoencoder.num_channels)
    patch = f"data.patch_size={list(totals)}" if config.data.patch_size is not None else "data.patch_size=null"
    return [f"data.image_size={[2 * f for f in totals]}", f"autoencoder.num_channels={[8] * levels}",
            "autoencoder.norm_num_groups=4", "autoencoder.training.use_adversarial_loss=false",
            "autoencoder.training.mixed_precision=false", "autoencoder.training.batch_size=1", patch]


def half_patch(config) -> list[int]:
    totals = autoencoder_totals(config)
    return [max(f, s // 2 // f * f) for s, f in zip(config.data.image_size, totals)]


def rows(table: Table, device: torch.device, tiny: bool) -> None:
    for path in sorted(EXAMPLES.glob("*.yaml")):
        base = tiny_overrides(path) if tiny else []
        config = load_config(path, base)
        patch = list(config.data.patch_size) if config.data.patch_size is not None else half_patch(config)
        for mode, extra in (("whole", ["data.patch_size=null"]), ("patches", [f"data.patch_size={patch}"])):
            variant = load_config(path, base + extra + [f"device={device.type}"])
            tr = variant.autoencoder.training
            size = variant.data.patch_size or variant.data.image_size
            estimate = estimate_autoencoder(variant, target="cuda" if device.type == "cuda" else "cpu").total
            precision = "mixed" if tr.mixed_precision else "fp32"
            checkpointing = "yes" if tr.use_gradient_checkpointing else "no"
            label = (f"| {path.stem} | {mode} | {'x'.join(map(str, size))} | {tr.batch_size} | {precision} | "
                     f"{checkpointing} | {estimate / 2**20:.0f} |")

            def measure(variant=variant, estimate=estimate) -> str:
                measured = measure_training_step(variant, device, repeats=2)
                return (f"{measured.peak_bytes / 2**20:.0f} | {estimate / measured.peak_bytes:.2f} | "
                        f"{measured.seconds * 1000:.0f} |{reserved(device)}")

            table.row(label, 3, measure)


def reserved(device: torch.device) -> str:
    """The reserved-memory cell: ``torch.cuda.max_memory_reserved`` (allocated plus the caching allocator's
    cached blocks, what the driver sees) on a GPU."""
    if device.type != "cuda":
        return " n/a |"
    return f" {torch.cuda.max_memory_reserved(device) / 2**20:.0f} |"


def inference(table: Table, device: torch.device, tiny: bool) -> None:
    """Tiled encode and decode of a whole volume of the 16 GB config of Example 4, random weights."""
    from generative.networks.nets import AutoencoderKL
    from monai_diffusion.config.tiles import resolve_tiles

    path = EXAMPLES / "example4_512x512x128_16gb.yaml"
    config = load_config(path, tiny_overrides(path) if tiny else [])
    tiles = resolve_tiles(config)
    inferer, tile = tiles.inferer(), tiles.tile_size or ["whole"]
    volume = "x".join(map(str, config.data.image_size))
    result = {}

    def encode() -> None:
        torch.manual_seed(0)
        result["model"] = AutoencoderKL(**config.autoencoder.model_kwargs(use_checkpointing=False)).to(device).eval()
        x = torch.rand(1, 1, *config.data.image_size, device=device)
        result["z"] = (inferer.encode(result["model"], x) if inferer is not None else result["model"].encode(x))[0]

    def decode() -> None:
        model, z = result["model"], result["z"]
        result["y"] = inferer.decode(model, z) if inferer is not None else model.decode(z)

    for name, fn in (("tiled encode", encode), ("tiled decode", decode)):
        def measure(fn=fn) -> str:
            with torch.no_grad():
                started = time.perf_counter()
                peak = measure_peak_bytes(fn, device)
                seconds = time.perf_counter() - started
            return f"{peak / 2**20:.0f} |{reserved(device)} {seconds:.1f} |"

        table.row(f"| {name} | {volume} | {'x'.join(map(str, tile))} |", 2, measure)


CONTROLNET_CLASSES = 22  # label classes of the ControlNet step entry (the phantoms' label maps)


def controlnet_step(table: Table, device: torch.device, tiny: bool) -> None:
    """One ControlNet training step (frozen UNet, one-hot label maps at image size) on the whole-volume latents of
    the 16 GB config of Example 4, measured beside the estimator's count (monai_diffusion.memory.controlnet)."""
    from monai_diffusion.memory.controlnet import estimate_controlnet, measure_controlnet_step

    path = EXAMPLES / "example4_512x512x128_16gb.yaml"
    extra = [f"data.num_classes={CONTROLNET_CLASSES}", "controlnet.training.batch_size=1"]
    if tiny:  # a one-level UNet for the two-voxel latents
        extra += tiny_overrides(path) + ["diffusion.num_channels=[8]", "diffusion.attention_levels=[false]",
                                         "diffusion.num_head_channels=[8]", "diffusion.norm_num_groups=4"]
    config = load_config(path, extra, stage="controlnet")
    target = "cuda" if device.type == "cuda" else "cpu"
    estimate = estimate_controlnet(config, target=target).total
    volume = "x".join(map(str, config.data.image_size))

    def measure() -> str:
        peak, seconds = measure_controlnet_step(config, device)
        return f"{peak / 2**20:.0f} |{reserved(device)} {seconds * 1000:.0f} |"

    table.row(f"| ControlNet step | {volume} | {CONTROLNET_CLASSES} | {estimate / 2**20:.0f} |", 2, measure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, to check the script on a CPU")
    parser.add_argument("--output", default=None, help="also write the tables to this markdown file, row by row")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help=f"start no row after this many seconds (default {BUDGET_S:.0f}); later rows say skipped")
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    started = time.perf_counter()
    table = Table(args.output, args.budget_s)
    table.add(f"# gpu_suite on {name}, torch {torch.__version__}{', --tiny' if args.tiny else ''}", "",
              "## Training step: measured vs estimated", "",
              "| config | mode | input | batch | precision | ckpt | estimate MiB | measured MiB | estimate / measured "
              "| step ms | reserved MiB |", "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|")
    rows(table, device, args.tiny)
    table.add("", "## Whole-volume inference of example4_512x512x128_16gb (random weights)", "",
              "| phase | volume | tile | peak MiB | reserved MiB | time s |", "|---|---|---|---:|---:|---:|")
    inference(table, device, args.tiny)
    table.add("", "## ControlNet training step of example4_512x512x128_16gb (whole latents, random weights)", "",
              "| phase | volume | classes | estimate MiB | measured MiB | reserved MiB | step ms |",
              "|---|---|---:|---:|---:|---:|---:|")
    controlnet_step(table, device, args.tiny)
    kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "the profiler's peak"
    table.add("", f"Measured peaks: {kind} above the start, plus the weights and Adam state for training steps; "
              "reserved: torch.cuda.max_memory_reserved since the process started (n/a on a CPU). "
              f"MiB = 2^20 bytes. {table.failures} row(s) failed, {table.skipped} skipped "
              f"(budget {args.budget_s:.0f} s). "
              f"{time.perf_counter() - started:.0f} s in all.")
    return 1 if table.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
