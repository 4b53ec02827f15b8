"""AutoencoderKL with per-level downsample_factors: shapes, compatibility, checkpointing, coverage, errors."""

from __future__ import annotations

import io

import pytest
import torch
from monai.networks.nets import AutoencoderKL as CoreAutoencoderKL

from generative.networks.nets import AutoencoderKL, load_monai_core_state_dict
from generative.networks.nets.autoencoderkl import Downsample, Upsample, latent_spatial_shape

TINY = dict(num_res_blocks=1, norm_num_groups=4, latent_channels=3)

# (kwargs, input_shape, expected_latent_shape)
SHAPE_CASES = [
    (dict(spatial_dims=3, num_channels=(4, 8, 8), attention_levels=(False, False, True)), (2, 1, 16, 16, 8), (2, 3, 4, 4, 2)),
    (dict(spatial_dims=3, num_channels=(4, 8, 8), attention_levels=(False, False, False), downsample_factors=[4, 2]), (1, 1, 32, 16, 8), (1, 3, 4, 2, 1)),
    (dict(spatial_dims=3, num_channels=(4, 8), attention_levels=(False, True), downsample_factors=[16]), (1, 1, 32, 32, 16), (1, 3, 2, 2, 1)),
    (dict(spatial_dims=3, num_channels=(4, 8, 8), attention_levels=(False, False, False), downsample_factors=[3, 5]), (1, 2, 30, 15, 45), (1, 3, 2, 1, 3)),
    (dict(spatial_dims=3, num_channels=(4, 8, 8), attention_levels=(False, False, False), downsample_factors=[1, 2]), (1, 1, 8, 6, 4), (1, 3, 4, 3, 2)),
    (dict(spatial_dims=3, num_channels=(4, 8, 8), attention_levels=(False, False, True), downsample_factors=[(4, 4, 2), 2]), (1, 1, 16, 24, 8), (1, 3, 2, 3, 2)),
    (dict(spatial_dims=2, num_channels=(4, 8, 8), attention_levels=(False, False, True)), (2, 1, 16, 12), (2, 3, 4, 3)),
    (dict(spatial_dims=2, num_channels=(4, 8, 8), attention_levels=(False, False, False), downsample_factors=[4, 2]), (1, 3, 32, 24), (1, 3, 4, 3)),
    (dict(spatial_dims=2, num_channels=(4, 8), attention_levels=(False, True), downsample_factors=[16]), (1, 1, 32, 16), (1, 3, 2, 1)),
    (dict(spatial_dims=2, num_channels=(4, 8, 8), attention_levels=(False, False, False), downsample_factors=[(4, 2), (1, 3)]), (1, 1, 8, 12), (1, 3, 2, 2)),
]


def _build(kwargs: dict, in_channels: int = 1, **extra) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=in_channels, out_channels=in_channels, **TINY, **kwargs, **extra)


@pytest.mark.parametrize("kwargs,input_shape,latent_shape", SHAPE_CASES)
def test_shapes_and_methods(kwargs, input_shape, latent_shape):
    model = _build(kwargs, in_channels=input_shape[1]).eval()
    x = torch.randn(input_shape)
    with torch.no_grad():
        reconstruction, z_mu, z_sigma = model(x)
        assert reconstruction.shape == x.shape
        assert z_mu.shape == z_sigma.shape == latent_shape
        assert (z_sigma > 0).all()
        assert model.reconstruct(x).shape == x.shape
        z = model.encode_stage_2_inputs(x)
        assert z.shape == latent_shape
        assert model.decode_stage_2_outputs(z).shape == x.shape
        assert model.sampling(z_mu, z_sigma).shape == latent_shape
        # reconstruct decodes the mean: deterministic, unlike forward
        torch.testing.assert_close(model.reconstruct(x), model.decode(model.encode(x)[0]))
    assert model.latent_shape(input_shape[2:]) == latent_shape[1:]


def test_readme_example_latent_shape():
    model = AutoencoderKL(3, num_channels=(32, 64, 64), attention_levels=(False, False, False), num_res_blocks=1,
                          downsample_factors=[4, 2])
    assert model.total_factors == (8, 8, 8)
    assert model.latent_shape((128, 128, 64)) == (3, 16, 16, 8)
    assert latent_spatial_shape((128, 128, 64), (4, 4, 2)) == (32, 32, 32)


