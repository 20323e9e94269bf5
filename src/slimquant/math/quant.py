"""Quantize, dequantize and fake-quantize tensors with given parameters (pure functions).

Shapes: ``scale`` and ``zero_point`` broadcast against ``x`` (e.g. ``[n, G, 1]`` against a
grouped weight ``[n, G, g]``).
"""

from __future__ import annotations

import torch

from slimquant.math.qparams import grid
from slimquant.types.qtype import QType


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qt: QType,
    reduce_range: bool = False,
    integer_zero_point: bool = True,
) -> torch.Tensor:
    """Map float ``x`` onto the grid of ``qt``.

    Returns int8 (signed types, zero point added) / uint8 (unsigned) values, or float8 for fp8 types.
    For asymmetric signed types whose zero point lies off-grid the result is clamped to the grid.
    """
    if qt.is_float:
        y = torch.clamp(x.float() / scale, qt.qmin, qt.qmax)
        return y.to(qt.torch_dtype)
    qmin, qmax = grid(qt, reduce_range)
    if zero_point is None:
        q = torch.round(x.float() / scale)
    elif integer_zero_point:
        q = torch.round(x.float() / scale) + zero_point  # seed 003: round, then shift
    else:
        q = torch.round(x.float() / scale + zero_point)
    q = torch.clamp(q, qmin, qmax)
    return q.to(torch.int16).to(qt.torch_dtype) if qt.signed else q.to(torch.uint8)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(q - zero_point) * scale`` in float32, cast to ``dtype``."""
    y = q.float()
    if zero_point is not None:
        y = y - zero_point
    return (y * scale).to(dtype)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qt: QType,
    reduce_range: bool = False,
    integer_zero_point: bool = True,
) -> torch.Tensor:
    """Quantize then dequantize, with a straight-through gradient (identity w.r.t. ``x``)."""
    q = quantize(x, scale, zero_point, qt, reduce_range, integer_zero_point)
    y = dequantize(q, scale, zero_point, x.dtype)
    # Forward is exactly y (x - x == 0); x + (y - x).detach() would round y off the grid by an ulp
    # wherever y - x is inexact (e.g. float zero points).
    return y.detach() + (x - x.detach())


class _RoundSTE(torch.autograd.Function):
    """``round(x)`` forward, identity gradient (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return torch.round(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return g


class _ScaleGrad(torch.autograd.Function):
    """``x`` forward (bit for bit), gradient times ``factor``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:  # noqa: ANN001
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        return g * ctx.factor, None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``torch.round(x)`` with a straight-through (identity) gradient."""
    return _RoundSTE.apply(x)


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged, its gradient multiplied by ``factor`` (LSQ's step-size gradient scale)."""
    return _ScaleGrad.apply(x, float(factor))


def learned_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    qmin: float,
    qmax: float,
    grad_factor: float = 1.0,
) -> torch.Tensor:
    """Fake quantization with learnable ``scale`` (LSQ, Esser et al. 2020) and ``zero_point`` (LSQ+'s learned
    offset, Bhalgat et al. 2020, kept on the integer grid).

    Forward: ``(clamp(round(x / scale) + round(zero_point), qmin, qmax) - round(zero_point)) * scale``, the same
    float32 operations as :func:`quantize` then :func:`dequantize` with those parameters (so a module converted
    with them computes the same values). Gradients: ``x`` straight through inside the grid and zero outside;
    ``scale`` LSQ's ``round(v) - v`` inside and the clamped level minus the zero point outside, times
    ``grad_factor`` (LSQ: ``1 / sqrt(numel per scale * qmax)``); ``zero_point`` through the rounding (STE), i.e.
    ``-scale`` where the value was clamped, 0 inside. ``scale`` / ``zero_point`` broadcast against ``x``.
    """
    s = scale_grad(scale, grad_factor)
    v = x / s
    q = round_ste(v)
    if zero_point is not None:
        z = round_ste(scale_grad(zero_point, grad_factor))
        q = torch.clamp(q + z, qmin, qmax)
        return (q - z) * s
    return torch.clamp(q, qmin, qmax) * s
