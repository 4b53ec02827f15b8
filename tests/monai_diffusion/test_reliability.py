"""Data safety through the command lines: the kept checkpoint after a run that diverged is finite and
resumable, one training per run folder, a damaged latent cache heals itself, what interrupted saves left is
removed when a run starts, files are never repeated or shared across the split, a file that disappears in
mid-run is named, a bare config name says which file it used, and one line per torchrun."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_diffusion.cli import train_autoencoder_main, train_diffusion_main
from monai_diffusion.config import load_config
from monai_diffusion.data import build_datasets
from monai_diffusion.runs.checkpoints import load_checkpoint
from monai_diffusion.runs.folders import LOCK_NAME, lock_holder
from tests.helpers import CONFIG, SCRIPTS, TINY_LDM, cli_args, summary_of, tiny, train, write_scans
from tests.helpers.distributed import torchrun

_BAR = re.compile(r"\d+/\d+ \[")  # a tqdm progress bar: "epoch 2/3:  50%|##   | 1/2 [00:01<00:01, ...]"


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _hidden(run_dir: Path) -> list[str]:
    return sorted(p.name for folder in (run_dir, run_dir / "checkpoints") for p in folder.glob(".*")
                  if p.name != LOCK_NAME)


# ----------------------------------------------------------------------------------------------------
# a diverging run: the kept last.pt is finite and resumable
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", [
    [],  # the poisoned state never reaches an epoch's end
    ["autoencoder.training.checkpoint_every_n_steps=1"],  # a step checkpoint of finite 1e30 weights is written
    ["data.num_train=2", "autoencoder.training.val_interval=1"],  # one step per epoch: validation sees it
], ids=["epoch-checkpoints", "step-checkpoints", "validated-epochs"])
def test_huge_learning_rate_keeps_a_finite_resumable_checkpoint(tmp_path, capsys, variant):
    """A learning rate of 1e30 (finite: .inf is refused at load, see test_bad_inputs.py 'lr-inf') makes Adam
    turn every weight into +-1e30 after one step with finite loss and gradients: finite weights whose next
    forward pass is NaN. The run stops; last.pt stays the last state that computed finite values, byte for
    byte, nothing half-confirmed stays behind, and --resume with a sane learning rate finishes."""
    assert train(CONFIG, tmp_path, *tiny()) == 0
    capsys.readouterr()
    run_dir = tmp_path / "autoencoder"
    last = run_dir / "checkpoints" / "last.pt"
    before = last.read_bytes()
    huge = ["autoencoder.training.learning_rate=1e30", "autoencoder.training.discriminator_learning_rate=1e30"]
    more = [*tiny(), "autoencoder.training.n_epochs=3", *variant]
    assert train(CONFIG, tmp_path, *more, *huge, resume=True) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not _BAR.search(line)]
    assert len(err) == 1 and err[0].startswith("error: non-finite ") and "the last good checkpoint is kept" in err[0]
    assert last.read_bytes() == before
    assert _hidden(run_dir) == [] and not list((run_dir / "checkpoints").glob("step_*"))
    kept = load_checkpoint(last)
    assert kept["loop"]["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in _tensors([kept["autoencoder"], kept["discriminator"],
                                                            kept["optimizers"]]) if t.is_floating_point())
    assert train(CONFIG, tmp_path, *more, resume=True) == 0
    resumed = load_checkpoint(last)
    assert resumed["loop"]["global_step"] > 2 and all(torch.isfinite(t).all() for t in _tensors(resumed["autoencoder"]))


# ----------------------------------------------------------------------------------------------------
# one training per run folder
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_training_is_refused_while_the_first_finishes_intact(tmp_path, capsys):
    overrides = [*tiny(), "data.num_train=8", "autoencoder.training.n_epochs=6", "device=cpu"]
    command = [sys.executable, str(SCRIPTS / "train_autoencoder.py"), *cli_args(CONFIG, tmp_path, *overrides)]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    lock_file = tmp_path / "autoencoder" / LOCK_NAME
    deadline = time.time() + 120
    while not (lock_file.is_file() and lock_holder(lock_file) == first.pid):
        assert first.poll() is None, first.stderr.read()
        assert time.time() < deadline, "the first training never took the run folder's lock"
        time.sleep(0.05)
    for extra in ([], ["--resume"]):  # a fresh run and a resume are both refused, naming the holder
        code = train_autoencoder_main(cli_args(CONFIG, tmp_path, *overrides) + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert f"is in use by another training (PID {first.pid})" in err[0]
    assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    summary = summary_of(tmp_path / "autoencoder")
    assert summary["optimizer_steps"] == 24 and summary["epochs"] == 6  # 8 volumes / batch 2 x 6 epochs
    assert load_checkpoint(tmp_path / "autoencoder" / "checkpoints" / "last.pt")["loop"]["global_step"] == 24
    assert lock_holder(lock_file) is None  # released with the process
    assert train(CONFIG, tmp_path, *overrides, "autoencoder.training.n_epochs=7", resume=True) == 0


# ----------------------------------------------------------------------------------------------------
# stage 2's latent cache, and what interrupted saves leave
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def autoencoder_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ae")
    assert train_autoencoder_main(cli_args(CONFIG, out, *TINY_LDM)) == 0
    return out


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_latent_cache_is_encoded_again(autoencoder_run, tmp_path, caplog, damage):
    (tmp_path / "autoencoder").symlink_to(autoencoder_run / "autoencoder")
    args = cli_args(CONFIG, tmp_path, *TINY_LDM, "diffusion.training.cache_latents_on_disk=true",
                    "diffusion.training.n_epochs=1")
    assert train_diffusion_main(args) == 0
    cache = tmp_path / "diffusion" / "latent_cache_rank0.pt"
    whole = cache.read_bytes()
    cache.write_bytes({"truncated": whole[: len(whole) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    with caplog.at_level(logging.WARNING, logger="monai_diffusion"):
        assert train_diffusion_main(args[:-2] + ["--set", "diffusion.training.n_epochs=2", "--resume"]) == 0
    assert "is unreadable" in caplog.text and "encoding the latents again" in caplog.text
    assert cache.read_bytes() != b"" and set(torch.load(cache, weights_only=True)) >= {"train_mu", "val_sigma"}
    assert load_checkpoint(tmp_path / "diffusion" / "checkpoints" / "last.pt")["loop"]["global_step"] == 4


# ----------------------------------------------------------------------------------------------------
# results folders: two commands into one new folder never overwrite each other
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_samplers_into_one_new_folder_never_mix_their_files(autoencoder_run, tmp_path):
    """Both pass the "new or empty" check at start; the folder's lock decides, under it the check is made
    again: one writes all its volumes, the other is refused in one line and writes nothing."""
    (tmp_path / "autoencoder").symlink_to(autoencoder_run / "autoencoder")
    overrides = [*TINY_LDM, "diffusion.training.n_epochs=1", "device=cpu"]
    assert train_diffusion_main(cli_args(CONFIG, tmp_path, *overrides)) == 0
    shared = tmp_path / "samples"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {seed: subprocess.Popen([sys.executable, str(SCRIPTS / "sample.py"), *cli_args(CONFIG, tmp_path, *overrides),
                                     "--output", str(shared), "--num-samples", "3", "--steps", "3", "--seed", str(seed)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
             for seed in (1, 2)}
    results = {seed: (proc.wait(timeout=300), proc.stderr.read()) for seed, proc in procs.items()}
    winners = [seed for seed, (code, _) in results.items() if code == 0]
    assert len(winners) == 1, results
    code, err = results[3 - winners[0]]
    lines = [line for line in err.splitlines() if line.strip() and not _BAR.search(line)]
    assert code == 2 and len(lines) == 1, lines
    assert re.search(r"^error: --output: .*samples (is in use by another command \(PID \d+\)|already exists and is "
                     r"not an empty folder)", lines[0]), lines[0]
    written = sorted(p.name for p in shared.glob("*.nii.gz"))
    assert written == ["sample_000.nii.gz", "sample_001.nii.gz", "sample_002.nii.gz"]
    # every file is the winner's: the same seed sampled again in this process gives them voxel for voxel
    from monai_diffusion.cli import sample_main

    again = tmp_path / "again"
    assert sample_main(cli_args(CONFIG, tmp_path, *overrides) + ["--output", str(again), "--num-samples", "3",
                                                                 "--steps", "3", "--seed", str(winners[0])]) == 0
    for name in written:
        assert np.array_equal(nib.load(shared / name).get_fdata(), nib.load(again / name).get_fdata()), name


def test_what_interrupted_saves_left_is_removed_when_a_run_starts_and_only_then(tmp_path, caplog):
    assert train(CONFIG, tmp_path, *tiny()) == 0
    run_dir = tmp_path / "autoencoder"
    orphans = [run_dir / ".config.yaml.k2j3.tmp", run_dir / ".latent_cache_rank0.pt.x1.tmp",
               run_dir / "checkpoints" / ".last.pt.a8f3.tmp", run_dir / "checkpoints" / ".last.pt.4242.link",
               run_dir / "checkpoints" / ".step_00000009.unconfirmed.pt"]
    for path in orphans:
        path.write_bytes(b"half a file")
    keep = run_dir / "checkpoints" / "notes.tmp"  # not ours: not hidden
    keep.write_text("mine")
    # a refused resume touches nothing
    assert train(CONFIG, tmp_path, *tiny(), "autoencoder.latent_channels=4", resume=True) == 2
    assert all(path.is_file() for path in orphans)
    with caplog.at_level(logging.INFO, logger="monai_diffusion"):
        assert train(CONFIG, tmp_path, *tiny(), "autoencoder.training.n_epochs=2", resume=True) == 0
    assert not any(path.exists() for path in orphans) and keep.read_text() == "mine"
    assert "removed 5 file(s) left by an interrupted save" in caplog.text
    assert _hidden(run_dir) == []


# ----------------------------------------------------------------------------------------------------
# files: each once, never in both sets; a file that disappears is named
# ----------------------------------------------------------------------------------------------------
def test_a_symlink_loop_and_repeated_entries_give_each_file_once(tmp_path, caplog):
    data = write_scans(tmp_path / "scans", (16, 16, 16), (1.0, 1.0, 1.0), count=3)
    (data / "sub").mkdir()
    (data / "case2.nii.gz").rename(data / "sub" / "case2.nii.gz")
    (data / "sub" / "up").symlink_to("..")  # a recursive glob walks this loop 40 levels deep
    glob = f"{data}/**/*.nii.gz"
    listed = f"[{data / 'case0.nii.gz'}, {data / 'case1.nii.gz'}, {data / 'case0.nii.gz'}, {data / 'sub/up/case1.nii.gz'}]"
    for paths, count in ((glob, 3), (listed, 2)):
        config = load_config(CONFIG, [*tiny(), "data.source=nifti", f"data.paths={paths}", "data.val_fraction=0.5"])
        with caplog.at_level(logging.WARNING, logger="monai_diffusion"):
            train_ds, val_ds = build_datasets(config.data, seed=config.seed)
        real = [os.path.realpath(item["path"]) for item in (*train_ds.data, *val_ds.data)]
        assert len(real) == len(set(real)) == count  # each file once, none in both sets
        assert "repeat a file already found" in caplog.text
        caplog.clear()
    assert train(CONFIG, tmp_path / "out", *tiny(), "data.source=nifti", f"data.paths={glob}") == 0


def test_a_file_deleted_during_training_is_named(tmp_path, capsys, monkeypatch):
    from monai_diffusion.training.autoencoder import AutoencoderStage

    data = write_scans(tmp_path / "scans", (16, 16, 16), (1.0, 1.0, 1.0), count=4)
    checked = AutoencoderStage.check_inputs

    def check_then_delete(self, config, runtime):
        checked(self, config, runtime)  # every header was read: the file goes away afterwards
        (data / "case1.nii.gz").unlink()

    monkeypatch.setattr(AutoencoderStage, "check_inputs", check_then_delete)
    assert train(CONFIG, tmp_path / "out", *tiny(), "data.source=nifti", f"data.paths={data}",
                 "data.val_fraction=0.25") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "error" in line]) == 1
    assert err[-1].startswith("error: ") and "case1.nii.gz: the file no longer exists" in err[-1]


def test_a_bare_config_name_says_which_file_it_used(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.chdir(tmp_path)  # no quickstart.yaml here: the shipped one is used, and said so
    with caplog.at_level(logging.INFO, logger="monai_diffusion"):
        assert train_autoencoder_main(["--config", "quickstart.yaml", "--set", "autoencoder.trainig=1"]) == 2
    assert "config: " in caplog.text and "monai_diffusion/config/quickstart.yaml (the shipped file" in caplog.text
    assert "autoencoder.trainig: unknown key" in capsys.readouterr().err
    (tmp_path / "my_project").mkdir()
    assert train_autoencoder_main(["--config", "my_projct/quickstart.yaml"]) == 2  # a folder part must exist
    assert capsys.readouterr().err.strip() == ("error: my_projct/quickstart.yaml: config file not found; pass "
                                               "--config with an existing YAML file")


# ----------------------------------------------------------------------------------------------------
# torchrun: one line for the whole run
# ----------------------------------------------------------------------------------------------------
def _torchrun(*args: str) -> subprocess.CompletedProcess:
    return torchrun(SCRIPTS / "train_autoencoder.py", *args)


def _our_lines(stderr: str) -> list[str]:
    """The error lines our processes printed (progress bars may precede one on its line)."""
    return [line[line.index("error: "):] for line in stderr.splitlines() if "error: " in line]


@pytest.mark.slow
def test_torchrun_prints_one_line_for_an_error_of_every_rank_or_of_one(tmp_path):
    base = [*tiny(), "device=cpu"]
    assert train(CONFIG, tmp_path, *base) == 0
    # decided alike on both ranks (a refused resume): rank 0 alone says it
    result = _torchrun(*cli_args(CONFIG, tmp_path, *base, "autoencoder.latent_channels=4"), "--resume")
    refused = result.stderr
    assert result.returncode != 0
    assert _our_lines(result.stderr) == [
        f"error: --resume: the config changes the autoencoder architecture (latent_channels: 3 -> 4) compared with "
        f"{tmp_path}/autoencoder/checkpoints/last.pt; restore those keys or start a new run in another output_dir"]
    # met by one rank (a NaN voxel in a file of its shard): it says so; the other rank, whose collective
    # failed, is quiet
    data = write_scans(tmp_path / "scans", (16, 16, 16), (1.0, 1.0, 1.0), count=6)
    volume = np.asarray(nib.load(data / "case3.nii.gz").dataobj).copy()
    volume[2, 2, 2] = np.nan
    nib.save(nib.Nifti1Image(volume, np.eye(4)), data / "case3.nii.gz")
    result = _torchrun(*cli_args(CONFIG, tmp_path / "nan", *base, "data.source=nifti", f"data.paths={data}",
                                 "data.val_fraction=0.34"))
    lines = _our_lines(result.stderr)
    assert result.returncode != 0 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: rank 1: ") and "case3.nii.gz: contains 1 non-finite voxels" in lines[0]
    for stderr in (refused, result.stderr):  # torchrun's own summary of the exit codes aside: no traceback of ours
        frames = [line for line in stderr.splitlines() if line.lstrip().startswith("File ")]
        assert "[rank" not in stderr and "Connection closed" not in stderr
        assert not [frame for frame in frames if "monai_diffusion" in frame], frames


# ----------------------------------------------------------------------------------------------------
# outputs and data: where a glob reaches; running out of memory
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern,folder,covered", [
    ("{d}", "{d}/runs", True),  # a folder is searched recursively
    ("{d}", "{d}", True),
    ("{d}", "{d}_other/runs", False),  # a name that merely starts like it
    ("{d}/*.nii.gz", "{d}", True),  # files written straight into it would match
    ("{d}/*.nii.gz", "{d}/runs", False),  # one level only
    ("{d}/*/*.nii.gz", "{d}/runs", True),
    ("{d}/ct_*/*.nii.gz", "{d}/runs", False),
    ("{d}/**/*.nii.gz", "{d}/a/b/c", True),
    ("{d}/case0.nii.gz", "{d}", False),  # one file finds only itself
])
def test_which_output_folders_lie_inside_the_data(tmp_path, pattern, folder, covered):
    from monai_diffusion.data.files import data_pattern_covers

    data = tmp_path / "scans"
    data.mkdir()
    assert data_pattern_covers(pattern.format(d=data), folder.format(d=data)) is covered
    assert data_pattern_covers([str(data / "case0.nii.gz")], data) is False  # a list of files finds only those


@pytest.mark.parametrize("failure", [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:127] "
                                                                 "DefaultCPUAllocator: can't allocate memory: you "
                                                                 "tried to allocate 155067617632032 bytes.")])
def test_running_out_of_memory_is_one_line(capsys, failure):
    from monai_diffusion.cli import _parser, run_main

    def body(args):
        raise failure

    assert run_main(body, _parser("test"), []) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: out of memory (") and "reduce data.image_size" in err[0]
    with pytest.raises(type(failure)):
        run_main(body, _parser("test"), ["--debug"])


def test_the_weights_fingerprint_names_identical_weights_only():
    """The identity a diffusion run and its latent cache keep of their autoencoder: one changed value, a
    changed dtype or a renamed entry all give another fingerprint; a copy gives the same."""
    from monai_diffusion.runs.checkpoints import weights_fingerprint

    state = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.bias": torch.zeros(3, dtype=torch.bfloat16)}
    same = {k: v.clone() for k, v in reversed(list(state.items()))}
    assert weights_fingerprint(state) == weights_fingerprint(same)
    nudged = {**state, "a.weight": state["a.weight"].clone().index_fill_(1, torch.tensor([2]), 5.0000005)}
    for other in (nudged, {**state, "b.bias": torch.zeros(3)}, {"a.w": state["a.weight"], "b.bias": state["b.bias"]}):
        assert weights_fingerprint(other) != weights_fingerprint(state)


# ----------------------------------------------------------------------------------------------------
# what used to pass without a word: now read correctly, or said
# ----------------------------------------------------------------------------------------------------
def test_a_spreadsheet_csv_and_a_json_without_validation_are_read(tmp_path):
    """A CSV saved by Excel (UTF-8 byte-order mark, ';' between the fields) keeps its header; a JSON datalist
    with "validation": null splits by data.val_fraction."""
    from monai_diffusion.config import DataConfig
    from monai_diffusion.data.datasets import item_covariates

    write_scans(tmp_path / "scans", (12, 12, 12), (1.0, 1.0, 1.0), count=4)
    rows = [(f"scans/case{i}.nii.gz", "FM"[i % 2], 50 + i) for i in range(4)]
    (tmp_path / "excel.csv").write_bytes(("\ufeffimage;sex;age\r\n" + "".join(f"{f};{s};{a}\r\n" for f, s, a in rows))
                                         .encode("utf-8"))
    listing = {"training": [{"image": f, "sex": s, "age": a} for f, s, a in rows], "validation": None}
    (tmp_path / "list.json").write_text(json.dumps(listing))
    for name, val in (("excel.csv", 1), ("list.json", 1)):
        config = DataConfig(source="nifti", paths=str(tmp_path / name), image_size=(12, 12, 12), val_fraction=0.25)
        train_ds, val_ds = build_datasets(config, seed=0)
        assert (len(train_ds), len(val_ds)) == (3, val), name
        items = [item_covariates(ds, i) for ds in (train_ds, val_ds) for i in range(len(ds))]
        assert sorted(str(item["sex"]) for item in items) == ["F", "F", "M", "M"], name
        assert sorted(int(item["age"]) for item in items) == [50, 51, 52, 53], name


def test_a_number_is_one_class_however_it_is_written():
    from monai_diffusion.generation.conditioning import Conditioning

    items = [{"grade": value, "row": f"line {i}"} for i, value in enumerate([1, 1.0, "1", " 1.0 ", "2", 2.0, "2.50",
                                                                            2.5])]
    fitted = Conditioning.fit(["grade"], [], 0.1, items)
    assert fitted.categorical == {"grade": ["1", "2", "2.5"]}
    labels = fitted.encode(items).class_labels.tolist()
    assert labels == [0, 0, 0, 0, 1, 1, 2, 2]
    # a stored run whose classes were written "1.0" keeps its order, under the new spelling
    assert Conditioning.from_state({"categorical": {"grade": ["1.0", "0.0"]}, "continuous": {},
                                    "dropout": 0.1}).categorical == {"grade": ["1", "0"]}


def test_guidance_on_a_model_trained_without_condition_dropout_is_warned(caplog):
    from monai_diffusion.generation.conditioning import Conditioning
    from monai_diffusion.generation.sampling import _check_guidance

    never_dropped = Conditioning({"sex": ["F", "M"]}, {}, 0.0)
    with caplog.at_level(logging.WARNING, logger="monai_diffusion"):
        _check_guidance(never_dropped, 1.0, "--guidance-scale")
        assert caplog.text == ""
        _check_guidance(Conditioning({"sex": ["F", "M"]}, {}, 0.1), 3.0, "--guidance-scale")
        assert caplog.text == ""
        _check_guidance(never_dropped, 3.0, "--guidance-scale")
    assert "--guidance-scale 3: the model was trained with diffusion.conditioning.dropout 0" in caplog.text


def test_the_learning_rate_schedule_follows_the_step_without_torchs_warning():
    """A warm-up with an optimiser that does not step (the discriminator in its warm-up epochs): every
    learning rate follows lr_factor of the step, and PyTorch's "lr_scheduler.step() before optimizer.step()"
    warning has no cause left."""
    import warnings

    from monai_diffusion.runtime import Precision
    from monai_diffusion.training.loop import Optimization, lr_factor

    nets = {name: torch.nn.Linear(2, 1) for name in ("g", "d")}
    optimizers = {name: torch.optim.Adam(net.parameters(), lr=0.01) for name, net in nets.items()}
    optimization = Optimization(optimizers, Precision(False, torch.device("cpu")), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimization.schedule(lambda step: lr_factor(step, 4, "cosine", 10, 0.1))
        for step in range(10):
            for optimizer in optimizers.values():
                assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * lr_factor(step, 4, "cosine", 10, 0.1))
            optimization.backward(nets["g"](torch.ones(1, 2)).sum(), "g", {})
            optimization.step()


def test_tiles_record_their_method_and_say_a_fallback(caplog):
    from generative.networks.nets import AutoencoderKL
    from monai_diffusion.config.tiles import tiling_record

    kwargs = dict(spatial_dims=3, num_channels=(4, 4), attention_levels=(False, False), latent_channels=1,
                  num_res_blocks=1, norm_num_groups=2)
    with caplog.at_level(logging.WARNING, logger="monai_diffusion"):
        assert tiling_record(AutoencoderKL(**kwargs), None, 0.5, "sampling") is None
        exact = tiling_record(AutoencoderKL(**kwargs), 8, 0.25, "sampling")
        assert caplog.text == ""
        blended = tiling_record(AutoencoderKL(**kwargs, use_convtranspose=True), [8, 8, 16], 0.25, "sampling")
    assert exact == {"tile_size": 8, "tile_overlap": 0.25, "method": "exact", "fallback": None}
    assert blended["method"] == "blend" and blended["tile_size"] == [8, 8, 16] and blended["fallback"]
    assert "use_convtranspose: true" in caplog.text and "method 'blend'" in caplog.text


def test_patches_of_a_volume_without_foreground_are_said_once(caplog):
    from monai_diffusion.data.patches import ForegroundPatchesd

    crop = ForegroundPatchesd("image", (4, 4, 4), 2, 0.25, 0.05).set_random_state(0)
    with caplog.at_level(logging.WARNING, logger="monai_diffusion"):
        crop({"image": torch.rand(1, 8, 8, 8), "path": "bright.nii.gz"})
        assert caplog.text == ""
        for _ in range(2):
            assert len(crop({"image": torch.zeros(1, 8, 8, 8), "path": "air.nii.gz"})) == 2
    assert caplog.text.count("air.nii.gz: no voxel above data.foreground_threshold = 0.05") == 1


def test_one_generated_volume_gives_a_reason_for_no_diversity_and_no_fid():
    from monai_diffusion.evaluation.sample_quality import _diversity_note, feature_distances

    volume = torch.rand(1, 16, 16, 16)
    assert _diversity_note([volume], "--samples") == "1 volume(s) in --samples; pairwise MS-SSIM needs at least 2"
    assert _diversity_note([volume, volume], "--samples") is None
    distances = feature_distances(torch.rand(1, 8, dtype=torch.float64), torch.rand(5, 8, dtype=torch.float64))
    assert all(math.isnan(v) for v in distances.values())  # returned at once: no matrix square root of NaN
