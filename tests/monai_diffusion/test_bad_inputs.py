"""The bad-input corpus: every case runs through the real command-line entry points and must end with a
non-zero exit, one line on stderr naming the key, file or value, no traceback, and no pre-existing file
changed or deleted."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_diffusion.cli import (
    compare_factors_main,
    estimate_memory_main,
    evaluate_autoencoder_main,
    evaluate_samples_main,
    import_weights_main,
    sample_main,
    train_autoencoder_main,
    train_controlnet_main,
    train_diffusion_main,
)
from monai_diffusion.runs.folders import OutputLock, RunLock

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "monai_diffusion" / "config" / "ldm_config.yaml"
TINY = [
    "data.image_size=[16, 16, 16]", "data.num_train=4", "data.num_val=2",
    "autoencoder.num_channels=[8, 8, 8]", "autoencoder.norm_num_groups=4",
    "autoencoder.discriminator.num_layers_d=1", "autoencoder.training.batch_size=2",
    "autoencoder.training.n_epochs=1",
    "diffusion.num_channels=[8]", "diffusion.attention_levels=[false]", "diffusion.num_head_channels=[8]",
    "diffusion.norm_num_groups=4",
]
# the trained diffusion run of the world: 20 diffusion steps (the cases' config keeps the default 1000)
DIFFUSION = ["diffusion.training.n_epochs=1", "diffusion.scheduler.num_train_timesteps=20",
             "diffusion.training.preview_inference_steps=2", "diffusion.sampling.num_inference_steps=2"]

# the ControlNet of the world, on the phantoms' label maps
CONTROLNET = ["data.num_classes=22", "controlnet.training.n_epochs=1", "controlnet.training.preview_inference_steps=2",
              "controlnet.conditioning_channels=4"]


def _read_only(path: Path) -> bool:
    """Make ``path`` refuse new files, also for root (``chattr +i``; root ignores permission bits)."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return True
    return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0


def _writable_again(path: Path) -> None:
    if os.geteuid() != 0:
        path.chmod(0o755)
    else:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


