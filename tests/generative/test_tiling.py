"""Tiled encoding/decoding (generative.inferers.tiling): tile placement, exactness where it must be exact,
and agreement with whole-volume inference on a trained network."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval

from generative.inferers.tiling.blended import VolumeNormStatistics as _VolumeNormStatistics
from generative.inferers.tiling.layout import monai_overlap as _monai_overlap
from generative.inferers.tiling.layout import slab as _slab
from generative.networks.nets import AutoencoderKL
from generative.networks.tiling import (
    exact_tiling_supported,
    tile_layout,
    tiled_decode,
    tiled_encode,
    tiled_reconstruct,
)
from monai_diffusion.data import make_phantom


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These networks are tiny: one thread runs them faster than two, and does not stall when other work
    shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10((a.clamp(0, 1) - b.clamp(0, 1)).pow(2).mean()))


@pytest.mark.parametrize("size,tile,overlap,factor", [
    (64, 32, 0.5, 4), (64, 32, 0.25, 4), (96, 40, 0.3, 8), (128, 48, 0.6, 16), (72, 24, 0.1, 8), (50, 10, 0.5, 5),
])
def test_tile_steps_land_on_the_latent_grid_and_monai_uses_them(size, tile, overlap, factor):
    tiles, steps = tile_layout([size], [tile], overlap, [factor])
    assert tiles == (tile,) and steps[0] % factor == 0 and steps[0] >= factor
    assert steps[0] <= tile * (1 - overlap) + 1e-9  # at least the requested overlap
    assert _get_scan_interval([size], list(tiles), 1, _monai_overlap(tiles, steps)) == steps


def test_tile_layout_errors_name_the_valid_sizes():
    with pytest.raises(ValueError, match=r"30 is not \(use 24 or 32\)"):
        tile_layout([64, 64, 64], 30, 0.5, [8, 8, 8])
    with pytest.raises(ValueError, match="one size per spatial axis"):
        tile_layout([64, 64, 64], [32, 32], 0.5, [4, 4, 4])
    with pytest.raises(ValueError, match=r"tile_overlap = 1.0: expected a fraction in \[0, 1\)"):
        tile_layout([64, 64, 64], 32, 1.0, [4, 4, 4])
    assert tile_layout([16, 64, 8], 32, 0.5, [4, 4, 4])[0] == (16, 32, 8)  # shrunk to the volume


def _tiny(spatial_dims: int = 3, **kwargs) -> AutoencoderKL:
    torch.manual_seed(0)
    args = dict(num_channels=(8, 8), latent_channels=2, norm_num_groups=4, attention_levels=(False, False),
                num_res_blocks=1, with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)
    return AutoencoderKL(spatial_dims, **{**args, **kwargs}).eval()


def test_a_tile_as_large_as_the_volume_is_whole_volume_inference():
    model = _tiny(attention_levels=(False, True), with_encoder_nonlocal_attn=True)
    x = torch.rand(2, 1, 16, 12, 8)
    with torch.no_grad():
        z_mu, z_sigma = model.encode(x)
        tiled_mu, tiled_sigma = model.encode(x, tile_size=(16, 12, 8))
        torch.testing.assert_close(tiled_mu, z_mu, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tiled_sigma, z_sigma, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.decode(z_mu, tile_size=64), model.decode(z_mu), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.reconstruct(x, tile_size=64), model.reconstruct(x), atol=1e-5, rtol=1e-5)


class _LocalAutoencoder(nn.Module):
    """A network without GroupNorm or context: average pooling down, nearest upsampling back.

    Tiled inference of such a network is exact only if every tile starts on the latent grid."""

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.total_factors = (factor,) * 3
        self.scale = nn.Parameter(torch.tensor(2.0))

    def _check_input(self, x: torch.Tensor) -> None:
        pass

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.total_factors[0]
        return F.avg_pool3d(x, f) * self.scale, F.avg_pool3d(x * x, f)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(z, scale_factor=self.total_factors[0], mode="nearest") / self.scale


def test_tiles_on_the_latent_grid_make_local_networks_exact():
    model = _LocalAutoencoder(4)
    x = torch.rand(1, 1, 40, 36, 28)
    z_mu, z_sigma = model.encode(x)
    tiled_mu, tiled_sigma = tiled_encode(model, x, (16, 12, 12), overlap=0.4)  # type: ignore[arg-type]
    torch.testing.assert_close(tiled_mu, z_mu)
    torch.testing.assert_close(tiled_sigma, z_sigma)
    torch.testing.assert_close(tiled_decode(model, z_mu, 12, overlap=0.3), model.decode(z_mu))  # type: ignore[arg-type]
    # the same tiles started off the latent grid (a step of 6 voxels with factor 4) give a different latent
    misaligned = sliding_window_inference(x, (16, 12, 12), 1, lambda t: model.encode(t)[0], overlap=1 - 6.5 / 16)
    assert not torch.allclose(misaligned, z_mu, atol=1e-3)


def test_measured_statistics_of_the_first_norm_are_the_whole_volume_ones():
    """The first GroupNorm sees one convolution of the input; counting only tile interiors makes its
    statistics exact, while the tiles' own statistics are not."""
    model = _tiny()
    x = torch.from_numpy(make_phantom((32, 32, 16), 1)).float()[None, None]
    stats = _VolumeNormStatistics(model)
    with torch.no_grad():
        stats.measure(x, (16, 16, 16), (8, 8, 8), model.total_factors, lambda t: model.encode(t), False)
        first = model.encoder.blocks[0](x)  # the input of the first GroupNorm
        groups = first.reshape(1, 4, -1).double()
    mean, var = stats.frozen[model.encoder.blocks[1].norm1]
    torch.testing.assert_close(mean.double(), groups.mean(-1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(var.double(), groups.var(-1, unbiased=False), atol=1e-5, rtol=1e-4)
    tile_mean = first[..., :16, :16, :].reshape(1, 4, -1).mean(-1).double()
    assert not torch.allclose(tile_mean, groups.mean(-1), atol=1e-3)


@pytest.fixture(scope="module")
def trained_2d() -> AutoencoderKL:
    """A small 2D autoencoder trained for a few seconds on phantom slices (tiling is dimension-agnostic)."""
    model = _tiny(2, num_channels=(8, 16))
    model.train()
    data = torch.stack([torch.from_numpy(make_phantom((48, 48), seed)).float()[None] for seed in range(16)])
    optimizer = torch.optim.Adam(model.parameters(), 2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        x = data[torch.randint(0, len(data), (4,), generator=generator)]
        reconstruction, z_mu, z_sigma = model(x)
        kl = (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1).sum() / len(x)
        loss = F.l1_loss(reconstruction, x) + 1e-6 * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_tiled_reconstruction_agrees_with_whole_volume_on_a_trained_network(trained_2d):
    """The stated tolerances: the exact method (the default) equals whole-volume inference up to float
    rounding; the blended one with whole-volume GroupNorm statistics agrees to a PSNR of at least 40 dB
    (measured 55-62 dB for 32-64 pixel tiles with overlap 0.5). Without the whole-volume statistics the
    same tiles agree only to about 20-25 dB."""
    x = torch.from_numpy(make_phantom((128, 96), 99)).float()[None, None]
    with torch.no_grad():
        whole = trained_2d.reconstruct(x)
        assert _psnr(whole, x) > 20  # the network has learned something
        for tile in (32, 64):
            exact = trained_2d.reconstruct(x, tile_size=tile, tile_overlap=0.5)
            blended = tiled_reconstruct(trained_2d, x, tile, 0.5, method="blend")
            own = tiled_reconstruct(trained_2d, x, tile, 0.5, volume_statistics=False)
            assert exact.shape == blended.shape == whole.shape
            torch.testing.assert_close(exact, whole, atol=1e-5, rtol=1e-5)
            assert _psnr(blended, whole) >= 40.0
            assert _psnr(blended, whole) > _psnr(own, whole) + 10


# ----------------------------------------------------------------------------------------------------
# the exact (streamed) method
# ----------------------------------------------------------------------------------------------------
def _random(spatial_dims: int = 3, **kwargs) -> AutoencoderKL:
    """Random weights with non-trivial GroupNorm affine parameters (the defaults are 1 and 0)."""
    model = _tiny(spatial_dims, **kwargs)
    with torch.no_grad():
        for norm in (m for m in model.modules() if isinstance(m, nn.GroupNorm)):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    return model


def _assert_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float rounding: the statistics are summed in another order than whole-volume GroupNorm's."""
    torch.testing.assert_close(actual, expected, atol=2e-5 * float(expected.abs().max()), rtol=0)


@pytest.mark.parametrize("factors,shape,tile", [
    (None, (24, 16, 8), 8),                              # 2 x 2, cubes that divide the volume
    ([4, 2], (40, 24, 16), (16, 8, 8)),                  # odd total factor split, tiles that leave a remainder
    ([(2, 2, 1), 3], (36, 30, 12), (12, 6, 6)),          # per-axis factors, scale 3 (float nearest indices)
])
def test_exact_tiling_is_whole_volume_inference(factors, shape, tile):
    model = _random(num_channels=(8, 8, 8), attention_levels=(False,) * 3, downsample_factors=factors)
    x = torch.rand(2, 1, *shape) * 2 - 0.5
    with torch.no_grad():
        z_mu, z_sigma = model.encode(x)
        report: dict = {}
        tiled_mu, tiled_sigma = tiled_encode(model, x, tile, report=report)
        assert report["method"] == "exact"
        _assert_exact(tiled_mu, z_mu)
        _assert_exact(tiled_sigma, z_sigma)
        _assert_exact(tiled_decode(model, z_mu, tile, buffers="disk"), model.decode(z_mu))
        _assert_exact(model.reconstruct(x, tile_size=tile), model.reconstruct(x))


def test_exact_tiling_in_2d_with_attention_at_the_deepest_level():
    """Attention blocks run on their whole input (the deepest level), so they stay exact too."""
    model = _random(2, num_channels=(8, 8), attention_levels=(False, True), with_encoder_nonlocal_attn=True,
                    with_decoder_nonlocal_attn=True)
    assert exact_tiling_supported(model)
    x = torch.rand(1, 1, 40, 24)
    with torch.no_grad():
        _assert_exact(tiled_reconstruct(model, x, (8, 16), buffers="device"), model.reconstruct(x))


def test_buffers_hold_at_most_three_activations_and_leave_no_files(tmp_path, monkeypatch):
    """The decoder's first level holds the upsampled activation, the residual block's inner activation
    and its output at once; disk buffers are unlinked as soon as they are mapped."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    model = _random(num_channels=(8, 16))
    z = torch.rand(1, 2, 6, 5, 4)
    report: dict = {}
    with torch.no_grad():
        tiled_decode(model, z, 4, buffers="disk", report=report)
    voxels = 12 * 10 * 8
    assert report["buffer_peak_bytes"] == (16 + 8 + 8) * voxels * 4  # Upsample out, inner, block out (fp32)
    assert list(tmp_path.iterdir()) == []


def test_checkpointing_with_gradients_keeps_the_whole_volume_statistics():
    """Issue #11: with use_checkpointing=True and gradients on, the low-memory path used to call
    F.group_norm itself, bypassing the whole-volume statistics of the blended method (agreement with
    whole-volume inference fell from 22 to 7 dB). Both methods must give their no-grad result."""
    model = _random(2, num_channels=(8, 16))
    x = torch.from_numpy(make_phantom((64, 48), 3)).float()[None, None]
    with torch.no_grad():
        whole = model.reconstruct(x)
        blended = tiled_reconstruct(model, x, 16, 0.5, method="blend")
    model.use_checkpointing = True
    with torch.enable_grad():
        blended_grad = tiled_reconstruct(model, x, 16, 0.5, method="blend")
        exact_grad = tiled_reconstruct(model, x, 16)
    assert blended_grad.requires_grad  # the blended method stays differentiable
    torch.testing.assert_close(blended_grad.detach(), blended, atol=1e-5, rtol=1e-5)
    _assert_exact(exact_grad, whole)


def test_method_and_buffer_choices():
    model = _tiny()
    x = torch.rand(1, 1, 16, 16, 8)
    with pytest.raises(ValueError, match=r"method = 'fast': expected one of 'auto', 'exact', 'blend'"):
        tiled_encode(model, x, 8, method="fast")
    with pytest.raises(ValueError, match=r"buffers = 'gpu': expected one of 'auto', 'device', 'cpu', 'disk'"):
        tiled_encode(model, x, 8, buffers="gpu")
    with pytest.raises(ValueError, match="drop volume_statistics=False or use method='blend'"):
        tiled_encode(model, x, 8, method="exact", volume_statistics=False)
    with pytest.raises(ValueError, match=r"3 is not \(use 2 or 4\)"):
        model.encode(torch.rand(1, 1, 64, 64, 64), tile_size=3)
    transposed = _tiny(use_convtranspose=True)
    assert not exact_tiling_supported(transposed) and exact_tiling_supported(model)
    with pytest.raises(ValueError, match="cannot be streamed .* use method='blend'"):
        tiled_decode(transposed, torch.rand(1, 2, 4, 4, 2), 8, method="exact")
    report: dict = {}
    with torch.no_grad():
        tiled_decode(transposed, torch.rand(1, 2, 4, 4, 2), 8, report=report)  # auto: blends
    assert report == {"method": "blend", "buffer_peak_bytes": 0}


def test_exact_blocks_span_whole_trailing_axes_but_stay_thick_enough():
    """The exact method keeps the tile's voxel count but widens trailing axes to the whole volume (long
    contiguous runs) while the other sides keep at least 8 voxels of the deepest level."""
    assert _slab([128, 128, 64], [256, 256, 128], [4, 4, 4]) == [32, 256, 128]
    assert _slab([128, 128, 64], [512, 512, 128], [4, 4, 4]) == [88, 88, 128]
    assert _slab([128, 128, 32], [512, 512, 512], [4, 4, 4]) == [32, 32, 512]
    assert _slab([16, 8, 8], [40, 24, 16], [8, 8, 8]) == [16, 8, 8]  # too thin to widen: the tile itself


def test_exact_method_with_blocks_split_along_every_axis(monkeypatch):
    """The same exactness when blocks are the literal tiles (halos and zeros on every axis)."""
    monkeypatch.setattr("generative.inferers.tiling.inferer.slab", lambda tile, shape, factors: list(tile))
    model = _random(num_channels=(8, 8, 8), attention_levels=(False,) * 3, downsample_factors=[4, 2])
    x = torch.rand(1, 1, 40, 24, 32)
    with torch.no_grad():
        _assert_exact(model.reconstruct(x, tile_size=(16, 8, 8)), model.reconstruct(x))


@pytest.mark.parametrize("factors,shape,tile", [
    (None, (24, 16, 8), 8),
    ([(3, 1, 2), 4], (24, 16, 16), (12, 8, 8)),          # per-axis factors, scale 3, an axis that is not upsampled
])
def test_exact_tiling_with_trilinear_upsampling(factors, shape, tile, monkeypatch):
    """MAISI's decoder interpolates trilinearly: a block needs one more source voxel each side, and the
    volume's edge clamps the source coordinate. Literal tiles put halos and edges on every axis."""
    monkeypatch.setattr("generative.inferers.tiling.inferer.slab", lambda tile, shape, factors: list(tile))
    model = _random(num_channels=(8, 8, 8), attention_levels=(False,) * 3, downsample_factors=factors,
                    upsample_mode="trilinear")
    nearest = _random(num_channels=(8, 8, 8), attention_levels=(False,) * 3, downsample_factors=factors)
    nearest.load_state_dict(model.state_dict())
    x = torch.rand(1, 1, *shape) * 2 - 0.5
    with torch.no_grad():
        z_mu, _ = model.encode(x)
        whole = model.decode(z_mu)
        _assert_exact(tiled_decode(model, z_mu, tile), whole)
        assert float((nearest.decode(z_mu) - whole).abs().max()) > 1e-2 * float(whole.abs().max())


def test_the_tiling_inferer_imports_no_network():
    """Issue #20: no import cycle, also inside functions. The network imports the inferer; the inferer's
    modules never import ``generative.networks`` (the blocks describe themselves with tiling plans)."""
    import ast
    from pathlib import Path

    import generative.inferers.tiling as package

    imported = []
    for path in sorted(Path(package.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.append((path.name, node.module))
            elif isinstance(node, ast.Import):
                imported += [(path.name, alias.name) for alias in node.names]
    assert imported and not [entry for entry in imported if entry[1].startswith(("generative.networks", "monai_diffusion"))]
