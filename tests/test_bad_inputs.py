"""The bad-input corpus: every case runs through the real command-line entry points and must end with a
non-zero exit, one line on stderr naming the key, file or value, no traceback, and no pre-existing file
changed or deleted."""

from __future__ import annotations

import gzip
import hashlib
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
    sample_main,
    train_autoencoder_main,
    train_controlnet_main,
    train_diffusion_main,
)
from monai_diffusion.runs import RunLock

ROOT = Path(__file__).resolve().parents[1]
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


def _argv(out: Path, *overrides: str, config: Path = CONFIG) -> list[str]:
    argv = ["--config", str(config), "--set", f"output_dir={out}"]
    for item in (*TINY, *overrides):
        argv += ["--set", item]
    return argv


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
    ("sample-ddpm-with-steps", sample_main, lambda w, o: _argv(w["trained"]) + ["--output", str(o), "--scheduler", "ddpm", "--steps", "3"], r"--steps 3: DDPM always runs all diffusion\.scheduler\.num_train_timesteps"),
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
    ("eval-tile-overlap-nan", evaluate_autoencoder_main, lambda w, o: ["--run", str(w["trained"] / "autoencoder"), "--output", str(o), "--tile-size", "8", "--tile-overlap", "nan"], r"--tile-size/--tile-overlap: tile_overlap = nan: expected a fraction in \[0, 1\)"),
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
]
READ_ONLY_CASES = {"sample-output-read-only", "eval-default-output-read-only", "budget-output-read-only"}
CPU_ONLY_CASES = {"training-cuda-on-cpu", "sample-cuda-on-cpu", "eval-cuda-on-cpu"}


def _snapshot(root: Path) -> dict[str, tuple[str, float]]:
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime) for p in root.rglob("*") if p.is_file()}


def test_corpus_has_at_least_90_cases():
    assert len(CASES) >= 90 and len({case[0] for case in CASES}) == len(CASES)


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
