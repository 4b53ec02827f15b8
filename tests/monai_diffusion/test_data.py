"""Tests for monai_diffusion.data: phantoms, NIfTI discovery/loading, DataError messages."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import SequentialSampler

from monai_diffusion.config import ConfigError, DataConfig, config_from_dict
from monai_diffusion.data import (
    DataError,
    SyntheticPhantomDataset,
    build_datasets,
    build_nifti_transforms,
    find_nifti_files,
    make_loader,
    make_phantom,
    save_nifti,
    split_files,
)

VOL_SHAPE = (20, 18, 12)
OUT_SIZE = (16, 16, 8)
ANISO = np.diag([0.8, 0.9, 2.5, 1.0])


def _corners(a: np.ndarray) -> np.ndarray:
    idx = np.ix_(*[[0, n - 1] for n in a.shape])
    return a[idx]


def _ct_volume(seed: int, shape: tuple[int, ...] = VOL_SHAPE) -> np.ndarray:
    """CT-like Hounsfield values: air -1000, tissue up to +1000."""
    return (make_phantom(shape, seed) * 2000.0 - 1000.0).astype(np.float32)


def _nifti_cfg(paths, **kw) -> DataConfig:
    return DataConfig(source="nifti", paths=paths, image_size=OUT_SIZE, **kw)


def _write(path: Path, array: np.ndarray, affine: np.ndarray = ANISO) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


@pytest.fixture()
def scans(tmp_path: Path) -> Path:
    """Five 20x18x12 volumes, one of them in a sub-folder, plus a non-NIfTI file."""
    root = tmp_path / "scans"
    for i in range(4):
        _write(root / f"case{i}.nii.gz", _ct_volume(i))
    _write(root / "sub" / "case4.nii", _ct_volume(4))
    (root / "notes.txt").write_text("not an image")
    return root


# --------------------------------------------------------------------------- phantoms


def test_phantom_deterministic_per_seed() -> None:
    a = make_phantom((32, 32, 16), 3)
    b = make_phantom((32, 32, 16), 3)
    c = make_phantom((32, 32, 16), 4)
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 0.01


@pytest.mark.parametrize("seed", [0, 1, 7, -5, 2**40])
def test_phantom_range_structure_and_background(seed: int) -> None:
    a = make_phantom((64, 64, 32), seed)
    assert a.shape == (64, 64, 32) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert np.all(_corners(a) == 0.0)
    assert np.all(a[0] == 0) and np.all(a[-1] == 0)  # body does not touch the borders
    body = a[a > 0]
    assert 0.1 < body.size / a.size < 0.7
    # several distinct intensity regions: >= 4 of 20 intensity bins hold >= 1% of the body
    hist, _ = np.histogram(body, bins=20, range=(0.0, 1.0))
    assert (hist / body.size >= 0.01).sum() >= 4
    assert body.std() > 0.05
    assert a.max() > 0.6  # at least one bright organ


def test_phantom_texture_is_smooth_not_flat() -> None:
    a = make_phantom((64, 64, 32), 11)
    core = a[24:40, 24:40, 12:20]
    assert core.std() > 0.005  # texture/noise present
    # neighbouring voxels are highly correlated (piecewise smooth, not white noise)
    diff = np.abs(np.diff(a, axis=0))
    assert np.median(diff[(a[1:] > 0) & (a[:-1] > 0)]) < 0.05


def test_phantom_2d() -> None:
    a = make_phantom((48, 40), 2)
    assert a.shape == (48, 40) and a.dtype == np.float32
    assert np.array_equal(a, make_phantom((48, 40), 2))
    assert np.all(_corners(a) == 0.0)
    assert 0.0 <= a.min() and a.max() <= 1.0 and (a > 0).mean() > 0.2


def test_phantom_bad_shape() -> None:
    with pytest.raises(DataError, match="phantom shape"):
        make_phantom((8, 8, 8, 8), 0)
    with pytest.raises(DataError, match="phantom shape"):
        make_phantom((8, 0, 8), 0)


# --------------------------------------------------------------------------- synthetic datasets


def test_synthetic_dataset_items() -> None:
    ds = SyntheticPhantomDataset(3, (24, 20, 12), seed=5)
    assert len(ds) == 3
    item = ds[1]
    assert type(item["image"]) is torch.Tensor
    assert item["image"].shape == (1, 24, 20, 12) and item["image"].dtype == torch.float32
    assert item["path"] == "synthetic://5/1"
    np.testing.assert_array_equal(item["image"][0].numpy(), make_phantom((24, 20, 12), 5 * 100003 + 1))
    assert torch.equal(item["affine"], torch.eye(4, dtype=torch.float64))
    assert not torch.equal(ds[0]["image"], ds[1]["image"])
    with pytest.raises(IndexError):
        ds[3]


def test_synthetic_dataset_two_channels() -> None:
    ds = SyntheticPhantomDataset(2, (24, 20, 12), seed=1, in_channels=2)
    img = ds[0]["image"]
    assert img.shape == (2, 24, 20, 12)
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    np.testing.assert_array_equal(img[0].numpy(), make_phantom((24, 20, 12), 100003))
    assert (img[0] - img[1]).abs().mean() > 0.005  # different contrast
    assert torch.equal((img[0] > 0), (img[1] > 0))  # same anatomy
    assert torch.equal(img, ds[0]["image"])


def test_build_datasets_synthetic() -> None:
    cfg = DataConfig(image_size=(24, 20, 12), num_train=3, num_val=2)
    train, val = build_datasets(cfg, seed=0, in_channels=2)
    assert (len(train), len(val)) == (3, 2)
    assert train[0]["image"].shape == (2, 24, 20, 12)
    assert not torch.equal(train[0]["image"], val[0]["image"])
    train2, _ = build_datasets(cfg, seed=0, in_channels=2)
    assert torch.equal(train[2]["image"], train2[2]["image"])


# --------------------------------------------------------------------------- file discovery


def test_find_folder_recursive_sorted(scans: Path) -> None:
    files = find_nifti_files(str(scans))
    assert [f.name for f in files] == ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz", "case3.nii.gz", "case4.nii"]


def test_find_glob_and_list(scans: Path) -> None:
    assert [f.name for f in find_nifti_files(str(scans / "case[12].nii.gz"))] == ["case1.nii.gz", "case2.nii.gz"]
    assert len(find_nifti_files(str(scans / "**" / "*.nii*"))) == 5
    listed = [str(scans / "case3.nii.gz"), str(scans / "sub" / "case4.nii")]
    assert find_nifti_files(listed) == [Path(p) for p in listed]
    assert find_nifti_files(str(scans / "case0.nii.gz")) == [scans / "case0.nii.gz"]


def test_find_errors(scans: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.paths: no input given"):
        find_nifti_files(None)
    with pytest.raises(DataError, match=r"data\.paths: no input given"):
        find_nifti_files([])
    with pytest.raises(DataError, match=r"data\.paths: folder '.*nowhere' does not exist; point data\.paths at"):
        find_nifti_files(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    with pytest.raises(DataError, match=r"folder '.*empty' contains no \.nii or \.nii\.gz files"):
        find_nifti_files(str(empty))
    with pytest.raises(DataError, match=r"glob '.*\*\.mha' matches nothing"):
        find_nifti_files(str(scans / "*.mha"))
    with pytest.raises(DataError, match=r"glob '.*\*\.txt' matches 1 path\(s\) but no \.nii"):
        find_nifti_files(str(scans / "*.txt"))
    with pytest.raises(DataError, match=r"data\.paths\[1\]: '.*notes\.txt' is not a NIfTI file"):
        find_nifti_files([str(scans / "case0.nii.gz"), str(scans / "notes.txt")])
    with pytest.raises(DataError, match=r"data\.paths\[0\]: file '.*gone\.nii\.gz' does not exist"):
        find_nifti_files([str(scans / "gone.nii.gz")])
    with pytest.raises(DataError, match=r"my\.key: file '.*gone\.nii' does not exist"):
        find_nifti_files(str(scans / "gone.nii"), key="my.key")


def test_split_files_deterministic() -> None:
    files = [Path(f"f{i}.nii.gz") for i in range(10)]
    train, val = split_files(files, 0.2, seed=3)
    assert (len(train), len(val)) == (8, 2)
    assert sorted(train + val) == files and not set(train) & set(val)
    assert split_files(files, 0.2, seed=3) == (train, val)
    assert len({tuple(split_files(files, 0.2, seed=s)[1]) for s in range(8)}) > 1
    assert [len(v) for _, v in (split_files(files[:n], 0.0, 0) for n in (2, 3))] == [1, 1]
    assert split_files(files[:2], 0.9, 0)[0] != []  # never empties the training set
    with pytest.raises(DataError, match=r"data\.paths: only 1 NIfTI file \(f0\.nii\.gz\); at least 2 are needed"):
        split_files(files[:1], 0.2, 0)  # a file is never in both sets


# --------------------------------------------------------------------------- NIfTI datasets


def _all_items(ds) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


def test_nifti_datasets_shapes_range_and_split(scans: Path) -> None:
    train, val = build_datasets(_nifti_cfg(str(scans)), seed=0)
    assert (len(train), len(val)) == (4, 1)
    items = _all_items(train) + _all_items(val)
    assert sorted(Path(it["path"]).name for it in items) == sorted(f.name for f in find_nifti_files(str(scans)))
    for it in items:
        img = it["image"]
        assert type(img) is torch.Tensor and img.dtype == torch.float32
        assert img.shape == (1, *OUT_SIZE)
        assert float(img.min()) == 0.0 and 0.9 < float(img.max()) <= 1.0
        assert it["affine"].shape == (4, 4)
    # centre crop 20x18x12 -> 16x16x8 shifts the origin by (2, 1, 2) voxels of size (0.8, 0.9, 2.5)
    np.testing.assert_allclose(items[0]["affine"].numpy()[:3, 3], [1.6, 0.9, 5.0], atol=1e-5)
    np.testing.assert_allclose(np.diag(items[0]["affine"].numpy())[:3], [0.8, 0.9, 2.5], atol=1e-5)
    # deterministic split for a seed, and some seed gives another split
    again = build_datasets(_nifti_cfg(str(scans)), seed=0)
    assert [d["path"] for d in again[1].data] == [d["path"] for d in val.data]
    val_sets = {tuple(d["path"] for d in build_datasets(_nifti_cfg(str(scans)), seed=s)[1].data) for s in range(6)}
    assert len(val_sets) > 1
    _, val2 = build_datasets(_nifti_cfg(str(scans), val_fraction=0.4), seed=0)
    assert len(val2) == 2


def test_nifti_glob_list_and_cache(scans: Path) -> None:
    train_g, val_g = build_datasets(_nifti_cfg(str(scans / "case*.nii.gz"), cache=True), seed=1)
    assert len(train_g) + len(val_g) == 4
    listed = [str(scans / f"case{i}.nii.gz") for i in range(4)]
    train_l, val_l = build_datasets(_nifti_cfg(listed), seed=1)
    assert [d["path"] for d in train_l.data] == [d["path"] for d in train_g.data]
    for cached, plain in zip(_all_items(train_g), _all_items(train_l)):
        assert type(cached["image"]) is torch.Tensor
        assert cached["path"] == plain["path"]
        assert torch.equal(cached["image"], plain["image"])


def test_nifti_orientation_to_ras(tmp_path: Path) -> None:
    # intensity grows with the voxel index i; with a flipped x axis (LAS) i runs right-to-left
    vol = _ct_volume(9) + 50.0 * np.arange(20, dtype=np.float32)[:, None, None]
    ras = _write(tmp_path / "ras.nii.gz", vol, np.eye(4))
    las = _write(tmp_path / "las.nii.gz", vol, np.diag([-1.0, 1.0, 1.0, 1.0]))
    transform = build_nifti_transforms(_nifti_cfg(None))
    a = transform({"image": str(ras)})["image"]
    b = transform({"image": str(las)})["image"]
    assert torch.allclose(b, torch.flip(a, dims=[1]))
    profile_a = a[0].mean(dim=(1, 2))
    assert float(profile_a[-1] - profile_a[0]) > 0.1  # RAS file kept as is: brighter towards +x
    profile_b = b[0].mean(dim=(1, 2))
    assert float(profile_b[0] - profile_b[-1]) > 0.1  # LAS file flipped into RAS


def test_nifti_spacing_resampling(tmp_path: Path) -> None:
    ramp = np.broadcast_to(10.0 * (np.arange(20, dtype=np.float32)[:, None, None] + 1.0), VOL_SHAPE).copy()
    for i in range(2):
        _write(tmp_path / f"ramp{i}.nii.gz", ramp)
    cfg = DataConfig(source="nifti", paths=str(tmp_path), image_size=(24, 24, 16), spacing=(1.6, 1.8, 2.5))
    train, _ = build_datasets(cfg, seed=0)
    item = train[0]
    assert item["image"].shape == (1, 24, 24, 16)
    np.testing.assert_allclose(np.diag(item["affine"].numpy())[:3], [1.6, 1.8, 2.5], atol=1e-5)
    # 20 x 0.8 mm -> ~10 voxels of 1.6 mm along H, zero-padded to 24; the lowest row maps to 0
    profile = item["image"][0, :, 12, 8]
    inside = profile[profile > 0]
    assert 8 <= inside.numel() <= 10
    assert torch.all(torch.diff(inside) > 0)  # the ramp survives resampling, same direction
    assert float(inside.max()) == pytest.approx(1.0)
    # 18 x 0.9 mm -> 9 voxels of 1.8 mm along W: 15 zero-padded columns carry no signal
    assert int((item["image"][0, 12, :, 8] > 0).sum()) in (8, 9, 10)


def test_nifti_two_channels(tmp_path: Path) -> None:
    for i in range(3):
        _write(tmp_path / f"mc{i}.nii.gz", np.stack([_ct_volume(i), _ct_volume(i + 10)], axis=-1))
    train, val = build_datasets(_nifti_cfg(str(tmp_path)), seed=0, in_channels=2)
    img = train[0]["image"]
    assert img.shape == (2, *OUT_SIZE)
    assert float(img[0].max()) > 0.9 and float(img[1].max()) > 0.9
    assert not torch.equal(img[0], img[1])


def test_loader_round_trip(scans: Path) -> None:
    train, _ = build_datasets(_nifti_cfg(str(scans)), seed=0)
    batch = next(iter(make_loader(train, batch_size=2, shuffle=True, num_workers=0, seed=0)))
    assert batch["image"].shape == (2, 1, *OUT_SIZE) and batch["image"].dtype == torch.float32
    assert len(batch["path"]) == 2 and all(isinstance(p, str) for p in batch["path"])
    assert batch["affine"].shape == (2, 4, 4)

    def order(seed: int) -> list[str]:
        loader = make_loader(train, batch_size=1, shuffle=True, num_workers=0, seed=seed)
        return [b["path"][0] for b in loader]

    assert order(4) == order(4)
    assert len({tuple(order(s)) for s in range(5)}) > 1
    sequential = make_loader(train, 2, shuffle=True, num_workers=0, seed=0, sampler=SequentialSampler(train))
    assert [p for b in sequential for p in b["path"]] == [d["path"] for d in train.data]


def test_synthetic_loader_batch() -> None:
    train, _ = build_datasets(DataConfig(image_size=OUT_SIZE, num_train=3, num_val=1), seed=0)
    batches = list(make_loader(train, 2, shuffle=False, num_workers=0, seed=0))
    assert [b["image"].shape for b in batches] == [(2, 1, *OUT_SIZE), (1, 1, *OUT_SIZE)]
    assert batches[0]["path"] == ["synthetic://0/0", "synthetic://0/1"]


# --------------------------------------------------------------------------- bad files


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_truncated_nifti(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.nii.gz", _ct_volume(0))
    bad = tmp_path / "bad.nii.gz"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    transform = build_nifti_transforms(_nifti_cfg(None))
    pattern = r"bad\.nii\.gz: cannot read the NIfTI file \(EOFError.*truncated or corrupt"
    with pytest.raises(DataError, match=pattern) as e:
        transform({"image": str(bad)})
    _one_line(e)
    # through a dataset (header is intact, so it fails when the voxels are loaded)
    train, val = build_datasets(_nifti_cfg([str(good), str(bad)], val_fraction=0.5), seed=0)
    with pytest.raises(DataError, match=r"bad\.nii\.gz: cannot read"):
        _all_items(train) + _all_items(val)
    # the cache loads everything up front, so building fails
    with pytest.raises(DataError, match=r"bad\.nii\.gz: cannot read"):
        build_datasets(_nifti_cfg([str(good), str(bad)], cache=True), seed=0)
    # a file cut inside the header fails already when the datasets are built
    bad.write_bytes(data[:100])
    with pytest.raises(DataError, match=r"bad\.nii\.gz: cannot read the NIfTI file \(ImageFileError") as e:
        build_datasets(_nifti_cfg([str(good), str(bad)]), seed=0)
    _one_line(e)


def test_truncated_uncompressed_nifti(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.nii", _ct_volume(0))
    data = good.read_bytes()
    good.write_bytes(data[: len(data) - 1000])
    with pytest.raises(DataError, match=r"good\.nii: cannot read the NIfTI file \(OSError") as e:
        build_nifti_transforms(_nifti_cfg(None))({"image": str(good)})
    _one_line(e)


def test_2d_image_rejected(tmp_path: Path) -> None:
    flat = _write(tmp_path / "flat.nii.gz", make_phantom((20, 18), 0))
    pattern = r"flat\.nii\.gz: expected a 3D volume \(H, W, D\), got shape \(20, 18\)"
    with pytest.raises(DataError, match=pattern) as e:
        build_datasets(_nifti_cfg(str(tmp_path)), seed=0)
    _one_line(e)
    with pytest.raises(DataError, match=pattern):
        build_nifti_transforms(_nifti_cfg(None))({"image": str(flat)})


def test_channel_mismatch_rejected(tmp_path: Path) -> None:
    two = _write(tmp_path / "two.nii.gz", np.stack([_ct_volume(0), _ct_volume(1)], axis=-1))
    with pytest.raises(DataError, match=r"two\.nii\.gz: has 2 channel\(s\) .* but in_channels=1; set") as e:
        build_datasets(_nifti_cfg(str(two)), seed=0, in_channels=1)
    _one_line(e)
    with pytest.raises(DataError, match=r"two\.nii\.gz: has 2 channel\(s\)"):
        build_nifti_transforms(_nifti_cfg(None), in_channels=1)({"image": str(two)})
    one = _write(tmp_path / "one.nii.gz", _ct_volume(0))
    with pytest.raises(DataError, match=r"one\.nii\.gz: has 1 channel\(s\) .* but in_channels=2"):
        build_nifti_transforms(_nifti_cfg(None), in_channels=2)({"image": str(one)})


def test_non_finite_rejected(tmp_path: Path) -> None:
    vol = _ct_volume(0)
    vol[1, 2, 3] = np.nan
    vol[4, 5, 6] = np.nan
    vol[7, 8, 9] = np.inf
    vol[0, 0, 0] = -np.inf
    good = _write(tmp_path / "a_good.nii.gz", _ct_volume(1))
    bad = _write(tmp_path / "nan.nii.gz", vol)
    with pytest.raises(DataError, match=r"nan\.nii\.gz: contains 4 non-finite voxels \(NaN/inf\); fix or remove") as e:
        build_nifti_transforms(_nifti_cfg(None))({"image": str(bad)})
    _one_line(e)
    with pytest.raises(DataError, match=r"nan\.nii\.gz: contains 4 non-finite"):
        build_datasets(_nifti_cfg([str(good), str(bad)], cache=True), seed=0)


def test_data_error_from_loader_worker_stays_one_line(tmp_path: Path) -> None:
    vol = _ct_volume(0)
    vol[3, 3, 3] = np.nan
    for name in ("nan0.nii.gz", "nan1.nii.gz"):
        _write(tmp_path / name, vol)
    train, _ = build_datasets(_nifti_cfg(str(tmp_path)), seed=0)
    loader = make_loader(train, batch_size=1, shuffle=False, num_workers=1, seed=0)
    with pytest.raises(DataError) as e:
        next(iter(loader))
    expected = f"{train.data[0]['path']}: contains 1 non-finite voxels (NaN/inf); fix or remove the file"
    assert _one_line(e) == expected


def test_data_section_is_checked_once_at_config_load() -> None:
    """The data section's checks live in the config package alone (no second copy in the data package)."""
    cases = [
        ({"image_size": [64, 64]}, r"data\.image_size: expected a list of 3 values"),
        ({"val_fraction": 1.5}, r"data\.val_fraction: expected a number >= 0 and < 1, got 1\.5"),
        ({"intensity_percentiles": [99.0, 1.0]}, r"data\.intensity_percentiles: expected \[lower, upper\] with lower < upper"),
        ({"spacing": [1.0, 0.0, 1.0]}, r"data\.spacing: expected a number > 0 and <= 1000 for each entry"),
        ({"source": "dicom"}, r"data\.source: expected one of 'synthetic', 'nifti', got 'dicom'"),
        ({"num_workers": -1}, r"data\.num_workers: expected an integer >= 0, got -1"),
    ]
    for data, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            config_from_dict({"data": data})
    with pytest.raises(DataError, match=r"data\.paths: no input given"):
        build_datasets(DataConfig(source="nifti"), seed=0)
    ok = config_from_dict({"data": {"image_size": [32, 32, 32], "spacing": [1, 1, 2]}}).data
    assert ok.image_size == (32, 32, 32) and ok.spacing == (1.0, 1.0, 2.0)


# --------------------------------------------------------------------------- saving


def test_save_nifti_round_trip(tmp_path: Path) -> None:
    vol = torch.from_numpy(make_phantom((12, 10, 8), 0))[None]
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    out = save_nifti(vol, tmp_path / "deep" / "sample", affine=affine)
    assert out.name == "sample.nii.gz" and out.exists()
    img = nib.load(str(out))
    assert img.shape == (12, 10, 8)
    np.testing.assert_allclose(img.affine, affine)
    np.testing.assert_array_equal(np.asarray(img.dataobj), vol[0].numpy())
    two = save_nifti(np.stack([vol[0].numpy()] * 2), tmp_path / "two.nii")
    assert nib.load(str(two)).shape == (12, 10, 8, 2)
