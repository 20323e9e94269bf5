"""Weight quantization to a QuantSpec, with an optional MSE-optimal clipping search (pure).

A weight ``W`` of shape ``[n, k]`` (conv weights are flattened to ``[out, in*kh*kw]`` first) is viewed
as ``[n, G, g]``: per_channel has ``G = 1, g = k``; per_group ``g = group_size``; per_tensor views the
whole tensor as one group. Scales and zero points have shape ``[n, G]`` (``[1, 1]`` per tensor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slimquant.math.gguf_grid import check_superblocks, snap
from slimquant.math.qparams import _nonzero, grid, qparams_from_minmax
from slimquant.types.gguf_types import gguf_type
from slimquant.math.quant import dequantize, quantize
from slimquant.types.qtype import qtype as lookup_qtype
from slimquant.types.spec import GROUP_SIZES, Granularity, QuantSpec


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
        divisors = [g for g in GROUP_SIZES if k % g == 0]
        raise ValueError(
            f"in_features {k} is not divisible by group_size {spec.group_size}"
            + (f" (group sizes that divide it: {divisors})" if divisors else
               f" (none of the group sizes {list(GROUP_SIZES)} divides it: quantize it per channel)")
        )
    if spec.granularity is Granularity.PER_TOKEN:
        raise ValueError("per_token granularity does not apply to weights")
    if spec.gguf is not None:
        check_superblocks(gguf_type(spec.gguf), k)


def grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View ``[n, k]`` as ``[n, G, g]`` (``[1, 1, n*k]`` per tensor)."""
    n, k = w.shape
    if spec.granularity is Granularity.PER_TENSOR:
        return w.reshape(1, 1, n * k)
    if spec.granularity is Granularity.PER_CHANNEL:
        return w.reshape(n, 1, k)
    g = int(spec.group_size)  # type: ignore[arg-type]
    return w.reshape(n, k // g, g)


def clip_grid(bits: int, symmetric: bool) -> tuple[int, float]:
    """Default clipping-search grid ``(steps, max_shrink)`` for a bit width.

    Symmetric ranges shrink their absmax by ``1 - max_shrink * i / steps``, ``i = 0..steps``.
    Asymmetric ranges shrink their lower and upper ends independently over the same ratios
    (``(steps + 1)**2`` candidates), which also lets the grid slide onto the weights' own structure.
    Fewer bits leave coarser steps, so their optimum lies further inside the range.
    """
    if symmetric:
        return (20, 0.5) if bits <= 4 else (40, 0.2)
    span = {2: 0.5, 3: 0.4, 4: 0.3}.get(bits, 0.1)
    return 15, span


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
        clip_search: per channel/group, try clipping ranges inside ``[min, max]`` and keep the one
            with the lowest squared reconstruction error (see :func:`clip_grid`). The full range is
            always a candidate, so no group's error grows.
        grid_points / max_shrink: override :func:`clip_grid`'s ``steps`` / ``max_shrink``.
    """
    check_weight_shape(tuple(w.shape), spec)  # type: ignore[arg-type]
    qt = lookup_qtype(spec.qtype)
    wg = grouped(w.detach().float(), spec)
    rmin = wg.amin(dim=-1)
    rmax = wg.amax(dim=-1)
    gt = gguf_type(spec.gguf) if spec.gguf is not None else None
    if gt is not None and gt.is_k and not gt.symmetric:
        rmin = rmin.clamp(max=0.0)  # Q4_K stores each group's minimum as -dmin * mn, mn >= 0
    izp = spec.zero_point == "int"
    if spec.outlier_fraction is not None:
        if clip_search:
            raise ValueError("the clipping search does not apply to W8A8S weights: their scale is set by the outlier "
                             "fraction (a lower error would only come from more outliers)")  # fmt: skip
        # the threshold weight lands just under level 7.5, so it (and all below it) round to 7 at most
        scale, zp = _nonzero(w8a8s_threshold(wg, spec.outlier_fraction) / W8A8S_REACH), None
    else:
        scale, zp = qparams_from_minmax(rmin, rmax, qt, spec.symmetric, integer_zero_point=izp)
    if clip_search:
        steps, span = clip_grid(qt.bits, spec.symmetric)
        steps = grid_points or steps
        span = max_shrink or span
        scale, zp = _search_clip(wg, rmin, rmax, scale, zp, spec, steps, span)
    if gt is not None:
        scale, zp = snap(scale, zp, gt)  # the GGUF type's fp16 / super-block scales (and minima)
        if gt.symmetric and not gt.is_k:
            scale = _signed_scale(wg, scale, qt, gt)
    q = quantize(wg, scale.unsqueeze(-1), None if zp is None else zp.unsqueeze(-1), qt, integer_zero_point=izp)
    return QuantizedWeight(q.reshape(w.shape), scale.contiguous(), None if zp is None else zp.contiguous())


W8A8S_INLIER_BITS = 4
W8A8S_REACH = 7.499  # the 4-bit grid's reach in steps: |w| <= threshold rounds to 7 at most (7.5 would tie to 8)


def w8a8s_threshold(wg: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per group of ``wg`` ``[n, G, g]``: the magnitude ``t`` ``[n, G]`` below which all but ``floor(fraction * g)``
    of the group's weights lie (its largest magnitude for fraction 0). The W8A8S scale ``t / 7`` puts those on the
    4-bit range; the rest are the group's outliers."""
    a = wg.abs()
    g = a.shape[-1]
    m = int(math.floor(fraction * g))
    if m == 0:
        return a.amax(dim=-1)
    return a.kthvalue(g - m, dim=-1).values


def w8a8s_outliers(q: torch.Tensor) -> int:
    """How many int8 values of a W8A8S weight lie outside the 4-bit range ``[-8, 7]``."""
    lo, hi = -(2 ** (W8A8S_INLIER_BITS - 1)), 2 ** (W8A8S_INLIER_BITS - 1) - 1
    return int(((q < lo) | (q > hi)).sum())


def _signed_scale(wg: torch.Tensor, scale: torch.Tensor, qt, gt) -> torch.Tensor:
    """Per group, ``scale`` or llama.cpp's ``d = m / qmin`` (``m`` the group's value of largest magnitude, so it
    lands on the grid's extra negative level: ``max / -8`` for Q4_0), whichever reconstructs the group better.
    Symmetric GGUF 32-blocks store ``d`` with its sign; a positive scale alone leaves that level to the smaller side."""
    idx = wg.abs().argmax(dim=-1, keepdim=True)
    signed = snap(wg.gather(-1, idx).squeeze(-1) / grid(qt)[0], None, gt)[0]
    better = _group_error(wg, signed, None, qt, True) < _group_error(wg, scale, None, qt, True)
    return torch.where(better, signed, scale)


def _search_clip(
    wg: torch.Tensor,
    rmin: torch.Tensor,
    rmax: torch.Tensor,
    scale: torch.Tensor,
    zp: torch.Tensor | None,
    spec: QuantSpec,
    steps: int,
    max_shrink: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    qt = lookup_qtype(spec.qtype)
    izp = spec.zero_point == "int"
    ratios = [1.0 - max_shrink * i / steps for i in range(steps + 1)]
    # symmetric grids have one free end; asymmetric ones shrink both ends independently
    pairs = [(r, r) for r in ratios[1:]] if spec.symmetric else [(a, b) for a in ratios for b in ratios][1:]
    best_err = _group_error(wg, scale, zp, qt, izp)
    best_scale, best_zp = scale.clone(), None if zp is None else zp.clone()
    for lo_ratio, hi_ratio in pairs:
        s, z = qparams_from_minmax(rmin * lo_ratio, rmax * hi_ratio, qt, spec.symmetric, integer_zero_point=izp)
        err = _group_error(wg, s, z, qt, izp)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, s, best_scale)
        if best_zp is not None and z is not None:
            best_zp = torch.where(better, z, best_zp)
    return best_scale, best_zp


def _group_error(wg: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, qt, izp: bool) -> torch.Tensor:
    """Squared reconstruction error per group, ``[n, G]``."""
    s = scale.unsqueeze(-1)
    z = None if zp is None else zp.unsqueeze(-1)
    if qt.is_float:
        deq = dequantize(quantize(wg, s, z, qt, integer_zero_point=izp), s, z)
        return (deq - wg).pow(2).sum(dim=-1)
    # Same arithmetic as quantize() then dequantize(), kept in float and in place: this runs once
    # per candidate range, and the integer casts would dominate its cost.
    qmin, qmax = grid(qt)
    y = wg / s
    if z is not None and not izp:
        y.add_(z)
    y.round_()
    if z is not None and izp:
        y.add_(z)
    y.clamp_(qmin, qmax)
    if z is not None:
        y.sub_(z)
    y.mul_(s).sub_(wg)
    return y.square_().sum(dim=-1)


def dequantize_weight(qw: QuantizedWeight, spec: QuantSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float ``[n, k]`` weight from a :class:`QuantizedWeight`."""
    qg = grouped(qw.q, spec)
    z = None if qw.zero_point is None else qw.zero_point.unsqueeze(-1)
    return dequantize(qg, qw.scale.unsqueeze(-1), z, dtype).reshape(qw.q.shape)
