"""The bad-input corpus: every case runs through the real command-line entry points and must end with a
non-zero exit, one line on stderr naming the key, file or value, no traceback, and no pre-existing file
changed or deleted."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_diffusion.cli import sample_main, train_autoencoder_main, train_diffusion_main

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


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Files the cases point at, and a trained tiny autoencoder run."""
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
    paths["trained"] = root / "trained"
    assert train_autoencoder_main(_argv(paths["trained"])) == 0
    return paths


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
]


def _snapshot(root: Path) -> dict[str, tuple[str, float]]:
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime) for p in root.rglob("*") if p.is_file()}


def test_corpus_has_at_least_30_cases():
    assert len(CASES) >= 30 and len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("name,entry,build,expected", CASES, ids=[case[0] for case in CASES])
def test_bad_input(world, tmp_path, capsys, name, entry, build, expected):
    import re

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
