"""Dice per class and the phantom segmenter of ``evaluate_samples.py --masks``."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_diffusion.config.schema import PHANTOM_NUM_CLASSES
from monai_diffusion.data import LABEL_KEY, SyntheticPhantomDataset
from monai_diffusion.evaluation.mask_metrics import (
    BODY,
    dice_per_class,
    evaluate_masks,
    fit_phantom_segmenter,
    mean_dice,
)


def test_dice_per_class_by_hand():
    mask = torch.tensor([0, 1, 1, 2, 2, 2])
    seg = torch.tensor([0, 1, 2, 2, 2, 0])
    dice = dice_per_class(seg, mask, [1, 2, 3])
    assert dice["1"] == 2 * 1 / 3 and dice["2"] == 2 * 2 / 6 and math.isnan(dice["3"])
    assert dice[BODY] == 2 * 4 / 9
    assert mean_dice([dice, {"1": 1.0, "3": math.nan}])["1"] == (2 / 3 + 1) / 2


@pytest.mark.parametrize("segmenter,organs", [("phantom", "random"), ("phantom-typed", "typed")])
def test_phantom_segmenter_sees_body_and_tissues(tmp_path, segmenter, organs):
    """Fitted on real phantoms, it finds the body and the fixed-intensity tissues of others (the ceiling); a
    volume that does not follow a mask scores lower than the volume that does."""
    _, ceiling = fit_phantom_segmenter((24, 24, 24), PHANTOM_NUM_CLASSES, num=6, organs=organs)
    assert ceiling[BODY] > 0.9 and ceiling["1"] > 0.8 and ceiling["2"] > 0.8
    phantoms = SyntheticPhantomDataset(2, (24, 24, 24), seed=123, covariates=True, labels=True, organs=organs)
    rows = []
    for index in range(2):  # a pairs folder: each image with its own mask, then with the other's
        image, label = phantoms[index]["image"][0], phantoms[index][LABEL_KEY][0]
        other = phantoms[1 - index][LABEL_KEY][0]
        for kind, mask in (("own", label), ("other", other)):
            name = f"{kind}{index}.nii.gz"
            (tmp_path / "imagesTr").mkdir(exist_ok=True)
            (tmp_path / "labelsTr").mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(image.numpy(), np.eye(4)), tmp_path / "imagesTr" / name)
            nib.save(nib.Nifti1Image(mask.numpy().astype(np.int16), np.eye(4)), tmp_path / "labelsTr" / name)
            rows.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
    (tmp_path / "datalist.json").write_text(json.dumps({"training": rows}))
    result = evaluate_masks(tmp_path, segmenter, output=tmp_path / "eval")
    own = mean_dice([r for r, row in zip(result["per_pair"], rows) if "own" in row["image"]])
    other = mean_dice([r for r, row in zip(result["per_pair"], rows) if "other" in row["image"]])
    assert own[BODY] > 0.9 and own[BODY] > other[BODY] and own["2"] > other["2"]
    assert (tmp_path / "eval" / "results.json").is_file() and "ceiling" in result


def test_phantom_segmenter_names_typed_organs_only():
    """Typed organs have one intensity each, so the segmenter fitted on some phantoms names them in others; the
    random layout shuffles organ intensities from phantom to phantom, so no intensity segmenter can."""
    _, typed = fit_phantom_segmenter((16, 16, 16), PHANTOM_NUM_CLASSES, num=8, organs="typed")
    _, shuffled = fit_phantom_segmenter((16, 16, 16), PHANTOM_NUM_CLASSES, num=8, organs="random")
    assert min(typed[c] for c in ("3", "4")) > 0.95
    assert max(shuffled[c] for c in ("3", "4", "5")) < 0.5
