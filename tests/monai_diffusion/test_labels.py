"""Label maps in the data: the phantoms' own, a datalist's ``label`` column, and the label following its
image through every spatial step (resampling, orientation, crop/pad, patches, flips, affines)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_diffusion.config.schema import PHANTOM_NUM_CLASSES, AugmentationConfig, DataConfig
from monai_diffusion.data import IMAGE_KEY, LABEL_KEY, PATH_KEY, build_datasets, make_labelled_phantom, make_phantom
from monai_diffusion.data.datalist import read_datalist
from monai_diffusion.data.patches import build_random_transform
from monai_diffusion.data.transforms import build_nifti_transforms
from monai_diffusion.errors import DataError

NUM_CLASSES = 4


def test_phantom_labels_match_the_images():
    for seed in range(4):
        image, classes = make_labelled_phantom((24, 20, 16), seed, cavity=seed % 2 == 1)
        assert np.array_equal(image, make_phantom((24, 20, 16), seed, cavity=seed % 2 == 1))
        assert classes.dtype == np.int16 and 0 <= classes.min() and classes.max() < PHANTOM_NUM_CLASSES
        assert np.array_equal(classes > 0, image > 0) or (image[classes == 0] == 0).all()
        assert ((classes == PHANTOM_NUM_CLASSES - 1).any()) == (seed % 2 == 1)  # the cavity's class
        for value in np.unique(classes):  # every class is one tissue: a narrow band of intensities
            if value > 0:
                region = image[classes == value]
                assert region.std() < 0.1, (seed, value)


def test_typed_phantom_organs_have_one_intensity_each_and_random_places():
    """``organs="typed"``: classes 3 and 4 in every phantom, each at its fixed intensity (the texture varies it
    by at most 15 %), at other places from phantom to phantom; the cavity lies under the organs."""
    from monai_diffusion.data.phantoms import TYPED_INTENSITIES

    centres = []
    for seed in range(4):
        image, classes = make_labelled_phantom((24, 24, 24), seed, cavity=seed % 2 == 1, organs="typed")
        assert np.array_equal(image, make_phantom((24, 24, 24), seed, cavity=seed % 2 == 1, organs="typed"))
        assert set(np.unique(classes)) == {0, 1, 2, 3, 4} | ({PHANTOM_NUM_CLASSES - 1} if seed % 2 else set())
        for value in range(1, len(TYPED_INTENSITIES)):
            region = image[classes == value]
            assert abs(float(np.median(region)) - TYPED_INTENSITIES[value]) < 0.15 * TYPED_INTENSITIES[value], value
        centres.append(np.argwhere(classes == 3).mean(0))
        if seed % 2:  # the same phantom without its cavity has the same organs: the cavity lies under them
            _, plain = make_labelled_phantom((24, 24, 24), seed, organs="typed")
            assert np.array_equal(np.isin(classes, (3, 4)), np.isin(plain, (3, 4)))
    assert max(np.linalg.norm(a - b) for i, a in enumerate(centres) for b in centres[i + 1:]) > 3.0
    with pytest.raises(DataError, match="phantom organs: expected one of"):
        make_phantom((8, 8, 8), 0, organs="fixed")


def test_phantom_dataset_carries_labels():
    cfg = DataConfig(image_size=(16, 16, 16), num_train=2, num_val=1, num_classes=PHANTOM_NUM_CLASSES)
    train, _ = build_datasets(cfg, seed=3)
    item = train[0]
    assert item[LABEL_KEY].shape == (1, 16, 16, 16) and item[LABEL_KEY].dtype == torch.float32
    assert torch.equal(item[LABEL_KEY] > 0, item[IMAGE_KEY] > 0)
    unlabelled, _ = build_datasets(dataclasses.replace(cfg, num_classes=None), seed=3)
    assert LABEL_KEY not in unlabelled[0] and torch.equal(unlabelled[0][IMAGE_KEY], item[IMAGE_KEY])


def _blocks(shape: tuple[int, int, int], seed: int, classes: int = 2) -> np.ndarray:
    """A piecewise-constant class volume: blocks of 4 voxels with classes 0..classes-1."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, classes, size=tuple(-(-n // 4) for n in shape))
    full = coarse.repeat(4, 0).repeat(4, 1).repeat(4, 2)
    return full[: shape[0], : shape[1], : shape[2]].astype(np.int16)


