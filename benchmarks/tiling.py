"""Tiled vs whole-volume inference: how closely they agree, what they cost, and the peak memory of a
tiled reconstruction of a volume too large to reconstruct whole.

    python benchmarks/tiling.py --run runs/quickstart/autoencoder                 # agreement on phantoms
    python benchmarks/tiling.py --random-weights --large 512 512 128 --large-modes exact whole
    python benchmarks/tiling.py --random-weights --large 512 512 512 --large-modes exact --buffers disk

Model: a trained autoencoder (``--run``) or the quickstart architecture with seeded random weights
(``--random-weights``: num_channels [16, 32, 32], downsample_factors [2, 2], latent_channels 3, one
residual block per level, no attention, 16 GroupNorm groups), which costs the same to run.

Agreement: phantoms of a few sizes are reconstructed whole and tiled, exactly (``method="exact"``) and
blended (``method="blend"``, with whole-volume GroupNorm statistics and with each tile's own); printed are
PSNR(tiled, whole), the largest absolute difference, and the reconstruction PSNR against the input.

Large: one phantom of ``--large`` voxels is reconstructed in each of ``--large-modes`` (``whole``,
``exact`` per tile size and buffer location, ``blend``); printed per run:

* time: wall-clock seconds and this process' CPU seconds (all threads), both while profiled;
* peak: the most bytes torch had allocated at once during the run, above what was allocated before it
  (``monai_diffusion.profiling.measure_peak_bytes``: CUDA max allocated on a GPU; on the CPU the running
  sum of the allocations torch's profiler records). On the CPU this includes host-memory buffers
  (``--buffers cpu``) but not memory-mapped scratch files (``--buffers disk``), which torch does not
  allocate; on a GPU it counts device memory only;
* buffers: the most bytes the exact method's full-size activations between layers held at once, wherever
  they lived (host memory, device, or scratch files);
* RSS: this process' peak resident set so far (it never goes down, so only the first run of an invocation
  is its own; memory-mapped scratch pages count while resident);
* PSNR of the output against the input, and against the whole-volume output when ``whole`` ran in the same
  invocation (it runs last, so the tiled runs' RSS is theirs), with the largest absolute difference.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from generative.inferers.tiling import tiled_reconstruct
from generative.networks.nets import AutoencoderKL
from monai_diffusion.data import make_phantom
from monai_diffusion.profiling import measure_peak_bytes, peak_rss_bytes
from monai_diffusion.runs.checkpoints import load_autoencoder
from monai_diffusion.runtime import resolve_device

MiB = 2**20


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.clamp(0, 1) - b.clamp(0, 1)).pow(2).mean()
    return float(-10 * torch.log10(mse)) if mse > 0 else float("inf")


def _phantom(shape: tuple[int, ...], seed: int = 5, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.from_numpy(make_phantom(shape, seed)).float()[None, None].to(device)


def _device(model: AutoencoderKL) -> torch.device:
    return next(model.parameters()).device


def random_quickstart(device: torch.device, seed: int = 0) -> AutoencoderKL:
    """The quickstart autoencoder's architecture with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    model = AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, num_channels=[16, 32, 32],
                          downsample_factors=[2, 2], latent_channels=3, num_res_blocks=1,
                          attention_levels=[False, False, False], norm_num_groups=16,
                          with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)
    return model.to(device).eval()


