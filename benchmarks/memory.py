"""Estimated vs measured memory of one autoencoder forward + backward, and MONAI core side by side.

For each configuration: the estimate of ``monai_diffusion.memory`` (no tensors allocated), and the
measured peak of a real step (CUDA ``max_memory_allocated``; on the CPU the highest running sum of the
allocations in ``torch.profiler``'s memory events) plus the weights that exist before the step. For the
default ``[2, 2]`` network MONAI core's AutoencoderKL (same architecture and weights) runs in the same
process for a peak and time ratio.

    python benchmarks/memory.py                      # 64x64x32, batch 1: variants of Example 1 and the 5 examples
    python benchmarks/memory.py --size 96 96 64 --repeats 5
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL as CoreAutoencoderKL

from generative.networks.nets import AutoencoderKL
from monai_diffusion.config import load_config
from monai_diffusion.memory import estimate_autoencoder
from monai_diffusion.profiling import measure_peak_bytes, time_call

CONFIG = "monai_diffusion/config/ldm_config.yaml"
CASES = [  # (name, overrides, mixed precision, checkpointing)
    ("[2, 2] fp32", [], False, False),
    ("[2, 2] checkpointing", [], False, True),
    ("[2, 2] mixed", [], True, False),
    ("[2, 2] mixed + checkpointing", [], True, True),
    ("[4, 2] fp32", ["autoencoder.downsample_factors=[4, 2]"], False, False),
    ("[4, 2] mixed + checkpointing", ["autoencoder.downsample_factors=[4, 2]"], True, True),
    ("[16], [32, 64] fp32", ["autoencoder.downsample_factors=[16]", "autoencoder.num_channels=[32, 64]",
                             "autoencoder.attention_levels=[false, true]"], False, False),
    ("[4, 2], [16, 32, 64] mixed + ckpt",
     ["autoencoder.downsample_factors=[4, 2]", "autoencoder.num_channels=[16, 32, 64]"], True, True),
]


def _step(model: torch.nn.Module, x: torch.Tensor, amp: bool, device: torch.device):
    def run() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            reconstruction, z_mu, z_sigma = model(x)
        loss = F.l1_loss(reconstruction.float(), x) + 1e-6 * (z_mu.float().pow(2) + z_sigma.float().pow(2)).mean()
        loss.backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=3, default=[64, 64, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    # a one-level UNet so the (unused) diffusion section accepts any latent size
    base = [f"data.image_size={args.size}", "autoencoder.training.batch_size=1", "diffusion.num_channels=[32]",
            "diffusion.attention_levels=[false]", "diffusion.num_head_channels=[0]"]
    print(f"# one autoencoder forward + backward, batch 1, input {'x'.join(map(str, args.size))}; {device} "
          f"({platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}")
    print("| configuration | estimate MB | measured MB | estimate / measured | time s |")
    print("|---|---:|---:|---:|---:|")
    examples = sorted(Path("monai_diffusion/config/examples").glob("example*.yaml"))
    cases = [(name, CONFIG, overrides, amp, ckpt) for name, overrides, amp, ckpt in CASES]
    for path in examples:  # the guide's examples with their own precision/checkpointing, at this size
        settings = load_config(path).autoencoder.training
        cases.append((f"{path.stem} ({'mixed' if settings.mixed_precision else 'fp32'}"
                       f"{' + ckpt' if settings.use_gradient_checkpointing else ''})", str(path), [],
                      settings.mixed_precision, settings.use_gradient_checkpointing))
    for name, source, overrides, amp, ckpt in cases:
        config = load_config(source, [*base, *overrides])
        estimate = estimate_autoencoder(config, mixed_precision=amp, checkpointing=ckpt, target="cpu").autoencoder_step
        torch.manual_seed(0)
        model = AutoencoderKL(**config.autoencoder.model_kwargs(use_checkpointing=ckpt)).to(device)
        x = torch.rand(1, config.autoencoder.in_channels, *args.size, device=device)
        step = _step(model, x, amp, device)
        step()
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        measured = measure_peak_bytes(step, device) + weights
        seconds = time_call(step, repeats=args.repeats, device=device)
        print(f"| {name} | {estimate / 1e6:.0f} | {measured / 1e6:.0f} | {estimate / measured:.2f} | {seconds:.3f} |")

    # ours vs MONAI core, default [2, 2] network, fp32
    config = load_config(CONFIG, base)
    kwargs = config.autoencoder.model_kwargs(use_checkpointing=False)
    torch.manual_seed(0)
    ours = AutoencoderKL(**kwargs).to(device)
    ours_only = ("num_channels", "downsample_factors", "use_checkpointing")
    core_kwargs = {k: v for k, v in kwargs.items() if k not in ours_only}
    core = CoreAutoencoderKL(channels=kwargs["num_channels"], include_fc=False, **core_kwargs).to(device)
    core.load_old_state_dict(dict(ours.state_dict()))
    x = torch.rand(1, 1, *args.size, device=device)
    rows = []
    for name, model in (("MONAI core", core), ("ours", ours)):
        step = _step(model, x, False, device)
        step()
        rows.append((name, measure_peak_bytes(step, device), time_call(step, repeats=args.repeats, device=device)))
    print("\n| network ([2, 2], fp32) | peak MB | time s |")
    print("|---|---:|---:|")
    for name, peak, seconds in rows:
        print(f"| {name} | {peak / 1e6:.0f} | {seconds:.3f} |")
    print(f"\nours / MONAI core: peak {rows[1][1] / rows[0][1]:.2f}, time {rows[1][2] / rows[0][2]:.2f}")


if __name__ == "__main__":
    main()
