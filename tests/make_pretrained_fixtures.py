"""Generate ``tests/fixtures/pretrained/brain_ldm.pth``: a small network pair in the MONAI model-zoo brain LDM
bundle's layout, built with the REAL ``monai-generative==0.2.3`` classes, and their outputs.

The bundle (``brain_image_synthesis_latent_diffusion_model``) holds ``models/autoencoder.pt`` and
``models/model.pt``: plain ``state_dict()``s of 0.2.3's ``AutoencoderKL`` and ``DiffusionModelUNet``. Its UNet
reads the latent concatenated with the four covariates broadcast over the grid (``in_channels`` 3 + 4) and the
covariates again through cross-attention (``cross_attention_dim`` 4), with ``resblock_updown`` and
``upcast_attention``. The fixture keeps every one of those features at tiny sizes.

Run it as ``make_generative_023_fixtures.py`` is run (a throwaway environment with monai-generative 0.2.3; from a
folder that is not the repository root):

    cd /tmp && /tmp/gen023/bin/python /path/to/repo/tests/make_pretrained_fixtures.py /path/to/repo/tests/fixtures/pretrained

Reference outputs are computed in float64 (a double copy of the float32 weights).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

AUTOENCODER = dict(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=3, num_channels=(4, 8, 8),
                   num_res_blocks=1, norm_num_groups=4, norm_eps=1e-6, attention_levels=(False, False, False),
                   with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)
UNET = dict(spatial_dims=3, in_channels=7, out_channels=3, num_channels=(8, 8), num_res_blocks=1,
            attention_levels=(False, True), norm_num_groups=4, norm_eps=1e-6, resblock_updown=True,
            num_head_channels=(0, 8), with_conditioning=True, transformer_num_layers=1, cross_attention_dim=4,
            upcast_attention=True, use_flash_attention=False)
IMAGE = (16, 16, 16)  # -> latent 3 x 4 x 4 x 4


def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def make(out: Path) -> None:
    from generative.networks.nets import AutoencoderKL, DiffusionModelUNet

    torch.manual_seed(0)
    ae = AutoencoderKL(**copy.deepcopy(AUTOENCODER)).eval()
    unet = DiffusionModelUNet(**copy.deepcopy(UNET)).eval()
    _perturb(ae, 1)
    _perturb(unet, 2)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 1, *IMAGE, generator=g)
    conditions = torch.rand(2, 1, 4, generator=g)
    latent = torch.randn(2, 3, 4, 4, 4, generator=g)
    timesteps = torch.tensor([5, 900])
    ae64, unet64 = copy.deepcopy(ae).double(), copy.deepcopy(unet).double()
    with torch.no_grad():
        z_mu, z_sigma = ae64.encode(x.double())
        decoded = ae64.decode(latent.double())
        channels = conditions.double().squeeze(1)[..., None, None, None].expand(-1, -1, *latent.shape[2:])
        eps = unet64(torch.cat([latent.double(), channels], dim=1), timesteps=timesteps, context=conditions.double())
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"autoencoder_args": AUTOENCODER, "unet_args": UNET, "autoencoder": ae.state_dict(),
                "unet": unet.state_dict(), "inputs": {"x": x, "conditions": conditions, "latent": latent,
                                                      "timesteps": timesteps},
                "outputs": {"z_mu": z_mu, "z_sigma": z_sigma, "decoded": decoded, "eps": eps}},
               out / "brain_ldm.pth", _use_new_zipfile_serialization=False)


if __name__ == "__main__":
    make(Path(sys.argv[1]))
