"""0.2.3 checkpoints load strictly into the classes at the same paths and give 0.2.3's outputs (fixtures)."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import pytest
import torch

from tests.helpers.dropin import NETWORKS, build, generator, load, max_error
from tests.helpers.tolerance import accumulated_terms, assert_close_fp32


@pytest.mark.parametrize("name", NETWORKS)
def test_023_state_dict_loads_strictly_and_matches(name: str) -> None:
    ref = load(name)
    model = build(name)
    torch.manual_seed(3)
    _assert_outputs_match(generator.outputs_for(name, model, ref["inputs"]), ref["outputs"], model)


def _assert_outputs_match(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], model) -> None:
    """Outputs stored by 0.2.3 on another machine: equal up to the reordering of fp32 sums, relative to each
    output's scale (tests/_tolerance.py); integer outputs exactly."""
    assert set(got) == set(expected)
    terms = accumulated_terms(model)
    for key, value in expected.items():
        assert_close_fp32(got[key], value, terms, name=key)


@pytest.mark.parametrize("name", NETWORKS)
def test_our_state_dict_has_023_layout(name: str) -> None:
    """Same keys and shapes as 0.2.3's, so it loads into 0.2.3 with strict=True; values round-trip."""
    ref = load(name)["state_dict"]
    ours = build(name).state_dict()
    assert set(ours) == set(ref)
    for key, value in ref.items():
        assert ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), key
    export = os.environ.get("DROPIN_EXPORT_DIR")  # for make_generative_023_fixtures.py --verify-ours
    if export:
        Path(export).mkdir(parents=True, exist_ok=True)
        torch.save(ours, Path(export) / f"{name}.pth")


def test_self_attention_skips_projection_but_cross_attention_applies_it() -> None:
    """Perturbing 0.2.3's unused proj_attn changes nothing; perturbing the transformer's to_out does."""
    for name, key, changes in (("unet_attn", "middle_block.attention.proj_attn.weight", False),
                               ("unet_cross", "middle_block.attention.transformer_blocks.0.attn1.to_out.0.weight", True)):
        ref = load(name)
        state = dict(ref["state_dict"])
        state[key] = state[key] + 1.0
        model = build(name)
        model.load_state_dict(state, strict=True)
        out = generator.outputs_for(name, model, ref["inputs"])
        assert (max_error(out, ref["outputs"]) > 1e-3) == changes


def test_monai_core_layout_loads_too() -> None:
    """A dict in MONAI core's key layout (what the module tree holds) also loads."""
    from monai.networks.nets import DiffusionModelUNet as CoreUNet

    ref = load("unet_attn")
    kwargs = dict(ref["kwargs"])
    kwargs["channels"] = kwargs.pop("num_channels")
    core = CoreUNet(**kwargs, include_fc=False)
    ours = build("unet_attn")
    core_state = {k: v for k, v in core.state_dict().items()}
    ours.load_state_dict(core_state, strict=False)  # core without include_fc lacks the unused projections
    core.eval()
    with torch.no_grad():
        # two implementations of the same sums, possibly in another order (tests/_tolerance.py)
        assert_close_fp32(ours(**ref["inputs"]), core(**ref["inputs"]), accumulated_terms(ours))


@pytest.mark.parametrize("name", generator.PICKLED)
def test_023_pickled_model_unpickles_and_runs(name: str, generative_023) -> None:
    ref = load(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "source code changed" notes about 0.2.3's classes
        model = torch.load(generative_023 / f"{name}_pickled.pth", weights_only=False)
    assert type(model).__module__.startswith("generative.networks.nets.")
    assert not model.training
    torch.manual_seed(3)
    _assert_outputs_match(generator.outputs_for(name, model, ref["inputs"]), ref["outputs"], model)
    buffer = io.BytesIO()  # and it pickles again as our own model
    torch.save(model, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    _assert_outputs_match(generator.outputs_for(name, again, ref["inputs"]), ref["outputs"], again)


def test_legacy_internal_names_are_stand_ins_only() -> None:
    from generative.networks.nets import diffusion_model_unet

    stand_in = diffusion_model_unet.ResnetBlock
    with pytest.raises(RuntimeError, match="0.2.3 internal class"):
        stand_in()(torch.zeros(1))
    with pytest.raises(AttributeError):
        diffusion_model_unet.NoSuchBlock  # noqa: B018
