"""Where the exact tiling keeps its activations, on a (fake) GPU: each buffer kind with CUDA tensors
(``FakeTensorMode``: CUDA tensors without a GPU, and an error on any op that mixes devices), the automatic
choice by free device memory, buffers that follow autocast, and the allocation hook."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from generative.inferers.tiling import TilingInferer
from generative.inferers.tiling import buffers as buffers_module
from generative.inferers.tiling.buffers import USABLE_FRACTION, WHOLE_VOLUME_FACTOR, BufferRequest
from generative.inferers.tiling.exact import buffer_peak
from generative.networks.nets import AutoencoderKL

ARGS = dict(spatial_dims=3, num_channels=(4, 8), attention_levels=(False, True), norm_num_groups=4,
            num_res_blocks=1, with_decoder_nonlocal_attn=True, latent_channels=3)


def _cuda_model(**extra) -> AutoencoderKL:
    """The network with its weights as fake CUDA tensors (call inside FakeTensorMode)."""
    model = AutoencoderKL(**ARGS, **extra).eval()
    model.load_state_dict({k: torch.empty(v.shape, dtype=v.dtype, device="cuda")
                           for k, v in model.state_dict().items()}, assign=True)
    return model


class _Spy:
    """Records every copy the transfers make: (destination device, source device, non_blocking, contiguous
    host side), and every buffer request."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.copies: list[tuple[str, str, bool, bool]] = []
        self.requests: list[BufferRequest] = []
        original = buffers_module.copy

        def copy(destination: torch.Tensor, source: torch.Tensor, non_blocking: bool = False) -> None:
            host = destination if destination.device.type == "cpu" else source
            self.copies.append((destination.device.type, source.device.type, non_blocking, host.is_contiguous()))
            original(destination, source, non_blocking)

        monkeypatch.setattr(buffers_module, "copy", copy)

    def allocate(self, request: BufferRequest) -> torch.Tensor:
        self.requests.append(request)
        return request.allocate()

    def crossing(self) -> list[tuple[str, str, bool, bool]]:
        return [c for c in self.copies if c[0] != c[1]]


@pytest.mark.parametrize("kind", ["device", "cpu", "disk"])
def test_each_buffer_kind_runs_with_cuda_tensors(kind, monkeypatch):
    """Encode and decode on fake CUDA tensors: no op mixes devices. Device buffers never leave the GPU; host
    and disk buffers are reached only through contiguous staging with asynchronous copies."""
    spy = _Spy(monkeypatch)
    with FakeTensorMode(), torch.no_grad():
        model = _cuda_model()
        x = torch.empty(2, 1, 8, 8, 4, device="cuda")
        report: dict = {}
        inferer = TilingInferer(4, buffers=kind, allocator=spy.allocate)
        z_mu, z_sigma = inferer.encode(model, x, report)
        y = inferer.decode(model, z_mu, report)
    assert report["method"] == "exact" and report["buffers"] == kind
    assert z_mu.device.type == z_sigma.device.type == y.device.type == "cuda"
    assert tuple(y.shape) == (2, 1, 8, 8, 4)
    assert spy.requests and {r.where for r in spy.requests} == {kind}
    if kind == "device":
        assert spy.crossing() == []
    else:
        crossing = spy.crossing()
        down = [c for c in crossing if c[0] == "cpu"]
        up = [c for c in crossing if c[0] == "cuda"]
        assert down and up  # blocks went to the host buffers and came back
        assert all(non_blocking and contiguous for _, _, non_blocking, contiguous in crossing)


def test_buffer_peak_is_predicted_without_running():
    """The automatic choice sizes the buffers from the plan; the prediction is what the streamer holds."""
    model = AutoencoderKL(**ARGS).eval()
    plan = model.tiling_plan()
    x = torch.rand(1, 1, 16, 16, 8)
    report: dict = {}
    with torch.no_grad():
        z = TilingInferer(8, buffers="cpu").encode(model, x, report)[0]
        encode_peak = report.pop("buffer_peak_bytes")
        TilingInferer(8, buffers="cpu").decode(model, z, report)
    assert buffer_peak(plan.encoder, 1, (16, 16, 8), 4, last_into_output=False) == encode_peak
    assert buffer_peak(plan.decoder, 3, tuple(z.shape[2:]), 4, last_into_output=True) == report["buffer_peak_bytes"]


@pytest.mark.parametrize("margin,expected", [("whole", "whole"), ("device", "device"), ("below", "cpu")])
def test_automatic_choice_follows_the_free_device_memory(margin, expected, monkeypatch):
    """Whole-volume inference when it fits the free memory, else device buffers when they fit, else pinned
    host buffers (torch.cuda.mem_get_info stands behind one function, replaced here)."""
    model = AutoencoderKL(**ARGS).eval()
    shape = (1, 3, 4, 4, 2)
    peak = buffer_peak(model.tiling_plan().decoder, 3, shape[2:], 4, last_into_output=True)
    io = (3 * 4 * 4 * 2 + 8 * 8 * 4) * 4  # the latent in, the image out (total factor 2)
    free = {"whole": (WHOLE_VOLUME_FACTOR * peak + io) / USABLE_FRACTION + 1,
            "device": (peak + io) / USABLE_FRACTION + 1, "below": (peak + io) / USABLE_FRACTION - 1}[margin]
    asked: list[torch.device] = []
    monkeypatch.setattr(buffers_module, "free_device_bytes", lambda device: asked.append(device) or int(free))
    with FakeTensorMode(), torch.no_grad():
        cuda_model = _cuda_model()
        report: dict = {}
        y = TilingInferer(8).decode(cuda_model, torch.empty(shape, device="cuda"), report)
    assert asked and asked[0].type == "cuda"
    assert report.get("buffers") == expected
    assert report["method"] == ("whole" if expected == "whole" else "exact")
    assert y.device.type == "cuda" and tuple(y.shape) == (1, 1, 8, 8, 4)


def test_automatic_choice_off_a_gpu_is_host_buffers():
    report: dict = {}
    with torch.no_grad():
        TilingInferer(8).decode(AutoencoderKL(**ARGS).eval(), torch.rand(1, 3, 4, 4, 2), report)
    assert report["buffers"] == "cpu" and report["method"] == "exact"


def test_buffers_follow_the_autocast_dtype():
    """Under autocast the convolutions return bfloat16, and the buffers keep that (half the bytes of float32);
    the result stays close to whole-volume inference under the same autocast."""
    torch.manual_seed(0)
    model = AutoencoderKL(**ARGS).eval()
    requests: list[BufferRequest] = []

    def allocate(request: BufferRequest) -> torch.Tensor:
        requests.append(request)
        return request.allocate()

    z = torch.randn(1, 3, 4, 4, 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        tiled = TilingInferer(8, buffers="cpu", allocator=allocate).decode(model, z)
        whole = model.decode(z)
    assert requests and {r.dtype for r in requests} == {torch.bfloat16}
    assert tiled.dtype == z.dtype
    # bfloat16 keeps 8 bits of mantissa: a few roundings of 2^-8 relative to the output's scale
    scale = float(whole.float().abs().max())
    torch.testing.assert_close(tiled.float(), whole.float(), atol=0.05 * scale, rtol=0)


def test_unknown_buffer_kind_is_refused():
    with pytest.raises(ValueError, match=r"buffers = 'gpu': expected one of 'auto', 'device', 'cpu', 'disk'"):
        TilingInferer(8, buffers="gpu")
