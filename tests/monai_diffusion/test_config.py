"""The typed config schema: shipped files, overrides, type errors and the guide's rules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from generative.networks.nets import AutoencoderKL
from monai_diffusion.config import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from monai_diffusion.config.rules import discriminator_min_size

CONFIG_DIR = Path(__file__).resolve().parents[2] / "monai_diffusion" / "config"
EXAMPLES = {
    "example1_64x64x32.yaml": (3, 16, 16, 8),
    "example2_128x128x64.yaml": (3, 16, 16, 8),
    "example3_256x256x64.yaml": (3, 32, 32, 8),
    "example4_512x512x128.yaml": (4, 32, 32, 8),
    "example5_extreme_16x.yaml": (8, 16, 16, 4),
}


def test_default_config_is_guide_example_1():
    config = load_config(CONFIG_DIR / "ldm_config.yaml")
    ae = config.autoencoder
    assert ae.num_channels == [32, 64, 64] and ae.downsample_factors == [2, 2] and ae.latent_channels == 3
    assert ae.training.batch_size == 4 and config.data.image_size == (64, 64, 32)
    assert ae.training.kl_weight == pytest.approx(1e-6)
    model = AutoencoderKL(**ae.model_kwargs())
    assert model.latent_shape(config.data.image_size) == (3, 16, 16, 8)


@pytest.mark.parametrize("name,latent", sorted(EXAMPLES.items()))
def test_guide_examples_load_and_build(name, latent):
    config = load_config(CONFIG_DIR / "examples" / name)
    with torch.device("meta"):
        model = AutoencoderKL(**config.autoencoder.model_kwargs())
    assert model.latent_shape(config.data.image_size) == latent


def test_quickstart_loads():
    config = load_config(CONFIG_DIR / "quickstart.yaml")
    assert config.data.source == "synthetic"


def test_overrides_parse_yaml_values_and_nested_keys():
    config = load_config(
        CONFIG_DIR / "ldm_config.yaml",
        [
            "autoencoder.training.batch_size=1",
            "autoencoder.downsample_factors=[[4, 4, 2], 2]",
            "autoencoder.training.learning_rate=1e-4",
            "data.image_size=[64, 64, 32]",
            "autoencoder.training.mixed_precision=true",
        ],
    )
    assert config.autoencoder.training.batch_size == 1
    assert config.autoencoder.downsample_factors == [[4, 4, 2], 2]
    assert config.autoencoder.training.learning_rate == pytest.approx(1e-4)
    assert config.autoencoder.training.mixed_precision is True


def test_round_trip_through_dict_and_yaml(tmp_path):
    config = load_config(CONFIG_DIR / "examples" / "example4_512x512x128.yaml")
    assert config_from_dict(config_to_dict(config)) == config
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config


def _error(tmp_path: Path, text: str, overrides: list[str] | None = None) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "text,expected",
    [
        ("autoencoder:\n  trainig:\n    batch_size: 1\n", r"autoencoder.trainig: unknown key \(did you mean 'autoencoder.training'\?\)"),
        ("autoencoder:\n  training:\n    batch_sise: 1\n", r"autoencoder.training.batch_sise: unknown key \(did you mean 'autoencoder.training.batch_size'\?\)"),
        ("dat:\n  image_size: [64, 64, 32]\n", r"dat: unknown key \(did you mean 'data'\?\)"),
        ("autoencoder:\n  training:\n    batch_size: two\n", r"autoencoder.training.batch_size: expected an integer, got 'two' \(str\)"),
        ("autoencoder:\n  training:\n    mixed_precision: 1\n", r"autoencoder.training.mixed_precision: expected true or false, got 1 \(int\)"),
        ("autoencoder:\n  num_channels: 32\n", r"autoencoder.num_channels: expected a list \(each: an integer\), got 32 \(int\)"),
        ("data:\n  source: nifty\n", r"data.source: expected one of 'synthetic', 'nifti', got 'nifty' \(str\) \(did you mean 'nifti'\?\)"),
        ("autoencoder: [1, 2]\n", r"autoencoder: expected a mapping of keys"),
        ("autoencoder:\n  downsample_factors: [4]\n", r"autoencoder.downsample_factors has 1 entries \(\[4\]\) but num_channels has 3 levels, so 2 are expected"),
        ("autoencoder:\n  downsample_factors: []\n", r"downsample_factors has 0 entries"),
        ("autoencoder:\n  downsample_factors: [0, 2]\n", r"autoencoder.downsample_factors\[0\] = 0: a downsampling factor must be an integer >= 1"),
        ("autoencoder:\n  downsample_factors: [-1, 2]\n", r"downsample_factors\[0\] = -1"),
        ("autoencoder:\n  downsample_factors: [2.5, 2]\n", r"autoencoder.downsample_factors\[0\]: expected an integer or a list \(each: an integer\), got 2.5 \(float\)"),
        ("autoencoder:\n  downsample_factors: ['4', 2]\n", r"autoencoder.downsample_factors\[0\]: expected an integer .* got '4' \(str\)"),
        ("autoencoder:\n  downsample_factors: [[4, 2], 2]\n", r"downsample_factors\[0\] = \[4, 2\]: a per-axis factor needs exactly 3 integers"),
        ("autoencoder:\n  attention_levels: [false, true]\n", r"autoencoder.attention_levels: 2 entries .* num_channels has 3 levels"),
        ("autoencoder:\n  num_channels: [32, 48, 64]\n  norm_num_groups: 32\n", r"autoencoder.num_channels: \[32, 48, 64\] must all be multiples of autoencoder.norm_num_groups = 32 \(not \[48\]\)"),
        ("data:\n  image_size: [60, 64, 32]\nautoencoder:\n  downsample_factors: [4, 2]\n", r"data.image_size: \[60, 64, 32\] is not divisible by the total downsampling factors \[8, 8, 8\] .* 56 or 64 x 64 x 32"),
        ("data:\n  image_size: [64, 64, 8]\nautoencoder:\n  num_channels: [32, 64]\n  attention_levels: [false, false]\n  downsample_factors: [16]\n", r"data.image_size: \[64, 64, 8\] .* \[16, 16, 16\] .* 64 x 64 x 16"),
        ("data:\n  image_size: [16, 16, 16]\n", r"autoencoder.discriminator.num_layers_d: 3 layers need at least 24 voxels per axis.*num_layers_d: 2"),
        ("autoencoder:\n  training:\n    use_perceptual_loss: true\n", r"autoencoder.perceptual.weights_path: required .* MedicalNet"),
        ("autoencoder:\n  training:\n    batch_size: 0\n", r"autoencoder.training.batch_size: expected an integer >= 1, got 0"),
        ("device: gpu\n", r"device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
        ("autoencoder:\n  training:\n    learning_rate: fast\n", r"autoencoder.training.learning_rate: expected a number, got 'fast'"),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, expected):
    message = _error(tmp_path, text)
    assert re.search(expected, message), message


def test_yaml_syntax_error_reports_line(tmp_path):
    message = _error(tmp_path, "autoencoder:\n  num_channels: [32, 64\n  latent_channels: 3\n")
    assert "bad.yaml:3:" in message and "YAML syntax error" in message


def test_missing_file_and_bad_overrides(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "ok.yaml").write_text("seed: 1\n")
    with pytest.raises(ConfigError, match=r"--set 'batch_size': expected dotted.key=value"):
        load_config(tmp_path / "ok.yaml", ["batch_size"])
    with pytest.raises(ConfigError, match=r"autoencoder.training.batchsize: unknown key \(did you mean"):
        load_config(tmp_path / "ok.yaml", ["autoencoder.training.batchsize=2"])
    with pytest.raises(ConfigError, match=r"--set seed.value: 'seed' is a value, not a section"):
        load_config(tmp_path / "ok.yaml", ["seed.value=2"])


def test_apply_overrides_does_not_mutate_input():
    raw = {"autoencoder": {"training": {"batch_size": 4}}}
    changed = apply_overrides(raw, ["autoencoder.training.batch_size=1"])
    assert raw["autoencoder"]["training"]["batch_size"] == 4 and changed["autoencoder"]["training"]["batch_size"] == 1


def test_discriminator_min_size_is_exact():
    from monai.networks.nets import PatchDiscriminator

    for layers in (1, 2, 3):
        size = discriminator_min_size(layers)
        disc = PatchDiscriminator(spatial_dims=3, num_layers_d=layers, channels=4, in_channels=1, out_channels=1)
        disc(torch.zeros(1, 1, size, size, size))
        with pytest.raises((RuntimeError, ValueError)):
            disc(torch.zeros(1, 1, size - 1, size - 1, size - 1))


def test_the_diffusion_stage_runs_only_the_rules_it_needs():
    """Stage 2 trains no discriminator and no perceptual loss: their rules refuse an autoencoder load only."""
    path = CONFIG_DIR / "ldm_config.yaml"
    for override in ("autoencoder.discriminator.num_layers_d=6", "autoencoder.training.use_perceptual_loss=true"):
        with pytest.raises(ConfigError, match="autoencoder"):
            load_config(path, [override])
        assert load_config(path, [override], stage="diffusion").autoencoder is not None
    with pytest.raises(ConfigError, match="data.image_size"):  # the network's geometry still counts for stage 2
        load_config(path, ["data.image_size=[60, 64, 32]"], stage="diffusion")


@pytest.mark.parametrize("factors", [[2, 2], [4, 2], [8, 2], [16], [2, 2, 2], [[4, 4, 2], 2]])
def test_the_factor_study_and_the_budget_search_build_the_same_network(tmp_path, factors):
    """Both take their variant from ``geometry.with_factors``: for ``[16]`` on ``[32, 64, 64]`` with attention
    at the deepest level, both build ``[32, 64]`` without attention."""
    from monai_diffusion.evaluation.factor_study import variant_config
    from monai_diffusion.memory.budget import _factor_variant

    config = load_config(CONFIG_DIR / "ldm_config.yaml")
    _, studied = variant_config(config, factors, False, tmp_path, 1)
    searched = _factor_variant(config, factors)
    assert studied.autoencoder.model_kwargs() == searched.autoencoder.model_kwargs()
    with torch.device("meta"):
        one, two = (AutoencoderKL(**c.autoencoder.model_kwargs()) for c in (studied, searched))
    assert [(k, v.shape) for k, v in one.state_dict().items()] == [(k, v.shape) for k, v in two.state_dict().items()]
    if factors == [16]:
        assert studied.autoencoder.num_channels == [32, 64] and studied.autoencoder.attention_levels == [False, False]