def test_factor_two_is_exactly_the_original_layer():
    down = Downsample(3, 4)
    assert down.conv.conv.kernel_size == (3, 3, 3) and down.conv.conv.stride == (2, 2, 2)
    assert down.conv.conv.padding == (0, 0, 0) and down.pad == (0, 1, 0, 1, 0, 1)
    x = torch.randn(1, 4, 6, 8, 4)
    expected = torch.nn.functional.conv3d(
        torch.nn.functional.pad(x, (0, 1, 0, 1, 0, 1)), down.conv.conv.weight, down.conv.conv.bias, stride=2
    )
    torch.testing.assert_close(down(x), expected)
    wide = Downsample(3, 4, stride=(4, 4, 2))
    assert wide.conv.conv.kernel_size == (5, 5, 3) and wide.conv.conv.stride == (4, 4, 2)


def test_upsample_nearest_then_conv_and_transposed_sizes():
    up = Upsample(3, 4, scale_factor=(4, 2, 1))
    x = torch.randn(1, 4, 2, 3, 5)
    assert up(x).shape == (1, 4, 8, 6, 5)
    repeated = x.repeat_interleave(4, 2).repeat_interleave(2, 3)
    torch.testing.assert_close(up(x), up.conv(repeated))
    for scale in (1, 2, 3, 4):
        transposed = Upsample(3, 4, use_convtranspose=True, scale_factor=scale)
        assert transposed(x).shape == (1, 4, 2 * scale, 3 * scale, 5 * scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_upsampling(dtype):
    up = Upsample(3, 4, scale_factor=(4, 4, 2)).to(dtype)
    out = up(torch.randn(1, 4, 2, 2, 2, dtype=dtype))
    assert out.dtype == dtype and out.shape == (1, 4, 8, 8, 4) and torch.isfinite(out).all()


def test_autocast_forward_backward_bf16():
    model = _build(dict(spatial_dims=3, num_channels=(4, 8), attention_levels=(False, True), downsample_factors=[4]))
    x = torch.randn(1, 1, 8, 8, 8)
    for checkpointing in (False, True):
        model.use_checkpointing = checkpointing
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reconstruction, _, _ = model(x)
        assert reconstruction.dtype == torch.bfloat16
        (reconstruction.float() - x).abs().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------------------
# compatibility with MONAI Generative checkpoints and MONAI core
# ------------------------------------------------------------------------------------------------
CORE_ARCH = dict(spatial_dims=3, num_res_blocks=1, attention_levels=(False, True), latent_channels=3, norm_num_groups=4)


def test_state_dict_has_monai_generative_layout():
    """The exact key list of MONAI Generative's AutoencoderKL for this architecture (from its source layout)."""
    model = AutoencoderKL(num_channels=(4, 8), **CORE_ARCH)

    def conv(prefix):
        return [f"{prefix}.conv.weight", f"{prefix}.conv.bias"]

    def norm(prefix):
        return [f"{prefix}.weight", f"{prefix}.bias"]

    def res(prefix, shortcut=False):
        keys = norm(f"{prefix}.norm1") + conv(f"{prefix}.conv1") + norm(f"{prefix}.norm2") + conv(f"{prefix}.conv2")
        return keys + (conv(f"{prefix}.nin_shortcut") if shortcut else [])

    def attn(prefix):
        return norm(f"{prefix}.norm") + [
            f"{prefix}.{n}.{p}" for n in ("to_q", "to_k", "to_v", "proj_attn") for p in ("weight", "bias")
        ]

    e, d = "encoder.blocks", "decoder.blocks"
    expected = (
        conv(f"{e}.0") + res(f"{e}.1") + conv(f"{e}.2.conv") + res(f"{e}.3", shortcut=True) + attn(f"{e}.4")
        + res(f"{e}.5") + attn(f"{e}.6") + res(f"{e}.7") + norm(f"{e}.8") + conv(f"{e}.9")
        + conv(f"{d}.0") + res(f"{d}.1") + attn(f"{d}.2") + res(f"{d}.3") + res(f"{d}.4") + attn(f"{d}.5")
        + conv(f"{d}.6.conv") + res(f"{d}.7", shortcut=True) + norm(f"{d}.8") + conv(f"{d}.9")
        + conv("quant_conv_mu") + conv("quant_conv_log_sigma") + conv("post_quant_conv")
    )
    assert sorted(model.state_dict()) == sorted(expected)


def _assert_same_outputs(ours: AutoencoderKL, core: torch.nn.Module, x: torch.Tensor) -> None:
    ours.eval(), core.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.reconstruct(x), core.reconstruct(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.encode(x)[0], core.encode(x)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.encode(x)[1], core.encode(x)[1], atol=1e-5, rtol=0)


def test_monai_generative_checkpoint_round_trip_matches_monai_core():
    """MONAI core's loader for MONAI Generative checkpoints accepts ours and computes the same function."""
    ours = AutoencoderKL(num_channels=(4, 8), **CORE_ARCH)
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    reloaded = AutoencoderKL(num_channels=(4, 8), **CORE_ARCH)
    reloaded.load_state_dict(saved, strict=True)
    core = CoreAutoencoderKL(channels=(4, 8), include_fc=False, **CORE_ARCH)
    core.load_old_state_dict(dict(saved))
    _assert_same_outputs(reloaded, core, torch.randn(2, 1, 8, 8, 4))


@pytest.mark.parametrize("combined", [False, True])
def test_load_monai_core_checkpoint(combined):
    torch.manual_seed(1)
    core = CoreAutoencoderKL(channels=(4, 8), include_fc=False, use_combined_linear=combined, **CORE_ARCH)
    ours = AutoencoderKL(num_channels=(4, 8), **CORE_ARCH)
    load_monai_core_state_dict(ours, core.state_dict())
    _assert_same_outputs(ours, core, torch.randn(1, 1, 8, 8, 8))


def test_load_monai_core_checkpoint_with_output_projection():
    torch.manual_seed(2)
    core = CoreAutoencoderKL(channels=(4, 8), include_fc=True, **CORE_ARCH)
    plain = AutoencoderKL(num_channels=(4, 8), **CORE_ARCH)
    with pytest.raises(ValueError, match="attention_out_projection=True"):
        plain.load_monai_core_state_dict(core.state_dict())
    ours = AutoencoderKL(num_channels=(4, 8), attention_out_projection=True, **CORE_ARCH)
    ours.load_monai_core_state_dict(core.state_dict())
    _assert_same_outputs(ours, core, torch.randn(1, 1, 8, 8, 8))


def test_load_monai_core_checkpoint_with_convtranspose_is_refused():
    core = CoreAutoencoderKL(channels=(4, 8), use_convtranspose=True, include_fc=False, **CORE_ARCH)
    ours = AutoencoderKL(num_channels=(4, 8), use_convtranspose=True, **CORE_ARCH)
    with pytest.raises(ValueError, match="use_convtranspose=True"):
        ours.load_monai_core_state_dict(core.state_dict())


def test_default_factors_match_monai_core_with_full_default_architecture():
    """Upstream defaults (4 levels, attention at the two deepest, non-local attention), 2 res blocks."""
    torch.manual_seed(3)
    ours = AutoencoderKL(spatial_dims=2, num_channels=(8, 16, 16, 16), norm_num_groups=8)
    core = CoreAutoencoderKL(spatial_dims=2, channels=(8, 16, 16, 16), norm_num_groups=8, include_fc=False)
    core.load_old_state_dict(dict(ours.state_dict()))
    _assert_same_outputs(ours, core, torch.randn(2, 1, 16, 24))


# ------------------------------------------------------------------------------------------------
# gradient checkpointing: same loss, same gradients
# ------------------------------------------------------------------------------------------------
CHECKPOINT_CASES = [
    (dict(spatial_dims=3, num_channels=(4, 8, 8), attention_levels=(False, False, True)), (2, 1, 8, 8, 8)),
    (dict(spatial_dims=3, num_channels=(4, 8, 8), attention_levels=(False, False, False), downsample_factors=[(4, 4, 2), 2]), (1, 2, 16, 8, 8)),
    (dict(spatial_dims=2, num_channels=(4, 8), attention_levels=(True, True), downsample_factors=[3]), (2, 1, 9, 12)),
]


def _loss_and_grads(model: AutoencoderKL, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    reconstruction, z_mu, z_sigma = model(x)
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1).mean()
    loss = (reconstruction - x).abs().mean() + 1e-3 * kl
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kwargs,input_shape", CHECKPOINT_CASES)
def test_checkpointing_gives_same_loss_and_gradients(kwargs, input_shape):
    model = _build(kwargs, in_channels=input_shape[1])
    x = torch.randn(input_shape, requires_grad=True)
    loss_plain, grads_plain = _loss_and_grads(model, x)
    input_grad_plain = x.grad.clone()
    x.grad = None
    model.use_checkpointing = True
    loss_ckpt, grads_ckpt = _loss_and_grads(model, x)
    torch.testing.assert_close(loss_ckpt, loss_plain, atol=1e-5, rtol=0)
    assert grads_ckpt.keys() == grads_plain.keys()
    assert len(grads_plain) == sum(1 for p in model.parameters() if p.requires_grad)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(x.grad, input_grad_plain, atol=1e-5, rtol=1e-5)


def test_checkpointing_flag_reaches_every_block_and_is_a_constructor_argument():
    model = _build(CHECKPOINT_CASES[0][0], use_checkpointing=True)
    flags = [m.low_memory for m in model.modules() if hasattr(m, "low_memory")]
    assert flags and all(flags)
    model.use_checkpointing = False
    assert not any(m.low_memory for m in model.modules() if hasattr(m, "low_memory"))


def test_checkpointing_stores_fewer_bytes_for_backward():
    """Counts what autograd keeps for backward (deterministic, unlike timings)."""
    model = _build(dict(spatial_dims=3, num_channels=(4, 8), attention_levels=(False, False)))
    x = torch.randn(1, 1, 16, 16, 16)

    def saved_bytes() -> int:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return sum(storages.values())

    plain = saved_bytes()
    model.use_checkpointing = True
    assert saved_bytes() < 0.6 * plain


# ------------------------------------------------------------------------------------------------
# no input voxel is skipped
# ------------------------------------------------------------------------------------------------
COVERAGE_CASES = [case for case in SHAPE_CASES if "downsample_factors" in case[0]] + [SHAPE_CASES[0]]


@pytest.mark.parametrize("kwargs,input_shape,latent_shape", COVERAGE_CASES)
def test_every_input_voxel_reaches_the_latent(kwargs, input_shape, latent_shape):
    model = _build(kwargs, in_channels=input_shape[1])
    x = torch.randn(input_shape, requires_grad=True)
    z_mu, _ = model.encode(x)
    weights = torch.randn(z_mu.shape, generator=torch.Generator().manual_seed(0))
    (z_mu * weights).sum().backward()
    assert (x.grad != 0).all(), f"{int((x.grad == 0).sum())} input voxels do not influence the latent"


def test_coverage_check_detects_a_skipping_kernel():
    """The check above can fail: a 3-wide kernel with stride 4 never reads a quarter of each axis."""
    conv = torch.nn.Conv1d(1, 1, kernel_size=3, stride=4)
    x = torch.randn(1, 1, 16, requires_grad=True)
    conv(x).sum().backward()
    assert (x.grad == 0).sum() == 4


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
ARCH3 = dict(spatial_dims=3, num_channels=(4, 8, 8), attention_levels=(False, False, False), **TINY)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(downsample_factors=[2]), r"downsample_factors has 1 entries .* so 2 are expected .*e\.g\. num_channels=\[32, 64, 64\] with downsample_factors=\[4, 2\]"),
        (dict(downsample_factors=[2, 2, 2]), r"has 3 entries .* 2 are expected"),
        (dict(downsample_factors=[]), r"has 0 entries"),
        (dict(downsample_factors=[0, 2]), r"downsample_factors\[0\] = 0: .*integer >= 1"),
        (dict(downsample_factors=[2, -1]), r"downsample_factors\[1\] = -1: .*integer >= 1"),
        (dict(downsample_factors=[2.5, 2]), r"downsample_factors\[0\] = 2\.5: expected an integer"),
        (dict(downsample_factors=["4", 2]), r"downsample_factors\[0\] = '4': expected an integer"),
        (dict(downsample_factors=[True, 2]), r"downsample_factors\[0\] = True: expected an integer"),
        (dict(downsample_factors=[(4, 2), 2]), r"downsample_factors\[0\] = \[4, 2\]: a per-axis factor needs exactly 3 integers"),
        (dict(downsample_factors=[(4, 0, 2), 2]), r"downsample_factors\[0\] = 0: .*integer >= 1"),
        (dict(downsample_factors=4), r"downsample_factors = 4: expected a list"),
        (dict(num_channels=(4, 6, 8)), r"num_channels = \[4, 6, 8\]: every entry must be a multiple of norm_num_groups = 4 .* \[6\]"),
        (dict(attention_levels=(False, True)), r"attention_levels has 2 entries .* num_channels has 3"),
        (dict(num_res_blocks=(1, 1)), r"num_res_blocks = \[1, 1\]: give a single integer or one integer per level \(3 levels\)"),
        (dict(spatial_dims=4), r"spatial_dims = 4: expected 1, 2 or 3"),
    ],
)
def test_constructor_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        AutoencoderKL(**{**ARCH3, **overrides})


