"""Code paths that only a GPU or several processes take, rebuilt on the CPU: the ``meta`` device stands in
for a GPU (a tensor there cannot be mixed with CPU tensors, as a CUDA tensor cannot), two gloo processes
stand in for a multi-GPU run."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from monai_diffusion import runtime as runtime_module
from monai_diffusion.config import ConfigError, DataConfig, load_config
from monai_diffusion.data import build_datasets
from monai_diffusion.errors import RunError
from monai_diffusion.runtime import Precision, Runtime, capture_rng, choose_autocast_dtype, resolve_device
from monai_diffusion.training.loop import all_finite, build_loaders
from monai_diffusion.training.runner import restore_loop
from tests.helpers import CONFIG, free_port
from tests.helpers.fake_cuda import CUDA, META, fake_cuda, fake_gpu, run_in_fresh_process


# ----------------------------------------------------------------------------------------------------
# sampling: scheduler tables on the CPU, model and latents on another device
# ----------------------------------------------------------------------------------------------------
def _tiny_sampling_setup():
    from monai.networks.nets import DiffusionModelUNet

    from generative.networks.nets import AutoencoderKL

    config = load_config(CONFIG, ["data.image_size=[8, 8, 8]", "autoencoder.num_channels=[4, 4]",
                                  "autoencoder.attention_levels=[false, false]", "autoencoder.downsample_factors=[2]",
                                  "autoencoder.norm_num_groups=4", "autoencoder.training.use_adversarial_loss=false",
                                  "diffusion.num_channels=[4]", "diffusion.attention_levels=[false]",
                                  "diffusion.num_head_channels=[4]", "diffusion.norm_num_groups=4",
                                  "diffusion.scheduler.num_train_timesteps=20", "diffusion.sampling.num_inference_steps=4",
                                  "diffusion.training.preview_inference_steps=4"])
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(**config.autoencoder.model_kwargs()).eval()
    unet = DiffusionModelUNet(**config.diffusion.unet_kwargs(3, 3)).eval()
    return config, unet, autoencoder


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_sampling_runs_with_the_model_on_another_device_than_the_scheduler(kind):
    """The MONAI inferer path put timesteps on the model's device and then mixed them with CPU tensors
    (a crash on every GPU); generate_volumes keeps the scheduler on the CPU."""
    from monai.networks.schedulers import DDIMScheduler

    from monai_diffusion.generation.sampling import SamplingRequest, generate_volumes

    scheduler = DDIMScheduler(20)
    scheduler.set_timesteps(4, device="meta")  # what the old code did: it cannot work off the CPU
    with pytest.raises(RuntimeError):
        torch.cat((scheduler.timesteps[1:], torch.tensor([0])))
    config, unet, autoencoder = _tiny_sampling_setup()
    volumes = generate_volumes(unet.to("meta"), autoencoder.to("meta"), SamplingRequest(config, 1.0, 2, 3, kind,
                               torch.Generator().manual_seed(0)))
    assert volumes.device.type == "meta" and volumes.shape == (2, 1, 8, 8, 8)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_sampling_is_fixed_by_its_seed_not_by_the_global_rng(kind):
    from monai_diffusion.generation.sampling import SamplingRequest, generate_volumes

    config, unet, autoencoder = _tiny_sampling_setup()

    def sample(seed: int, global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)  # DDPM through MONAI's inferer drew its step noise from here
        return generate_volumes(unet, autoencoder, SamplingRequest(config, 1.0, 2, 3, kind, torch.Generator().manual_seed(seed)))

    first = sample(7, 1)
    torch.testing.assert_close(sample(7, 2), first, rtol=0, atol=0)
    assert not torch.allclose(sample(8, 1), first)


# ----------------------------------------------------------------------------------------------------
# resume: CPU loading, RNG state, grad scaler
# ----------------------------------------------------------------------------------------------------
def test_rng_state_is_plain_data_and_round_trips(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    saved = capture_rng()
    torch.save(saved, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)  # no pickled code needed
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    runtime_module.restore_rng(loaded)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_old_checkpoint_rng_format_still_restores():
    """Checkpoints written before 0.5 stored one dict with tuples and a NumPy array."""
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    saved = {"scaler": {}, "loop": {"epoch": 1, "batch_in_epoch": 0, "global_step": 2}, "rng": old}
    restore_loop(saved, Precision(False, torch.device("cpu")), Runtime(torch.device("cpu")), seed=0)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_empty_scaler_state_into_an_enabled_scaler():
    """Resuming a bf16/fp32 run with fp16: the checkpoint's scaler state is empty."""
    precision = Precision(True, torch.device("cpu"))
    precision.scaler = torch.amp.GradScaler("cpu", enabled=True)  # what an fp16 GPU run has
    with pytest.raises(RuntimeError):
        precision.scaler.load_state_dict({})  # what the old code did
    precision.load_scaler_state({})
    assert precision.scaler.get_scale() == 2.0**16


