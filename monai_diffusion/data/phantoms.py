"""Synthetic CT/MRI-like phantoms: a body with organ-like ellipsoids, textured, in [0, 1], fully determined
by a seed. They let every command run without data and the tests check learning on known anatomy."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from monai_diffusion.config.schema import PHANTOM_NUM_CLASSES
from monai_diffusion.data.keys import AFFINE_KEY, CAVITY_KEY, IMAGE_KEY, LABEL_KEY, PATH_KEY, SIZE_KEY
from monai_diffusion.errors import DataError

__all__ = ["make_phantom", "make_labelled_phantom", "label_classes", "SyntheticPhantomDataset", "seeded_rng"]


def seeded_rng(*seeds: int) -> np.random.Generator:
    """A numpy Generator for arbitrary (possibly negative) integer seeds."""
    return np.random.default_rng([int(s) % 2**64 for s in seeds])


def _rotation(rng: np.random.Generator, ndim: int, max_angle: float) -> np.ndarray:
    """Random rotation matrix of shape (ndim, ndim) with angles in [-max_angle, max_angle]."""
    if ndim == 2:
        a = rng.uniform(-max_angle, max_angle)
        return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    rot = np.eye(3)
    for axes in ((0, 1), (0, 2), (1, 2)):
        a = rng.uniform(-max_angle, max_angle)
        plane = np.eye(3)
        i, j = axes
        plane[i, i], plane[i, j], plane[j, i], plane[j, j] = math.cos(a), -math.sin(a), math.sin(a), math.cos(a)
        rot = rot @ plane
    return rot


def _grid(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Broadcastable normalised coordinates in [-1, 1], one array per axis (length n_k on axis k)."""
    coords = []
    for axis, n in enumerate(shape):
        view = [1] * len(shape)
        view[axis] = n
        coords.append(np.linspace(-1.0, 1.0, n, dtype=np.float32).reshape(view))
    return coords


def _upsample_axis(arr: np.ndarray, axis: int, n: int) -> np.ndarray:
    """Smoothstep interpolation of ``arr`` along ``axis`` to length ``n`` (arr.shape[axis] >= 2)."""
    g = arr.shape[axis]
    t = np.linspace(0.0, g - 1.0, n, dtype=np.float32)
    i0 = np.minimum(np.floor(t).astype(np.int64), g - 2)
    w = t - i0
    w = w * w * (3.0 - 2.0 * w)
    view = [1] * arr.ndim
    view[axis] = n
    w = w.reshape(view)
    return np.take(arr, i0, axis=axis) * (1.0 - w) + np.take(arr, i0 + 1, axis=axis) * w


