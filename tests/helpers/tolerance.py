"""Tolerances for comparing a network's fp32 output with one stored on another machine.

Why they are not zero: every output value is a chain of sums of products (convolutions, matmuls, norms).
Another CPU (AVX2 against AVX-512), another thread count or a GPU splits those sums differently, and fp32
rounds each partial sum to a unit roundoff ``u = 2**-24`` of its size. Reordering a sum of ``n`` terms
changes it by at most about ``n * u`` times the sum of the magnitudes (Higham's bound), and in practice by
about ``sqrt(n) * u`` of the output's scale, since the rounding errors of the partial sums have random signs.
Along a network the errors of successive layers add, so ``n`` is the sum of the fan-ins of its weighted
layers (the number of products each output value accumulates on its way through the network).

The tolerance is therefore ``SAFETY * sqrt(n) * u * scale``, with ``scale`` the largest magnitude of the
expected output and a safety factor for the layers whose inputs are larger than the output and for
the non-linear steps (softmax, normalisation) that amplify differences a little. Integer outputs (indices)
must match exactly. For the networks of the fixtures this is about 1e-5 to 1e-4 of the output's scale: far
below any change a real regression makes (a changed weight or operation moves outputs by 1e-3 or more), and
above what the reordering of fp32 sums does on another machine (seen: 7.2e-6 on a reconstruction of scale 1,
2.3e-5 on a multiscale discriminator's features).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["FP32_UNIT_ROUNDOFF", "SAFETY", "accumulated_terms", "fp32_tolerance", "assert_close_fp32"]

FP32_UNIT_ROUNDOFF = 2.0**-24
SAFETY = 8.0


def accumulated_terms(model: nn.Module) -> int:
    """The sum over the weighted layers (convolutions, linear layers, attention projections) of their
    fan-in: how many products an output value of ``model`` accumulates along its path, at most."""
    total = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
            fan_in = weight.numel() // weight.shape[0]
            if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                fan_in = weight.numel() // weight.shape[1]
            total += fan_in
    return max(total, 1)


def fp32_tolerance(expected: torch.Tensor, terms: int) -> float:
    """The absolute tolerance of an fp32 result of scale ``max |expected|`` accumulated over ``terms`` products."""
    scale = float(expected.detach().double().abs().max()) if expected.numel() else 0.0
    return SAFETY * math.sqrt(terms) * FP32_UNIT_ROUNDOFF * scale


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor, terms: int, name: str = "output") -> None:
    """``actual`` matches ``expected`` up to :func:`fp32_tolerance` (exactly for integer tensors)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), f"{name}: integer values differ"
        return
    tolerance = fp32_tolerance(expected, terms)
    error = float((actual.detach().double() - expected.detach().double()).abs().max()) if expected.numel() else 0.0
    assert error <= tolerance, (f"{name}: max error {error:.3g} > tolerance {tolerance:.3g} "
                                f"({terms} accumulated products, scale {float(expected.abs().max()):.3g})")
