"""Guide Example 3 at full size on the CPU: one autoencoder forward + backward with mixed precision and
checkpointing, measured peak vs estimate (issue target: at most 3 GB), and the [2, 2] fp32 baseline's
estimate beside it.

    python benchmarks/example3_cpu.py          # several minutes on a 2-core CPU
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from generative.networks.nets import AutoencoderKL
from monai_diffusion.config import load_config
from monai_diffusion.memory import estimate_autoencoder
from monai_diffusion.profiling import measure_peak_bytes
from monai_diffusion.training.measure import measure_training_step

CONFIG = "monai_diffusion/config/examples/example3_256x256x64.yaml"


def _autoencoder_step(config, amp: bool, ckpt: bool) -> float:
    """Measured peak (bytes) of one autoencoder forward + backward, weights included."""
    torch.manual_seed(0)
    model = AutoencoderKL(**config.autoencoder.model_kwargs(use_checkpointing=ckpt))
    x = torch.rand(1, 1, *config.data.image_size)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            reconstruction, z_mu, z_sigma = model(x)
        (F.l1_loss(reconstruction.float(), x) + 1e-6 * (z_mu.float().pow(2) + z_sigma.float().pow(2)).mean()).backward()

    return measure_peak_bytes(step) + sum(p.numel() * 4 for p in model.parameters())


def main() -> None:
    config = load_config(CONFIG, ["autoencoder.training.use_gradient_checkpointing=true"])
    estimate = estimate_autoencoder(config, mixed_precision=True, checkpointing=True, target="cpu")
    baseline = estimate_autoencoder(load_config(CONFIG, ["autoencoder.downsample_factors=[2, 2]"]),
                                    mixed_precision=False, checkpointing=False, target="cpu")
    started = time.perf_counter()
    measured = _autoencoder_step(config, amp=True, ckpt=True)
    baseline_config = load_config(CONFIG, ["autoencoder.downsample_factors=[2, 2]"])
    measured_baseline = _autoencoder_step(baseline_config, amp=False, ckpt=False)
    measured_full = measure_training_step(config).peak_bytes
    print(f"Example 3 (256x256x64, [16, 32, 64], [4, 2], attention at the deepest level, batch 1) on "
          f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}; {time.perf_counter() - started:.0f} s")
    print("| what | measured GB | estimate GB |")
    print("|---|---:|---:|")
    print(f"| autoencoder forward + backward, mixed precision + checkpointing | {measured / 1e9:.2f} | "
          f"{estimate.autoencoder_step / 1e9:.2f} |")
    print(f"| the same with [2, 2], fp32, no checkpointing (baseline) | {measured_baseline / 1e9:.2f} | "
          f"{baseline.autoencoder_step / 1e9:.2f} |")
    print(f"| full training step (discriminator, Adam), mixed precision + checkpointing | {measured_full / 1e9:.2f} | "
          f"{estimate.total / 1e9:.2f} |")
    print(f"\nmixed precision + checkpointing with [4, 2] needs {measured / measured_baseline:.2f}x the [2, 2] fp32 "
          f"baseline")


if __name__ == "__main__":
    main()
