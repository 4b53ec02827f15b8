"""Public weights: ``ldm-import`` gives the reference networks' outputs, and the run folders it writes work with
every command (evaluation, conditioned sampling, fine-tuning with ``init_from``, resume, stage 2, the memory
estimate).

The reference checkpoints are built with random weights from the reference classes: MONAI Generative 0.2.3's
(``tests/fixtures/pretrained/brain_ldm.pth``, made by ``tests/make_pretrained_fixtures.py``, and the drop-in
fixtures of ``tests/fixtures/generative_0_2_3``) and MONAI 1.6's ``AutoencoderKlMaisi``. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from monai_diffusion.cli import import_weights_main
from monai_diffusion.generation.conditioning import Conditioning
from monai_diffusion.runs.checkpoints import load_autoencoder, load_diffusion

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BRAIN = FIXTURES / "pretrained" / "brain_ldm.pth"
TOLERANCE = 1e-4  # relative to the output's largest magnitude: fp32 against the float64 (or fp32) reference


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected.double()).abs().max() / expected.double().abs().max())


def _brain_files(folder: Path) -> tuple[dict, Path, Path]:
    """The fixture's weights saved as the bundle saves them (``models/autoencoder.pt``, ``models/model.pt``)."""
    ref = torch.load(BRAIN)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(ref["autoencoder"], folder / "autoencoder.pt")
    torch.save(ref["unet"], folder / "model.pt")
    return ref, folder / "autoencoder.pt", folder / "model.pt"


def import_brain(tmp_path: Path, *extra: str) -> tuple[dict, Path]:
    ref, ae, unet = _brain_files(tmp_path / "bundle" / "models")
    out = tmp_path / "brain"
    code = import_weights_main(["brain-ldm", "--autoencoder", str(ae), "--unet", str(unet), "--output", str(out),
                                "--autoencoder-args", json.dumps(ref["autoencoder_args"]),
                                "--unet-args", json.dumps(ref["unet_args"]), "--image-size", "16", "16", "16",
                                "--set", "autoencoder.discriminator.num_layers_d=1", *extra])
    assert code == 0
    return ref, out


