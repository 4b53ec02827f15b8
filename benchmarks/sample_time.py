"""Time to one whole sample of a config on this machine: the denoising (network evaluations x one UNet pass,
measured here with seeded random weights, which cost the same to run as trained ones) plus the tiled decode of
one volume (``--decode-seconds``, as ``benchmarks/pipeline.py`` measured it for the same config), for each
sampler's number of network evaluations.

    python benchmarks/sample_time.py --config monai_diffusion/config/examples/example4_512x512x128_16gb.yaml \
        --decode-seconds 92
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
from monai.networks.nets import DiffusionModelUNet  # noqa: E402

from generative.networks.nets import AutoencoderKL  # noqa: E402
from monai_diffusion.config import load_config  # noqa: E402

SAMPLERS = [("ddpm", 1000), ("ddim", 50), ("dpm-solver++", 20), ("dpm-solver++", 10), ("rflow", 30), ("rflow", 10)]


def unet_pass_seconds(config, repeats: int) -> tuple[float, float, tuple[int, ...]]:
    """Wall and CPU seconds of one UNet pass on one latent of the config (batch 1, fp32, no grad)."""
    ae = config.autoencoder
    latent_shape = AutoencoderKL(**ae.model_kwargs()).latent_shape(tuple(config.data.image_size)[: ae.spatial_dims])
    torch.manual_seed(0)
    unet = DiffusionModelUNet(**config.diffusion.unet_kwargs(ae.latent_channels, ae.spatial_dims)).eval()
    latent = torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.no_grad():
        unet(latent, timesteps=t)  # warm-up
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            unet(latent, timesteps=t)
    return (time.perf_counter() - wall) / repeats, (time.process_time() - cpu) / repeats, tuple(latent_shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--decode-seconds", type=float, required=True,
                        help="wall seconds of one tiled decode, as benchmarks/pipeline.py measured it")
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    config = load_config(options.config)
    wall, cpu, latent = unet_pass_seconds(config, options.repeats)
    print(f"# {options.config}; {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"one UNet pass on a {'x'.join(map(str, latent))} latent: {wall:.3f} s wall, {cpu:.3f} s CPU "
          f"(mean of {options.repeats}); decode {options.decode_seconds:g} s (benchmarks/pipeline.py)\n")
    print("| sampler | network evaluations | denoising, wall s | denoising, CPU s | + decode, wall s | "
          "whole sample, wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, evaluations in SAMPLERS:
        print(f"| {name} | {evaluations} | {wall * evaluations:.0f} | {cpu * evaluations:.0f} | "
              f"{options.decode_seconds:g} | {wall * evaluations + options.decode_seconds:.0f} |")


if __name__ == "__main__":
    main()
