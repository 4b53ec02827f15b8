"""An offline 3D perceptual loss on MedicalNet ResNet features.

MONAI's ``PerceptualLoss`` fetches its feature network at run time (torch.hub), which fails on
air-gapped hospital machines. Here the network is defined in the project (the MedicalNet ResNet of
Chen et al., "Med3D: Transfer Learning for 3D Medical Image Analysis", 2019: 7³ stem with stride 2,
max-pool, four residual stages, the last two dilated instead of strided) and its weights are read from
a local file that the user downloads once, e.g. ``resnet_10_23dataset.pth`` from
https://github.com/Tencent/MedicalNet. Nothing is downloaded here.

The distance is LPIPS-like: each volume is standardised (zero mean, unit variance, as MedicalNet was
trained), features of the four stages are normalised along channels, and the squared differences are
summed over channels and averaged over space and stages.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from monai_diffusion.errors import ConfigError

__all__ = ["MedicalNetResNet", "MedicalNetPerceptualLoss", "load_medicalnet_weights", "PerceptualWeightsError"]

# block, blocks per stage, shortcut type of the released weights (MedicalNet's README: A for 18/34, B for 10/50)
_DEPTHS: dict[str, tuple[str, tuple[int, int, int, int], str]] = {
    "resnet10": ("basic", (1, 1, 1, 1), "B"),
    "resnet18": ("basic", (2, 2, 2, 2), "A"),
    "resnet34": ("basic", (3, 4, 6, 3), "A"),
    "resnet50": ("bottleneck", (3, 4, 6, 3), "B"),
}
_FILES = {
    "resnet10": "resnet_10_23dataset.pth",
    "resnet18": "resnet_18_23dataset.pth",
    "resnet34": "resnet_34_23dataset.pth",
    "resnet50": "resnet_50_23dataset.pth",
}


class PerceptualWeightsError(ConfigError):
    """The MedicalNet weights file is missing or does not fit the configured network."""


def _conv3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class _PadShortcut(nn.Module):
    """Shortcut type A: subsample by ``stride`` and append zero channels up to ``planes`` (no weights).

    MedicalNet's own version detaches the shortcut (``out.data``); here gradients flow through it, as the
    perceptual loss needs gradients with respect to the input."""

    def __init__(self, planes: int, stride: int) -> None:
        super().__init__()
        self.planes, self.stride = planes, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x[:, :, :: self.stride, :: self.stride, :: self.stride]
        return torch.nn.functional.pad(out, (0, 0, 0, 0, 0, 0, 0, self.planes - out.shape[1]))


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = _conv3(in_ch, planes, stride, dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


class MedicalNetResNet(nn.Module):
    """MedicalNet's 3D ResNet backbone (no segmentation head), returning the four stage outputs.

    Args:
        depth: ``resnet10``, ``resnet18``, ``resnet34`` or ``resnet50``.
        in_channels: input channels (MedicalNet was trained on 1).
    """

    def __init__(self, depth: str = "resnet10", in_channels: int = 1) -> None:
        super().__init__()
        if depth not in _DEPTHS:
            raise ValueError(f"MedicalNet depth {depth!r}: expected one of {', '.join(_DEPTHS)}")
        kind, layers, self.shortcut = _DEPTHS[depth]
        block = _BasicBlock if kind == "basic" else _Bottleneck
        self.depth = depth
        self.conv1 = nn.Conv3d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        self._in_ch = 64
        self.layer1 = self._stage(block, 64, layers[0], stride=1, dilation=1)
        self.layer2 = self._stage(block, 128, layers[1], stride=2, dilation=1)
        self.layer3 = self._stage(block, 256, layers[2], stride=1, dilation=2)
        self.layer4 = self._stage(block, 512, layers[3], stride=1, dilation=4)

    def _stage(self, block: type, planes: int, count: int, stride: int, dilation: int) -> nn.Sequential:
        downsample: nn.Module | None = None
        if stride != 1 or self._in_ch != planes * block.expansion:
            if self.shortcut == "A":
                downsample = _PadShortcut(planes * block.expansion, stride)
            else:
                downsample = nn.Sequential(
                    nn.Conv3d(self._in_ch, planes * block.expansion, 1, stride=stride, bias=False),
                    nn.BatchNorm3d(planes * block.expansion),
                )
        blocks = [block(self._in_ch, planes, stride, dilation, downsample)]
        self._in_ch = planes * block.expansion
        blocks += [block(self._in_ch, planes, 1, dilation, None) for _ in range(count - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Args: x: BxCxHxWxD. Returns: the outputs of the four stages."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            features.append(x)
        return features


def load_medicalnet_weights(model: MedicalNetResNet, path: str | Path, key: str = "weights_path") -> None:
    """Load MedicalNet weights (``{'state_dict': {'module.conv1.weight': ...}}`` or a plain state dict).

    The segmentation head (``conv_seg``) of the released files is ignored; every backbone weight must be
    present and of the right shape (BatchNorm's ``num_batches_tracked`` counters may be absent: they are
    not weights).

    Raises:
        PerceptualWeightsError: missing file, unreadable file or weights of another depth.
    """
    path = Path(path)
    expected = _FILES.get(model.depth, "the MedicalNet weights")
    if not path.is_file():
        raise PerceptualWeightsError(
            f"{key}: MedicalNet weights file '{path}' not found; download {expected} once from "
            f"https://github.com/Tencent/MedicalNet (pretrain folder) and point {key} at it"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise PerceptualWeightsError(f"{key}: cannot read '{path}' as a PyTorch weights file ({err})") from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, Mapping) else None
    if not isinstance(state, Mapping):
        raise PerceptualWeightsError(f"{key}: '{path}' holds no state dict")
    cleaned = {k.removeprefix("module."): v for k, v in state.items()}
    cleaned = {k: v for k, v in cleaned.items() if not k.startswith("conv_seg")}
    own = model.state_dict()
    for name, value in own.items():
        if name.endswith("num_batches_tracked"):
            cleaned.setdefault(name, value)
    missing = [k for k in own if k not in cleaned]
    wrong = [k for k in own if k in cleaned and tuple(cleaned[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        example = (missing or wrong)[0]
        raise PerceptualWeightsError(
            f"{key}: '{path}' does not match MedicalNet {model.depth} ({len(missing)} missing and {len(wrong)} "
            f"mis-shaped weights, e.g. {example}); use {expected} or change perceptual.network"
        )
    model.load_state_dict({k: cleaned[k] for k in own}, strict=True)


def _standardise(x: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(1, x.dim()))
    return (x - x.mean(dim=dims, keepdim=True)) / (x.std(dim=dims, keepdim=True) + 1e-6)


def _unit_channels(f: torch.Tensor) -> torch.Tensor:
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)


class MedicalNetPerceptualLoss(nn.Module):
    """Perceptual distance between two volumes on frozen MedicalNet features.

    Args:
        depth: MedicalNet depth.
        weights_path: local weights file (required: the loss is meaningless with random features).
        key: config key named in errors.
    """

    def __init__(self, depth: str, weights_path: str | Path, key: str = "autoencoder.perceptual.weights_path") -> None:
        super().__init__()
        self.network = MedicalNetResNet(depth)
        load_medicalnet_weights(self.network, weights_path, key)
        self.network.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> MedicalNetPerceptualLoss:
        super().train(mode)
        self.network.eval()  # frozen BatchNorm statistics, always
        return self

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Args: prediction, target: BxCxHxWxD (channels are averaged). Returns: scalar loss."""
        pred = _standardise(prediction.mean(dim=1, keepdim=True))
        targ = _standardise(target.mean(dim=1, keepdim=True))
        with torch.no_grad():
            target_features = [_unit_channels(f) for f in self.network(targ)]
        losses = [
            (_unit_channels(fp) - ft).pow(2).sum(dim=1).mean() for fp, ft in zip(self.network(pred), target_features)
        ]
        return torch.stack(losses).mean()