def maisi_reference(channels: tuple[int, ...] = (8, 8, 16)) -> torch.nn.Module:
    """MONAI 1.6's AutoencoderKlMaisi with random weights (MAISI's structure at small widths)."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    torch.manual_seed(0)
    model = AutoencoderKlMaisi(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4,
                               num_channels=list(channels), num_res_blocks=[1] * len(channels), norm_num_groups=4,
                               norm_eps=1e-6, attention_levels=[False] * len(channels),
                               with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False,
                               use_checkpointing=False, use_convtranspose=False, norm_float16=False, num_splits=1,
                               dim_split=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# the same outputs as the reference classes
# ----------------------------------------------------------------------------------------------------
def test_brain_ldm_import_gives_the_bundle_outputs(tmp_path):
    ref, out = import_brain(tmp_path)
    bundle = load_diffusion(out / "diffusion")
    inputs, expected = ref["inputs"], ref["outputs"]
    with torch.no_grad():
        z_mu, z_sigma = bundle.autoencoder.encode(inputs["x"])
        decoded = bundle.autoencoder.decode(inputs["latent"])
        # the UNet concatenates the conditions to the latent itself, as the bundle's sampler does outside it
        eps = bundle.unet(inputs["latent"], timesteps=inputs["timesteps"], context=inputs["conditions"])
    for name, got in {"z_mu": z_mu, "z_sigma": z_sigma, "decoded": decoded, "eps": eps}.items():
        assert _relative(got, expected[name]) < TOLERANCE, name
    # the context is the four covariates as given: no normalisation, no presence flag
    assert bundle.conditioning.continuous == {n: (0.0, 1.0) for n in ("sex", "age", "ventricular_vol", "brain_vol")}
    context = bundle.conditioning.encode([{"sex": 1, "age": 0.5, "ventricular_vol": 0.2, "brain_vol": 0.4}]).context
    assert torch.equal(context, torch.tensor([[[1.0, 0.5, 0.2, 0.4]]]))
    assert bundle.scale_factor == 1.0 and bundle.config.diffusion.scheduler.beta_end == 0.0205
    assert (out / "datalist.csv").read_text().strip() == "image,sex,age,ventricular_vol,brain_vol"


def test_generative_pair_import_gives_0_2_3_outputs(tmp_path, caplog):
    """Any 0.2.3 AutoencoderKL/DiffusionModelUNet pair (2D, with self-attention: 0.2.3 never applied the attention's
    output projection, core does, so the import makes it the identity)."""
    ae_ref = torch.load(FIXTURES / "generative_0_2_3" / "autoencoderkl.pth")
    unet_ref = torch.load(FIXTURES / "generative_0_2_3" / "unet_ldm.pth")
    torch.save(ae_ref["state_dict"], tmp_path / "ae.pt")
    torch.save(unet_ref["state_dict"], tmp_path / "unet.pt")
    code = import_weights_main(["generative", "--autoencoder", str(tmp_path / "ae.pt"), "--unet", str(tmp_path / "unet.pt"),
                                "--autoencoder-args", json.dumps(ae_ref["kwargs"]), "--unet-args",
                                json.dumps(unet_ref["kwargs"]), "--scale-factor", "0.5", "--image-size", "16", "16", "1",
                                "--output", str(tmp_path / "run"), "--set", "autoencoder.discriminator.num_layers_d=1"])
    assert code == 0
    bundle = load_diffusion(tmp_path / "run" / "diffusion")
    with torch.no_grad():
        z_mu, z_sigma = bundle.autoencoder.encode(ae_ref["inputs"]["x"])
        decoded = bundle.autoencoder.decode(z_mu)
        out = bundle.unet(unet_ref["inputs"]["x"], timesteps=unet_ref["inputs"]["timesteps"])
    got = {"z_mu": z_mu, "z_sigma": z_sigma, "decoded": decoded}
    for name, expected in ae_ref["outputs"].items():
        assert _relative(got[name], expected) < TOLERANCE, name
    assert _relative(out, unet_ref["outputs"]["out"]) < TOLERANCE
    assert bundle.scale_factor == 0.5 and not bundle.conditioning.active
    # its config describes the UNet (diffusion.init_from accepts it); one it cannot describe is named at import
    from monai_diffusion.memory.estimates import config_unet_args
    from monai_diffusion.pretrained.importer import _warn_unless_tunable
    from monai_diffusion.pretrained.unet import unet_differences

    saved = torch.load(tmp_path / "run" / "diffusion" / "checkpoints" / "last.pt", weights_only=True)["unet_args"]
    assert saved["num_head_channels"] == 8 and unet_differences(saved, config_unet_args(bundle.config)) == []
    with caplog.at_level("WARNING", logger="monai_diffusion"):
        _warn_unless_tunable({**saved, "transformer_num_layers": 2}, config_unet_args(bundle.config))
    assert "transformer_num_layers: 2 -> 1" in caplog.text and "diffusion.init_from will refuse" in caplog.text


def test_maisi_import_gives_autoencoderklmaisi_outputs(tmp_path):
    reference = maisi_reference()
    torch.save(reference.state_dict(), tmp_path / "autoencoder_v1.pt")
    code = import_weights_main(["maisi", "--autoencoder", str(tmp_path / "autoencoder_v1.pt"), "--output",
                                str(tmp_path / "maisi"), "--autoencoder-args",
                                "{num_channels: [8, 8, 16], num_res_blocks: [1, 1, 1], norm_num_groups: 4}",
                                "--image-size", "16", "16", "16", "--set", "autoencoder.discriminator.num_layers_d=1"])
    assert code == 0
    model, config = load_autoencoder(tmp_path / "maisi" / "autoencoder")
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    z = torch.randn(1, 4, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_mu, ref_sigma = reference.encode(x)
        mu, sigma = model.encode(x)
        ref_decoded, decoded = reference.decode(z), model.decode(z)
    assert _relative(mu, ref_mu) < TOLERANCE and _relative(sigma, ref_sigma) < TOLERANCE
    assert _relative(decoded, ref_decoded) < TOLERANCE
    assert config.data.intensity_window == (-1000.0, 1000.0)


# ----------------------------------------------------------------------------------------------------
# pieces
# ----------------------------------------------------------------------------------------------------
def test_conditioning_without_flag_round_trips():
    plain = Conditioning({}, {"a": (0.0, 1.0), "b": (2.0, 4.0)}, 0.0, flag=False)
    again = Conditioning.from_state(plain.state_dict())
    assert again == plain and again.context_dim == 2 and again.unet_kwargs()["cross_attention_dim"] == 2
    assert again.encode([{"a": 3, "b": 6}]).context.tolist() == [[[3.0, 1.0]]]
    old = plain.state_dict()
    del old["flag"]  # checkpoints written before the flag was stored had one
    assert Conditioning.from_state(old).context_dim == 3


def test_scale_factor_of_the_means():
    from monai_diffusion.generation.latents import LatentDataset, compute_scale_factor
    from monai_diffusion.runtime import Runtime

    mu = torch.randn(8, 2, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 3
    data = LatentDataset(mu, torch.full_like(mu, 5.0))
    runtime = Runtime(torch.device("cpu"))
    mean = compute_scale_factor(data, 4, 2, runtime, 0, mean=True)
    drawn = compute_scale_factor(data, 4, 2, runtime, 0)
    assert mean == pytest.approx(1 / float(mu.double().std()), rel=1e-3)
    assert drawn < mean / 1.3  # sigma 5 widens the drawn latents


def test_init_from_refuses_another_architecture(tmp_path):
    from generative.networks.nets import AutoencoderKL
    from monai_diffusion.errors import RunError
    from monai_diffusion.pretrained.init_from import autoencoder_start

    _, out = import_brain(tmp_path)
    same = AutoencoderKL(**load_autoencoder(out / "autoencoder")[0].init_args)
    autoencoder_start(same, out / "autoencoder")
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(),
                                                 load_autoencoder(out / "autoencoder")[0].state_dict().values()))
    other = AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, num_channels=(8, 8, 8), latent_channels=3,
                          num_res_blocks=1, norm_num_groups=4, attention_levels=(False, False, False))
    with pytest.raises(RunError, match=r"autoencoder\.init_from: .* another architecture .*num_channels: \[4, 8, 8\] "
                                       r"-> \[8, 8, 8\]"):
        autoencoder_start(other, out / "autoencoder")


# ----------------------------------------------------------------------------------------------------
# through the command lines
# ----------------------------------------------------------------------------------------------------
FINE_TUNE = ["autoencoder.training.n_epochs=1", "autoencoder.training.batch_size=1", "autoencoder.training.val_interval=1",
             "autoencoder.training.adversarial_warmup_epochs=0", "autoencoder.discriminator.num_channels=4",
             "autoencoder.training.learning_rate=2e-5", "autoencoder.training.warmup_steps=1"]


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.mark.slow
def test_brain_ldm_through_the_commands(tmp_path):
    """import -> evaluate_autoencoder.py -> sample.py --condition -> one epoch of fine-tuning -> --resume."""
    import subprocess
    import sys

    from monai_diffusion.cli import estimate_memory_main, evaluate_autoencoder_main, sample_main, train_autoencoder_main
    from tests.helpers import SCRIPTS, write_scans

    ref, ae, unet = _brain_files(tmp_path / "bundle" / "models")
    out = tmp_path / "brain"
    done = subprocess.run([sys.executable, str(SCRIPTS / "import_weights.py"), "brain-ldm", "--autoencoder", str(ae),
                           "--unet", str(unet), "--output", str(out), "--autoencoder-args",
                           json.dumps(ref["autoencoder_args"]), "--unet-args", json.dumps(ref["unet_args"]),
                           "--image-size", "16", "16", "16", "--set", "autoencoder.discriminator.num_layers_d=1"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    scans = write_scans(tmp_path / "scans", (16, 16, 16), (1.0, 1.0, 1.0), count=3)
    assert evaluate_autoencoder_main(["--run", str(out / "autoencoder"), "--data", str(scans), "--output",
                                      str(tmp_path / "eval"), "--no-nifti"]) == 0
    assert (tmp_path / "eval" / "metrics.csv").is_file()
    config = out / "diffusion" / "config.yaml"
    assert sample_main(["--config", str(config), "--output", str(tmp_path / "samples"), "--steps", "2",
                        "--condition", "sex=1", "age=0.2,0.9", "ventricular_vol=0.3", "brain_vol=0.5"]) == 0
    written = json.loads((tmp_path / "samples" / "sample_001.json").read_text())
    assert written["conditions"]["age"] == 0.9 and len(list((tmp_path / "samples").glob("sample_*.nii.gz"))) == 2
    assert estimate_memory_main(["--config", str(config), "--pipeline"]) == 0
    tune = ["--config", str(config), *_sets(f"output_dir={tmp_path / 'tuned'}", f"autoencoder.init_from={out / 'autoencoder'}",
                                            f"data.paths={scans}", *FINE_TUNE)]
    assert train_autoencoder_main(tune) == 0
    tuned = torch.load(tmp_path / "tuned" / "autoencoder" / "checkpoints" / "last.pt", weights_only=True)
    start = load_autoencoder(out / "autoencoder")[0].state_dict()
    moved = max(float((tuned["autoencoder"][k] - v).abs().max()) for k, v in start.items())
    assert 0 < moved < 0.05  # started from the imported weights, a few small steps away
    assert train_autoencoder_main(tune + _sets("autoencoder.training.n_epochs=2") + ["--resume"]) == 0
    # the imported folder itself is weights, not a run to continue
    assert train_autoencoder_main(["--config", str(config), *_sets(f"data.paths={scans}", *FINE_TUNE), "--resume"]) == 2


@pytest.mark.slow
def test_stage2_on_imported_maisi_autoencoder(tmp_path, capsys):
    """The diffusion stage on phantoms with a frozen imported MAISI autoencoder (posterior means cached), then
    fine-tuned from that run with diffusion.init_from, resumed; the memory estimate reads the imported config."""
    from monai_diffusion.cli import estimate_memory_main, evaluate_autoencoder_main, sample_main, train_diffusion_main

    torch.save(maisi_reference().state_dict(), tmp_path / "autoencoder_v1.pt")
    out = tmp_path / "maisi"
    assert import_weights_main(["maisi", "--autoencoder", str(tmp_path / "autoencoder_v1.pt"), "--output", str(out),
                                "--autoencoder-args", "{num_channels: [8, 8, 16], num_res_blocks: [1, 1, 1], "
                                "norm_num_groups: 4}", "--image-size", "16", "16", "16",
                                "--set", "autoencoder.discriminator.num_layers_d=1", "--set", "data.num_val=2"]) == 0
    assert evaluate_autoencoder_main(["--run", str(out / "autoencoder"), "--output", str(tmp_path / "eval"),
                                      "--no-nifti"]) == 0
    config = out / "autoencoder" / "config.yaml"
    assert estimate_memory_main(["--config", str(config), "--pipeline"]) == 0
    assert "latent" in capsys.readouterr().out
    stage2 = _sets("data.num_train=4", "data.intensity_window=null", "diffusion.num_channels=[8, 8]",
                   "diffusion.attention_levels=[false, true]", "diffusion.num_head_channels=[0, 8]",
                   "diffusion.norm_num_groups=4", "diffusion.scheduler.num_train_timesteps=50",
                   "diffusion.training.batch_size=2", "diffusion.training.n_epochs=1",
                   "diffusion.training.val_interval=1", "diffusion.training.preview_inference_steps=2",
                   "diffusion.sampling.num_inference_steps=2", "diffusion.training.latent_sample=mean",
                   f"diffusion.autoencoder_run={out / 'autoencoder'}")
    first = ["--config", str(config), *stage2, "--set", f"output_dir={tmp_path / 'ldm'}"]
    assert train_diffusion_main(first) == 0
    run = tmp_path / "ldm" / "diffusion"
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert saved["autoencoder_args"]["upsample_mode"] == "trilinear"
    assert sample_main(["--config", str(config), *stage2, "--set", f"output_dir={tmp_path / 'ldm'}",
                        "--output", str(tmp_path / "samples")]) == 0
    tuned = ["--config", str(config), *stage2, "--set", f"output_dir={tmp_path / 'tuned'}",
             "--set", f"diffusion.init_from={run}"]
    assert train_diffusion_main(tuned) == 0
    again = torch.load(tmp_path / "tuned" / "diffusion" / "checkpoints" / "last.pt", weights_only=True)
    assert again["scale_factor"] == saved["scale_factor"]  # the source run's, not re-estimated
    assert train_diffusion_main(tuned + ["--set", "diffusion.training.n_epochs=2", "--resume"]) == 0
    wrong = ["--config", str(config), *stage2, "--set", f"output_dir={tmp_path / 'wrong'}",
             "--set", f"diffusion.init_from={run}", "--set", "diffusion.num_channels=[16, 16]",
             "--set", "diffusion.num_head_channels=[0, 16]"]
    assert train_diffusion_main(wrong) == 2
    assert "diffusion.init_from" in capsys.readouterr().err


def test_concat_condition_unet_needs_its_context():
    from monai_diffusion.pretrained.unet import ConcatConditionUNet, build_unet

    args = dict(spatial_dims=2, in_channels=3, out_channels=1, channels=[8], attention_levels=[True],
                num_head_channels=[8], norm_num_groups=4, num_res_blocks=1, with_conditioning=True,
                cross_attention_dim=2, concat_conditions=2)
    unet = build_unet(args)
    assert isinstance(unet, ConcatConditionUNet)
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([3])
    assert unet(x, t, context=torch.rand(1, 1, 2)).shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="a context is required"):
        unet(x, t)
    with pytest.raises(ValueError, match=r"concat_conditions must be in \[1, in_channels\)"):
        build_unet({**args, "concat_conditions": 3})


BRAIN_COVARIATES = ("sex", "age", "ventricular_vol", "brain_vol")
UNET_FINE_TUNE = ["diffusion.training.n_epochs=1", "diffusion.training.batch_size=2", "diffusion.training.val_interval=1",
                  "diffusion.training.preview_inference_steps=2", "diffusion.sampling.num_inference_steps=2",
                  "diffusion.training.learning_rate=1e-4", "diffusion.training.warmup_steps=1",
                  "diffusion.training.ema_decay=0.9"]


@pytest.mark.slow
def test_brain_ldm_unet_fine_tuning_through_the_commands(tmp_path, capsys):
    """The imported config as it is (its datalist template filled in) fine-tunes the brain UNet with
    diffusion.init_from: the imported weights and scale factor, the covariates as given (no normalisation, no
    flag, also read as input channels) -> --resume -> sample.py from the fine-tuned run."""
    from monai_diffusion.cli import sample_main, train_diffusion_main
    from tests.helpers import write_scans

    _, out = import_brain(tmp_path)
    scans = write_scans(tmp_path / "scans", (16, 16, 16), (1.0, 1.0, 1.0), count=5)
    rows = [f"{scans / f'case{i}.nii.gz'},{i % 2},{0.2 + 0.1 * i},{0.3 + 0.05 * i},{0.6 - 0.05 * i}" for i in range(5)]
    with open(out / "datalist.csv", "a", encoding="utf-8") as handle:  # the header-only template the import wrote
        handle.write("\n".join(rows) + "\n")
    config = out / "diffusion" / "config.yaml"
    tune = ["--config", str(config), *_sets(f"output_dir={tmp_path / 'tuned'}", f"diffusion.init_from={out / 'diffusion'}",
                                            *UNET_FINE_TUNE)]
    assert train_diffusion_main(tune) == 0
    run = tmp_path / "tuned" / "diffusion"
    tuned = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    imported = torch.load(out / "diffusion" / "checkpoints" / "last.pt", weights_only=True)
    args = tuned["unet_args"]
    assert args["resblock_updown"] and args["upcast_attention"] and args["concat_conditions"] == 4
    assert args["in_channels"] == 7 and args["cross_attention_dim"] == 4
    assert tuned["scale_factor"] == imported["scale_factor"] == 1.0  # the source's, not re-estimated
    assert tuned["conditioning"]["continuous"] == {n: [0.0, 1.0] for n in BRAIN_COVARIATES}
    assert not tuned["conditioning"]["flag"]
    assert tuned["unet"].keys() == imported["unet"].keys()
    moved = max(float((tuned["unet"][k] - v).abs().max()) for k, v in imported["unet"].items())
    assert 0 < moved < 0.01  # started from the imported weights (a fresh UNet differs by O(1)), a few steps away
    ema = {k.removeprefix("module."): v for k, v in tuned["ema"].items() if k.startswith("module.")}
    assert 0 < max(float((ema[k] - v).abs().max()) for k, v in imported["unet"].items()) < 0.01  # the EMA copy too
    assert train_diffusion_main(tune + _sets("diffusion.training.n_epochs=2") + ["--resume"]) == 0
    resumed = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    further = max(float((resumed["unet"][k] - v).abs().max()) for k, v in tuned["unet"].items())
    assert 0 < further < 0.01 and resumed["scale_factor"] == 1.0
    samples = tmp_path / "samples"
    assert sample_main(["--config", str(config), *_sets(f"output_dir={tmp_path / 'tuned'}"), "--output", str(samples),
                        "--steps", "2", "--condition", "sex=0", "age=0.7", "ventricular_vol=0.4", "brain_vol=0.5"]) == 0
    assert len(list(samples.glob("sample_*.nii.gz"))) == 1
    # a config that does not describe the weights: one line, exit code 2
    capsys.readouterr()
    wrong = tune[:2] + _sets(f"output_dir={tmp_path / 'wrong'}", f"diffusion.init_from={out / 'diffusion'}",
                             *UNET_FINE_TUNE, "diffusion.resblock_updown=false")
    assert train_diffusion_main(wrong) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "diffusion.init_from" in error and "resblock_updown: True -> False" in error
    # the covariates in another order: the same shapes, but each value would reach the UNet as another covariate
    reordered = tune[:2] + _sets(f"output_dir={tmp_path / 'reordered'}", f"diffusion.init_from={out / 'diffusion'}",
                                 *UNET_FINE_TUNE, "diffusion.conditioning.continuous=[age, sex, ventricular_vol, brain_vol]")
    assert train_diffusion_main(reordered) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "continuous ['sex', 'age', 'ventricular_vol', 'brain_vol'] as given, without a presence flag" in error
    assert "gives (continuous ['age', 'sex'" in error and "by position" in error
    # standardised covariates: the same names and shapes, but not the values the UNet learned
    scaled = tune[:2] + _sets(f"output_dir={tmp_path / 'scaled'}", f"diffusion.init_from={out / 'diffusion'}",
                              *UNET_FINE_TUNE, "diffusion.conditioning.standardize=true")
    assert train_diffusion_main(scaled) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "gives (continuous ['sex', 'age', 'ventricular_vol', 'brain_vol'] standardised, without" in error


def test_unet_keys_at_their_defaults_leave_old_unet_args_unchanged():
    """A 0.4.0 run's stored UNet arguments are what its config gives now (the new keys at their defaults add
    nothing), so --resume and diffusion.init_from accept it; an argument one side leaves out is its default."""
    from types import SimpleNamespace

    from monai_diffusion.config import load_config
    from monai_diffusion.errors import RunError
    from monai_diffusion.pretrained.unet import unet_differences
    from monai_diffusion.runs.checkpoints import load_checkpoint
    from monai_diffusion.training.diffusion import DiffusionStage
    from tests.helpers import OLD

    path = OLD / "diffusion" / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    config = load_config(OLD / "diffusion" / "config.yaml", stage="diffusion")
    args = config.diffusion.unet_kwargs(config.autoencoder.latent_channels, config.autoencoder.spatial_dims)
    assert args == state["unet_args"]
    DiffusionStage().check_resume(state, SimpleNamespace(unet_args=args), config, path)
    assert unet_differences(state["unet_args"], args) == []
    changed = {**args, "resblock_updown": True}
    assert unet_differences(state["unet_args"], changed) == ["resblock_updown: False -> True"]
    # one value for every level is that value per level; the attention kernel is no architecture
    same = {**args, "num_head_channels": [8, 8], "num_res_blocks": [1, 1], "use_flash_attention": True}
    assert unet_differences({**args, "num_head_channels": 8}, same) == []
    assert unet_differences(args, {**args, "num_res_blocks": [1, 2]}) == ["num_res_blocks: 1 -> [1, 2]"]
    with pytest.raises(RunError, match=r"--resume: the config changes the UNet architecture \(resblock_updown: "
                                       r"False -> True\)"):
        DiffusionStage().check_resume(state, SimpleNamespace(unet_args=changed), config, path)


def test_imported_brain_config_describes_its_unet(tmp_path):
    """The imported config's UNet keys and conditioning give the imported UNet: the same arguments (up to
    defaults), the same network for the memory estimate, the covariates as given without a flag."""
    from monai_diffusion.config import load_config
    from monai_diffusion.memory.estimates import config_unet_args, context_of
    from monai_diffusion.pretrained.unet import ConcatConditionUNet, build_unet, unet_differences

    _, out = import_brain(tmp_path)
    config = load_config(out / "diffusion" / "config.yaml", stage="diffusion")
    df = config.diffusion
    assert df.resblock_updown and df.upcast_attention
    assert df.conditioning.concat and not df.conditioning.standardize and not df.conditioning.presence_flag
    assert config.autoencoder_source == out / "autoencoder"
    bundle = load_diffusion(out / "diffusion")
    imported = torch.load(out / "diffusion" / "checkpoints" / "last.pt", weights_only=True)["unet_args"]
    args = config_unet_args(config)
    assert unet_differences(imported, args) == []
    fitted = Conditioning.fit([], df.conditioning.continuous, df.conditioning.dropout,
                              [{"sex": 1, "age": 0.5, "ventricular_vol": 0.2, "brain_vol": 0.4},
                               {"sex": 0, "age": 0.9, "ventricular_vol": 0.3, "brain_vol": 0.6}],
                              df.conditioning.standardize, df.conditioning.presence_flag)
    assert fitted == bundle.conditioning  # what the fine-tuning stage fits on a datalist: the import's
    unet = build_unet(args)
    assert isinstance(unet, ConcatConditionUNet)
    unet.load_state_dict(bundle.unet.state_dict(), strict=True)  # the estimator's network is the imported one
    assert context_of(config, 2)["context"].shape == (2, 1, 4)
