"""Tiled vs whole-volume inference: how closely they agree, what they cost, and the peak memory of a
tiled reconstruction of a volume too large to reconstruct whole.

    python benchmarks/tiling.py --run runs/quickstart/autoencoder            # agreement on phantoms
    python benchmarks/tiling.py --run runs/quickstart/autoencoder --large 512 512 128

Agreement: phantoms of a few sizes are reconstructed whole and tiled (whole-volume GroupNorm statistics
on and off); printed are PSNR(tiled, whole) and the reconstruction PSNR against the input for both.
Large: the peak memory (``monai_diffusion.profiling.measure_peak_bytes``: CUDA max allocated, or on the
CPU the running sum of the allocations torch's profiler records) of a whole-volume and of a tiled
reconstruction, beside the size of the input and of one full-resolution activation of the first level.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from generative.networks.nets import AutoencoderKL
from generative.networks.tiling import tiled_reconstruct
from monai_diffusion.checkpoints import load_autoencoder
from monai_diffusion.data import make_phantom
from monai_diffusion.profiling import measure_peak_bytes
from monai_diffusion.runtime import resolve_device


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.clamp(0, 1) - b.clamp(0, 1)).pow(2).mean()
    return float(-10 * torch.log10(mse)) if mse > 0 else float("inf")


def _phantom(shape: tuple[int, ...], seed: int = 5, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.from_numpy(make_phantom(shape, seed)).float()[None, None].to(device)


def _device(model: AutoencoderKL) -> torch.device:
    return next(model.parameters()).device


def agreement(model: AutoencoderKL, sizes: list[tuple[int, ...]], tiles: list[int], overlaps: list[float]) -> None:
    print("| volume | tile | overlap | statistics | PSNR tiled vs whole dB | PSNR vs input: whole / tiled dB | time whole / tiled s |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for shape in sizes:
        x = _phantom(shape, device=_device(model))
        with torch.no_grad():
            start = time.perf_counter()
            whole = model.reconstruct(x)
            whole_s = time.perf_counter() - start
            for tile in tiles:
                for overlap in overlaps:
                    for volume in (True, False):
                        start = time.perf_counter()
                        tiled = tiled_reconstruct(model, x, tile, overlap, volume_statistics=volume)
                        tiled_s = time.perf_counter() - start
                        print(f"| {'x'.join(map(str, shape))} | {tile} | {overlap} | {'volume' if volume else 'tile'} | "
                              f"{_psnr(tiled, whole):.1f} | {_psnr(whole, x):.2f} / {_psnr(tiled, x):.2f} | "
                              f"{whole_s:.1f} / {tiled_s:.1f} |", flush=True)


def large(model: AutoencoderKL, shape: tuple[int, ...], tile: list[int], overlap: float, modes: list[str]) -> None:
    x = _phantom(shape, device=_device(model))
    first_level = model.init_args["num_channels"][0]
    voxels = x[0, 0].numel()
    print(f"input {'x'.join(map(str, shape))}: {x.numel() * 4 / 2**20:.0f} MiB; one first-level activation "
          f"({first_level} channels, fp32): {voxels * first_level * 4 / 2**20:.0f} MiB")
    for mode in modes:
        result: dict[str, torch.Tensor] = {}
        kwargs = {"tile_size": tile, "tile_overlap": overlap} if mode == "tiled" else {}

        def run() -> None:
            with torch.no_grad():
                result["y"] = model.reconstruct(x, **kwargs)

        start = time.perf_counter()
        peak = measure_peak_bytes(run, _device(model))
        seconds = time.perf_counter() - start
        what = f"tiled reconstruction, tile {tile}, overlap {overlap}" if mode == "tiled" else "whole-volume reconstruction"
        print(f"{what}: peak {peak / 2**20:.0f} MiB above the input, {seconds:.0f} s (profiled); "
              f"output {tuple(result['y'].shape)}, PSNR vs input {_psnr(result['y'], x):.2f} dB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="autoencoder run folder or checkpoint")
    parser.add_argument("--sizes", nargs="+", default=["64x64x32", "96x96x64"])
    parser.add_argument("--tiles", type=int, nargs="+", default=[32, 48])
    parser.add_argument("--overlaps", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--large", type=int, nargs=3, default=None, metavar=("H", "W", "D"))
    parser.add_argument("--large-tile", type=int, nargs=3, default=[128, 128, 64])
    parser.add_argument("--large-modes", nargs="+", choices=["whole", "tiled"], default=["whole", "tiled"],
                        help="whole needs several full-resolution activations (GBs at 512x512x128)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args()
    device = resolve_device(args.device)
    model, _ = load_autoencoder(args.run, map_location=device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"# {args.run}; {where}, torch {torch.__version__}")
    if args.large:
        large(model, tuple(args.large), args.large_tile, 0.5, args.large_modes)
        return
    agreement(model, [tuple(int(v) for v in s.split("x")) for s in args.sizes], args.tiles, args.overlaps)


if __name__ == "__main__":
    main()