def test_spatial_size_not_divisible_names_size_factor_and_nearest_valid_sizes():
    model = AutoencoderKL(**{**ARCH3, "downsample_factors": [4, 2]})
    with pytest.raises(ValueError, match=r"spatial size 1225 along axis 0 \(H\) .* total downsampling factor 8 .* nearest valid sizes: 1224 or 1232"):
        model.latent_shape((1225, 16, 8))
    with pytest.raises(ValueError, match=r"spatial size 20 along axis 2 \(D\) .* factor 8 .*: 16 or 24"):
        model.encode(torch.randn(1, 1, 16, 16, 20))
    with pytest.raises(ValueError, match=r"spatial size 4 along axis 1 \(W\) .* factor 8 .*nearest valid sizes: 8 "):
        model.encode(torch.randn(1, 1, 16, 4, 8))
    with pytest.raises(ValueError, match=r"expected B x C x H x W x D"):
        model.encode(torch.randn(1, 16, 16, 8))


# ----------------------------------------------------------------------------------------------------
# upsample_mode: nearest (MONAI Generative's decoder, the default) or trilinear (MAISI's)
# ----------------------------------------------------------------------------------------------------
MAISI_ARGS = dict(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4, num_channels=(8, 16, 16),
                  num_res_blocks=(1, 1, 1), norm_num_groups=8, attention_levels=(False, False, False),
                  with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)


