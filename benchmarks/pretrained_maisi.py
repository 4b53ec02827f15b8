"""The MAISI CT autoencoder imported with ``ldm-import maisi``, estimated on 512x512x512 by the memory estimator
(CUDA rules; nothing is run at that size).

    python benchmarks/pretrained_maisi.py [--tile-size 128] [--keep DIR]

1. Builds MONAI 1.6's ``AutoencoderKlMaisi`` at NV-Generate-CT's size (channels 64/128/256, two residual blocks
   per level, 4 latent channels, no attention; 20.9 M parameters) with random weights, which cost the same
   memory as the published ones, and saves its state dict as ``autoencoder_v1.pt`` would be saved.
2. Imports it with ``ldm-import maisi --image-size 512 512 512 --set autoencoder.tile_size=T``.
3. Prints ``estimate_memory.py --config <run>/config.yaml --pipeline`` for that run folder: the line
   "sampling: decode" is our exact tiled decode of one 4x128x128x128 latent to 512x512x512 (device memory,
   with the margin, and the host memory of the tiled method's buffers).

No CPU measurement of the 512^3 decode is made: on the shared 2-core machine it would take hours (the
512x512x512 tiled run of docs/tiling.md took 1153 s for a smaller network). The diffusion phases printed
come from the default UNet of the config written, not from MAISI's UNet (which is not imported).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "GenerativeModels")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tile-size", type=int, default=128, help="autoencoder.tile_size of the import")
    parser.add_argument("--keep", default=None, help="folder for the checkpoint and run (default: temporary)")
    args = parser.parse_args()

    import torch
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    from monai_diffusion.cli import estimate_memory_main, import_weights_main
    from monai_diffusion.pretrained.importer import MAISI_CT_AUTOENCODER

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="maisi_"))
    torch.manual_seed(0)
    reference = AutoencoderKlMaisi(**MAISI_CT_AUTOENCODER, use_checkpointing=False, use_convtranspose=False,
                                   norm_float16=True, num_splits=8, dim_split=1)
    print(f"AutoencoderKlMaisi: {sum(p.numel() for p in reference.parameters()):,} parameters")
    torch.save(reference.state_dict(), folder / "autoencoder_v1.pt")
    run = folder / "run"
    code = import_weights_main(["maisi", "--autoencoder", str(folder / "autoencoder_v1.pt"), "--output", str(run),
                                "--image-size", "512", "512", "512",
                                "--set", f"autoencoder.tile_size={args.tile_size}"])
    if code:
        raise SystemExit(code)
    overrides = ["autoencoder.training.batch_size=1", "diffusion.training.batch_size=1",
                 "diffusion.sampling.batch_size=1"]
    argv = ["--config", str(run / "autoencoder" / "config.yaml"), "--pipeline"]
    for item in overrides:
        argv += ["--set", item]
    print(f"$ estimate_memory.py {' '.join(argv)}")
    raise SystemExit(estimate_memory_main(argv))


if __name__ == "__main__":
    main()
