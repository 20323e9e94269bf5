"""Weight quantization to a QuantSpec, with an optional MSE-optimal clipping search (pure).

A weight ``W`` of shape ``[n, k]`` (conv weights are flattened to ``[out, in*kh*kw]`` first) is viewed
as ``[n, G, g]``: per_channel has ``G = 1, g = k``; per_group ``g = group_size``; per_tensor views the
whole tensor as one group. Scales and zero points have shape ``[n, G]`` (``[1, 1]`` per tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimquant.math.qparams import qparams_from_minmax
from slimquant.math.quant import dequantize, quantize
from slimquant.types.qtype import qtype as lookup_qtype
from slimquant.types.spec import Granularity, QuantSpec


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer (or fp8) weight values plus their parameters.

    Attributes:
        q: ``[n, k]`` int8 values on the qtype's grid (uint8 for unsigned, float8 for fp8).
        scale: ``[n, G]`` float32.
        zero_point: ``[n, G]`` float32 holding integers, or None (symmetric / fp8).
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None


def check_weight_shape(shape: tuple[int, int], spec: QuantSpec) -> None:
    """Raise ValueError when ``spec`` cannot be applied to a ``[n, k]`` weight."""
    n, k = shape
    if spec.granularity is Granularity.PER_GROUP and k % int(spec.group_size or 0):
        divisors = [g for g in (32, 64, 96, 128, 256) if k % g == 0]
        raise ValueError(
            f"in_features {k} is not divisible by group_size {spec.group_size}"
            + (f" (group sizes that divide it: {divisors})" if divisors else "")
        )
    if spec.granularity is Granularity.PER_TOKEN:
        raise ValueError("per_token granularity does not apply to weights")


def grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View ``[n, k]`` as ``[n, G, g]`` (``[1, 1, n*k]`` per tensor)."""
    n, k = w.shape
    if spec.granularity is Granularity.PER_TENSOR:
        return w.reshape(1, 1, n * k)
    if spec.granularity is Granularity.PER_CHANNEL:
        return w.reshape(n, 1, k)
    g = int(spec.group_size)  # type: ignore[arg-type]
    return w.reshape(n, k // g, g)


def quantize_weight(
    w: torch.Tensor,
    spec: QuantSpec,
    clip_search: bool = False,
    grid_points: int | None = None,
    max_shrink: float | None = None,
) -> QuantizedWeight:
    """Round-to-nearest quantization of a 2-D weight.

    Args:
        w: ``[n, k]`` float weight.
        spec: target spec (qtype, granularity, symmetry).
        clip_search: try ranges shrunk by ratios ``1, 1 - s/grid_points, ..., 1 - max_shrink`` per
            channel/group and keep the one with the lowest squared reconstruction error.
        grid_points / max_shrink: default 20 / 0.5 for up to 4 bits; 40 / 0.2 for more bits, whose
            optimum lies close to the full range.
    """
    check_weight_shape(tuple(w.shape), spec)  # type: ignore[arg-type]
    qt = lookup_qtype(spec.qtype)
    wg = grouped(w.detach().float(), spec)
    rmin = wg.amin(dim=-1)
    rmax = wg.amax(dim=-1)
    izp = spec.zero_point == "int"
    scale, zp = qparams_from_minmax(rmin, rmax, qt, spec.symmetric, integer_zero_point=izp)
    if clip_search:
        low_bit = qt.bits <= 4
        grid_points = grid_points or (20 if low_bit else 40)
        max_shrink = max_shrink or (0.5 if low_bit else 0.2)
        scale, zp = _search_clip(wg, rmin, rmax, scale, zp, spec, grid_points, max_shrink)
    q = quantize(wg, scale.unsqueeze(-1), None if zp is None else zp.unsqueeze(-1), qt, integer_zero_point=izp)
    return QuantizedWeight(q.reshape(w.shape), scale.contiguous(), None if zp is None else zp.contiguous())


def _search_clip(
    wg: torch.Tensor,
    rmin: torch.Tensor,
    rmax: torch.Tensor,
    scale: torch.Tensor,
    zp: torch.Tensor | None,
    spec: QuantSpec,
    grid_points: int,
    max_shrink: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    qt = lookup_qtype(spec.qtype)
    izp = spec.zero_point == "int"
    best_err = _group_error(wg, scale, zp, qt, izp)
    best_scale, best_zp = scale.clone(), None if zp is None else zp.clone()
    for i in range(1, grid_points + 1):
        ratio = 1.0 - max_shrink * i / grid_points
        s, z = qparams_from_minmax(rmin * ratio, rmax * ratio, qt, spec.symmetric, integer_zero_point=izp)
        err = _group_error(wg, s, z, qt, izp)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, s, best_scale)
        if best_zp is not None and z is not None:
            best_zp = torch.where(better, z, best_zp)
    return best_scale, best_zp


def _group_error(wg: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, qt, izp: bool) -> torch.Tensor:
    s = scale.unsqueeze(-1)
    z = None if zp is None else zp.unsqueeze(-1)
    deq = dequantize(quantize(wg, s, z, qt, integer_zero_point=izp), s, z)
    return (deq - wg).pow(2).sum(dim=-1)


def dequantize_weight(qw: QuantizedWeight, spec: QuantSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float ``[n, k]`` weight from a :class:`QuantizedWeight`."""
    qg = grouped(qw.q, spec)
    z = None if qw.zero_point is None else qw.zero_point.unsqueeze(-1)
    return dequantize(qg, qw.scale.unsqueeze(-1), z, dtype).reshape(qw.q.shape)