def test_trilinear_upsampling_reproduces_monai_maisi_autoencoder():
    """MONAI 1.6.1's AutoencoderKlMaisi (random weights) and ours with upsample_mode="trilinear" give the same
    outputs from the same weights (keys ``.conv.conv.`` -> ``.conv.``); nearest upsampling does not."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    torch.manual_seed(0)
    reference = AutoencoderKlMaisi(**MAISI_ARGS, num_splits=1, save_mem=False).eval()
    weights = {key.replace(".conv.conv.", ".conv."): value for key, value in reference.state_dict().items()}
    ours = AutoencoderKL(**MAISI_ARGS, upsample_mode="trilinear").eval()
    ours.load_state_dict(weights, strict=True)
    nearest = AutoencoderKL(**MAISI_ARGS).eval()
    nearest.load_state_dict(weights, strict=True)
    x, z = torch.randn(1, 1, 16, 24, 20), torch.randn(1, 4, 4, 6, 5)
    with torch.no_grad():
        expected = reference.decode(z)
        scale = float(expected.abs().max())
        # fp32 rounding of a few dozen convolution sums, relative to the output's scale
        torch.testing.assert_close(ours.decode(z), expected, atol=1e-5 * scale, rtol=0)
        torch.testing.assert_close(ours.encode(x)[0], reference.encode(x)[0], atol=1e-5 * scale, rtol=0)
        assert float((nearest.decode(z) - expected).abs().max()) > 0.05 * scale


def test_upsample_mode_nearest_is_the_default_key_for_key_and_number_for_number():
    default, nearest = _build(SHAPE_CASES[1][0]).eval(), _build(SHAPE_CASES[1][0], upsample_mode="nearest").eval()
    assert list(default.state_dict()) == list(nearest.state_dict())
    assert default.init_args["upsample_mode"] == "nearest"
    trilinear = _build(SHAPE_CASES[1][0], upsample_mode="trilinear").eval()
    assert list(trilinear.state_dict()) == list(default.state_dict())
    x = torch.randn(1, 1, 32, 16, 8)
    with torch.no_grad():
        assert torch.equal(default.reconstruct(x), nearest.reconstruct(x))
        assert not torch.allclose(trilinear.reconstruct(x), default.reconstruct(x))
    rebuilt = AutoencoderKL(**trilinear.init_args)
    assert rebuilt.upsample_mode == "trilinear"


@pytest.mark.parametrize("mode", ["bilinear", "Nearest", None, "bicubic"])
def test_unknown_upsample_mode_is_refused(mode):
    with pytest.raises(ValueError, match=r"upsample_mode = .*expected one of 'nearest', 'trilinear'"):
        _build(SHAPE_CASES[1][0], upsample_mode=mode)