def _header_only(path: Path, shape: tuple[int, ...], data_bytes: int, gzipped: bool) -> None:
    """A NIfTI header claiming ``shape`` (float32), followed by only ``data_bytes`` zero bytes."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape(shape)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4 + b"\0" * data_bytes
    path.write_bytes(gzip.compress(raw) if gzipped else raw)


def _labelled_world(root: Path, volume) -> Path:
    """Image/label datalists: three good pairs, then one row whose label map is wrong in one way each."""
    root.mkdir()
    classes = np.random.default_rng(1).integers(0, 3, size=(20, 18, 16)).astype(np.int16)
    for index in range(4):
        nib.save(nib.Nifti1Image(volume(), np.eye(4)), root / f"ok{index}.nii.gz")
        nib.save(nib.Nifti1Image(classes, np.eye(4)), root / f"lab{index}.nii.gz")
    moved = np.eye(4)
    moved[0, 3] = 5.0
    bad = {"short": (classes[..., :15], np.eye(4)), "moved": (classes, moved),
           "half": (classes.astype(np.float32) + 0.5, np.eye(4)), "negative": (classes - 1, np.eye(4)),
           "big": (classes + 5, np.eye(4))}
    good = "image,label\n" + "".join(f"ok{i}.nii.gz,lab{i}.nii.gz\n" for i in range(3))
    for name, (data, affine) in bad.items():
        nib.save(nib.Nifti1Image(data, affine), root / f"{name}.nii.gz")
        (root / f"{name}.csv").write_text(good + f"ok3.nii.gz,{name}.nii.gz\n")
    (root / "missing.csv").write_text(good + "ok3.nii.gz,gone.nii.gz\n")
    (root / "nolabel.csv").write_text("image\n" + "".join(f"ok{i}.nii.gz\n" for i in range(4)))
    nib.save(nib.Nifti1Image(classes + 28, np.eye(4)), root / "class30.nii.gz")  # above the phantoms' 22 classes
    nib.save(nib.Nifti1Image(classes.astype(np.float32) + 0.25, np.eye(4)), root / "fraction.nii.gz")
    return root


def _labelled(world, name: str) -> list[str]:
    return ["data.source=nifti", f"data.paths={world['labelled'] / (name + '.csv')}", "data.num_classes=3",
            "data.val_fraction=0.25"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Files the cases point at, a trained tiny autoencoder and diffusion run, a run folder locked by a live
    training, and read-only folders."""
    root = tmp_path_factory.mktemp("corpus")
    paths = {"root": root}
    rng = np.random.default_rng(0)

    def volume(shape=(20, 18, 16)):
        return rng.random(shape).astype(np.float32)

    def folder(name: str, files: dict[str, np.ndarray]) -> Path:
        path = root / name
        path.mkdir()
        for file, data in files.items():
            nib.save(nib.Nifti1Image(data, np.eye(4)), path / file)
        return path

    good = {f"ok{i}.nii.gz": volume() for i in range(3)}
    paths["good"] = folder("good", good)
    paths["empty"] = folder("empty", {})
    (paths["empty"] / "notes.txt").write_text("no images here")
    paths["flat"] = folder("flat", {**good, "slice.nii.gz": volume((20, 18))})
    paths["multichannel"] = folder("multichannel", {**good, "rgb.nii.gz": volume((20, 18, 16, 3))})
    nan = volume()
    nan[3, 4, 5] = np.nan
    paths["nan"] = folder("nan", {**good, "broken_nan.nii.gz": nan})
    paths["truncated"] = folder("truncated", good)
    whole = gzip.compress(nib.Nifti1Image(volume(), np.eye(4)).to_bytes())
    (paths["truncated"] / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])
    paths["a_file"] = root / "a_file.txt"
    paths["a_file"].write_text("not a folder")
    paths["bad_yaml"] = root / "bad.yaml"
    paths["bad_yaml"].write_text("autoencoder:\n  num_channels: [32, 64\n  latent_channels: 3\n")
    paths["complex"] = folder("complex", {**good, "cplx.nii.gz": (volume() + 1j * volume()).astype(np.complex64)})
    paths["rgb"] = folder("rgb", {**good, "colour.nii.gz": np.zeros((20, 18, 16), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])})
    paths["five_d"] = folder("five_d", {**good, "five.nii.gz": volume((20, 18, 16, 1, 3))})
    paths["float64"] = folder("float64", {**good, "beyond32.nii.gz": np.full((20, 18, 16), 1e300)})
    paths["single"] = folder("single", {"only.nii.gz": volume()})
    paths["hard_linked"] = folder("hard_linked", {"scan.nii.gz": volume()})
    os.link(paths["hard_linked"] / "scan.nii.gz", paths["hard_linked"] / "same_scan.nii.gz")
    paths["zero_affine"] = folder("zero_affine", good)
    header = nib.Nifti1Image(volume(), np.eye(4)).header.copy()
    header.set_sform(np.zeros((4, 4)), code=1)
    header["qform_code"] = 0
    nib.save(nib.Nifti1Image(volume(), None, header), paths["zero_affine"] / "no_affine.nii.gz")
    paths["huge_header"] = folder("huge_header", good)
    _header_only(paths["huge_header"] / "claims.nii", (4000, 4000, 4000), 1000, gzipped=False)
    paths["huge_gz"] = folder("huge_gz", good)
    _header_only(paths["huge_gz"] / "claims.nii.gz", (4000, 4000, 4000), 1000, gzipped=True)
    paths["labelled"] = _labelled_world(root / "labelled", volume)
    paths["cut_checkpoint"] = root / "cut.pt"
    paths["dup_yaml"] = root / "dup.yaml"
    paths["dup_yaml"].write_text("autoencoder:\n  latent_channels: 3\n  norm_num_groups: 4\n  latent_channels: 4\n")
    brain = torch.load(ROOT / "tests" / "fixtures" / "pretrained" / "brain_ldm.pth")  # bundle-layout weights
    for name in ("autoencoder", "unet"):
        paths[f"brain_{name}"] = root / f"brain_{name}.pt"
        torch.save(brain[name], paths[f"brain_{name}"])
    paths["brain_args"] = {k: json.dumps(brain[f"{k}_args"]) for k in ("autoencoder", "unet")}
    paths["trained"] = root / "trained"
    assert train_autoencoder_main(_argv(paths["trained"])) == 0
    assert train_diffusion_main(_argv(paths["trained"], *DIFFUSION)) == 0
    assert train_controlnet_main(_argv(paths["trained"], *DIFFUSION, *CONTROLNET)) == 0
    whole = (paths["trained"] / "diffusion" / "checkpoints" / "last.pt").read_bytes()
    paths["cut_checkpoint"].write_bytes(whole[: len(whole) // 2])
    # a run folder a live training holds (this process, through another open file: flock refuses it too)
    (root / "busy" / "autoencoder").mkdir(parents=True)
    lock = RunLock(root / "busy" / "autoencoder")
    lock.acquire()
    paths["busy"] = root / "busy"
    # a results folder another command (sample.py, an evaluation) is writing: its lock is held
    paths["in_use"] = root / "in_use"
    paths["in_use"].mkdir()
    output_lock = OutputLock(paths["in_use"])
    output_lock.acquire()
    # a diffusion run whose autoencoder was then trained further in place
    shutil.copytree(paths["trained"], root / "retrained")
    paths["retrained"] = root / "retrained"
    assert train_autoencoder_main(_argv(paths["retrained"], "autoencoder.training.n_epochs=2") + ["--resume"]) == 0
    # a conditional diffusion run (sex, age) on the trained autoencoder, and datalists edited afterwards
    scans = folder("cond_scans", {f"c{i}.nii.gz": volume() for i in range(6)})
    rows = [(f"c{i}.nii.gz", "FM"[i % 2], 50 + 5 * i) for i in range(6)]
    edits = {"cond_list": rows, "cond_new_class": [(f, "O" if s == "M" else s, a) for f, s, a in rows],
             "cond_ages_x10": [(f, s, 10 * a) for f, s, a in rows]}
    for name, table in edits.items():
        paths[name] = root / f"{name}.csv"
        paths[name].write_text("image,sex,age\n" + "".join(f"{scans / f},{s},{a}\n" for f, s, a in table))
    paths["cond_run"] = root / "cond_run"
    assert train_diffusion_main(_argv(paths["cond_run"], *DIFFUSION, *_conditional(paths, "cond_list"))) == 0
    # datalists with the faults a spreadsheet or a hand-edited JSON file brings
    image = scans / "c0.nii.gz"
    texts = {
        "csv_one_class.csv": "image,grade,age\n" + "".join(f"{scans / f'c{i}.nii.gz'},{'1' if i % 2 else '1.0'},{50 + i}\n" for i in range(6)),
        "csv_single_sex.csv": "image,sex,age\n" + "".join(f"{scans / f'c{i}.nii.gz'},F,{50 + i}\n" for i in range(6)),
        "csv_empty_cell.csv": "image,sex,age\n" + "".join(f"{scans / f'c{i}.nii.gz'},{'' if i == 2 else 'FM'[i % 2]},{50 + i}\n" for i in range(6)),
        "csv_short_row.csv": "image,age,sex\n" + "".join(f"{scans / f'c{i}.nii.gz'},{50 + i}" + ("" if i == 3 else f",{'FM'[i % 2]}") + "\n" for i in range(6)),
        "csv_repeated_column.csv": f"image,age,sex,age\n{image},50,F,60\n",
        "csv_extra_field.csv": f"image,sex,age\n{image},F,50\n{image},M,60,oops\n",
        "csv_header_only_bom_semicolon.csv": "\ufeffimage;sex;age\n",
        "csv_empty.csv": "\n",
        "conditions_repeated.csv": "sex,age,sex\nF,60,M\n",
        "conditions_extra.csv": "sex,age\nF,60,7\n",
        "conditions_header_only.csv": "sex,age\n",
    }
    rows = [{"image": str(scans / f"c{i}.nii.gz"), "sex": "FM"[i % 2], "age": 50 + i} for i in range(6)]
    jsons = {
        "json_null_sex.json": {"training": [{**r, "sex": None if i == 1 else r["sex"]} for i, r in enumerate(rows)]},
        "json_true_age.json": {"training": [{**r, "age": True if i == 4 else r["age"]} for i, r in enumerate(rows)]},
        "json_text_age.json": {"training": [{**r, "age": "sixty" if i == 4 else r["age"]} for i, r in enumerate(rows)]},
        "json_empty_training.json": {"training": [], "validation": rows[:2]},
        "json_validation_object.json": {"training": rows, "validation": rows[0]},
    }
    for name, text in texts.items():
        paths[name] = root / name
        paths[name].write_text(text, encoding="utf-8")
    for name, data in jsons.items():
        paths[name] = root / name
        paths[name].write_text(json.dumps(data), encoding="utf-8")
    # generated volumes of the trained run, for evaluate_samples.py
    paths["samples"] = root / "samples"
    assert sample_main(_argv(paths["trained"]) + ["--output", str(paths["samples"]), "--num-samples", "2",
                                                   "--steps", "2"]) == 0
    # sample folders with one broken volume beside the good ones (the model generates 16^3, one channel)
    broken = {"all_nan": np.full((16, 16, 16), np.nan, np.float32), "one_inf": np.where(np.broadcast_to(np.eye(16)[..., None], (16, 16, 16)) > 0, np.inf, 0.5).astype(np.float32),
              "bytes_0_255": (rng.random((16, 16, 16)) * 255).astype(np.float32), "negative": rng.random((16, 16, 16)).astype(np.float32) - 0.5,
              "two_channels": rng.random((16, 16, 16, 2)).astype(np.float32)}
    for name, data in broken.items():
        paths[f"samples_{name}"] = root / f"samples_{name}"
        shutil.copytree(paths["samples"], paths[f"samples_{name}"], ignore=shutil.ignore_patterns(".lock", "*.png", "*.json"))
        nib.save(nib.Nifti1Image(data, np.eye(4)), paths[f"samples_{name}"] / f"{name}.nii.gz")
    # a trained run folder and a folder that refuse new files
    shutil.copytree(paths["trained"] / "autoencoder", root / "frozen" / "autoencoder")
    paths["frozen_run"] = root / "frozen" / "autoencoder"
    paths["frozen_dir"] = root / "frozen_dir"
    paths["frozen_dir"].mkdir()
    frozen = [paths["frozen_run"], paths["frozen_dir"]]
    paths["read_only"] = all([_read_only(path) for path in frozen])
    yield paths
    for path in frozen:
        _writable_again(path)
    lock.release()
    output_lock.release()


def _argv(out: Path, *overrides: str, config: Path = CONFIG) -> list[str]:
    argv = ["--config", str(config), "--set", f"output_dir={out}"]
    for item in (*TINY, *overrides):
        argv += ["--set", item]
    return argv


def _conditional(world, datalist: str, categorical: str = "sex") -> list[str]:
    return ["data.source=nifti", f"data.paths={world[datalist]}", "data.val_fraction=0.34",
            f"diffusion.autoencoder_run={world['trained'] / 'autoencoder'}",
            f"diffusion.conditioning.categorical=[{categorical}]", "diffusion.conditioning.continuous=[age]",
            "diffusion.attention_levels=[true]"]


def _samples(world, folder: str, *extra: str) -> list[str]:
    return ["--run", str(world["trained"] / "diffusion"), "--samples", str(world[folder]), *extra]


def _nifti(world, name: str) -> list[str]:
    return ["data.source=nifti", f"data.paths={world[name]}", "data.val_fraction=0.34"]


# (case id, entry point, argv builder, regex the one-line message must contain)
CASES = [
    ("yaml-syntax", train_autoencoder_main, lambda w, o: _argv(o, config=w["bad_yaml"]), r"bad\.yaml:3:\d+: YAML syntax error"),
    ("missing-config", train_autoencoder_main, lambda w, o: _argv(o, config=w["root"] / "nope.yaml"), r"nope\.yaml: config file not found"),
    ("unknown-key", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.trainig.batch_size=1"), r"autoencoder\.trainig: unknown key \(did you mean 'autoencoder\.training'\?\)"),
    ("unknown-leaf", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.latent_chanels=4"), r"autoencoder\.latent_chanels: unknown key \(did you mean 'autoencoder\.latent_channels'\?\)"),
    ("set-malformed", train_autoencoder_main, lambda w, o: _argv(o, "batch_size"), r"--set 'batch_size': expected dotted\.key=value"),
    ("type-int", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.training.batch_size=two"), r"autoencoder\.training\.batch_size: expected an integer, got 'two'"),
    ("type-bool", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.training.mixed_precision=maybe"), r"autoencoder\.training\.mixed_precision: expected true or false, got 'maybe'"),
    ("type-float", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.training.learning_rate=fast"), r"autoencoder\.training\.learning_rate: expected a number, got 'fast'"),
    ("type-list", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.num_channels=32"), r"autoencoder\.num_channels: expected a list"),
    ("negative-lr", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.training.learning_rate=-1"), r"autoencoder\.training\.learning_rate: expected a number > 0, got -1"),
    ("device", train_autoencoder_main, lambda w, o: _argv(o, "device=gpu"), r"device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("source", train_autoencoder_main, lambda w, o: _argv(o, "data.source=nifty"), r"data\.source: .*got 'nifty'.*did you mean 'nifti'"),
    ("factors-length", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.downsample_factors=[4]"), r"autoencoder\.downsample_factors has 1 entries .* 2 are expected"),
    ("factor-zero", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.downsample_factors=[0, 2]"), r"downsample_factors\[0\] = 0: .*integer >= 1"),
    ("factor-negative", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.downsample_factors=[-1, 2]"), r"downsample_factors\[0\] = -1: .*integer >= 1"),
    ("factor-fraction", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.downsample_factors=[2.5, 2]"), r"autoencoder\.downsample_factors\[0\]: expected an integer .*got 2\.5"),
    ("factor-string", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.downsample_factors=['4', 2]"), r"autoencoder\.downsample_factors\[0\]: expected an integer .*got '4'"),
    ("factors-empty", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.downsample_factors=[]"), r"downsample_factors has 0 entries"),
    ("per-axis-length", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.downsample_factors=[[4, 2], 2]"), r"downsample_factors\[0\] = \[4, 2\]: a per-axis factor needs exactly 3 integers"),
    ("attention-length", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.attention_levels=[false, true]"), r"autoencoder\.attention_levels: 2 entries .* 3 levels"),
    ("norm-groups", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.num_channels=[8, 10, 8]"), r"autoencoder\.num_channels: \[8, 10, 8\] must all be multiples of autoencoder\.norm_num_groups = 4 \(not \[10\]\)"),
    ("size-not-divisible", train_autoencoder_main, lambda w, o: _argv(o, "data.image_size=[18, 16, 16]"), r"data\.image_size: \[18, 16, 16\] is not divisible .* \[4, 4, 4\].* 16 or 20 x 16 x 16"),
    ("size-below-factor", train_autoencoder_main, lambda w, o: _argv(o, "data.image_size=[8, 8, 8]", "autoencoder.downsample_factors=[4, 4]"), r"data\.image_size: \[8, 8, 8\] .* \[16, 16, 16\].* 16 x 16 x 16"),
    ("discriminator-too-deep", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.discriminator.num_layers_d=3"), r"autoencoder\.discriminator\.num_layers_d: 3 layers need at least 24 voxels"),
    ("perceptual-no-weights", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.training.use_perceptual_loss=true"), r"autoencoder\.perceptual\.weights_path: required .* MedicalNet"),
    ("perceptual-missing-file", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.training.use_perceptual_loss=true", f"autoencoder.perceptual.weights_path={w['root'] / 'r10.pth'}"), r"r10\.pth' not found; download resnet_10_23dataset\.pth"),
    ("missing-data-folder", train_autoencoder_main, lambda w, o: _argv(o, "data.source=nifti", f"data.paths={w['root'] / 'nowhere'}"), r"data\.paths: .*nowhere.* does not exist"),
    ("folder-without-nifti", train_autoencoder_main, lambda w, o: _argv(o, *_nifti(w, "empty")), r"data\.paths: folder .*empty' contains no \.nii or \.nii\.gz files"),
    ("glob-matches-nothing", train_autoencoder_main, lambda w, o: _argv(o, "data.source=nifti", f"data.paths={w['good']}/*.nii.bz2"), r"data\.paths: glob .*\*\.nii\.bz2' matches nothing"),
    ("truncated-nifti", train_autoencoder_main, lambda w, o: _argv(o, *_nifti(w, "truncated")), r"cut\.nii\.gz"),
    ("2d-image", train_autoencoder_main, lambda w, o: _argv(o, *_nifti(w, "flat")), r"slice\.nii\.gz: expected a 3D volume"),
    ("channels-mismatch", train_autoencoder_main, lambda w, o: _argv(o, *_nifti(w, "multichannel")), r"rgb\.nii\.gz: has 3 channel\(s\) .* but in_channels=1"),
    ("cache-dir-not-writable", train_autoencoder_main, lambda w, o: _argv(o, *_nifti(w, "good"), "data.cache_memory_gb=0", f"data.cache_dir={w['a_file']}/cache"), r"data\.cache_dir: cannot create the cache folder .*a_file\.txt/cache .*set data\.cache_dir to a writable folder"),
    ("cache-memory-negative", train_autoencoder_main, lambda w, o: _argv(o, "data.cache_memory_gb=-1"), r"data\.cache_memory_gb: expected a number >= 0, got -1"),
    ("nan-volume", train_autoencoder_main, lambda w, o: _argv(o, *_nifti(w, "nan"), "data.cache=true"), r"broken_nan\.nii\.gz: contains 1 non-finite voxels"),
    ("output-not-writable", train_autoencoder_main, lambda w, o: _argv(w["a_file"] / "runs"), r"output_dir: cannot write to .*a_file\.txt/runs/autoencoder"),
    ("resume-without-run", train_autoencoder_main, lambda w, o: _argv(o) + ["--resume"], r"--resume: no checkpoint at .*last\.pt; start without --resume"),
    ("existing-run", train_autoencoder_main, lambda w, o: _argv(w["trained"]), r"output_dir: .*trained/autoencoder already holds a trained run .*pass --resume"),
    ("resume-changed-architecture", train_autoencoder_main, lambda w, o: _argv(w["trained"], "autoencoder.latent_channels=4") + ["--resume"], r"--resume: the config changes the autoencoder architecture \(latent_channels: 3 -> 4\)"),
    ("diffusion-missing-autoencoder", train_diffusion_main, lambda w, o: _argv(o), r"diffusion\.autoencoder_run: .*autoencoder: no such run folder.*train the autoencoder first"),
    ("diffusion-mismatched-autoencoder", train_diffusion_main, lambda w, o: _argv(o, f"diffusion.autoencoder_run={w['trained'] / 'autoencoder'}", "autoencoder.latent_channels=4"), r"does not match the config's autoencoder section \(latent_channels: 3 -> 4\)"),
    ("diffusion-latent-size", train_diffusion_main, lambda w, o: _argv(o, "diffusion.num_channels=[8, 8, 8, 8]", "diffusion.attention_levels=[false, false, false, false]", "diffusion.num_head_channels=[0, 0, 0, 8]"), r"every latent axis must be divisible by 8"),
    ("diffusion-head-channels", train_diffusion_main, lambda w, o: _argv(o, "diffusion.num_channels=[8, 8]", "diffusion.attention_levels=[false, true]", "diffusion.num_head_channels=[0, 3]"), r"diffusion\.num_head_channels\[1\]: 3 must be a positive divisor"),
    ("sample-without-run", sample_main, lambda w, o: _argv(o) + ["--output", str(o / "samples")], r"--run: .*train the diffusion model first"),
    # non-finite numbers, integers beyond 64 bits, the limits beside the fields, the cross-key rules
    ("lr-inf", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.training.learning_rate=.inf"), r"autoencoder\.training\.learning_rate: expected a finite number, got inf"),
    ("lr-beyond-float64", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.training.learning_rate=1e400"), r"autoencoder\.training\.learning_rate: expected a finite number, got '1e400'"),
    ("norm-eps-nan", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.norm_eps=.nan"), r"autoencoder\.norm_eps: expected a finite number, got nan"),
    ("kl-weight-minus-inf", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.training.kl_weight=-.inf"), r"autoencoder\.training\.kl_weight: expected a finite number, got -inf"),
    ("seed-beyond-int64", train_autoencoder_main, lambda w, o: _argv(o, "seed=9223372036854775808"), r"seed: 9223372036854775808 does not fit in a 64-bit integer"),
    ("seed-negative", train_autoencoder_main, lambda w, o: _argv(o, "seed=-1"), r"seed: expected an integer >= 0, got -1"),
    ("size-beyond-int64", train_autoencoder_main, lambda w, o: _argv(o, "data.image_size=[16, 16, 99999999999999999999]"), r"data\.image_size\[2\]: 99999999999999999999 does not fit in a 64-bit integer"),
    ("duplicate-yaml-key", train_autoencoder_main, lambda w, o: _argv(o, config=w["dup_yaml"]), r"dup\.yaml:4: duplicate key 'latent_channels' \(first given at line 2\)"),
    ("config-is-a-folder", train_autoencoder_main, lambda w, o: _argv(o, config=w["good"]), r"good: is a folder, not a config file"),
    ("config-in-mistyped-folder", train_autoencoder_main, lambda w, o: _argv(o, config=Path("my_projct/quickstart.yaml")), r"^error: my_projct/quickstart\.yaml: config file not found"),
    ("num-res-blocks-negative", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.num_res_blocks=-1"), r"autoencoder\.num_res_blocks: expected an integer >= 1, got -1"),
    ("num-res-blocks-entry-zero", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.num_res_blocks=[1, 0, 1]"), r"autoencoder\.num_res_blocks: expected an integer >= 1 for each entry, got \[1, 0, 1\]"),
    ("norm-groups-zero", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.norm_num_groups=0"), r"autoencoder\.norm_num_groups: expected an integer >= 1, got 0"),
    ("out-channels-differ", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.out_channels=2"), r"autoencoder\.out_channels: 2 differs from autoencoder\.in_channels = 1"),
    ("num-val-zero", train_autoencoder_main, lambda w, o: _argv(o, "data.num_val=0"), r"data\.num_val: expected an integer >= 1, got 0"),
    ("val-fraction-one", train_autoencoder_main, lambda w, o: _argv(o, "data.val_fraction=1.0"), r"data\.val_fraction: expected a number >= 0 and < 1, got 1\.0"),
    ("spacing-zero", train_autoencoder_main, lambda w, o: _argv(o, "data.spacing=[1.0, 0, 1.0]"), r"data\.spacing: expected a number > 0 and <= 1000 for each entry"),
    ("percentiles-reversed", train_autoencoder_main, lambda w, o: _argv(o, "data.intensity_percentiles=[99, 1]"), r"data\.intensity_percentiles: expected \[lower, upper\] with lower < upper, got \[99\.0, 1\.0\]"),
    ("max-steps-zero", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.training.max_steps=0"), r"autoencoder\.training\.max_steps: expected an integer >= 1, got 0"),
    ("training-cuda-on-cpu", train_autoencoder_main, lambda w, o: _argv(o, "device=cuda"), r"device: 'cuda' requested but CUDA is not available"),
    ("unet-deepest-head-zero", train_diffusion_main, lambda w, o: _argv(o, "diffusion.num_head_channels=[0]"), r"diffusion\.num_head_channels\[0\]: 0 must be a positive divisor .*middle block always has attention there"),
    ("beta-start-negative", train_diffusion_main, lambda w, o: _argv(o, "diffusion.scheduler.beta_start=-5"), r"diffusion\.scheduler\.beta_start: expected a number > 0 and < 1, got -5"),
    ("beta-start-above-end", train_diffusion_main, lambda w, o: _argv(o, "diffusion.scheduler.beta_start=0.5", "diffusion.scheduler.beta_end=0.1"), r"diffusion\.scheduler\.beta_start: 0\.5 must be below diffusion\.scheduler\.beta_end = 0\.1"),
    ("preview-steps-above-timesteps", train_diffusion_main, lambda w, o: _argv(o, "diffusion.scheduler.num_train_timesteps=20", "diffusion.sampling.num_inference_steps=2", "diffusion.training.preview_inference_steps=50"), r"diffusion\.training\.preview_inference_steps: 50 exceeds diffusion\.scheduler\.num_train_timesteps = 20"),
    ("sampling-steps-above-timesteps", train_diffusion_main, lambda w, o: _argv(o, "diffusion.scheduler.num_train_timesteps=20"), r"diffusion\.sampling\.num_inference_steps: 50 exceeds diffusion\.scheduler\.num_train_timesteps = 20"),
    ("ema-decay-one", train_diffusion_main, lambda w, o: _argv(o, "diffusion.training.ema_decay=1.0"), r"diffusion\.training\.ema_decay: expected a number > 0 and < 1, got 1\.0"),
    # resume: a changed discriminator or UNet, nothing to resume, and config.yaml is never rewritten
    ("resume-changed-discriminator", train_autoencoder_main, lambda w, o: _argv(w["trained"], "autoencoder.discriminator.num_channels=8") + ["--resume"], r"--resume: the config changes the autoencoder architecture \(discriminator\.num_channels: 32 -> 8\)"),
    ("resume-deeper-discriminator", train_autoencoder_main, lambda w, o: _argv(w["trained"], "autoencoder.discriminator.num_layers_d=2") + ["--resume"], r"--resume: the config changes the autoencoder architecture \(discriminator\.num_layers_d: 1 -> 2\)"),
    ("resume-changed-unet", train_diffusion_main, lambda w, o: _argv(w["trained"], *DIFFUSION, "diffusion.num_channels=[16]", "diffusion.num_head_channels=[16]") + ["--resume"], r"--resume: the config changes the UNet architecture \(channels: \[8\] -> \[16\]"),
    ("resume-diffusion-without-run", train_diffusion_main, lambda w, o: _argv(o) + ["--resume"], r"--resume: no checkpoint at .*diffusion/checkpoints/last\.pt"),
    ("existing-diffusion-run", train_diffusion_main, lambda w, o: _argv(w["trained"], *DIFFUSION), r"output_dir: .*trained/diffusion already holds a trained run"),
    # one training per run folder; no output inside the data
    ("run-folder-in-use", train_autoencoder_main, lambda w, o: _argv(w["busy"]), rf"output_dir: .*busy/autoencoder is in use by another training \(PID {os.getpid()}\); wait for it"),
    ("run-folder-in-use-resume", train_autoencoder_main, lambda w, o: _argv(w["busy"]) + ["--resume"], rf"output_dir: .*busy/autoencoder is in use by another training \(PID {os.getpid()}\)"),
    ("output-dir-inside-data", train_autoencoder_main, lambda w, o: _argv(w["good"] / "runs", *_nifti(w, "good")), r"output_dir: .*good/runs lies inside the data of data\.paths"),
    ("output-dir-inside-glob", train_autoencoder_main, lambda w, o: _argv(w["good"] / "runs", "data.source=nifti", f"data.paths={w['good']}/**/*.nii.gz"), r"output_dir: .*good/runs lies inside the data of data\.paths \(.*\*\*/\*\.nii\.gz\)"),
    # NIfTI files: refused from the header, or named when loading fails
    ("complex-nifti", train_autoencoder_main, lambda w, o: _argv(o, *_nifti(w, "complex")), r"cplx\.nii\.gz: holds complex values \(complex64\)"),
    ("rgb24-nifti", train_autoencoder_main, lambda w, o: _argv(o, *_nifti(w, "rgb")), r"colour\.nii\.gz: holds voxels of type .* \(e\.g\. RGB24\)"),
    ("five-d-nifti", train_autoencoder_main, lambda w, o: _argv(o, *_nifti(w, "five_d")), r"five\.nii\.gz: has 5 dimensions \(shape \(20, 18, 16, 1, 3\)\)"),
    ("float64-beyond-float32", train_autoencoder_main, lambda w, o: _argv(o, *_nifti(w, "float64"), "data.cache=true"), r"beyond32\.nii\.gz: holds finite values up to 1e\+300, beyond float32's range"),
    ("float64-beyond-float32-in-loop", train_autoencoder_main, lambda w, o: _argv(o, *_nifti(w, "float64"), "data.val_fraction=0.5"), r"beyond32\.nii\.gz: holds finite values up to 1e\+300"),
    ("zero-affine", train_autoencoder_main, lambda w, o: _argv(o, *_nifti(w, "zero_affine")), r"no_affine\.nii\.gz: its affine .* is singular"),
    ("huge-header-nii", train_autoencoder_main, lambda w, o: _argv(o, *_nifti(w, "huge_header")), r"claims\.nii: the header says 4000 x 4000 x 4000 voxels .*but the file has 1,352 bytes"),
    ("huge-header-gz", train_autoencoder_main, lambda w, o: _argv(o, *_nifti(w, "huge_gz")), r"claims\.nii\.gz: the header says 4000 x 4000 x 4000 voxels .*gzip file can hold"),
    ("absurd-spacing", train_autoencoder_main, lambda w, o: _argv(o, *_nifti(w, "good"), "data.spacing=[0.0001, 0.0001, 0.0001]"), r"ok0\.nii\.gz: resampling its 1 x 1 x 1 mm voxels to data\.spacing \[0\.0001, 0\.0001, 0\.0001\] mm gives about"),
    ("single-nifti", train_autoencoder_main, lambda w, o: _argv(o, *_nifti(w, "single")), r"data\.paths: only 1 NIfTI file \(.*only\.nii\.gz\); at least 2 are needed"),
    ("listed-file-twice", train_autoencoder_main, lambda w, o: _argv(o, "data.source=nifti", f"data.paths=[{w['good'] / 'ok0.nii.gz'}, {w['good'] / 'ok0.nii.gz'}]"), r"data\.paths: only 1 NIfTI file"),
    ("diffusion-complex-nifti", train_diffusion_main, lambda w, o: _argv(o, *_nifti(w, "complex"), f"diffusion.autoencoder_run={w['trained'] / 'autoencoder'}"), r"cplx\.nii\.gz: holds complex values"),
    # sampling
    ("sample-steps-zero", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(o), "--steps", "0"], r"--steps: expected an integer >= 1, got 0"),
    ("sample-batch-size-zero", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(o), "--batch-size", "0"], r"--batch-size: expected an integer >= 1, got 0"),
    ("sample-num-samples-zero", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(o), "--num-samples", "0"], r"--num-samples: expected an integer >= 1, got 0"),
    ("sample-seed-beyond-int64", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(o), "--seed", str(2**63)], r"--seed: expected an integer from 0 to 2\*\*63 - 1, got 9223372036854775808"),
    ("sample-ddpm-steps-above-the-runs", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(o), "--scheduler", "ddpm", "--steps", "30"], r"--steps 30 \(or diffusion\.sampling\.num_inference_steps\): exceeds the num_train_timesteps = 20 the run"),
    ("sample-rflow-on-a-ddpm-run", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(o), "--scheduler", "rflow", "--steps", "2"], r"--scheduler rflow: the run .* was trained with diffusion\.scheduler\.type = ddpm \(noise prediction\), which rflow cannot sample; use ddim or ddpm or dpm-solver\+\+"),
    ("sampling-scheduler-against-the-objective", train_diffusion_main, lambda w, o: _argv(o, "diffusion.scheduler.type=rflow", "diffusion.sampling.scheduler=ddim"), r"diffusion\.sampling\.scheduler: ddim cannot sample a model trained with diffusion\.scheduler\.type = rflow; use auto or one of rflow"),
    ("scheduler-type-unknown", train_diffusion_main, lambda w, o: _argv(o, "diffusion.scheduler.type=flow"), r"diffusion\.scheduler\.type: .*flow"),
    ("rflow-base-numel-zero", train_diffusion_main, lambda w, o: _argv(o, "diffusion.scheduler.type=rflow", "diffusion.scheduler.transform_base_numel=0"), r"diffusion\.scheduler\.transform_base_numel: expected an integer >= 1, got 0"),
    ("sample-steps-above-timesteps", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(o), "--steps", "2000"], r"--steps 2000: exceeds diffusion\.scheduler\.num_train_timesteps = 1000"),
    ("sample-steps-above-the-runs", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(o), "--steps", "30"], r"--steps 30 \(or diffusion\.sampling\.num_inference_steps\): exceeds the num_train_timesteps = 20 the run"),
    ("sample-beyond-the-disk", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(o), "--steps", "2", "--num-samples", "1000000000000"], r"--num-samples 1000000000000: the samples need about .* GB as NIfTI files, but .* GB free"),
    ("sample-output-not-empty", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(w["good"])], r"--output: .*good already exists and is not an empty folder"),
    ("sample-output-under-a-file", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(w["a_file"] / "samples")], r"--output: cannot create .*a_file\.txt/samples: .*a_file\.txt is a file"),
    ("sample-output-read-only", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(w["frozen_dir"] / "samples")], r"--output: cannot write to .*frozen_dir/samples: cannot create it in .*frozen_dir"),
    ("sample-output-inside-data", sample_main, lambda w, o: _argv(w["trained"], *_nifti(w, "good")) + ["--output", str(w["good"] / "samples")], r"--output: .*good/samples lies inside the data of data\.paths"),
    ("sample-cuda-on-cpu", sample_main, lambda w, o: _argv(w["trained"], "device=cuda") + ["--output", str(o)], r"device: 'cuda' requested but CUDA is not available"),
    ("sample-autoencoder-run", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(o), "--run", str(w["trained"] / "autoencoder")], r"--run: .*autoencoder/checkpoints/best\.pt is not a diffusion checkpoint"),
    ("sample-truncated-checkpoint", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(o), "--run", str(w["cut_checkpoint"])], r"cut\.pt: cannot read checkpoint \(RuntimeError: [^;]*\); the file is truncated or corrupt$"),
    # evaluation
    ("eval-tile-overlap-alone", evaluate_autoencoder_main, lambda w, o: ["--run", str(w["trained"] / "autoencoder"), "--output", str(o), "--tile-overlap", "0.3"], r"--tile-overlap: only used with --tile-size"),
    ("eval-tile-overlap-nan", evaluate_autoencoder_main, lambda w, o: ["--run", str(w["trained"] / "autoencoder"), "--output", str(o), "--tile-size", "8", "--tile-overlap", "nan"], r"--tile-overlap: expected a finite number, got 'nan'"),
    ("eval-tile-overlap-one", evaluate_autoencoder_main, lambda w, o: ["--run", str(w["trained"] / "autoencoder"), "--output", str(o), "--tile-size", "8", "--tile-overlap", "1.0"], r"--tile-size/--tile-overlap: tile_overlap = 1\.0: expected a fraction in \[0, 1\)"),
    ("eval-buffers-unknown", evaluate_autoencoder_main, lambda w, o: ["--run", str(w["trained"] / "autoencoder"), "--output", str(o), "--buffers", "gpu"], r"--buffers: invalid choice: 'gpu' \(choose from 'auto', 'device', 'cpu', 'disk'\)"),
    ("sample-buffers-unknown", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(o), "--buffers", "host"], r"--buffers: invalid choice: 'host'"),
    ("tile-buffers-unknown", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.tile_buffers=gpu"), r"autoencoder\.tile_buffers: expected one of 'auto', 'device', 'cpu', 'disk', got 'gpu'"),
    ("eval-tile-size-zero", evaluate_autoencoder_main, lambda w, o: ["--run", str(w["trained"] / "autoencoder"), "--output", str(o), "--tile-size", "0"], r"--tile-size: expected an integer >= 1, got 0"),
    ("eval-output-not-empty", evaluate_autoencoder_main, lambda w, o: ["--run", str(w["trained"] / "autoencoder"), "--output", str(w["good"])], r"--output: .*good already exists and is not an empty folder"),
    ("eval-output-inside-data", evaluate_autoencoder_main, lambda w, o: ["--run", str(w["trained"] / "autoencoder"), "--data", str(w["good"]), "--output", str(w["good"] / "eval")], r"--output: .*good/eval lies inside the data of --data"),
    ("eval-default-output-read-only", evaluate_autoencoder_main, lambda w, o: ["--run", str(w["frozen_run"])], r"--output \(default <run>/evaluation\): cannot write to .*frozen/autoencoder/evaluation: cannot create it in"),
    ("eval-missing-run", evaluate_autoencoder_main, lambda w, o: ["--run", str(w["root"] / "nothing"), "--output", str(o)], r"--run: .*nothing: no such run folder or checkpoint file"),
    ("eval-diffusion-run", evaluate_autoencoder_main, lambda w, o: ["--run", str(w["trained"] / "diffusion"), "--output", str(o)], r"--run: .*diffusion/checkpoints/best\.pt holds no autoencoder"),
    ("eval-missing-data", evaluate_autoencoder_main, lambda w, o: ["--run", str(w["trained"] / "autoencoder"), "--output", str(o), "--data", str(w["root"] / "nowhere")], r"--data: .*nowhere' does not exist"),
    ("eval-complex-data", evaluate_autoencoder_main, lambda w, o: ["--run", str(w["trained"] / "autoencoder"), "--output", str(o), "--data", str(w["complex"])], r"cplx\.nii\.gz: holds complex values"),
    ("eval-cuda-on-cpu", evaluate_autoencoder_main, lambda w, o: ["--run", str(w["trained"] / "autoencoder"), "--output", str(o), "--device", "cuda"], r"device: 'cuda' requested but CUDA is not available"),
    # the memory estimate's budget search
    ("budget-nan", estimate_memory_main, lambda w, o: _argv(o) + ["--budget", "nan", "--output", str(o.parent / "x.yaml")], r"--budget 'nan': expected a finite size above zero"),
    ("budget-inf", estimate_memory_main, lambda w, o: _argv(o) + ["--budget", "infGB", "--output", str(o.parent / "x.yaml")], r"--budget 'infGB': expected a finite size above zero"),
    ("budget-negative", estimate_memory_main, lambda w, o: _argv(o) + ["--budget=-5GB", "--output", str(o.parent / "x.yaml")], r"--budget '-5GB': expected a finite size above zero"),
    ("budget-words", estimate_memory_main, lambda w, o: _argv(o) + ["--budget", "lots", "--output", str(o.parent / "x.yaml")], r"--budget 'lots': expected a size such as 24GB"),
    ("budget-output-missing-folder", estimate_memory_main, lambda w, o: _argv(o) + ["--budget", "24GB", "--output", str(w["root"] / "nowhere" / "x.yaml")], r"--output: cannot write .*nowhere/x\.yaml: its folder .*nowhere does not exist"),
    ("budget-output-exists", estimate_memory_main, lambda w, o: _argv(o) + ["--budget", "24GB", "--output", str(w["bad_yaml"])], r"--output: .*bad\.yaml already exists"),
    ("budget-output-read-only", estimate_memory_main, lambda w, o: _argv(o) + ["--budget", "24GB", "--output", str(w["frozen_dir"] / "x.yaml")], r"--output: cannot write to .*frozen_dir"),
    ("input-size-zero", estimate_memory_main, lambda w, o: _argv(o) + ["--input-size", "0"], r"--input-size: expected an integer >= 1, got 0"),
    ("all-without-budget", estimate_memory_main, lambda w, o: _argv(o) + ["--all"], r"--all: only used with --budget"),
    ("world-size-zero", estimate_memory_main, lambda w, o: _argv(o) + ["--world-size", "0"], r"--world-size: expected an integer >= 1, got 0"),
    # the factor study
    ("compare-output-not-empty", compare_factors_main, lambda w, o: _argv(o) + ["--factors", "[2, 2]", "--output", str(w["good"])], r"--output: .*good already exists and is not an empty folder"),
    ("compare-output-inside-data", compare_factors_main, lambda w, o: _argv(o, *_nifti(w, "good")) + ["--factors", "[2, 2]", "--output", str(w["good"] / "study")], r"--output: .*good/study lies inside the data of data\.paths"),
    ("compare-steps-zero", compare_factors_main, lambda w, o: _argv(o) + ["--factors", "[2, 2]", "--steps", "0"], r"--steps: expected an integer >= 1, got 0"),
    ("compare-factors-not-a-list", compare_factors_main, lambda w, o: _argv(o) + ["--factors", "four"], r"--factors 'four': expected a list"),
    # an empty or ignored option is an error, never a silent fall-back
    ("compare-empty-output", compare_factors_main, lambda w, o: _argv(o) + ["--factors", "[2, 2]", "--output", ""], r"--output: expected a path, got ''"),
    ("budget-empty-output", estimate_memory_main, lambda w, o: _argv(o) + ["--budget", "24GB", "--output", " "], r"--output: expected a path, got ' '"),
    ("sample-empty-run", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(o), "--run", ""], r"--run: expected a path, got ''"),
    ("estimate-output-without-budget", estimate_memory_main, lambda w, o: _argv(o) + ["--output", str(o.parent / "x.yaml")], r"--output: only used with --budget"),
    ("budget-batch-size-does-not-fit", estimate_memory_main, lambda w, o: _argv(o) + ["--budget", "1MB", "--batch-size", "2", "--output", str(o.parent / "x.yaml")], r"--budget 1MB: no searched configuration fits \(.*; batch 2; mixed precision"),
    # ldm-import: a wrong file, a layout we do not know, keys or shapes that do not fit, a config that does not match
    ("import-missing-file", import_weights_main, lambda w, o: ["maisi", "--autoencoder", str(w["root"] / "autoencoder_v1.pt"), "--output", str(o)], r"--autoencoder: .*autoencoder_v1\.pt: no such file; download it first"),
    ("import-not-weights", import_weights_main, lambda w, o: ["maisi", "--autoencoder", str(w["a_file"]), "--output", str(o)], r"--autoencoder: .*a_file\.txt is not a readable PyTorch weights file"),
    ("import-unknown-layout", import_weights_main, lambda w, o: ["maisi", "--autoencoder", str(w["brain_autoencoder"]), "--output", str(o)], r"--autoencoder: .*brain_autoencoder\.pt is not in MAISI's AutoencoderKlMaisi layout \(no 'encoder\.blocks\.0\.conv\.conv\.weight'; found 'encoder\.blocks\.0\.conv\.weight'"),
    ("import-missing-keys", import_weights_main, lambda w, o: ["generative", "--autoencoder", str(w["brain_autoencoder"]), "--output", str(o), "--autoencoder-args", "{num_channels: [4, 8], latent_channels: 3, norm_num_groups: 4, attention_levels: [false, false], num_res_blocks: 1, with_encoder_nonlocal_attn: false, with_decoder_nonlocal_attn: false}", "--image-size", "16", "16", "16"], r"brain_autoencoder\.pt does not fit the network: .*unexpected keys \('encoder\.blocks\.\d"),
    ("import-wrong-shapes", import_weights_main, lambda w, o: ["generative", "--autoencoder", str(w["brain_autoencoder"]), "--autoencoder-args", w["brain_args"]["autoencoder"].replace('"latent_channels": 3', '"latent_channels": 4'), "--image-size", "16", "16", "16", "--output", str(o)], r"--autoencoder: .*brain_autoencoder\.pt: 9 tensors have another shape than the network's \(file vs network: 'encoder\.blocks\.7\.conv\.weight \(3, 8, 3, 3, 3\) vs \(4, 8, 3, 3, 3\)'"),
    ("import-unet-other-autoencoder", import_weights_main, lambda w, o: ["generative", "--autoencoder", str(w["brain_autoencoder"]), "--autoencoder-args", w["brain_args"]["autoencoder"], "--unet", str(w["brain_unet"]), "--unet-args", w["brain_args"]["unet"], "--conditions", "a", "b", "c", "d", "--image-size", "16", "16", "16", "--output", str(o)], r"--unet-args: the UNet takes 7 and gives 3 channels, the autoencoder's latent has 3; the UNet was not trained on this autoencoder"),
    ("import-conditions-count", import_weights_main, lambda w, o: ["generative", "--autoencoder", str(w["brain_autoencoder"]), "--autoencoder-args", w["brain_args"]["autoencoder"], "--unet", str(w["brain_unet"]), "--unet-args", w["brain_args"]["unet"], "--conditions", "a", "b", "c", "d", "e", "--concat-conditions", "--image-size", "16", "16", "16", "--output", str(o)], r"--unet-args: the UNet takes 7 .* \(\+ 5 condition channels\)"),
    ("import-unet-args-wrong", import_weights_main, lambda w, o: ["brain-ldm", "--autoencoder", str(w["brain_autoencoder"]), "--autoencoder-args", w["brain_args"]["autoencoder"], "--unet", str(w["brain_unet"]), "--unet-args", "{num_channels: [8, 16], num_head_channels: [0, 16], norm_num_groups: 4, attention_levels: [false, true], num_res_blocks: 1}", "--image-size", "16", "16", "16", "--output", str(o)], r"--unet: .*brain_unet\.pt does not fit the network: missing 2 keys \('down_blocks\.1\.resnets\.0\.skip_connection\.conv\.weight'.*check the UNet's constructor arguments"),
    ("import-generative-without-args", import_weights_main, lambda w, o: ["generative", "--autoencoder", str(w["brain_autoencoder"]), "--output", str(o)], r"--autoencoder-args: the generative layout needs the AutoencoderKL's constructor arguments"),
    ("import-args-not-a-mapping", import_weights_main, lambda w, o: ["generative", "--autoencoder", str(w["brain_autoencoder"]), "--autoencoder-args", "[4, 8", "--output", str(o)], r"--autoencoder-args: not valid YAML/JSON"),
    ("import-unknown-argument", import_weights_main, lambda w, o: ["generative", "--autoencoder", str(w["brain_autoencoder"]), "--autoencoder-args", "{num_chanels: [4, 8]}", "--output", str(o)], r"--autoencoder-args: unknown AutoencoderKL argument\(s\) \['num_chanels'\]"),
    ("import-output-not-empty", import_weights_main, lambda w, o: ["brain-ldm", "--autoencoder", str(w["brain_autoencoder"]), "--unet", str(w["brain_unet"]), "--output", str(w["good"])], r"--output: .*good already exists and is not an empty folder"),
    ("import-maisi-with-unet", import_weights_main, lambda w, o: ["maisi", "--autoencoder", str(w["brain_autoencoder"]), "--unet", str(w["brain_unet"]), "--output", str(o)], r"--unet: the maisi layout imports the autoencoder only"),
    # fine-tuning starts
    ("init-from-missing", train_autoencoder_main, lambda w, o: _argv(o, f"autoencoder.init_from={w['root'] / 'nothing'}"), r"autoencoder\.init_from: .*nothing: no such run folder or checkpoint file; point autoencoder\.init_from at a run folder"),
    ("init-from-other-architecture", train_autoencoder_main, lambda w, o: _argv(o, f"autoencoder.init_from={w['trained'] / 'autoencoder'}", "autoencoder.latent_channels=4"), r"autoencoder\.init_from: .*holds another architecture than the config's autoencoder section \(latent_channels: 3 -> 4\)"),
    ("init-from-autoencoder-as-unet", train_diffusion_main, lambda w, o: _argv(o, *DIFFUSION, f"diffusion.autoencoder_run={w['trained'] / 'autoencoder'}", f"diffusion.init_from={w['trained'] / 'autoencoder'}"), r"diffusion\.init_from: .*is not a diffusion checkpoint"),
    # conditions read as input channels / without a presence flag (the brain LDM's UNet)
    ("conditioning-concat-without-continuous", train_diffusion_main, lambda w, o: _argv(o, *DIFFUSION, "diffusion.conditioning.concat=true"), r"diffusion\.conditioning\.concat: true reads the continuous covariates as input channels, but diffusion\.conditioning\.continuous is empty"),
    ("conditioning-dropout-without-flag", train_diffusion_main, lambda w, o: _argv(o, *DIFFUSION, *_conditional(w, "cond_list"), "diffusion.conditioning.presence_flag=false"), r"diffusion\.conditioning\.dropout: 0\.1 drops conditions, but presence_flag: false .*set dropout: 0 or presence_flag: true"),
    ("init-from-other-covariates", train_diffusion_main, lambda w, o: _argv(o, *DIFFUSION, *_conditional(w, "cond_list"), f"diffusion.init_from={w['cond_run'] / 'diffusion'}", "diffusion.conditioning.presence_flag=false", "diffusion.conditioning.dropout=0"), r"diffusion\.init_from: .*cond_run/diffusion/checkpoints/\w+\.pt was trained on the covariates \(categorical \['sex'\], continuous \['age'\] standardised, with a presence flag\), the config's diffusion\.conditioning gives \(categorical \['sex'\], continuous \['age'\] standardised, without a presence flag\); the UNet reads them by position"),
    ("controlnet-on-concat-unet", train_controlnet_main, lambda w, o: _argv(o, *DIFFUSION, *_conditional(w, "cond_list"), "diffusion.conditioning.concat=true", *CONTROLNET), r"diffusion\.conditioning\.concat: the ControlNet stage cannot steer a UNet that reads its conditions as input channels"),
    ("estimate-pipeline-controlnet-on-concat-unet", estimate_memory_main, lambda w, o: _argv(o, *_conditional(w, "cond_list"), "diffusion.conditioning.concat=true", "data.num_classes=22") + ["--pipeline"], r"diffusion\.conditioning\.concat: the ControlNet stage cannot steer"),
    # label maps (data.num_classes)
    ("label-missing-file", train_autoencoder_main, lambda w, o: _argv(o, *_labelled(w, "missing")), r"missing\.csv, line 5: label '.*gone\.nii\.gz' does not exist"),
    ("label-no-column", train_autoencoder_main, lambda w, o: _argv(o, *_labelled(w, "nolabel")), r"nolabel\.csv, line 2: no 'label' \(data\.num_classes is set"),
    ("label-shape", train_autoencoder_main, lambda w, o: _argv(o, *_labelled(w, "short")), r"short\.nii\.gz: the label map's shape \(20, 18, 15\) differs from its image .*ok3\.nii\.gz's \(20, 18, 16\)"),
    ("label-affine", train_autoencoder_main, lambda w, o: _argv(o, *_labelled(w, "moved")), r"moved\.nii\.gz: the label map's affine .* differs from its image .*ok3\.nii\.gz's"),
    ("label-non-integer", train_autoencoder_main, lambda w, o: _argv(o, *_labelled(w, "half")), r"half\.nii\.gz: the label map holds non-integer values \(e\.g\. \d\.5\)"),
    ("label-negative", train_autoencoder_main, lambda w, o: _argv(o, *_labelled(w, "negative")), r"negative\.nii\.gz: the label map holds negative values \(min -1\)"),
    ("label-class-too-large", train_autoencoder_main, lambda w, o: _argv(o, *_labelled(w, "big")), r"big\.nii\.gz: the label map holds class 7, but data\.num_classes = 3 allows 0\.\.2"),
    ("label-from-a-folder", train_autoencoder_main, lambda w, o: _argv(o, *_nifti(w, "good"), "data.num_classes=3"), r"data\.num_classes: label maps come from a datalist's 'label' column"),
    ("label-phantom-classes", train_autoencoder_main, lambda w, o: _argv(o, "data.num_classes=3"), r"data\.num_classes: 3 is too few for the phantoms' label maps, which have 22 classes"),
    # the ControlNet stage, sampling from masks and measuring the pairs
    ("controlnet-without-classes", train_controlnet_main, lambda w, o: _argv(o, *DIFFUSION), r"data\.num_classes: the ControlNet stage learns to follow label maps; set data\.num_classes"),
    ("controlnet-without-diffusion", train_controlnet_main, lambda w, o: _argv(o, *DIFFUSION, *CONTROLNET), r"controlnet\.diffusion_run: .*diffusion: no such run folder.*train the diffusion model first"),
    ("controlnet-mismatched-diffusion", train_controlnet_main, lambda w, o: _argv(o, *DIFFUSION, *CONTROLNET, f"controlnet.diffusion_run={w['trained'] / 'diffusion'}", "diffusion.num_channels=[16]"), r"controlnet\.diffusion_run: the diffusion model in .* does not match .* \(channels: \[8\] -> \[16\]\)"),
    ("sample-mask-missing", sample_main, lambda w, o: _argv(w["trained"], *DIFFUSION, *CONTROLNET) + ["--output", str(o), "--mask", str(w["root"] / "nowhere.nii.gz")], r"--mask: label map '.*nowhere\.nii\.gz' does not exist"),
    ("sample-mask-not-nifti", sample_main, lambda w, o: _argv(w["trained"], *DIFFUSION, *CONTROLNET) + ["--output", str(o), "--mask", str(w["a_file"])], r"--mask: '.*a_file\.txt' is not a NIfTI file"),
    ("sample-mask-class-too-large", sample_main, lambda w, o: _argv(w["trained"], *DIFFUSION, *CONTROLNET) + ["--output", str(o), "--mask", str(w["labelled"] / "class30.nii.gz")], r"class30\.nii\.gz: the label map holds class 30, but data\.num_classes = 22"),
    ("sample-mask-non-integer", sample_main, lambda w, o: _argv(w["trained"], *DIFFUSION, *CONTROLNET) + ["--output", str(o), "--mask", str(w["labelled"] / "fraction.nii.gz")], r"fraction\.nii\.gz: the label map holds non-integer values"),
    ("sample-masks-without-label", sample_main, lambda w, o: _argv(w["trained"], *DIFFUSION, *CONTROLNET) + ["--output", str(o), "--masks", str(w["labelled"] / "nolabel.csv")], r"--masks: .*nolabel\.csv needs a 'label' entry in every row"),
    ("sample-mask-diffusion-run", sample_main, lambda w, o: _argv(w["trained"], *DIFFUSION, *CONTROLNET) + ["--output", str(o), "--run", str(w["trained"] / "diffusion"), "--mask", str(w["labelled"] / "lab0.nii.gz")], r"--run: .*diffusion/checkpoints/best\.pt is not a ControlNet checkpoint"),
    ("sample-conditioning-scale-alone", sample_main, lambda w, o: _argv(w["trained"], *DIFFUSION) + ["--output", str(o), "--conditioning-scale", "2"], r"--conditioning-scale: only used with --mask or --masks"),
    ("eval-masks-not-pairs", evaluate_samples_main, lambda w, o: ["--masks", "--samples", str(w["good"]), "--output", str(o)], r"--samples: .*good has no datalist\.json; point it at the folder sample\.py --mask wrote"),
    ("hard-linked-file", train_autoencoder_main, lambda w, o: _argv(o, *_nifti(w, "hard_linked")), r"data\.paths: only 1 NIfTI file"),
    # data safety: a results folder another command is writing is never shared (its lock is held)
    ("sample-output-in-use", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(w["in_use"])], rf"--output: .*in_use is in use by another command \(PID {os.getpid()}\); wait for it"),
    ("eval-output-in-use", evaluate_autoencoder_main, lambda w, o: ["--run", str(w["trained"] / "autoencoder"), "--output", str(w["in_use"])], rf"--output: .*in_use is in use by another command \(PID {os.getpid()}\)"),
    ("samples-eval-output-in-use", evaluate_samples_main, lambda w, o: ["--run", str(w["trained"] / "diffusion"), "--samples", str(w["samples"]), "--output", str(w["in_use"])], rf"--output: .*in_use is in use by another command \(PID {os.getpid()}\)"),
    ("compare-output-in-use", compare_factors_main, lambda w, o: _argv(o) + ["--factors", "[2, 2]", "--output", str(w["in_use"])], rf"--output: .*in_use is in use by another command \(PID {os.getpid()}\)"),
    # data safety: a resumed diffusion run keeps its autoencoder and its conditioning
    ("resume-retrained-autoencoder", train_diffusion_main, lambda w, o: _argv(w["retrained"], *DIFFUSION, "diffusion.training.n_epochs=2") + ["--resume"], r"--resume: the autoencoder in .*retrained/autoencoder has changed since the diffusion run .*retrained/diffusion started .*start a new diffusion run without --resume in a new output_dir \(set diffusion\.autoencoder_run="),
    ("resume-datalist-new-class", train_diffusion_main, lambda w, o: _argv(w["cond_run"], *DIFFUSION, *_conditional(w, "cond_new_class"), "diffusion.training.n_epochs=2") + ["--resume"], r"--resume: the datalist's covariates no longer match the conditioning stored in .*last\.pt \('sex' classes \['F', 'M'\] -> \['F', 'O'\] \(unseen: \['O'\]\)\); restore the datalist"),
    ("resume-datalist-new-normalisation", train_diffusion_main, lambda w, o: _argv(w["cond_run"], *DIFFUSION, *_conditional(w, "cond_ages_x10"), "diffusion.training.n_epochs=2") + ["--resume"], r"--resume: the datalist's covariates .*\('age' normalisation 6\d\.\d+ ± \d+\.?\d* -> 6\d\d\.?\d* ± \d+\.?\d*\)"),
    # every number on a command line is finite, as config values are
    ("sample-guidance-nan", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(o), "--guidance-scale", "nan"], r"--guidance-scale: expected a finite number, got 'nan'"),
    ("sample-guidance-inf", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(o), "--guidance-scale", "inf"], r"--guidance-scale: expected a finite number, got 'inf'"),
    ("sample-guidance-beyond-float64", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(o), "--guidance-scale", "1e400"], r"--guidance-scale: expected a finite number, got '1e400'"),
    ("sample-tile-overlap-minus-inf", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(o), "--tile-size", "8", "--tile-overlap=-inf"], r"--tile-overlap: expected a finite number, got '-inf'"),
    ("eval-tile-overlap-inf", evaluate_autoencoder_main, lambda w, o: ["--run", str(w["trained"] / "autoencoder"), "--output", str(o), "--tile-size", "8", "--tile-overlap", "Infinity"], r"--tile-overlap: expected a finite number, got 'Infinity'"),
    ("samples-copy-threshold-nan", evaluate_samples_main, lambda w, o: _samples(w, "samples", "--output", str(o), "--copy-threshold", "NaN"), r"--copy-threshold: expected a finite number, got 'NaN'"),
    # options that would be ignored are refused
    ("sample-guidance-unconditional", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(o), "--steps", "2", "--guidance-scale", "3"], r"--guidance-scale 3: the model is unconditional .*; drop --guidance-scale"),
    ("sample-guidance-zero-unconditional", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(o), "--steps", "2", "--guidance-scale", "0"], r"--guidance-scale 0: the model is unconditional"),
    ("sample-tile-overlap-alone", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(o), "--steps", "2", "--tile-overlap", "0.3"], r"--tile-overlap: only used with --tile-size \(the run .* decodes whole volumes\)"),
    ("sample-tile-overlap-negative-alone", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(o), "--steps", "2", "--tile-overlap=-3"], r"--tile-overlap: only used with --tile-size"),
    ("sample-tile-overlap-one", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(o), "--steps", "2", "--tile-size", "8", "--tile-overlap", "1.0"], r"tile_overlap = 1\.0: expected a fraction in \[0, 1\)"),
    ("min-lr-ratio-constant", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.training.min_lr_ratio=0.1"), r"autoencoder\.training\.min_lr_ratio: 0\.1 only applies to a decaying schedule, but autoencoder\.training\.lr_schedule is constant"),
    ("diffusion-min-lr-ratio-constant", train_diffusion_main, lambda w, o: _argv(o, "diffusion.training.min_lr_ratio=0.5"), r"diffusion\.training\.min_lr_ratio: 0\.5 only applies"),
    ("warmup-beyond-max-steps", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.training.max_steps=5", "autoencoder.training.warmup_steps=5"), r"autoencoder\.training\.warmup_steps: 5 warm-up steps, but autoencoder\.training\.max_steps = 5"),
    ("warmup-beyond-the-run", train_autoencoder_main, lambda w, o: _argv(o, "autoencoder.training.warmup_steps=1000"), r"autoencoder\.training\.warmup_steps: 1000 warm-up steps, but the run has 2 optimiser steps \(1 epochs of 2\)"),
    ("diffusion-warmup-beyond-the-run", train_diffusion_main, lambda w, o: _argv(o, *DIFFUSION, f"diffusion.autoencoder_run={w['trained'] / 'autoencoder'}", "diffusion.training.warmup_steps=50", "diffusion.training.lr_schedule=cosine"), r"diffusion\.training\.warmup_steps: 50 warm-up steps, but the run has \d+ optimiser steps"),
    ("phantom-covariates-nifti", train_autoencoder_main, lambda w, o: _argv(o, *_nifti(w, "good"), "data.phantom_covariates=true"), r"data\.phantom_covariates: only used with data\.source: synthetic .* but data\.source is nifti"),
    ("phantom-organs-nifti", train_autoencoder_main, lambda w, o: _argv(o, *_nifti(w, "good"), "data.phantom_organs=typed"), r"data\.phantom_organs: only used with data\.source: synthetic .* but data\.source is nifti"),
    ("phantom-organs-unknown", train_autoencoder_main, lambda w, o: _argv(o, "data.phantom_organs=fixed"), r"data\.phantom_organs: expected one of 'random', 'typed', got 'fixed'"),
    # evaluate_samples.py: a broken generated volume is named, never scored
    ("samples-all-nan", evaluate_samples_main, lambda w, o: _samples(w, "samples_all_nan", "--output", str(o)), r"--samples: .*all_nan\.nii\.gz holds 4,096 non-finite voxels \(NaN or inf\) of 4,096"),
    ("samples-one-inf-line", evaluate_samples_main, lambda w, o: _samples(w, "samples_one_inf", "--output", str(o)), r"--samples: .*one_inf\.nii\.gz holds 256 non-finite voxels"),
    ("samples-0-to-255", evaluate_samples_main, lambda w, o: _samples(w, "samples_bytes_0_255", "--output", str(o)), r"--samples: .*bytes_0_255\.nii\.gz holds values from .* to 25\d\.?\d*, outside the \[0, 1\] that sample\.py writes"),
    ("samples-negative", evaluate_samples_main, lambda w, o: _samples(w, "samples_negative", "--output", str(o)), r"--samples: .*negative\.nii\.gz holds values from -0\.\d+ to"),
    ("samples-two-channels", evaluate_samples_main, lambda w, o: _samples(w, "samples_two_channels", "--output", str(o)), r"--samples: .*two_channels\.nii\.gz has 2 channels but the model generates 1"),
    ("samples-network-without-weights", evaluate_samples_main, lambda w, o: _samples(w, "samples", "--output", str(o), "--medicalnet-network", "resnet18"), r"--medicalnet-network resnet18: only used with MedicalNet weights, and none are given"),
    ("samples-empty-folder", evaluate_samples_main, lambda w, o: _samples(w, "empty", "--output", str(o)), r"--samples: folder .*empty' contains no \.nii or \.nii\.gz files .*point --samples at a folder"),
    ("samples-real-empty-folder", evaluate_samples_main, lambda w, o: _samples(w, "samples", "--output", str(o), "--real", str(w["empty"])), r"--real: folder .*empty' contains no .*point --real at a folder"),
    ("samples-real-glob-nothing", evaluate_samples_main, lambda w, o: _samples(w, "samples", "--output", str(o), "--real", f"{w['good']}/*.nii.bz2"), r"--real: glob .* matches nothing; check the pattern or point --real at"),
    # datalist values: one class per number, no empty class, no boolean number, no silent column or row loss
    ("datalist-one-class-from-1-and-1.0", train_diffusion_main, lambda w, o: _argv(o, *DIFFUSION, *_conditional(w, "csv_one_class.csv", "grade")), r"diffusion\.conditioning\.categorical: covariate 'grade' has a single class \['1'\] in the training set"),
    ("datalist-single-class", train_diffusion_main, lambda w, o: _argv(o, *DIFFUSION, *_conditional(w, "csv_single_sex.csv")), r"covariate 'sex' has a single class \['F'\]"),
    ("datalist-empty-categorical-cell", train_diffusion_main, lambda w, o: _argv(o, *DIFFUSION, *_conditional(w, "csv_empty_cell.csv")), r"csv_empty_cell\.csv, line 4: covariate 'sex' is empty \(''\)"),
    ("datalist-short-row", train_diffusion_main, lambda w, o: _argv(o, *DIFFUSION, *_conditional(w, "csv_short_row.csv")), r"csv_short_row\.csv, line 5: covariate 'sex' is empty"),
    ("datalist-json-null-class", train_diffusion_main, lambda w, o: _argv(o, *DIFFUSION, *_conditional(w, "json_null_sex.json")), r"json_null_sex\.json, training\[1\]: covariate 'sex' is empty \(None\)"),
    ("datalist-json-true-age", train_diffusion_main, lambda w, o: _argv(o, *DIFFUSION, *_conditional(w, "json_true_age.json")), r"json_true_age\.json, training\[4\]: covariate 'age' = True is not a finite number"),
    ("datalist-json-text-age", train_diffusion_main, lambda w, o: _argv(o, *DIFFUSION, *_conditional(w, "json_text_age.json")), r"training\[4\]: covariate 'age' = 'sixty' is not a finite number"),
    ("datalist-json-empty-training", train_autoencoder_main, lambda w, o: _argv(o, "data.source=nifti", f"data.paths={w['json_empty_training.json']}"), r"json_empty_training\.json has no training rows \(its 'training' list is empty\)"),
    ("datalist-json-validation-object", train_autoencoder_main, lambda w, o: _argv(o, "data.source=nifti", f"data.paths={w['json_validation_object.json']}"), r"json_validation_object\.json: 'validation' must be a list of objects .* got dict"),
    ("datalist-repeated-column", train_autoencoder_main, lambda w, o: _argv(o, "data.source=nifti", f"data.paths={w['csv_repeated_column.csv']}"), r"data\.paths: .*csv_repeated_column\.csv: the header repeats the column\(s\) \['age'\]"),
    ("datalist-extra-field", train_autoencoder_main, lambda w, o: _argv(o, "data.source=nifti", f"data.paths={w['csv_extra_field.csv']}"), r"data\.paths: .*csv_extra_field\.csv, line 3: 4 fields but the header has 3 \(image, sex, age\)"),
    ("datalist-header-only", train_autoencoder_main, lambda w, o: _argv(o, "data.source=nifti", f"data.paths={w['csv_header_only_bom_semicolon.csv']}"), r"data\.paths: .*csv_header_only_bom_semicolon\.csv has a header \(image, sex, age\) but no rows"),
    ("datalist-empty-csv", train_autoencoder_main, lambda w, o: _argv(o, "data.source=nifti", f"data.paths={w['csv_empty.csv']}"), r"data\.paths: .*csv_empty\.csv is empty; expected a header line"),
    ("condition-repeated-name", sample_main, lambda w, o: _argv(w["cond_run"], *_conditional(w, "cond_list")) + ["--output", str(o), "--condition", "sex=F", "age=60", "sex=M"], r"--condition 'sex=M': 'sex' is given twice in one set"),
    ("conditions-csv-repeated-column", sample_main, lambda w, o: _argv(w["cond_run"], *_conditional(w, "cond_list")) + ["--output", str(o), "--conditions-csv", str(w["conditions_repeated.csv"])], r"--conditions-csv: .*conditions_repeated\.csv: the header repeats the column\(s\) \['sex'\]"),
    ("conditions-csv-extra-field", sample_main, lambda w, o: _argv(w["cond_run"], *_conditional(w, "cond_list")) + ["--output", str(o), "--conditions-csv", str(w["conditions_extra.csv"])], r"--conditions-csv: .*conditions_extra\.csv, line 2: 3 fields but the header has 2"),
    ("conditions-csv-header-only", sample_main, lambda w, o: _argv(w["cond_run"], *_conditional(w, "cond_list")) + ["--output", str(o), "--conditions-csv", str(w["conditions_header_only.csv"])], r"--conditions-csv: .*conditions_header_only\.csv has a header \(sex, age\) but no rows"),
    ("condition-unseen-class", sample_main, lambda w, o: _argv(w["cond_run"], *_conditional(w, "cond_list")) + ["--output", str(o), "--steps", "2", "--condition", "sex=O", "age=60"], r"sex=O is not one of the classes \['F', 'M'\] seen in training"),
    # the memory estimate's pipeline builds the UNet: its section is checked first
    ("estimate-pipeline-head-zero", estimate_memory_main, lambda w, o: _argv(o, "diffusion.num_head_channels=[0]") + ["--pipeline"], r"diffusion\.num_head_channels\[0\]: 0 must be a positive divisor"),
    ("estimate-pipeline-head-three", estimate_memory_main, lambda w, o: _argv(o, "diffusion.num_channels=[8, 8]", "diffusion.attention_levels=[false, true]", "diffusion.num_head_channels=[0, 3]") + ["--pipeline"], r"diffusion\.num_head_channels\[1\]: 3 must be a positive divisor"),
    ("budget-pipeline-head-zero", estimate_memory_main, lambda w, o: _argv(o, "diffusion.num_head_channels=[0]") + ["--budget", "24GB", "--output", str(o.parent / "x.yaml")], r"diffusion\.num_head_channels\[0\]: 0 must be a positive divisor"),
    ("budget-output-in-a-sampled-folder", estimate_memory_main, lambda w, o: _argv(o) + ["--budget", "24GB", "--output", str(w["samples"] / "sample_000.nii.gz")], r"--output: .*sample_000\.nii\.gz already exists"),
]
READ_ONLY_CASES = {"sample-output-read-only", "eval-default-output-read-only", "budget-output-read-only"}
CPU_ONLY_CASES = {"training-cuda-on-cpu", "sample-cuda-on-cpu", "eval-cuda-on-cpu"}


def _snapshot(root: Path) -> dict[str, tuple[str, float]]:
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime) for p in root.rglob("*") if p.is_file()}


def test_corpus_has_at_least_180_cases():
    assert len(CASES) >= 180 and len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("name,entry,build,expected", CASES, ids=[case[0] for case in CASES])
def test_bad_input(world, tmp_path, capsys, name, entry, build, expected):
    import re

    if name in READ_ONLY_CASES and not world["read_only"]:
        pytest.skip("no way to make a folder read-only here")
    if name in CPU_ONLY_CASES and torch.cuda.is_available():
        pytest.skip("CUDA is available")
    argv = build(world, tmp_path / "out")
    before = _snapshot(world["root"])
    code = entry(argv)
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert code != 0, f"{name}: exit code 0"
    # progress bars may precede it; the message itself is the last line, alone
    assert lines and lines[-1].startswith("error: "), f"{name}: stderr was {lines}"
    assert sum("error" in line for line in lines) == 1 and "Traceback" not in stderr
    assert re.search(expected, lines[-1]), f"{name}: {lines[-1]}"
    after = _snapshot(world["root"])
    assert {k: v for k, v in after.items() if k in before} == before, f"{name}: a pre-existing file changed"
    assert set(before) <= set(after), f"{name}: a pre-existing file was deleted"


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="downsample_factors has 1 entries"):
        train_autoencoder_main(_argv(tmp_path, "autoencoder.downsample_factors=[4]") + ["--debug"])
