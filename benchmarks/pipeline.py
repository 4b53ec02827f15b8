"""The whole-volume pipeline of a config, phase by phase: estimated device memory, and a measured tiled encode
and decode of one whole volume on this machine with seeded random weights.

    python benchmarks/pipeline.py --config monai_diffusion/config/examples/example4_512x512x128_16gb.yaml

1. The estimate (``monai_diffusion.memory.estimate_pipeline``, CUDA autocast rules): the autoencoder training
   step, its validation on whole volumes, the latent cache's encode, the diffusion training step, and
   sampling (denoising, then the decode of a generated latent), with the GPU margin and the host memory of
   the exact tiled method's buffers.
2. Measured (``--measure``, default encode and decode): the autoencoder of the config with seeded random
   weights (which cost the same to run as trained ones) encodes a phantom of ``data.image_size`` and decodes
   a latent of the matching shape, by the config's tiles (``Config.inference_tile``), in float32. The
   buffers go to scratch files (``buffers="disk"``), so the torch peak is what the compute device would
   hold with its buffers in host memory; it is printed beside the estimate of the same pass on CPU rules.
   On the CPU, the peak is the running sum of the allocations torch's profiler records
   (``monai_diffusion.profiling``); it includes the CPU convolution kernels' own scratch memory, which a
   GPU's cuDNN keeps in its workspace instead (in the margin).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "GenerativeModels")]

import torch  # noqa: E402

from generative.networks.nets import AutoencoderKL  # noqa: E402
from monai_diffusion import memory  # noqa: E402
from monai_diffusion.config import load_config  # noqa: E402
from monai_diffusion.config.tiles import resolve_tiles  # noqa: E402
from monai_diffusion.data import make_phantom  # noqa: E402
from monai_diffusion.profiling import measure_peak_bytes, peak_rss_bytes  # noqa: E402

MiB = 2**20


def measure(config, part: str, seed: int = 0) -> tuple[float, float, int, int, str]:
    """Wall s, CPU s, torch peak bytes, buffer peak bytes and the blocks of one tiled ``part`` in float32."""
    ae = config.autoencoder
    torch.manual_seed(seed)
    model = AutoencoderKL(**ae.model_kwargs()).eval()
    size = tuple(config.data.image_size)[: ae.spatial_dims]
    inferer = resolve_tiles(config, buffers="disk").inferer()
    if part == "encode":
        data = torch.from_numpy(make_phantom(size, seed)).float()[None, None]
    else:
        data = torch.randn((1, *model.latent_shape(size)), generator=torch.Generator().manual_seed(seed))
    report: dict = {}

    def run() -> None:
        with torch.no_grad():
            if part == "encode":
                inferer.encode(model, data, report)
            else:
                inferer.decode(model, data, report)

    wall, cpu = time.perf_counter(), time.process_time()
    peak = measure_peak_bytes(run)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    block = "x".join(map(str, report.get("block", ()))) or report.get("method", "")
    return wall, cpu, peak, report.get("buffer_peak_bytes", 0), block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--measure", nargs="*", choices=("encode", "decode"), default=["encode", "decode"])
    options = parser.parse_args()
    config = load_config(options.config)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"# {options.config}; {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("\n## Estimated device memory per phase (CUDA autocast rules)\n")
    print(memory.pipeline_report(memory.estimate_pipeline(config)))
    if not options.measure:
        return
    tiles = resolve_tiles(config)
    if tiles.tile_size is None:
        raise SystemExit("error: the config runs whole volumes at once (no autoencoder.tile_size or data.patch_size); "
                         "the measurement is of tiled passes")
    print(f"\n## Measured on this CPU: one {'x'.join(map(str, config.data.image_size))} volume, random weights, fp32, "
          f"tiles {'x'.join(map(str, tiles.tile_size))}, buffers on disk\n")
    print("| pass | wall s | CPU s | measured torch peak MiB | estimate (CPU rules) MiB | buffers MiB | "
          "peak RSS so far MiB | blocks |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for part in options.measure:
        estimate, _, _ = memory.estimate_autoencoder_inference(config, part, False, target="cpu")
        wall, cpu, peak, buffered, block = measure(config, part)
        print(f"| {part} | {wall:.0f} | {cpu:.0f} | {peak / MiB:.0f} | {estimate / MiB:.0f} | {buffered / MiB:.0f} | "
              f"{peak_rss_bytes() / MiB:.0f} | {block} |", flush=True)


if __name__ == "__main__":
    main()
