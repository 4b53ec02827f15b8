"""Stage-scoped rules and the loop's bookkeeping: defects that came from stages checking each other's
settings, from resume positions and from accumulation windows, each with the case that used to fail."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml
from torch.utils.data import DataLoader

from monai_diffusion.cli import sample_main, train_diffusion_main
from monai_diffusion.config import ConfigError, load_config
from monai_diffusion.errors import CheckpointError
from monai_diffusion.memory import search_budget
from monai_diffusion.runs.checkpoints import load_autoencoder, load_checkpoint, save_checkpoint
from monai_diffusion.runtime import Precision, Runtime
from monai_diffusion.training.loop import LoopSettings, LoopState, Task, fit
from tests.helpers import CONFIG, cli_args, summary_of, tiny, train


def test_autoencoder_stage_ignores_the_diffusion_section():
    """A 24^3 autoencoder run: its latent (6^3) does not suit the default 3-level UNet, which is no reason to
    refuse an autoencoder run; the diffusion stage refuses it."""
    overrides = ["data.image_size=[24, 24, 24]", "autoencoder.discriminator.num_layers_d=2"]
    config = load_config(CONFIG, overrides)  # stage "autoencoder"
    assert config.data.image_size == (24, 24, 24)
    with pytest.raises(ConfigError, match=r"diffusion\.num_channels: a UNet with 3 levels"):
        load_config(CONFIG, overrides, stage="diffusion")


def test_budget_search_keeps_every_factor_option_of_the_default_config():
    found = search_budget(load_config(CONFIG), 1e15, batch_sizes=(1,))
    factors = {str(c.downsample_factors) for c in found}
    assert {"[2, 2]", "[4, 2]", "[8, 2]", "[16]"} <= factors


def test_a_checkpoint_is_loaded_with_the_rules_it_was_trained_with(tmp_path):
    """The stored config is read for its types only: a diffusion setting that a later rule refuses does not
    make an autoencoder checkpoint unloadable."""
    assert train(CONFIG, tmp_path, *tiny()) == 0
    path = tmp_path / "autoencoder" / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    state["config"]["diffusion"]["num_head_channels"] = [0, 0, 0]  # refused by today's diffusion rules
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, path)
    model, config = load_autoencoder(path)
    assert config.diffusion.num_head_channels == [0, 0, 0] and model.latent_channels == 3


def test_checkpoints_are_read_without_running_pickled_code(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"format": "monai_diffusion.checkpoint/1", "model_args": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil\.pt: not a monai_diffusion checkpoint, or it holds objects"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_shipped_yaml_comment_examples_load():
    """The comment beside downsample_factors must be valid YAML for a per-axis factor."""
    text = (CONFIG.parent / "ldm_config.yaml").read_text()
    example = re.search(r"downsample_factors: .*e\.g\. \[4, 2\] = 8x, (\[\[.*?\]\, \d\]) per axis", text).group(1)
    assert yaml.safe_load(example) == [[4, 4, 2], 2]
    config = load_config(CONFIG, [f"autoencoder.downsample_factors={example}", "data.image_size=[64, 64, 32]"])
    assert config.autoencoder.downsample_factors == [[4, 4, 2], 2]


def test_pyproject_torch_floor_satisfies_monai():
    import importlib.metadata

    ours = re.search(r'"torch>=([\d.]+)"', (CONFIG.parents[2] / "pyproject.toml").read_text()).group(1)
    monai = next(r for r in importlib.metadata.requires("monai") if r.startswith("torch"))
    needed = re.search(r">=([\d.]+)", monai).group(1)
    def version(text: str) -> tuple[int, ...]:
        return tuple(int(part) for part in text.split(".")) + (0,) * (3 - len(text.split(".")))

    assert version(ours) >= version(needed)


# ----------------------------------------------------------------------------------------------------
# the loop: resume position after max_steps, the last accumulation window
# ----------------------------------------------------------------------------------------------------
def test_resume_after_max_steps_mid_epoch_finishes_that_epoch(tmp_path):
    """4 batches per epoch; stopped by max_steps after 1, then resumed with a larger max_steps: the other 3
    batches of that epoch are trained (before, the resume skipped to the next epoch, past n_epochs)."""
    base = [*tiny(), "data.num_train=8", "autoencoder.training.n_epochs=1"]
    assert train(CONFIG, tmp_path, *base, "autoencoder.training.max_steps=1") == 0
    saved = load_checkpoint(tmp_path / "autoencoder" / "checkpoints" / "last.pt")["loop"]
    assert (saved["epoch"], saved["batch_in_epoch"], saved["global_step"]) == (0, 1, 1)
    assert train(CONFIG, tmp_path, *base, "autoencoder.training.max_steps=10", resume=True) == 0
    assert summary_of(tmp_path / "autoencoder")["optimizer_steps"] == 4


class _LinearTask(Task):
    """The smallest task: one weight, loss = weight * mean(batch), so each gradient is the batch mean."""

    monitor = "val/loss"

    def __init__(self) -> None:
        self.model = nn.Linear(1, 1, bias=False)
        nn.init.zeros_(self.model.weight)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1.0)
        self.gradients: list[float] = []

    def ddp_modules(self):
        return []

    def optimizers(self):
        return {"model": self.optimizer}

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def training_step(self, batch, epoch, optimization):
        loss = self.model.weight.sum() * batch["x"].mean()
        optimization.backward(loss, "model", {})
        return {}

    def validation_step(self, batch):
        return {"loss": torch.tensor(0.0), "count": torch.tensor(1.0)}

    def preview(self, batch):
        return None

    def state_dict(self):
        return {"stage": "test"}


def test_the_last_partial_accumulation_window_averages_its_own_batches(tmp_path):
    """5 batches with 2 per window: windows (1, 2), (3, 4), (5). SGD with lr 1 moves the weight by minus the
    window's mean gradient: -(1.5 + 3.5 + 5) = -10. Dividing the last window by 2 would give -7.5."""
    task = _LinearTask()
    data = [{"x": torch.tensor([float(i)])} for i in range(1, 6)]
    settings = LoopSettings(n_epochs=1, max_steps=None, accumulation_steps=2, val_interval=1, fast_dev_run=False,
                            fast_dev_run_batches=1, log_every_n_steps=1, checkpoint_every_n_steps=None)
    runtime = Runtime(torch.device("cpu"))
    in_order = torch.utils.data.SequentialSampler(data)  # the batches in order, so the windows are known
    loaders = (DataLoader(data, batch_size=1, sampler=in_order), DataLoader(data[:1], batch_size=1), in_order)
    state = fit(task, settings, runtime, Precision(False, runtime.device), loaders, tmp_path, LoopState(), None)
    assert state.global_step == 3
    assert task.model.weight.detach().item() == pytest.approx(-10.0)


