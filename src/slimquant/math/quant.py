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