def test_resume_loads_checkpoints_onto_the_cpu(tmp_path, monkeypatch):
    """Whatever the training device, the checkpoint is read onto the CPU (RNG states must stay there)."""
    from monai_diffusion.runs import checkpoints as checkpoint_module
    from monai_diffusion.training import runner as run_module

    seen = {}
    real = checkpoint_module.load_checkpoint

    def spy(path, map_location="cpu"):
        seen["map_location"] = map_location
        return real(path, map_location)

    checkpoint_module.save_checkpoint({"stage": "autoencoder"}, tmp_path / "checkpoints" / "last.pt")
    monkeypatch.setattr(run_module, "load_checkpoint", spy)
    assert run_module.load_for_resume(tmp_path, "autoencoder")["stage"] == "autoencoder"
    assert seen["map_location"] == "cpu"


# ----------------------------------------------------------------------------------------------------
# device choice and precision
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("capability,expected", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                                 ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_bf16_only_on_gpus_with_native_bf16(capability, expected):
    assert choose_autocast_dtype("cuda", capability) == expected
    assert choose_autocast_dtype("cpu") == torch.bfloat16


def test_cuda_device_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_device("cuda", local_rank=2, world_size=4) == torch.device("cuda", 2)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)
    with pytest.raises(ConfigError, match="would put all 4 processes on GPU 1"):
        resolve_device("cuda:1", local_rank=0, world_size=4)
    with pytest.raises(ConfigError, match="only 4 GPU"):
        resolve_device("cuda:7")
    with pytest.raises(ConfigError, match="LOCAL_RANK=5"):
        resolve_device("cuda", local_rank=5, world_size=8)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU shown per process by the launcher
    assert resolve_device("cuda", local_rank=3, world_size=4) == torch.device("cuda", 0)


def test_all_finite_checks_every_tensor_at_once():
    tensors = [torch.ones(3), torch.ones(2, 2, dtype=torch.float64), torch.full((4,), 3e38)]
    assert all_finite(tensors)
    for bad in (float("inf"), float("nan")):
        broken = [t.clone() for t in tensors]
        broken[1][1, 0] = bad
        assert not all_finite(broken)
    assert all_finite([])


# ----------------------------------------------------------------------------------------------------
# data under DDP: cached shards, unpadded validation, pinned memory
# ----------------------------------------------------------------------------------------------------
def _scans(folder: Path, count: int) -> str:
    import nibabel as nib

    folder.mkdir()
    for index in range(count):
        nib.save(nib.Nifti1Image(np.random.default_rng(index).random((8, 8, 8), dtype=np.float32), np.eye(4)),
                 folder / f"scan{index}.nii.gz")
    return str(folder)


