"""The offline MedicalNet perceptual loss: weights from a local file, clear errors, sensible distances."""

from __future__ import annotations

import pytest
import torch

from monai_diffusion.perceptual import (
    MedicalNetPerceptualLoss,
    MedicalNetResNet,
    PerceptualWeightsError,
    load_medicalnet_weights,
)
from tests.conftest import write_medicalnet_file


def test_loads_medicalnet_layout(tmp_path):
    write_medicalnet_file(tmp_path / "r10.pth", seed=3)
    torch.manual_seed(3)
    reference = MedicalNetResNet("resnet10")
    model = MedicalNetResNet("resnet10")
    load_medicalnet_weights(model, tmp_path / "r10.pth")
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)


def test_missing_file_says_what_to_download(tmp_path):
    with pytest.raises(PerceptualWeightsError, match=r"autoencoder.perceptual.weights_path: MedicalNet weights file .*missing.pth' not found; download resnet_10_23dataset.pth"):
        MedicalNetPerceptualLoss("resnet10", tmp_path / "missing.pth")


def test_wrong_depth_and_garbage_files(tmp_path):
    write_medicalnet_file(tmp_path / "r10.pth")
    with pytest.raises(PerceptualWeightsError, match=r"does not match MedicalNet resnet18 .*use resnet_18_23dataset.pth or change perceptual.network"):
        MedicalNetPerceptualLoss("resnet18", tmp_path / "r10.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PerceptualWeightsError, match="cannot read"):
        MedicalNetPerceptualLoss("resnet10", tmp_path / "junk.pth")


@pytest.mark.parametrize("depth", ["resnet10", "resnet50"])
def test_distance_properties(tmp_path, depth):
    write_medicalnet_file(tmp_path / "w.pth", depth)
    loss = MedicalNetPerceptualLoss(depth, tmp_path / "w.pth")
    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 16, 16)
    same = loss(x, x)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    assert loss(2 * x + 1, x).item() == pytest.approx(0.0, abs=1e-5)  # standardised: insensitive to affine scaling
    noisy = x + 0.3 * torch.randn_like(x)
    far = x.flip(2)
    assert 0 < loss(noisy, x).item() < loss(far, x).item() + 1.0
    prediction = noisy.clone().requires_grad_(True)
    loss(prediction, x).backward()
    assert prediction.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.parameters())
    loss.train()
    assert not loss.network.training  # BatchNorm statistics stay frozen
