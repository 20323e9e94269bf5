"""Choosing static activation ranges (pure): the auto-mixed rule of msModelSlim's ``act_method 3``."""

from __future__ import annotations

import torch

from slimquant.math.qparams import qparams_from_minmax
from slimquant.math.quant import fake_quantize
from slimquant.types.qtype import QType


def input_output_error(
    x: torch.Tensor,
    w_float: torch.Tensor,
    w_deq: torch.Tensor,
    rmin: float,
    rmax: float,
    qt: QType,
    symmetric: bool,
) -> float:
    """Mean squared error of a layer's output when its input is quantized to ``[rmin, rmax]``.

    Args:
        x: ``[t, k]`` float sample of the layer's inputs.
        w_float: ``[n, k]`` float weight (the reference output is ``x @ w_float.T``).
        w_deq: ``[n, k]`` dequantized weight the quantized layer computes with.
    """
    scale, zp = qparams_from_minmax(torch.tensor(rmin), torch.tensor(rmax), qt, symmetric)
    xq = fake_quantize(x.float(), scale, zp, qt)
    ref = x.float() @ w_float.float().T
    return float((xq @ w_deq.float().T - ref).pow(2).mean())


def choose_input_range(
    x: torch.Tensor,
    w_float: torch.Tensor,
    w_deq: torch.Tensor,
    candidates: dict[str, tuple[float, float]],
    qt: QType,
    symmetric: bool,
) -> tuple[str, float, float, dict[str, float]]:
    """The candidate range with the lowest :func:`input_output_error` on ``x``.

    Returns ``(name, rmin, rmax, errors)``; ties keep the first candidate in ``candidates`` order.
    """
    if not candidates:
        raise ValueError("no candidate ranges to choose from")
    errors = {name: input_output_error(x, w_float, w_deq, lo, hi, qt, symmetric) for name, (lo, hi) in candidates.items()}
    best = min(errors, key=lambda name: errors[name])
    lo, hi = candidates[best]
    return best, lo, hi, errors