def test_cached_data_is_sharded_per_rank(tmp_path):
    cfg = DataConfig(source="nifti", paths=_scans(tmp_path / "scans", 11), image_size=(8, 8, 8), cache=True,
                     val_fraction=0.3)
    whole_train, whole_val = build_datasets(cfg, seed=0)
    shards = [build_datasets(cfg, seed=0, shard=(rank, 2)) for rank in range(2)]
    train_paths = [[item["path"] for item in train] for train, _ in shards]
    val_paths = [[item["path"] for item in val] for _, val in shards]
    assert len(train_paths[0]) == len(train_paths[1]) == -(-len(whole_train) // 2)  # padded to equal length
    assert set(train_paths[0]) | set(train_paths[1]) == {item["path"] for item in whole_train}
    assert sorted(val_paths[0] + val_paths[1]) == sorted(item["path"] for item in whole_val)  # each once


def test_validation_shards_are_not_padded_and_gpu_loaders_pin_memory():
    train = list(range(10))
    val = [{"image": torch.tensor([float(i)])} for i in range(5)]
    seen = []
    for rank in range(3):
        runtime = Runtime(torch.device("cpu"), rank=rank, world_size=3)
        _, val_loader, _ = build_loaders(train, val, 2, 0, 0, runtime)
        seen += [float(v) for batch in val_loader for v in batch["image"]]
    assert sorted(seen) == [0.0, 1.0, 2.0, 3.0, 4.0]  # every volume once: metrics do not depend on world size
    loaders = build_loaders(train, val, 2, 0, 0, Runtime(torch.device("cuda", 0)))
    assert loaders[0].pin_memory and loaders[1].pin_memory
    assert not build_loaders(train, val, 2, 0, 0, Runtime(torch.device("cpu")))[0].pin_memory


# ----------------------------------------------------------------------------------------------------
# two processes: per-rank RNG streams survive a resume; rank 0's refusal reaches every rank
# ----------------------------------------------------------------------------------------------------
def _draw() -> torch.Tensor:
    return torch.cat([torch.randn(4), torch.tensor([random.random(), float(np.random.rand())])])


def _worker(rank: int, world: int, port: int, folder: str, phase: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    runtime = Runtime(torch.device("cpu"), rank=rank, world_size=world)
    out = Path(folder)
    try:
        if phase == "run":
            runtime_module.seed_everything(100 + rank)
            _draw()  # some training happened before the checkpoint
            streams = runtime.all_gather(capture_rng())
            if runtime.is_main:
                torch.save({"rng": streams, "scaler": {}, "loop": {"global_step": 1}}, out / "ckpt.pt")
            torch.save(_draw(), out / f"uninterrupted_{rank}.pt")
        else:
            runtime_module.seed_everything(999)  # a fresh process, seeded as a new run would be
            saved = torch.load(out / "ckpt.pt", weights_only=True)
            restore_loop(saved, Precision(False, runtime.device), runtime, seed=0)
            torch.save(_draw(), out / f"resumed_{rank}.pt")

            def refuse() -> None:
                raise RunError("--resume: refused on rank 0")

            try:
                runtime.on_main(refuse, (RunError,))
            except RunError as err:
                (out / f"error_{rank}.txt").write_text(str(err))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_resume_restores_each_ranks_own_streams(tmp_path):
    for phase in ("run", "resume"):
        mp.spawn(_worker, args=(2, free_port(), str(tmp_path), phase), nprocs=2, join=True)
    resumed = [torch.load(tmp_path / f"resumed_{r}.pt") for r in range(2)]
    for rank in range(2):
        torch.testing.assert_close(resumed[rank], torch.load(tmp_path / f"uninterrupted_{rank}.pt"), rtol=0, atol=0)
    assert not torch.allclose(resumed[0], resumed[1])  # ranks draw different noise
    assert [(tmp_path / f"error_{r}.txt").read_text() for r in range(2)] == ["--resume: refused on rank 0"] * 2


# ----------------------------------------------------------------------------------------------------
# fake CUDA tensors (tests/_fake_cuda.py): the real training, resume, sampling and tiling code on "cuda"
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fp16", [False, True])
def test_optimiser_step_with_adam_state_on_two_devices(monkeypatch, fp16):
    """Adam keeps ``state["step"]`` on the CPU for CUDA parameters; the finiteness check of weights and
    optimiser state stacked one flag per device and crashed at every CUDA run's first optimiser step."""
    from monai_diffusion.training.loop import Optimization

    with fake_cuda(monkeypatch) as fake:
        layer = torch.nn.Linear(4, 4).to("cuda")
        optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3)
        precision = Precision(True, CUDA)
        if fp16:
            precision.dtype, precision.scaler = torch.float16, torch.amp.GradScaler("cuda", enabled=True)
        optimization = Optimization({"g": optimizer}, precision, 1, grad_clip_norm=1.0)
        for _ in range(2):  # the first step creates Adam's state, the second checks it
            for param in layer.parameters():  # (no autograd on CUDA in a CPU build of torch)
                param.grad = torch.randn(param.shape, device="cuda")
            precision.scaler.scale(torch.ones((), device="cuda"))  # what backward() does first
            optimization._pending.add("g")
            optimization.step()
        state = optimizer.state[layer.weight]
        assert state["step"].device.type == "cpu" and state["exp_avg"].device == CUDA
        # one host sync per optimiser step (all checks read at once); fp16 adds GradScaler's own, which
        # reads its overflow flags before stepping each optimiser
        assert fake.syncs == 2 * (2 if fp16 else 1)


@pytest.mark.parametrize("kind,guidance", [("ddim", 1.0), ("ddpm", 1.0), ("ddim", 3.0)])
def test_sampling_on_a_fake_gpu_under_autocast(monkeypatch, kind, guidance):
    """A few DDIM / DDPM steps (and classifier-free guidance) on the GPU: the CPU scheduler tables, the
    CPU generator's initial noise, the per-step noise and the conditions meet the GPU latents."""
    from monai.networks.nets import DiffusionModelUNet

    from generative.networks.nets import AutoencoderKL
    from monai_diffusion.generation.conditioning import Conditioning, Conditions
    from monai_diffusion.generation.sampling import SamplingRequest, generate_volumes

    config, _, _ = _tiny_sampling_setup()
    conditioning = Conditioning({"site": ["a", "b"]}, {}, 0.2) if guidance != 1.0 else Conditioning()
    with fake_gpu(monkeypatch):
        autoencoder = AutoencoderKL(**config.autoencoder.model_kwargs()).eval().to(META)
        unet = DiffusionModelUNet(**config.diffusion.unet_kwargs(3, 3), **conditioning.unet_kwargs()).eval().to(META)
        conditions = Conditions(torch.tensor([1, 2])) if conditioning.active else None
        volumes = generate_volumes(unet, autoencoder, SamplingRequest(config, 1.0, 2, 2, kind, torch.Generator().manual_seed(0),
                                   precision=Precision(True, CUDA), conditions=conditions, conditioning=conditioning,
                                   guidance_scale=guidance))
        assert volumes.device == META and volumes.shape == (2, 1, 8, 8, 8) and volumes.dtype == torch.float32


def _tiling_config():
    return load_config(CONFIG, ["data.image_size=[16, 16, 16]", "autoencoder.num_channels=[4, 4]",
                                "autoencoder.attention_levels=[false, false]", "autoencoder.downsample_factors=[2]",
                                "autoencoder.norm_num_groups=4", "autoencoder.discriminator.num_layers_d=2"])


@pytest.mark.parametrize("method,buffers", [("exact", "cpu"), ("exact", "device"), ("exact", "disk"), ("blend", "cpu")])
def test_tiled_encode_and_decode_on_a_fake_gpu(monkeypatch, method, buffers):
    """Tiled inference of a GPU autoencoder under autocast, with each kind of buffer (host, device, disk),
    through the public entry points."""
    from generative.networks.nets import AutoencoderKL
    from generative.networks.tiling import tiled_decode, tiled_encode

    config = _tiling_config()
    with fake_gpu(monkeypatch), torch.no_grad(), Precision(True, CUDA).autocast():
        model = AutoencoderKL(**config.autoencoder.model_kwargs()).eval().to(META)
        x = torch.rand(1, 1, 16, 16, 16).to(META)
        z_mu, z_sigma = tiled_encode(model, x, 8, method=method, buffers=buffers)
        assert z_mu.device == META and z_sigma.device == META and z_mu.shape == (1, 3, 8, 8, 8)
        out = tiled_decode(model, z_mu, 8, method=method, buffers=buffers)
        assert out.device == META and out.shape == (1, 1, 16, 16, 16)
        assert model.reconstruct(x, tile_size=8).device == META  # the network's own entry point


def _precision(monkeypatch, fp16: bool) -> Precision:
    """CUDA's mixed precision: bf16 on a Hopper GPU, fp16 with a GradScaler on a V100."""
    if fp16:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    precision = Precision(True, CUDA)
    assert precision.uses_scaler == fp16
    return precision


def _train_steps(task, precision, batch, steps: int = 2, accumulation: int = 2):
    """``steps`` optimiser steps of ``accumulation`` micro-batches each, with clipping, as fit() runs them."""
    from monai_diffusion.training.loop import Optimization

    optimization = Optimization(task.optimizers(), precision, accumulation, grad_clip_norm=1.0)
    for _ in range(steps):
        for _ in range(accumulation):
            logs = task.training_step(batch, 0, optimization)
            assert all(isinstance(v, torch.Tensor) for v in logs.values())  # no host sync per micro-batch
        optimization.step()
        task.after_optimizer_step()
    return optimization


@pytest.mark.parametrize("fp16", [False, True])
def test_autoencoder_training_step_on_a_fake_gpu(monkeypatch, tmp_path, fp16):
    """Generator and discriminator steps (adversarial and perceptual terms), accumulation, clipping, bf16
    autocast or fp16 loss scaling, on the GPU; one host sync per optimiser step (plus GradScaler's own)."""
    from monai_diffusion.training.autoencoder import AutoencoderTask
    from tests.helpers import tiny, write_medicalnet_file

    write_medicalnet_file(tmp_path / "r10.pth")
    config = load_config(CONFIG, [*tiny(), "autoencoder.training.use_perceptual_loss=true",
                                  f"autoencoder.perceptual.weights_path={tmp_path / 'r10.pth'}"])
    with fake_gpu(monkeypatch) as fake:
        precision = _precision(monkeypatch, fp16)
        task = AutoencoderTask(config, Runtime(META), precision)
        assert task.perceptual is not None and task.discriminator is not None
        optimization = _train_steps(task, precision, {"image": torch.rand(2, 1, 16, 16, 16)})
        assert optimization.step_index == 2 and next(task.autoencoder.parameters()).device == META
        for optimizer in task.optimizers().values():
            state = next(iter(optimizer.state.values()))
            assert state["exp_avg"].device == META and state["step"].device.type == "cpu"
        assert fake.syncs == 2 * (1 + (2 if fp16 else 0))  # two optimisers under fp16


@pytest.mark.slow
@pytest.mark.parametrize("fp16", [False, True])
def test_diffusion_training_step_with_ema_and_conditions_on_a_fake_gpu(fp16):
    """Run in a fresh process: the EMA's deep copy of fake parameters, freed later in another test's fake
    mode, crashed the process (a FakeTensorMode limitation, not the code under test)."""
    code = (f"import pytest; from tests.monai_diffusion.test_gpu_paths import _diffusion_step_on_a_fake_gpu as check; "
            f"check(pytest.MonkeyPatch(), {fp16})")
    run_in_fresh_process(code)


def _diffusion_step_on_a_fake_gpu(monkeypatch, fp16):
    """The UNet's step on cached CPU latents with CPU conditions (dropped for guidance), the EMA update,
    resume of the task's state; one host sync per optimiser step (plus GradScaler's own)."""
    from generative.networks.nets import AutoencoderKL
    from monai_diffusion.generation.conditioning import Conditioning
    from monai_diffusion.training.diffusion import DiffusionTask
    from tests.helpers import TINY_LDM

    config = load_config(CONFIG, [*TINY_LDM, "diffusion.training.ema_decay=0.9"])
    conditioning = Conditioning({"site": ["a", "b"]}, {"age": (50.0, 10.0)}, 0.5)
    batch = {"z_mu": torch.rand(2, 3, 4, 4, 4), "z_sigma": torch.rand(2, 3, 4, 4, 4),
             "class_labels": torch.tensor([1, 2]), "context": torch.rand(2, 1, 2)}
    # hashing the autoencoder's bytes reads values, which fake tensors have not: the one host read, replaced
    monkeypatch.setattr("monai_diffusion.training.diffusion.weights_fingerprint", lambda state: "fake weights")
    with fake_gpu(monkeypatch) as fake:
        precision = _precision(monkeypatch, fp16)
        autoencoder = AutoencoderKL(**config.autoencoder.model_kwargs()).to(META)
        task = DiffusionTask(config, Runtime(META), precision, autoencoder, 1.0, torch.eye(4), conditioning)
        _train_steps(task, precision, batch)
        assert fake.syncs == 2 * (2 if fp16 else 1)
        assert next(task.ema.module.parameters()).device == META
        # --resume: the state saved and restored on the GPU (Adam's moments there, its step on the CPU)
        state = task.state_dict()
        again = DiffusionTask(config, Runtime(META), precision, autoencoder, 1.0, torch.eye(4), conditioning)
        again.load_state_dict(state)
        moments = next(iter(again.optimizers()["unet"].state.values()))
        assert moments["exp_avg"].device == META and moments["step"].device.type == "cpu"
        with torch.no_grad():
            metrics = again.validation_step(batch)
        assert metrics["loss"].device == META


def test_latent_cache_encodes_on_a_fake_gpu_and_keeps_latents_on_the_host(monkeypatch):
    """The latent cache's encoder (encode_latents, which cached_latents runs) under autocast: batches from the
    pinned DataLoader move to the GPU (fake CUDA tensors), are encoded and come back as float32 host latents,
    with their label maps. (The tiled encode is covered by test_tiled_encode_and_decode_on_a_fake_gpu.)"""
    from generative.networks.nets import AutoencoderKL
    from monai_diffusion.generation.latents import encode_latents

    config = _tiling_config()
    volumes = [{"image": torch.rand(1, 16, 16, 16), "label": torch.randint(0, 3, (1, 16, 16, 16))} for _ in range(3)]
    labels: list[torch.Tensor] = []
    with fake_cuda(monkeypatch), Precision(True, CUDA).autocast():
        model = AutoencoderKL(**config.autoencoder.model_kwargs()).eval().to(CUDA)
        z_mu, z_sigma = encode_latents(model, volumes, [0, 2], 2, CUDA, "encode", labels=labels)
        assert z_mu.device.type == "cpu" and z_sigma.device.type == "cpu"
        assert z_mu.shape == (2, 3, 8, 8, 8) and z_mu.dtype == torch.float32 and z_sigma.dtype == torch.float32
        assert [label.dtype for label in labels] == [torch.int16, torch.int16]


@pytest.mark.parametrize("fp16", [False, True])
def test_measured_training_step_on_a_fake_gpu(monkeypatch, fp16):
    """The estimator's measured step (measure_training_step): the real autoencoder steps (generator and
    discriminator, Adam's state created by the first) under CUDA's mixed precision on the GPU (the meta device),
    counting the weights and Adam state that live there."""
    from generative.networks.nets import AutoencoderKL
    from monai_diffusion.training import measure as measure_module
    from tests.helpers import tiny

    config = load_config(CONFIG, [*tiny(), "autoencoder.training.mixed_precision=true"])
    model = AutoencoderKL(**config.autoencoder.model_kwargs())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    with fake_gpu(monkeypatch):
        precision = _precision(monkeypatch, fp16)
        monkeypatch.setattr(measure_module, "Precision", lambda enabled, device: precision)
        measured = measure_module.measure_training_step(config, META, repeats=1)
    assert measured.peak_bytes >= 3 * weights  # weights plus Adam's two moments, at least
    assert measured.seconds >= 0


@pytest.mark.slow
@pytest.mark.parametrize("fp16", [False, True])
def test_controlnet_training_step_with_labels_ema_and_conditions_on_a_fake_gpu(fp16):
    """Run in a fresh process, as the diffusion step's test (the EMA's deep copy of fake parameters)."""
    code = (f"import pytest; from tests.monai_diffusion.test_gpu_paths import _controlnet_step_on_a_fake_gpu as check; "
            f"check(pytest.MonkeyPatch(), {fp16})")
    run_in_fresh_process(code)


def _controlnet_step_on_a_fake_gpu(monkeypatch, fp16):
    """The ControlNet's step on the GPU: cached CPU latents, CPU label maps (one-hot encoded on the GPU) and CPU
    conditions (dropped for guidance), the frozen GPU UNet steered by it, the EMA update, resume of the task's
    state, validation and guided sampling with the label maps; one host sync per optimiser step (plus
    GradScaler's own)."""
    from generative.networks.nets import AutoencoderKL
    from monai_diffusion.generation.conditioning import Conditioning, Conditions
    from monai_diffusion.generation.controlnet import ControlledUNet, MaskControlNet
    from monai_diffusion.generation.sampling import SamplingRequest, generate_volumes
    from monai_diffusion.runs.checkpoints import DiffusionBundle, build_unet
    from monai_diffusion.training.controlnet import ControlNetTask
    from tests.helpers import TINY_LDM

    config = load_config(CONFIG, [*TINY_LDM, "data.num_classes=22", "controlnet.conditioning_channels=4",
                                  "controlnet.training.ema_decay=0.9"])
    conditioning = Conditioning({"site": ["a", "b"]}, {"age": (50.0, 10.0)}, 0.5)
    labels = torch.randint(0, 22, (2, 1, 16, 16, 16), dtype=torch.int16)  # as the latent cache keeps them
    batch = {"z_mu": torch.rand(2, 3, 4, 4, 4), "z_sigma": torch.rand(2, 3, 4, 4, 4),
             "class_labels": torch.tensor([1, 2]), "context": torch.rand(2, 1, 2), "label": labels}
    # hashing the autoencoder's bytes reads values, which fake tensors have not: the one host read, replaced
    monkeypatch.setattr("monai_diffusion.training.diffusion.weights_fingerprint", lambda state: "fake weights")
    # where the label maps are one-hot encoded (fake mode lets some no-grad convolutions mix CPU and meta inputs)
    encoded_on, one_hot = [], MaskControlNet.one_hot

    def spy(self, label, dtype):
        encoded_on.append(label.device)
        return one_hot(self, label, dtype)

    monkeypatch.setattr(MaskControlNet, "one_hot", spy)
    with fake_gpu(monkeypatch) as fake:
        precision = _precision(monkeypatch, fp16)
        autoencoder = AutoencoderKL(**config.autoencoder.model_kwargs()).to(META)
        unet_args = {**config.diffusion.unet_kwargs(3, 3), **conditioning.unet_kwargs()}
        bundle = DiffusionBundle(build_unet(unet_args).to(META).eval(), autoencoder, config, 1.0, torch.eye(4),
                                 conditioning)
        task = ControlNetTask(config, Runtime(META), precision, bundle, torch.eye(4))
        _train_steps(task, precision, batch)
        assert fake.syncs == 2 * (2 if fp16 else 1)
        for module in (task.controlnet, task.ema.module, task.unet):
            assert {p.device for p in module.parameters()} == {META}
        assert not any(p.requires_grad for p in task.unet.parameters())  # frozen
        # --resume: the state saved and restored on the GPU (Adam's moments there, its step on the CPU)
        state = task.state_dict()
        again = ControlNetTask(config, Runtime(META), precision, bundle, torch.eye(4))
        again.load_state_dict(state)
        moments = next(iter(again.optimizers()["controlnet"].state.values()))
        assert moments["exp_avg"].device == META and moments["step"].device.type == "cpu"
        with torch.no_grad():
            assert again.validation_step(batch)["loss"].device == META
            # guided sampling with the EMA ControlNet: the CPU label maps repeated for both halves on the GPU
            steered = ControlledUNet(again.unet, again.sampling_controlnet(), labels)
            volumes = generate_volumes(steered, autoencoder, SamplingRequest(
                config, 1.0, 2, 2, "ddim", torch.Generator().manual_seed(0), precision=precision,
                conditions=Conditions(torch.tensor([1, 2]), torch.rand(2, 1, 2)), conditioning=conditioning,
                guidance_scale=3.0))
        assert volumes.device == META and volumes.shape == (2, 1, 16, 16, 16)
    assert len(encoded_on) == 7 and set(encoded_on) == {META}  # 4 training, 1 validation, 2 sampling steps
