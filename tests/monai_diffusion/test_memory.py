"""The memory estimator: exact saved-tensor counts, budget search, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from generative.networks.nets import AutoencoderKL
from monai_diffusion import memory as memory_module
from monai_diffusion.cli import estimate_memory_main
from monai_diffusion.config import load_config
from monai_diffusion.memory import (
    CUDA_RESERVED_BYTES,
    FRAGMENTATION,
    count_saved,
    estimate_autoencoder,
    parse_budget,
    search_budget,
    with_margin,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "monai_diffusion" / "config" / "ldm_config.yaml"
SMALL = ["data.image_size=[32, 32, 32]", "autoencoder.training.batch_size=2", "autoencoder.num_channels=[8, 16, 16]",
         "autoencoder.norm_num_groups=8"]


@pytest.mark.parametrize("factors", [[2, 2], [4, 2], [[4, 4, 2], 2]])
@pytest.mark.parametrize("amp,ckpt", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_estimate_equals_a_real_cpu_forward(factors, amp, ckpt, target):
    """The count on fake tensors equals the count of a real forward under the same autocast rules (on the CPU,
    CUDA's rule, GroupNorm in float32, is applied by the estimator's own autocast context)."""
    config = load_config(CONFIG, [*SMALL, f"autoencoder.downsample_factors={factors}"])
    estimate = estimate_autoencoder(config, mixed_precision=amp, checkpointing=ckpt, target=target)
    model = AutoencoderKL(**config.autoencoder.model_kwargs(use_checkpointing=ckpt)).train()
    x = torch.rand(2, 1, 32, 32, 32)
    with count_saved({}, exclude=(model,)) as real, memory_module._autocast(amp, target):
        reconstruction, z_mu, z_sigma = model(x)
        torch.nn.functional.l1_loss(reconstruction.float(), x) + (z_mu.float().pow(2) + z_sigma.float().pow(2)).mean()
    assert estimate.autoencoder_activations == real.total
    assert sum(row.saved_bytes for row in estimate.levels) <= real.total
    assert estimate.latent_shape == model.latent_shape((32, 32, 32))
    params = sum(p.numel() for p in model.parameters())
    assert estimate.parameters >= 4 * params


def test_cuda_rules_keep_group_norm_in_float32():
    config = load_config(CONFIG, SMALL)
    cpu, cuda = (estimate_autoencoder(config, mixed_precision=True, checkpointing=False, target=t) for t in ("cpu", "cuda"))
    assert cuda.autoencoder_activations > cpu.autoencoder_activations  # float32 GroupNorm outputs are kept
    fp32 = [estimate_autoencoder(config, mixed_precision=False, target=t).total for t in ("cpu", "cuda")]
    assert fp32[0] == fp32[1]
    with memory_module._autocast(True, "cuda"):
        out = torch.nn.GroupNorm(2, 4)(torch.randn(1, 4, 3).bfloat16())
    assert out.dtype == torch.float32
    assert torch.nn.functional.group_norm.__name__ == "group_norm"  # restored after the context


def test_factors_shrink_deeper_levels_but_not_the_first():
    plain = estimate_autoencoder(load_config(CONFIG, SMALL), mixed_precision=False, checkpointing=False)
    wide = estimate_autoencoder(load_config(CONFIG, [*SMALL, "autoencoder.downsample_factors=[4, 2]"]),
                                mixed_precision=False, checkpointing=False)
    assert plain.levels[0].resolution == wide.levels[0].resolution == (32, 32, 32)
    assert plain.levels[0].saved_bytes == wide.levels[0].saved_bytes
    assert wide.autoencoder_activations < plain.autoencoder_activations
    assert wide.levels[1].resolution == (8, 8, 8) and plain.levels[1].resolution == (16, 16, 16)


def test_budget_search_returns_fitting_buildable_configs():
    config = load_config(CONFIG, [*SMALL, "data.image_size=[64, 64, 32]"])
    everything = search_budget(config, 1e15, batch_sizes=(4, 2, 1))
    budget = sorted(with_margin(c.total) for c in everything)[len(everything) // 2]
    found = search_budget(config, budget, batch_sizes=(4, 2, 1))
    assert found and all(with_margin(c.total) <= budget for c in found) and len(found) < len(everything)
    assert with_margin(1e9) == pytest.approx(1e9 * (1 + FRAGMENTATION) + CUDA_RESERVED_BYTES)
    keys = [(c.compression, -c.batch_size, c.mixed_precision, c.checkpointing) for c in found]
    assert keys == sorted(keys)
    for c in found[:3]:
        with torch.device("meta"):
            AutoencoderKL(**{**config.autoencoder.model_kwargs(), **c.overrides()})


def test_cli_report_budget_and_errors(tmp_path, capsys):
    assert estimate_memory_main(["--config", str(CONFIG), "--input-size", "64", "64", "32", "--batch-size", "1"]) == 0
    out = capsys.readouterr().out
    assert "latent shape: [3, 16, 16, 8]" in out and "training step total" in out and "largest contributors" in out
    target = tmp_path / "fits.yaml"
    args = ["--config", str(CONFIG), *sum((["--set", s] for s in SMALL), []), "--budget", "2GB", "--output", str(target)]
    assert estimate_memory_main(args) == 0
    out = capsys.readouterr().out
    assert f"the whole-volume pipeline of {target}" in out and "sampling: decode" in out  # beside the step
    chosen = yaml.safe_load(target.read_text())
    assert load_config(target).autoencoder.training.batch_size == chosen["autoencoder"]["training"]["batch_size"]
    assert estimate_memory_main(args) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
    assert estimate_memory_main(["--config", str(CONFIG), "--budget", "lots"]) == 2
    assert "--budget 'lots': expected a size such as 24GB" in capsys.readouterr().err
    assert estimate_memory_main(["--config", str(CONFIG), "--budget", "1MB", "--output", str(tmp_path / "x.yaml")]) == 2
    assert "no searched configuration fits" in capsys.readouterr().err
    assert estimate_memory_main(["--config", str(CONFIG), "--input-size", "62", "64", "32"]) == 2


def test_parse_budget():
    assert parse_budget("24GB") == 24e9 and parse_budget("2 GiB") == 2 * 2**30 and parse_budget("500MB") == 5e8


def test_estimate_is_repeatable_with_discriminator_and_perceptual(tmp_path):
    config = load_config(CONFIG, [*SMALL, "autoencoder.training.use_perceptual_loss=true",
                                  f"autoencoder.perceptual.weights_path={tmp_path / 'w.pth'}"])
    first, second = estimate_autoencoder(config), estimate_autoencoder(config)
    assert first.total == second.total and first.discriminator_activations > 0 and first.perceptual_activations > 0


def test_live_bytes_counts_each_storage_from_creation_to_free():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for fake in (False, True):
        with FakeTensorMode() if fake else torch.no_grad():
            live = memory_module.LiveBytes()
            with live:
                a = torch.ones(1000)  # 4000 bytes
                view = a[10:]  # a view: nothing new
                b = a + 1  # 8000 alive
                del a  # the view keeps a's storage
                assert live.now == 8000
                del view  # now it is freed
                c = b * 2  # 8000 again
                with live.uncounted():
                    d = torch.empty(10_000)  # left out
                b.add_(d[:1000])  # in place: nothing new
                del b, c, d
            assert live.peak == 8000 and live.now == 0, fake


def test_inference_estimate_matches_the_same_count_on_real_tensors():
    """The fake-tensor count of a whole and a tiled encode equals the count of the same passes on real CPU
    tensors, and the profiler's measured peak (which adds the CPU kernels' scratch) is not below it."""
    from generative.networks.tiling import tiled_encode
    from monai_diffusion.profiling import measure_peak_bytes

    for tile in (None, "autoencoder.tile_size=[16, 16, 16]"):
        config = load_config(CONFIG, [*SMALL, "autoencoder.training.use_adversarial_loss=false"] + ([tile] if tile else []))
        estimate, _, how = memory_module.estimate_autoencoder_inference(config, "encode", buffers="device",
                                                                        target="cpu")
        model = AutoencoderKL(**config.autoencoder.model_kwargs()).eval()
        x = torch.rand(1, 1, 32, 32, 32)

        def run():
            with torch.no_grad():
                return tiled_encode(model, x, [16, 16, 16], buffers="device", progress=False) if tile else model.encode(x)

        live = memory_module.LiveBytes()
        with live:
            out = run()
            del out
        assert ("exact" in how) == bool(tile)
        assert live.peak == estimate - x.numel() * 4  # the estimate also counts the input volume
        assert measure_peak_bytes(run) >= live.peak


def test_inference_estimate_counts_every_volume_of_a_batch():
    """The exact method runs a batch volume by volume, but the batch's inputs and outputs are all on the
    device: one more volume adds its input and its two latent maps (mean and sigma), nothing else."""
    config = load_config(CONFIG, [*SMALL, "autoencoder.training.use_adversarial_loss=false",
                                  "autoencoder.tile_size=[16, 16, 16]"])
    one, _, _ = memory_module.estimate_autoencoder_inference(config, "encode", target="cpu")
    two, _, _ = memory_module.estimate_autoencoder_inference(config, "encode", target="cpu", batch=2)
    latent = 3 * 8 * 8 * 8 * 4  # latent_channels x 32^3 / 4^3, float32
    assert two - one == 32**3 * 4 + 2 * latent


def test_cuda_rules_run_softmax_exp_and_sum_in_float32():
    """CUDA autocast's float32 ops (torch's AT_FORALL_FP32 / FP32_SET_OPT_DTYPE) come out float32 under the
    ``cuda`` rules and stay bf16 under the ``cpu`` rules; an explicit dtype is kept."""
    x = torch.randn(2, 8).bfloat16()
    with memory_module._autocast(True, "cuda"):
        assert {x.softmax(-1).dtype, torch.exp(x).dtype, x.pow(2).dtype, x.sum().dtype} == {torch.float32}
        assert torch.nn.functional.layer_norm(x, (8,)).dtype == torch.float32
        assert x.sum(dtype=torch.bfloat16).dtype == torch.bfloat16 and (x + x).dtype == torch.bfloat16
    with memory_module._autocast(True, "cpu"):
        assert x.softmax(-1).dtype == torch.bfloat16


def test_unet_attention_runs_through_sdpa_with_the_math_path_outputs():
    """The UNet is built with SDPA attention: the same state-dict keys as MONAI's math attention and the same
    outputs to float32 rounding (relative to the output's scale)."""
    from monai.networks.nets import DiffusionModelUNet

    from monai_diffusion.runs.checkpoints import build_unet

    config = load_config(CONFIG, ["diffusion.num_channels=[16, 32]", "diffusion.attention_levels=[false, true]",
                                  "diffusion.num_head_channels=[0, 8]", "diffusion.norm_num_groups=8"])
    args = config.diffusion.unet_kwargs(3, 3)
    torch.manual_seed(0)
    math_unet = DiffusionModelUNet(**args).eval()
    sdpa = build_unet(args).eval()
    assert list(sdpa.state_dict()) == list(math_unet.state_dict())
    sdpa.load_state_dict(math_unet.state_dict(), strict=True)
    assert all(m.use_flash_attention for m in sdpa.modules() if hasattr(m, "use_flash_attention"))
    x, t = torch.randn(2, 3, 8, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        expected, got = math_unet(x, timesteps=t), sdpa(x, timesteps=t)
    # the two paths sum the same products in another order: a few float32 ulps of the output's scale
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_diffusion_estimate_keeps_no_attention_matrix_and_counts_ddp_buckets():
    config = load_config(CONFIG, ["data.image_size=[64, 64, 64]"])
    sdpa = memory_module.estimate_diffusion(config, mixed_precision=True)
    sdpa_cpu = memory_module.estimate_diffusion(config, mixed_precision=True, target="cpu")
    from monai_diffusion.runs import checkpoints as checkpoints

    original = checkpoints.build_unet
    try:  # the math path: the voxels x voxels attention matrix is kept, in float32 under CUDA rules
        from monai.networks.nets import DiffusionModelUNet

        checkpoints.build_unet = lambda args: DiffusionModelUNet(**args)
        math_cuda = memory_module.estimate_diffusion(config, mixed_precision=True)
        math_cpu = memory_module.estimate_diffusion(config, mixed_precision=True, target="cpu")
    finally:
        checkpoints.build_unet = original
    assert sdpa.activations < math_cuda.activations and sdpa_cpu.activations < math_cpu.activations
    # CUDA keeps the matrix's softmax (and the GroupNorms) in float32, CPU autocast in bf16
    assert math_cuda.activations - sdpa.activations > math_cpu.activations - sdpa_cpu.activations
    two = memory_module.estimate_diffusion(config, mixed_precision=True, world_size=2)
    assert two.ddp_buckets == sdpa.gradients and two.total == sdpa.total + sdpa.gradients
    ae = estimate_autoencoder(config, world_size=2)
    assert ae.ddp_buckets == ae.gradients and ae.total == estimate_autoencoder(config, world_size=1).total + ae.gradients


def test_margin_parts_add_up():
    assert memory_module.CUDA_RESERVED_BYTES == memory_module.WORKSPACE_BYTES + memory_module.CUDA_CONTEXT_BYTES
    assert "through it" in memory_module.margin_text() and "outside it" in memory_module.margin_text()


def test_budget_table_shows_each_factor_option_first_marks_the_written_row_and_counts_the_rest(tmp_path, capsys):
    base = ["--config", str(CONFIG), *sum((["--set", s] for s in SMALL), []), "--budget", "2GB", "--batch-size", "1"]
    assert estimate_memory_main([*base, "--output", str(tmp_path / "a.yaml")]) == 0
    out = capsys.readouterr().out
    fit = int(out.split(" configurations fit")[0].split()[-1])
    rows = [line for line in out.splitlines() if line[:2] in ("* ", "  ") and line[2:3] == "["]
    assert [row.split("]")[0].split("[")[1] for row in rows[:4]] == ["2, 2", "4, 2", "8, 2", "16"]  # best of each
    marked = [row for row in rows if row.startswith("*")]
    written = yaml.safe_load((tmp_path / "a.yaml").read_text())["autoencoder"]
    assert len(marked) == 1 and marked[0].startswith(f"* {written['downsample_factors']}")
    assert "wrote the row marked *" in out
    left = fit - 15
    assert len(rows) == 15 < fit and f"{left} more row{'s' if left > 1 else ''} left out; --all shows every one" in out
    assert estimate_memory_main([*base, "--output", str(tmp_path / "b.yaml"), "--all"]) == 0
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line[:2] in ("* ", "  ") and line[2:3] == "["]) == fit
    assert "left out" not in out
    assert estimate_memory_main(["--config", str(CONFIG), "--all"]) == 2
    assert "--all: only used with --budget" in capsys.readouterr().err