def _value_noise(shape: tuple[int, ...], cells: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth low-frequency noise of ``shape``, roughly in [-1, 1] (``cells`` periods per axis)."""
    grid_shape = tuple(max(2, min(cells, n // 2) + 1) for n in shape)
    arr = rng.uniform(-1.0, 1.0, size=grid_shape).astype(np.float32)
    for axis, n in enumerate(shape):
        arr = _upsample_axis(arr, axis, n)
    return arr


def _box(center: np.ndarray, radius: float, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Index slices covering the normalised-coordinate cube ``center +- radius``."""
    slices = []
    for c, n in zip(center, shape):
        scale = (n - 1) / 2.0
        lo = int(math.floor((c - radius + 1.0) * scale))
        hi = int(math.ceil((c + radius + 1.0) * scale)) + 1
        slices.append(slice(min(max(lo, 0), n), min(max(hi, 0), n)))
    return tuple(slices)


CAVITY_RADIUS = 0.5  # of the body (a unit ball in body coordinates)
CAVITY_INTENSITY = 0.03

PHANTOM_ORGANS = ("random", "typed")  # the organ layouts (data.phantom_organs)
TYPED_ORGANS = 2  # organs of the typed layout: classes 3 and 4
# background, shell, soft tissue, bright organ, grey organ: each class touches the next one up, so the blurred edge
# between two of them passes through no third class's intensity (only the bright organ's edge passes the grey's)
TYPED_INTENSITIES = (0.0, 0.15, 0.35, 0.95, 0.65)
TYPED_ORGAN_AXES = (0.38, 0.46)  # range of a typed organ's mean semi-axis, in body units
TYPED_ORGAN_DISTANCE = (0.42, 0.48)  # range of a typed organ centre's distance from the body's centre
TYPED_INNER_LIMIT = 0.82  # a typed organ reaches this radius at most (the soft tissue reaches 0.8-0.9)


class _Body(NamedTuple):
    """A phantom's body: ``labels`` (1 shell, 2 soft tissue), the body-frame coordinates ``p`` in which it is the
    unit ball (p = R^T (x - c) / a), their squared radius, and c, a and R."""

    labels: np.ndarray
    p: list[np.ndarray]
    radius2: np.ndarray
    center: np.ndarray
    axes: np.ndarray
    rot: np.ndarray


def _body(shape: tuple[int, ...], rng: np.random.Generator, body_scale: float) -> _Body:
    """Draw the body (a rotated, shifted ellipsoid) and label its shell and soft tissue."""
    ndim = len(shape)
    coords = _grid(shape)
    body_center = rng.uniform(-0.05, 0.05, size=ndim)
    body_axes = rng.uniform(0.75, 0.92, size=ndim) * body_scale
    body_rot = _rotation(rng, ndim, math.radians(20.0))
    p = [
        sum(body_rot[j, k] * (coords[j] - np.float32(body_center[j])) for j in range(ndim)) / np.float32(body_axes[k])
        for k in range(ndim)
    ]
    radius2 = sum(pk * pk for pk in p)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[radius2 <= 1.0] = 1
    labels[radius2 <= rng.uniform(0.8, 0.9) ** 2] = 2
    return _Body(labels, p, radius2, body_center, body_axes, body_rot)


def _typed_labels(shape: tuple[int, ...], rng: np.random.Generator, body_scale: float,
                  cavity: bool) -> tuple[np.ndarray, int]:
    """Label map of a phantom with typed organs: 1 shell, 2 soft tissue, then ``TYPED_ORGANS`` organs of fixed
    kinds (classes 3 and 4), each a rotated ellipsoid; their centres lie on opposite sides of the body's centre,
    along a random direction, at random distances (they may touch: the later organ covers the earlier). The
    cavity (last label) lies under the organs."""
    ndim = len(shape)
    labels, p, radius2 = _body(shape, rng, body_scale)[:3]
    num_labels = 3 + TYPED_ORGANS
    if cavity:
        labels[radius2 <= CAVITY_RADIUS**2] = num_labels
    plane = np.linalg.qr(rng.normal(size=(ndim, 2)))[0]  # two orthonormal directions
    start = rng.uniform(0.0, 2.0 * math.pi)
    for organ in range(TYPED_ORGANS):
        angle = start + 2.0 * math.pi * organ / TYPED_ORGANS
        axes = rng.uniform(*TYPED_ORGAN_AXES) * rng.uniform(0.8, 1.2, size=ndim)
        distance = min(rng.uniform(*TYPED_ORGAN_DISTANCE), TYPED_INNER_LIMIT - float(axes.max()))
        center = distance * (math.cos(angle) * plane[:, 0] + math.sin(angle) * plane[:, 1])
        rot = _rotation(rng, ndim, math.pi)
        u2 = sum((sum(rot[j, k] * (p[j] - np.float32(center[j])) for j in range(ndim)) / np.float32(axes[k])) ** 2
                 for k in range(ndim))
        labels[u2 <= 1.0] = 3 + organ
    return labels, num_labels + int(cavity)


def _typed_intensities(num_labels: int) -> np.ndarray:
    """Per-label mean intensity of the typed layout: the same for every phantom (``TYPED_INTENSITIES``), like
    a tissue's value in CT."""
    lut = np.zeros(num_labels, dtype=np.float32)
    lut[: len(TYPED_INTENSITIES)] = TYPED_INTENSITIES
    return lut


def _phantom_labels(shape: tuple[int, ...], rng: np.random.Generator, body_scale: float = 1.0,
                    cavity: bool = False) -> tuple[np.ndarray, int]:
    """Label map of an anatomy-like phantom.

    Label 0 is background, 1 the outer body shell (skin/fat), 2 the inner soft
    tissue, and 3.. organ-like ellipsoids (some with a nested inner ellipsoid).
    With ``cavity`` the last label is a dark cavity at the body's centre.

    Args:
        shape: Spatial shape, 2D or 3D.
        rng: Random generator; fully determines the layout.
        body_scale: scales the body's axes (1: the default phantoms).
        cavity: carve a cavity of radius ``CAVITY_RADIUS`` (body units) at the body's centre.

    Returns:
        (labels of ``shape`` as uint8, number of labels including background).
    """
    ndim = len(shape)
    labels, p, radius2, body_center, body_axes, body_rot = _body(shape, rng, body_scale)
    next_label = 3
    for _ in range(int(rng.integers(5, 10))):
        axes = np.clip(rng.uniform(0.12, 0.4) * rng.uniform(0.7, 1.3, size=ndim), 0.08, 0.5)
        direction = rng.normal(size=ndim)
        direction /= np.linalg.norm(direction) + 1e-12
        center = direction * (0.84 - axes.max()) * rng.random() ** (1.0 / ndim)
        rot = _rotation(rng, ndim, math.pi)
        world_center = body_center + body_rot @ (body_axes * center)
        box = _box(world_center, float(body_axes.max() * axes.max()), shape)
        # Organ-frame coordinates u: the organ is the unit ball.
        u = [
            sum(rot[j, k] * (p[j][box] - np.float32(center[j])) for j in range(ndim)) / np.float32(axes[k])
            for k in range(ndim)
        ]
        sub = labels[box]
        sub[sum(uk * uk for uk in u) <= 1.0] = next_label
        next_label += 1
        if rng.random() < 0.5:
            scale = rng.uniform(0.3, 0.6)
            offset = rng.normal(size=ndim)
            offset *= rng.uniform(0.0, 0.8 * (1.0 - scale)) / (np.linalg.norm(offset) + 1e-12)
            inner = sum((uk - np.float32(offset[k])) ** 2 for k, uk in enumerate(u)) <= scale**2
            sub[inner] = next_label
            next_label += 1
    if cavity:
        labels[radius2 <= CAVITY_RADIUS**2] = next_label
        next_label += 1
    return labels, next_label


def _intensities(num_labels: int, rng: np.random.Generator) -> np.ndarray:
    """Per-label mean intensity, shape (num_labels,); background 0, organs well separated."""
    lut = np.zeros(num_labels, dtype=np.float32)
    lut[1] = rng.uniform(0.15, 0.3)
    lut[2] = rng.uniform(0.35, 0.5)
    num_organs = num_labels - 3
    if num_organs > 0:
        levels = np.linspace(0.1, 1.0, num_organs) + rng.uniform(-0.02, 0.02, size=num_organs)
        lut[3:] = rng.permutation(levels)
    return lut


def label_classes(labels: np.ndarray, num_labels: int, cavity: bool) -> np.ndarray:
    """The phantom's label map in the fixed classes of ``PHANTOM_NUM_CLASSES``: 0 background, 1 body shell,
    2 soft tissue, 3-20 the organs and their nested parts (in the order drawn; typed organs: 3 bright, 4 grey),
    21 the cavity; int16."""
    classes = labels.astype(np.int16)
    if cavity:
        classes[labels == num_labels - 1] = PHANTOM_NUM_CLASSES - 1
    return classes


def _phantom_channels(shape: tuple[int, ...], seed: int, num_channels: int, body_scale: float = 1.0,
                      cavity: bool = False, with_labels: bool = False, organs: str = "random") -> Any:
    """Render ``num_channels`` contrasts of one phantom, shape (num_channels, *shape), float32 in [0, 1]; with
    ``with_labels`` also its label map (see :func:`label_classes`). ``organs``: one of ``PHANTOM_ORGANS``."""
    if len(shape) not in (2, 3) or not all(isinstance(n, (int, np.integer)) and n > 0 for n in shape):
        raise DataError(f"phantom shape: expected 2 or 3 positive integers, got {tuple(shape)!r}")
    if organs not in PHANTOM_ORGANS:
        raise DataError(f"phantom organs: expected one of {list(PHANTOM_ORGANS)}, got {organs!r}")
    shape = tuple(int(n) for n in shape)
    rng = seeded_rng(seed)
    typed = organs == "typed"
    labels, num_labels = (_typed_labels if typed else _phantom_labels)(shape, rng, body_scale, cavity)
    texture = 0.6 * _value_noise(shape, 4, rng) + 0.4 * _value_noise(shape, 8, rng)
    inside = labels > 0
    out = np.empty((num_channels, *shape), dtype=np.float32)
    for channel in range(num_channels):
        chan_rng = rng if channel == 0 else seeded_rng(seed, channel)
        if not typed:
            lut = _intensities(num_labels, chan_rng)
        elif channel == 0:
            lut = _typed_intensities(num_labels)
        else:  # another contrast, the same for every phantom
            lut = _intensities(num_labels, seeded_rng(channel))
        if cavity:
            lut[-1] = CAVITY_INTENSITY
        image = lut[labels] * (1.0 + 0.15 * texture)
        image += 0.01 * chan_rng.standard_normal(shape, dtype=np.float32)
        np.clip(np.where(inside, image, np.float32(0.0)), 0.0, 1.0, out=out[channel])
    if with_labels:
        return out, label_classes(labels, num_labels, cavity)
    return out


def make_phantom(shape: tuple[int, ...], seed: int, body_scale: float = 1.0, cavity: bool = False,
                 organs: str = "random") -> np.ndarray:
    """Generate a deterministic anatomy-like phantom.

    A rotated/shifted body ellipsoid (outer shell and inner soft tissue) with
    several organ-like ellipsoids of distinct intensities, some containing a
    nested ellipsoid, modulated by a smooth low-frequency texture plus a little
    fine noise. The background is exactly 0.

    Args:
        shape: Spatial shape, (H, W) or (H, W, D).
        seed: Any integer; the same seed always gives the same array.
        body_scale: scale of the body (1 with the defaults: the phantoms every other test and result uses).
        cavity: a dark cavity at the body's centre.
        organs: ``random``: 5 to 9 organs (some with a nested part), their intensities shuffled from phantom to
            phantom; ``typed``: two organs of fixed kinds and intensities (classes 3 bright, 4 grey), placed at
            random, the shell and soft tissue at fixed intensities too (for masks, docs/masks.md).

    Returns:
        float32 array of exactly ``shape`` with values in [0, 1].

    Raises:
        DataError: If ``shape`` is not 2 or 3 positive integers.
    """
    return _phantom_channels(tuple(shape), seed, 1, body_scale, cavity, organs=organs)[0]


def make_labelled_phantom(shape: tuple[int, ...], seed: int, body_scale: float = 1.0, cavity: bool = False,
                          organs: str = "random") -> tuple[np.ndarray, np.ndarray]:
    """:func:`make_phantom` and its label map: (image float32, classes int16), both of ``shape``; the image is
    the one :func:`make_phantom` returns for the same arguments."""
    image, classes = _phantom_channels(tuple(shape), seed, 1, body_scale, cavity, with_labels=True, organs=organs)
    return image[0], classes


SIZE_RANGE = (0.6, 1.0)  # body scales of phantoms with covariates


class SyntheticPhantomDataset(Dataset):
    """Phantom volumes generated on the fly (item ``i`` uses seed ``seed * 100003 + i``).

    Items are ``{"image": FloatTensor (in_channels, H, W, D), "path": "synthetic://{seed}/{i}",
    "affine": identity DoubleTensor (4, 4)}``. Extra channels show the same anatomy
    with different (deterministic) tissue contrasts. With ``covariates``, items also carry a class
    ``cavity`` (0/1, alternating: 1 = a dark cavity at the body's centre) and a continuous ``size`` (the
    body's scale, drawn in ``SIZE_RANGE``), for conditional models. With ``labels``, items also carry
    ``"label"``: the label map, FloatTensor (1, H, W, D) of integer classes (see :func:`label_classes`).
    """

    def __init__(self, num: int, shape: tuple[int, int, int], seed: int, in_channels: int = 1,
                 covariates: bool = False, labels: bool = False, organs: str = "random") -> None:
        """Create the dataset.

        Args:
            num: Number of volumes (>= 0).
            shape: Spatial shape (H, W, D).
            seed: Base seed.
            in_channels: Channels per volume (>= 1).
            covariates: phantoms with a ``cavity`` class and a ``size`` factor.
            labels: items carry their label maps.
            organs: the organ layout, ``random`` or ``typed`` (see :func:`make_phantom`).

        Raises:
            DataError: On a bad argument.
        """
        if num < 0 or in_channels < 1 or len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"SyntheticPhantomDataset(num={num}, shape={tuple(shape)}, in_channels={in_channels}): "
                             f"expected num >= 0, three positive sizes and in_channels >= 1")
        self.num, self.shape = int(num), tuple(int(s) for s in shape)
        self.seed, self.in_channels, self.with_covariates = int(seed), int(in_channels), covariates
        self.with_labels, self.organs = labels, organs

    def __len__(self) -> int:
        return self.num

    def covariates(self, index: int) -> dict[str, Any]:
        """Item ``index``'s ``path`` and, with covariates, its ``cavity`` and ``size`` (without rendering it)."""
        index = int(index) % self.num
        extra: dict[str, Any] = {PATH_KEY: f"synthetic://{self.seed}/{index}"}
        if self.with_covariates:
            size = float(seeded_rng(self.seed * 100003 + index, 7).uniform(*SIZE_RANGE))
            extra.update({CAVITY_KEY: index % 2, SIZE_KEY: size})
        return extra

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.num <= index < self.num:
            raise IndexError(f"index {index} out of range for {self.num} synthetic volumes")
        index = int(index) % self.num
        seed = self.seed * 100003 + index
        extra = self.covariates(index)
        rendered = _phantom_channels(self.shape, seed, self.in_channels, extra.get(SIZE_KEY, 1.0),
                                     bool(extra.get(CAVITY_KEY, False)), with_labels=self.with_labels,
                                     organs=self.organs)
        if self.with_labels:
            volume, classes = rendered
            extra[LABEL_KEY] = torch.from_numpy(classes[None].astype(np.float32))
        else:
            volume = rendered
        return {IMAGE_KEY: torch.from_numpy(volume), AFFINE_KEY: torch.eye(4, dtype=torch.float64), **extra}
