"""Quantization parameters from observed ranges, exactly as Intel Neural Compressor defines them.

Conventions (seed 003):
    asymmetric: scale = (rmax - rmin) / (qmax - qmin); zero_point = qmin - round(rmin / scale)
    symmetric, signed:   scale = 2 * max(|rmin|, |rmax|) / (qmax - qmin - 1)   (int8: absmax / 127)
    symmetric, unsigned: scale = max(rmin, rmax) / (qmax - qmin), zero_point = 0
    reduce_range: 8-bit types use 7 bits (int8 -> [-64, 63], uint8 -> [0, 127]).

The integer grid is ``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and
``x ~= (q - zero_point) * scale``. Zero points are kept as float tensors holding integers and are
not clamped to the grid (the seed's per-channel example has zp = -162 for uint8).
"""

from __future__ import annotations

import torch

from slimquant.types.qtype import QType


def grid(qt: QType, reduce_range: bool = False) -> tuple[float, float]:
    """The inclusive integer range ``(qmin, qmax)`` of an integer qtype."""
    if qt.is_float:
        return qt.qmin, qt.qmax
    if reduce_range:
        if qt.bits != 8:
            raise ValueError(f"reduce_range only applies to 8-bit types, not {qt.name}")
        return (-64.0, 63.0) if qt.signed else (0.0, 127.0)
    return qt.qmin, qt.qmax


def qparams_from_minmax(
    rmin: torch.Tensor,
    rmax: torch.Tensor,
    qt: QType,
    symmetric: bool,
    reduce_range: bool = False,
    integer_zero_point: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point for each element of ``rmin``/``rmax`` (any shape, float).

    Returns ``(scale, zero_point)``; ``zero_point`` is None for symmetric and float types.
    ``integer_zero_point=False`` keeps the zero point unrounded (``qmin - rmin / scale``), so ``rmin``
    and ``rmax`` land exactly on the grid ends; weight-only formats whose offset is a float
    (msModelSlim ``weight_offset``, quanto's shift) can hold it.
    Degenerate asymmetric ranges (rmin == rmax) get a scale that still reproduces the constant exactly;
    symmetric ones keep the formula above (the constant comes back within one float32 ulp).
    """
    rmin = rmin.float()
    rmax = rmax.float()
    qmin, qmax = grid(qt, reduce_range)
    absmax = torch.maximum(rmin.abs(), rmax.abs())
    if qt.is_float:
        scale = absmax / qmax
        return _nonzero(scale), None
    if symmetric:
        if qt.signed:
            scale = 2.0 * absmax / (qmax - qmin - 1.0)
        else:
            scale = torch.clamp(torch.maximum(rmin, rmax), min=0.0) / (qmax - qmin)
        return _nonzero(scale), None
    scale = (rmax - rmin) / (qmax - qmin)
    # Constant ranges: scale = |c| puts the constant one step from the zero point, on the grid edge
    # (q = qmin); c / |c| = +-1 and +-1 * |c| = c are exact in floating point, so c comes back bit
    # for bit (|c| / 127 and the like does not multiply back to c for every c, and can underflow).
    scale = torch.where(scale > 0, scale, absmax)
    scale = _nonzero(scale)
    zero_point = qmin - (torch.round(rmin / scale) if integer_zero_point else rmin / scale)
    return scale, zero_point


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    # An all-zero range quantizes to q = zero_point with any scale; 1.0 keeps it exact and finite.
    return torch.where(scale > 0, scale, torch.ones_like(scale))
