"""Contracts of MONAI Generative 0.2.3 that its own test suite checks and that our ``generative`` keeps (our
tests, written for the behaviours of its ``test_encoder_modules.py`` and ``test_spade_vaegan.py``): the
``SpatialRescaler`` shapes and the errors 0.2.3 asserted, and ``SPADENet`` refusing arguments it cannot
be built from with a ValueError."""

from __future__ import annotations

import pytest
import torch

from generative.networks.blocks import SpatialRescaler
from generative.networks.nets import SPADENet


@pytest.mark.parametrize("kwargs,shape,expected", [
    ({"spatial_dims": 2, "method": "bilinear", "multiplier": 0.5, "in_channels": None, "out_channels": None},
     (1, 1, 12, 16), (1, 1, 6, 8)),
    ({"spatial_dims": 2, "method": "bilinear", "multiplier": 0.5, "in_channels": 3, "out_channels": 2},
     (2, 3, 16, 16), (2, 2, 8, 8)),
    ({"spatial_dims": 3, "method": "trilinear", "multiplier": (0.25, 0.5, 0.75), "in_channels": 3, "out_channels": 2},
     (1, 3, 20, 20, 20), (1, 2, 5, 10, 15)),
    ({"spatial_dims": 3, "method": "nearest", "n_stages": 2, "multiplier": 0.5, "in_channels": None},
     (1, 1, 16, 16, 8), (1, 1, 4, 4, 2)),
    ({"spatial_dims": 3, "size": (8, 6, 4), "method": "trilinear", "in_channels": None, "out_channels": None},
     (1, 1, 16, 16, 16), (1, 1, 8, 6, 4)),
    ({"spatial_dims": 2, "n_stages": 0, "method": "area", "multiplier": 0.5, "in_channels": 4, "out_channels": 1},
     (1, 4, 10, 10), (1, 1, 10, 10)),
])
def test_spatial_rescaler_shapes(kwargs, shape, expected):
    rescaler = SpatialRescaler(**kwargs)
    assert tuple(rescaler(torch.randn(shape)).shape) == expected
    assert torch.equal(rescaler.encode(torch.ones(shape)), rescaler(torch.ones(shape)))


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "none"}, r"method = 'none': expected one of"),
    ({"n_stages": -1}, r"n_stages = -1: expected an integer >= 0"),
])
def test_spatial_rescaler_errors_0_2_3_asserted_are_both_assertion_and_value_errors(kwargs, message):
    for kind in (AssertionError, ValueError):
        with pytest.raises(kind, match=message):
            SpatialRescaler(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    ({"n_stages": 2, "size": [8, 8, 8]}, r"needs n_stages = 1"),
    ({"size": [1, 2, 3], "multiplier": 0.5}, r"give size or multiplier, not both"),
])
def test_spatial_rescaler_argument_conflicts_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpatialRescaler(**kwargs)


@pytest.mark.parametrize("args,message", [
    ((1, 1, 8, [16, 16], [16, 32, 64, 128], 16, True), r"num_channels = 16: expected a sequence"),  # 0.2.3's test
    ((2, 1, 1, 3, [16, 16, 16], [4, 8], 8, True), r"input_shape = \[16, 16, 16\]: expected 2 sizes"),
    ((2, 1, 1, 3, [16, 18], [4, 8], 8, True), r"divisible by 2 \*\* len\(num_channels\) = 4 \(not \[18\]\)"),
])
def test_spade_net_refuses_shapes_it_cannot_build(args, message):
    with pytest.raises(ValueError, match=message):
        SPADENet(*args)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_spade_vae_gan_forward_encode_decode(spatial_dims):
    torch.manual_seed(0)
    shape = [16] * spatial_dims
    net = SPADENet(spatial_dims, 1, 1, 3, shape, [4, 8], 8, True, spade_intermediate_channels=4).eval()
    labels = torch.nn.functional.one_hot(torch.randint(0, 3, (1, *shape)), 3).movedim(-1, 1).float()
    image = torch.randn(1, 1, *shape)
    with torch.no_grad():
        out, kld = net(labels, image)
        z = net.encode(image)
        decoded = net.decode(labels, z)
    assert list(out.shape) == [1, 1, *shape] and torch.isfinite(out).all() and torch.isfinite(kld)
    assert list(z.shape) == [1, 8] and list(decoded.shape) == [1, 1, *shape]
