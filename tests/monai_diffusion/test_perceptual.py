"""The offline MedicalNet perceptual loss: weights from a local file, clear errors, sensible distances."""

from __future__ import annotations

import pytest
import torch

from monai_diffusion.evaluation.perceptual import (
    MedicalNetPerceptualLoss,
    MedicalNetResNet,
    PerceptualWeightsError,
    load_medicalnet_weights,
)
from tests.helpers import write_medicalnet_file


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


def medicalnet_release_keys(depth: int) -> set[str]:
    """The state-dict keys of MedicalNet's released ``resnet_<depth>_23dataset.pth``, written out from its
    ``models/resnet.py`` and README (shortcut B for 10 and 50, A — no weights — for 18 and 34), independently
    of our network: ``module.`` (DataParallel) + backbone + the ``conv_seg`` head."""
    blocks = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}[depth]
    expansion, convs = (4, 3) if depth == 50 else (1, 2)

    def bn(prefix: str) -> list[str]:
        return [f"{prefix}.{p}" for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]

    keys = ["conv1.weight", *bn("bn1")]
    inplanes = 64
    for stage, (count, planes) in enumerate(zip(blocks, (64, 128, 256, 512))):
        stride = 2 if stage == 1 else 1
        for index in range(count):
            prefix = f"layer{stage + 1}.{index}"
            for conv in range(1, convs + 1):
                keys += [f"{prefix}.conv{conv}.weight", *bn(f"{prefix}.bn{conv}")]
            if index == 0 and depth in (10, 50) and (stride != 1 or inplanes != planes * expansion):
                keys += [f"{prefix}.downsample.0.weight", *bn(f"{prefix}.downsample.1")]
        inplanes = planes * expansion
    keys += ["conv_seg.0.weight", "conv_seg.0.bias", *bn("conv_seg.1"), "conv_seg.3.weight", *bn("conv_seg.4"),
             "conv_seg.6.weight"]
    return {f"module.{k}" for k in keys}


@pytest.mark.parametrize("depth", [10, 18, 34, 50])
def test_loads_the_key_layout_of_the_real_releases(tmp_path, depth):
    """Our backbone has exactly the released backbone's weights: a file with the release's key names loads
    (also without the num_batches_tracked counters), and every value lands where its name says."""
    keys = medicalnet_release_keys(depth)
    model = MedicalNetResNet(f"resnet{depth}")
    own = model.state_dict()
    backbone = {k.removeprefix("module.") for k in keys if not k.startswith("module.conv_seg")}
    assert set(own) == backbone
    generator = torch.Generator().manual_seed(depth)
    release = {k: torch.randn(own[k.removeprefix("module.")].shape, generator=generator) if k in
               {f"module.{b}" for b in backbone} else torch.zeros(1) for k in keys}
    release = {k: v for k, v in release.items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": release}, tmp_path / "release.pth")
    load_medicalnet_weights(model, tmp_path / "release.pth")
    for name, value in model.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            torch.testing.assert_close(value, release[f"module.{name}"], rtol=0, atol=0)


def test_shortcut_a_pads_channels_and_passes_gradients():
    model = MedicalNetResNet("resnet18").eval()
    x = torch.rand(1, 1, 16, 16, 16, requires_grad=True)
    features = model(x)
    assert [f.shape[1] for f in features] == [64, 128, 256, 512]
    features[-1].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("depth", ["resnet10", "resnet50"])
def test_distance_properties(tmp_path, depth):
    write_medicalnet_file(tmp_path / "w.pth", depth)
    loss = MedicalNetPerceptualLoss(depth, tmp_path / "w.pth")
    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 16, 16)
    same = loss(x, x)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    assert loss(2 * x + 1, x).item() == pytest.approx(0.0, abs=1e-5)  # standardised: insensitive to affine scaling
    noise = torch.randn_like(x)
    distances = [loss(x + level * noise, x).item() for level in (0.05, 0.2, 0.8)]
    assert 0 < distances[0] < distances[1] < distances[2]  # more noise, farther
    noisy = x + 0.2 * noise
    prediction = noisy.clone().requires_grad_(True)
    loss(prediction, x).backward()
    assert prediction.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.parameters())
    loss.train()
    assert not loss.network.training  # BatchNorm statistics stay frozen