def _write_pairs(root: Path, count: int, affine: np.ndarray, shape=(20, 18, 14)) -> Path:
    rows = ["image,label"]
    for index in range(count):
        classes = _blocks(shape, index)
        nib.save(nib.Nifti1Image(classes.astype(np.float32), affine), root / f"img{index}.nii.gz")
        nib.save(nib.Nifti1Image(classes, affine), root / f"lab{index}.nii.gz")
        rows.append(f"img{index}.nii.gz,lab{index}.nii.gz")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root / "pairs.csv"


def test_label_stays_voxel_aligned_through_the_whole_pipeline(tmp_path):
    """The image is its own (binary) label map as intensities, so where the transformed image is exactly 0 or 1
    every voxel its interpolations drew on had that class, and the nearest-neighbour label must hold it: any
    flip, crop, patch, shift or rotation the label missed breaks it. (With more than two classes a blend of
    classes 0 and 2 could read 1, so two classes make the check exact.)"""
    affine = np.diag([-2.0, 1.0, 1.5, 1.0])  # LAS and anisotropic: reoriented and resampled
    affine[:3, 3] = [10.0, -4.0, 2.0]
    datalist = _write_pairs(tmp_path, 2, affine)
    cfg = DataConfig(source="nifti", paths=str(datalist), image_size=(32, 16, 24), spacing=(1.0, 1.0, 1.0),
                     intensity_window=(0.0, 1.0), num_classes=NUM_CLASSES, patch_size=(16, 16, 16),
                     patches_per_volume=3, augmentation=AugmentationConfig(flip_prob=0.5, affine_prob=1.0,
                                                                           rotate_degrees=20.0, scale_range=0.1))
    training, _ = read_datalist(datalist, labels=True)
    preprocess, random = build_nifti_transforms(cfg), build_random_transform(cfg)
    compared = 0
    for seed, item in enumerate(training * 3):
        whole = preprocess(dict(item, **{PATH_KEY: item[IMAGE_KEY]}))
        assert whole[LABEL_KEY].shape == (1, 32, 16, 24)
        random.set_random_state(seed=seed)
        for patch in random(whole):
            value = patch[IMAGE_KEY][0].double()
            exact = (value - value.round()).abs() < 1e-5
            assert torch.equal(patch[LABEL_KEY][0][exact].double(), value.round()[exact])
            assert exact.double().mean() > 0.5  # most voxels are inside a block: the check is not vacuous
            compared += int(exact.sum())
    assert compared > 0


def test_label_misalignment_would_be_seen(tmp_path):
    """The check of the test above fails for a label flipped against its image."""
    value = torch.from_numpy(_blocks((16, 16, 16), 0)).double()
    label = torch.flip(value, dims=(0,))
    exact = (value - value.round()).abs() < 1e-5
    assert not torch.equal(label[exact], value.round()[exact])


def test_datalist_label_column(tmp_path):
    datalist = _write_pairs(tmp_path, 2, np.eye(4))
    training, _ = read_datalist(datalist, labels=True)
    assert training[0][LABEL_KEY] == str(tmp_path / "lab0.nii.gz")
    (tmp_path / "nolabel.csv").write_text("image\nimg0.nii.gz\nimg1.nii.gz\n")
    with pytest.raises(DataError, match=r"nolabel\.csv, line 2: no 'label'"):
        read_datalist(tmp_path / "nolabel.csv", labels=True)
    assert LABEL_KEY not in read_datalist(tmp_path / "nolabel.csv")[0][0]


def test_label_preview_spreads_the_classes_present_over_the_greys():
    from monai_diffusion.visualize import label_preview

    label = torch.tensor([0.0, 3.0, 3.0, 21.0, 4.0]).reshape(1, 1, 5, 1, 1)
    grey = label_preview(label, PHANTOM_NUM_CLASSES).flatten()
    expected = torch.tensor([0.0, 1 / 3, 1 / 3, 1.0, 2 / 3])  # background, then classes 3 < 4 < 21 evenly spaced
    assert torch.allclose(grey, expected, atol=1e-6)
    assert label_preview(torch.zeros(1, 1, 2, 2, 2), PHANTOM_NUM_CLASSES).abs().sum() == 0
