"""Peak memory and time of one forward+backward with and without gradient checkpointing.

Compares MONAI core's AutoencoderKL (which checkpoints the encoder and decoder as two segments) with
ours (which recomputes cheap convolution inputs in backward), on the same architecture and weights.

    python benchmarks/checkpointing.py                 # the case of issue #2: 1x1x96x96x48, (16, 32, 32)
    python benchmarks/checkpointing.py --size 64 64 32 --repeats 5
"""

from __future__ import annotations

import argparse
import platform

import torch
from monai.networks.nets import AutoencoderKL as CoreAutoencoderKL

from generative.networks.nets import AutoencoderKL
from monai_diffusion.profiling import measure_peak_bytes, time_call

MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=3, default=[96, 96, 48])
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    arch = dict(
        spatial_dims=3,
        num_res_blocks=1,
        attention_levels=[False] * len(args.channels),
        latent_channels=3,
        norm_num_groups=16,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )
    ours = AutoencoderKL(num_channels=args.channels, **arch).to(device)
    core = CoreAutoencoderKL(channels=args.channels, include_fc=False, **arch).to(device)
    core.load_old_state_dict(dict(ours.state_dict()))
    x = torch.randn(1, 1, *args.size, device=device)

    def step(model: torch.nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        reconstruction, z_mu, z_sigma = model(x)
        loss = (reconstruction - x).abs().mean() + 1e-6 * (z_mu.pow(2) + z_sigma.pow(2)).mean()
        loss.backward()

    print(f"# one forward+backward, input 1x1x{'x'.join(map(str, args.size))}, num_channels {args.channels}, "
          f"1 res block, no attention; device {device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}")
    print("| network | checkpointing | peak MiB | time s | peak vs no ckpt | time vs no ckpt |")
    print("|---|---|---:|---:|---:|---:|")
    for name, model, attr in (("MONAI core", core, "use_checkpoint"), ("ours", ours, "use_checkpointing")):
        base = None
        for flag in (False, True):
            setattr(model, attr, flag)
            peak = measure_peak_bytes(lambda: step(model), device)
            seconds = time_call(lambda: step(model), repeats=args.repeats, device=device)
            if base is None:
                base = (peak, seconds)
            print(f"| {name} | {flag} | {peak / MIB:.0f} | {seconds:.3f} | {peak / base[0]:.2f} | "
                  f"{seconds / base[1]:.2f} |")


if __name__ == "__main__":
    main()