def _timed(fn) -> tuple[object, float, float]:
    """``fn()``, wall seconds, CPU seconds of this process."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def agreement(model: AutoencoderKL, sizes: list[tuple[int, ...]], tiles: list[int], overlaps: list[float]) -> None:
    print("| volume | tile | method | overlap | statistics | PSNR tiled vs whole dB | max abs diff | "
          "PSNR vs input: whole / tiled dB | time whole / tiled s |")
    print("|---|---:|---|---:|---|---:|---:|---:|---:|")
    for shape in sizes:
        x = _phantom(shape, device=_device(model))
        with torch.no_grad():
            whole, whole_s, _ = _timed(lambda: model.reconstruct(x))
            for tile in tiles:
                runs = [("exact", None, True)] + [("blend", o, v) for o in overlaps for v in (True, False)]
                for method, overlap, volume in runs:
                    tiled, tiled_s, _ = _timed(lambda: tiled_reconstruct(
                        model, x, tile, overlap if overlap is not None else 0.5, volume_statistics=volume,
                        method=method))
                    shown = "-" if overlap is None else overlap
                    print(f"| {'x'.join(map(str, shape))} | {tile} | {method} | {shown} | "
                          f"{'volume' if volume else 'tile'} | {_psnr(tiled, whole):.1f} | "
                          f"{(tiled - whole).abs().max():.1e} | {_psnr(whole, x):.2f} / {_psnr(tiled, x):.2f} | "
                          f"{whole_s:.1f} / {tiled_s:.1f} |", flush=True)


def large(model: AutoencoderKL, shape: tuple[int, ...], modes: list[str], tiles: list[list[int]], buffers: list[str],
          overlap: float) -> None:
    device = _device(model)
    x = _phantom(shape, device=device)
    first_level = model.init_args["num_channels"][0]
    voxels = x[0, 0].numel()
    print(f"input {'x'.join(map(str, shape))}: {x.numel() * 4 / MiB:.0f} MiB; one first-level activation "
          f"({first_level} channels, fp32): {voxels * first_level * 4 / MiB:.0f} MiB")
    runs: list[tuple[str, dict]] = []
    for mode in [m for m in modes if m != "whole"]:  # whole last: its RSS would hide the others'
        for tile in tiles:
            for where in (buffers if mode == "exact" else ["-"]):
                options = {"tile_size": tile, "overlap": overlap, "method": mode}
                runs.append((f"{mode}, tile {'x'.join(map(str, tile))}" + (f", buffers {where}" if mode == "exact" else
                                                                            f", overlap {overlap}"),
                             {**options, **({"buffers": where} if mode == "exact" else {})}))
    if "whole" in modes:
        runs.append(("whole", {}))
    outputs: dict[str, torch.Tensor] = {}
    rows: list[tuple[str, str]] = []
    for name, options in runs:
        result: dict[str, torch.Tensor] = {}
        report: dict = {}

        def run() -> None:
            with torch.no_grad():
                if options:
                    result["y"] = tiled_reconstruct(model, x, report=report, **options)
                else:
                    result["y"] = model.reconstruct(x)

        peak, wall, cpu = _timed(lambda: measure_peak_bytes(run, device))
        if "block" in report:
            name += f" (blocks {'x'.join(map(str, report['block']))})"
        outputs[name] = result["y"]
        buffered = report.get("buffer_peak_bytes", 0) / MiB
        row = (f"| {name} | {wall:.0f} | {cpu:.0f} | {peak / MiB:.0f} | {buffered:.0f} | "
               f"{peak_rss_bytes() / MiB:.0f} | {_psnr(result['y'], x):.2f} |")
        rows.append((name, row))
        print(f"done: {row}", flush=True)
    print("\n| run | wall s | CPU s | peak torch MiB | buffers MiB | peak RSS so far MiB | PSNR vs input dB | "
          "PSNR vs whole dB | max abs diff vs whole |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    whole = outputs.get("whole")
    for name, row in rows:
        if whole is None or name == "whole":
            print(f"{row} | |")
        else:
            print(f"{row} {_psnr(outputs[name], whole):.1f} | {(outputs[name] - whole).abs().max():.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="autoencoder run folder or checkpoint")
    source.add_argument("--random-weights", action="store_true",
                        help="the quickstart architecture with seeded random weights (no trained model needed)")
    parser.add_argument("--sizes", nargs="+", default=["64x64x32", "96x96x64"])
    parser.add_argument("--tiles", type=int, nargs="+", default=[32, 48])
    parser.add_argument("--overlaps", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--large", type=int, nargs=3, default=None, metavar=("H", "W", "D"))
    parser.add_argument("--large-tiles", nargs="+", default=["128x128x64"], help="tile sizes, e.g. 128x128x64")
    parser.add_argument("--large-modes", nargs="+", choices=["whole", "exact", "blend"], default=["exact", "whole"],
                        help="whole needs several full-resolution activations (about 18 GiB at 512x512x128)")
    parser.add_argument("--buffers", nargs="+", choices=["cpu", "device", "disk"], default=["cpu"],
                        help="where the exact method keeps its full-size activations (one run each)")
    parser.add_argument("--large-overlap", type=float, default=0.5, help="overlap of the blended runs")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.random_weights:
        model, name = random_quickstart(device), "quickstart architecture, random weights (seed 0)"
    else:
        model, name = load_autoencoder(args.run, map_location=device)[0], args.run
    threads = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else threads
    print(f"# {name}; {where}, torch {torch.__version__}")
    if args.large:
        tiles = [[int(v) for v in tile.split("x")] for tile in args.large_tiles]
        large(model, tuple(args.large), args.large_modes, tiles, args.buffers, args.large_overlap)
        return
    agreement(model, [tuple(int(v) for v in s.split("x")) for s in args.sizes], args.tiles, args.overlaps)


if __name__ == "__main__":
    main()