# ----------------------------------------------------------------------------------------------------
# a 2D config through both stages
# ----------------------------------------------------------------------------------------------------
def test_2d_config_trains_both_stages_and_samples(tmp_path):
    """The 2D autoencoder sees each volume's centre slice; the diffusion stage must encode those slices."""
    overrides = [
        "data.image_size=[16, 16, 8]", "data.num_train=4", "data.num_val=2", "autoencoder.spatial_dims=2",
        "autoencoder.num_channels=[8, 8]", "autoencoder.attention_levels=[false, false]",
        "autoencoder.downsample_factors=[2]", "autoencoder.norm_num_groups=4",
        "autoencoder.training.use_adversarial_loss=false", "autoencoder.training.batch_size=2",
        "autoencoder.training.n_epochs=1", "diffusion.num_channels=[8, 8]", "diffusion.attention_levels=[false, true]",
        "diffusion.num_head_channels=[0, 8]", "diffusion.norm_num_groups=4",
        "diffusion.scheduler.num_train_timesteps=20", "diffusion.training.batch_size=2",
        "diffusion.training.n_epochs=1", "diffusion.training.preview_inference_steps=2",
        "diffusion.sampling.num_inference_steps=2",
    ]
    assert train(CONFIG, tmp_path, *overrides) == 0
    assert train_diffusion_main(cli_args(CONFIG, tmp_path, *overrides)) == 0
    assert summary_of(tmp_path / "diffusion")["latent_shape"] == [3, 8, 8]
    out = tmp_path / "samples"
    assert sample_main(cli_args(CONFIG, tmp_path, *overrides) + ["--num-samples", "2", "--output", str(out)]) == 0
    import nibabel as nib

    image = nib.load(str(out / "sample_000.nii.gz"))
    assert image.shape == (16, 16, 1)  # one slice, placed at the centre slice of the training volumes
    assert float(image.affine[2, 3]) == pytest.approx(4.0)
