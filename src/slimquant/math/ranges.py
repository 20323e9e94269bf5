"""Clipping ranges from calibration statistics (pure functions, no state).

A histogram is ``hist`` (``[B]`` float32/float64 counts) with ``edges`` (``[B + 1]``, increasing); the
mass of a bin is taken as spread uniformly over it. The histogram functions return ``(rmin, rmax)``
as 0-d float64 tensors inside ``[edges[0], edges[-1]]``; :func:`sigma_range` returns tensors of the
broadcast shape of its inputs. Both go straight into
:func:`slimquant.math.qparams.qparams_from_minmax`.

``symmetric=True`` searches a threshold ``T`` on ``|x|`` and returns ``(max(-T, lo), min(T, hi))``:
the symmetric qparams see ``absmax == T`` and the range never leaves the observed one.
An empty histogram or one of zero width returns ``(edges[0], edges[-1])``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from slimquant.math.qparams import grid, qparams_from_minmax
from slimquant.types.qtype import QType

# Clipping ratios tried per searched end by the MSE search: geometric from 1 down to 1/bins
# (about 4% apart at 2048 bins), so ranges clipped to a few bins of a wide histogram are reachable.
_CANDIDATES = 200
_MAX_ROUNDS = 10  # cap on the rounds of the asymmetric MSE search (one end at a time)
_CHUNK = 256  # KL windows evaluated at once: bounds memory to _CHUNK x bins
_KL_EPS = 1e-4  # least count of Q where P has mass (MXNet's smoothing epsilon)


def rebin_histogram(hist: torch.Tensor, edges: torch.Tensor, new_edges: torch.Tensor) -> torch.Tensor:
    """Redistribute ``hist`` onto ``new_edges`` (``[B' + 1]``, covering ``edges``) by overlap.

    Returns ``[B']`` float64 counts with the same total. A zero-width histogram (a point mass)
    lands in the new bin that contains the point (the right one when it falls on an edge).
    """
    hist, edges = _checked(hist, edges)
    new_edges = new_edges.double()
    if new_edges[0] > edges[0] or new_edges[-1] < edges[-1]:
        raise ValueError("new_edges must cover the old histogram range")
    # Cumulative counts at the inner new edges; the outer ones are 0 and the total by coverage.
    inner = _cdf(hist, edges, new_edges[1:-1])
    return torch.diff(torch.cat([hist.new_zeros(1), inner, hist.sum().reshape(1)]))


def histogram_percentile_range(
    hist: torch.Tensor, edges: torch.Tensor, percentile: float, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Range keeping ``percentile`` percent of the mass.

    Asymmetric: drops ``(100 - percentile) / 2`` percent of the mass from each tail.
    Symmetric: drops ``100 - percentile`` percent of the ``|x|`` mass (the largest magnitudes).
    ``percentile`` in ``(0, 100]``; 100 gives ``(edges[0], edges[-1])``.
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    hist, edges = _checked(hist, edges)
    lo, hi = edges[0], edges[-1]
    if _trivial(hist, edges):
        return lo, hi
    tail = hist.sum() * (100.0 - percentile) / 100.0
    if symmetric:
        habs, eabs = _fold_abs(hist, edges)
        return _symmetric(_upper_quantile(habs, eabs, tail), lo, hi)
    return _lower_quantile(hist, edges, tail / 2), _upper_quantile(hist, edges, tail / 2)


def histogram_quant_error(
    hist: torch.Tensor,
    edges: torch.Tensor,
    rmin: torch.Tensor,
    rmax: torch.Tensor,
    qt: QType,
    symmetric: bool,
    reduce_range: bool = False,
) -> torch.Tensor:
    """Expected summed squared error of fake-quantizing the histogram's data with each range.

    ``rmin``/``rmax``: ``[K]`` candidate ranges (any matching shape); the scale and zero point of each
    come from :func:`qparams_from_minmax`. Mass in a bin is uniform, so the error is integrated in
    closed form per bin: clipped mass pays its distance to the grid end, in-range mass its rounding
    error (a centre-only estimate aliases when bins and grid steps line up). Integer qtypes only.
    Returns float64 of the candidates' shape (divide by ``hist.sum()`` for the MSE).
    """
    if qt.is_float:
        raise ValueError(f"histogram error search needs an integer qtype, not {qt.name}")
    hist, edges = _checked(hist, edges)
    scale, zero_point = qparams_from_minmax(rmin, rmax, qt, symmetric, reduce_range)
    s = scale.double().unsqueeze(-1)
    z = 0.0 if zero_point is None else zero_point.double().unsqueeze(-1)
    qmin, qmax = grid(qt, reduce_range)
    phi = _sq_error_antiderivative(edges, s, s * (qmin - z), s * (qmax - z))
    return (hist * torch.diff(phi, dim=-1) / torch.diff(edges)).sum(-1)


def histogram_mse_range(
    hist: torch.Tensor, edges: torch.Tensor, qt: QType, symmetric: bool, reduce_range: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Range with the lowest expected squared quantization error (:func:`histogram_quant_error`).

    Symmetric: thresholds ``absmax * r`` for ``r`` geometric from 1 to ``1 / bins``. Asymmetric: each
    end shrinks the same way towards the median, searched one end at a time until neither moves.
    Ties keep the wider range.
    """
    if qt.is_float:
        raise ValueError(f"histogram MSE search needs an integer qtype, not {qt.name}")
    hist, edges = _checked(hist, edges)
    lo, hi = edges[0], edges[-1]
    if _trivial(hist, edges):
        return lo, hi

    def error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return histogram_quant_error(hist, edges, a, b, qt, symmetric, reduce_range)

    ratios = torch.logspace(0.0, -math.log10(hist.numel()), _CANDIDATES, dtype=torch.float64)
    if symmetric:
        t = torch.maximum(lo.abs(), hi.abs()) * ratios
        return _symmetric(t[error(-t, t).argmin()], lo, hi)
    mid = _lower_quantile(hist, edges, hist.sum() / 2)
    lows, highs = mid - (mid - lo) * ratios, mid + (hi - mid) * ratios
    return _coordinate_search(error, lows, highs, lows[0], highs[0])


def histogram_kl_range(
    hist: torch.Tensor, edges: torch.Tensor, qt: QType, symmetric: bool, reduce_range: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy calibration (TensorRT, MXNet): the threshold ``T`` with the closest quantized histogram.

    A candidate keeps the bins of ``[-T, T]``; P is their counts with the mass outside folded into the
    edge bins, and Q splits them into ``L`` runs of ``width / L`` bins (as NVIDIA pytorch-quantization;
    TensorRT's whole-bin runs with the remainder in the last make KL jump with the width) and
    spreads each run's total evenly over its bins where P is nonzero. Every width of at least ``L``
    bins is tried; the lowest KL(P || Q) wins, ties to the wider.
    Symmetric: the ``|x|`` histogram with ``L`` = the non-negative grid values (128 for int8, as
    TensorRT). Asymmetric: the signed histogram re-binned so that 0 is an edge, with ``L`` = all grid
    values; ``T`` clips both sides at ``|x| = T``, which on one-sided data (ReLU) moves only the top.
    Returns ``(max(-T, lo), min(T, hi))``; histograms of fewer than ``L`` bins keep the full range.
    """
    if qt.is_float:
        raise ValueError(f"histogram KL search needs an integer qtype, not {qt.name}")
    hist, edges = _checked(hist, edges)
    lo, hi = edges[0], edges[-1]
    if _trivial(hist, edges):
        return lo, hi
    qmin, qmax = grid(qt, reduce_range)
    levels = int(qmax) + 1 if symmetric else int(qmax - qmin) + 1
    if symmetric:
        h, e = _fold_abs(hist, edges)
        width, zero = float(e[1]), 0
    else:
        h, width, zero = _zero_aligned(hist, edges)
    n = h.numel()
    # Window half-widths in bins, widest first, down to the narrowest window that is not empty.
    half = torch.arange(max(zero, n - zero), max(0, -zero, zero - n), -1)
    starts, stops = (zero - half).clamp(0, n), (zero + half).clamp(0, n)
    keep = stops - starts >= levels
    if not bool(keep.any()):
        return lo, hi
    scores = _kl_windows(h, starts[keep], stops[keep], levels)
    t = half[keep][scores.argmin()] * width
    return _symmetric(t, lo, hi)


def sigma_range(
    mean: torch.Tensor,
    std: torch.Tensor,
    k: float,
    xmin: torch.Tensor | None = None,
    xmax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean - k * std, mean + k * std)``, intersected with the observed ``[xmin, xmax]`` if given.

    msModelSlim ``use_sigma`` / ``sigma_factor``. Tensors broadcast (``[]`` or ``[C]``); ``k > 0``.
    """
    if not k > 0:
        raise ValueError(f"sigma factor k must be positive, got {k}")
    rmin, rmax = mean - k * std, mean + k * std
    if xmin is not None:
        rmin = torch.maximum(rmin, xmin)
    if xmax is not None:
        rmax = torch.minimum(rmax, xmax)
    return rmin, rmax


# -- helpers ---------------------------------------------------------------------------------------


def _checked(hist: torch.Tensor, edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if hist.dim() != 1 or edges.shape != (hist.numel() + 1,):
        raise ValueError(f"need hist [B] and edges [B + 1], got {tuple(hist.shape)} and {tuple(edges.shape)}")
    return hist.double(), edges.double()


def _trivial(hist: torch.Tensor, edges: torch.Tensor) -> bool:
    return bool(edges[-1] <= edges[0]) or bool(hist.sum() <= 0)


def _symmetric(t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.maximum(-t, lo), torch.minimum(t, hi)


def _cdf(hist: torch.Tensor, edges: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Counts below each ``x`` (any shape): linear inside bins, 0 before ``edges[0]``, total after."""
    c = torch.cat([hist.new_zeros(1), hist.cumsum(0)])
    i = torch.searchsorted(edges, x).clamp(1, hist.numel())
    x0, x1 = edges[i - 1], edges[i]
    # A zero-width histogram gives 0/0 at its point: not yet passed, so a point mass on an edge
    # re-bins to the right, where binning puts values that fall on an edge.
    t = ((x - x0) / (x1 - x0)).nan_to_num(nan=0.0).clamp(0.0, 1.0)
    return c[i - 1] + t * (c[i] - c[i - 1])


def _lower_quantile(hist: torch.Tensor, edges: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Smallest ``x`` with ``m`` counts below it (``m`` a 0-d count)."""
    c = torch.cat([hist.new_zeros(1), hist.cumsum(0)])
    i = torch.searchsorted(c, m.reshape(1)).clamp(1, hist.numel())[0]
    t = ((m - c[i - 1]) / (c[i] - c[i - 1])).nan_to_num(nan=0.0).clamp(0.0, 1.0)
    return edges[i - 1] + t * (edges[i] - edges[i - 1])


def _upper_quantile(hist: torch.Tensor, edges: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Largest ``x`` with ``m`` counts above it: the lower quantile of the mirrored histogram."""
    return -_lower_quantile(hist.flip(0), -edges.flip(0), m)


def _fold_abs(hist: torch.Tensor, edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The histogram of ``|x|``: as many bins, over ``[0, max |edge|]``."""
    top = torch.maximum(edges[0].abs(), edges[-1].abs())
    e = torch.linspace(0.0, float(top), hist.numel() + 1, dtype=torch.float64)
    inside = _cdf(hist, edges, e) - _cdf(hist, edges, -e)  # mass within [-t, t]
    return torch.diff(inside), e


def _zero_aligned(hist: torch.Tensor, edges: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """``hist`` re-binned onto bins of the same width with 0 on an edge: ``(counts, width, zero's index)``.

    The index lies outside ``[0, bins]`` when the range excludes 0.
    """
    w = float(edges[-1] - edges[0]) / hist.numel()
    first, last = math.floor(float(edges[0]) / w), math.ceil(float(edges[-1]) / w)
    e = torch.arange(first, last + 1, dtype=torch.float64) * w
    e[0], e[-1] = torch.minimum(e[0], edges[0]), torch.maximum(e[-1], edges[-1])  # cover despite rounding
    return rebin_histogram(hist, edges, e), w, -first


def _sq_error_antiderivative(
    x: torch.Tensor, s: torch.Tensor, g_lo: torch.Tensor, g_hi: torch.Tensor
) -> torch.Tensor:
    """An antiderivative in ``x`` of ``(x - fq(x))^2`` for the grid ``{g_lo, g_lo + s, ..., g_hi}``.

    Within half a step of the grid the error is a sawtooth of period ``s`` (one period integrates
    to ``s^3 / 12``); beyond, values clip to the grid end. Shapes broadcast (``[K, 1]`` x ``[B + 1]``).
    """
    h = s / 2
    u = torch.clamp(x, g_lo - h, g_hi + h) / s
    n = torch.floor(u + 0.5)  # periods completed; u - n in [-1/2, 1/2)
    saw = s**3 * (n / 12 + ((u - n) ** 3 + 0.125) / 3)
    below = (torch.minimum(x - g_lo, -h) ** 3 + h**3) / 3
    above = (torch.maximum(x - g_hi, h) ** 3 - h**3) / 3
    return saw + below + above


def _coordinate_search(
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    lows: torch.Tensor,
    highs: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise ``objective(lo, hi)`` over ``lows x highs`` one end at a time from ``(a, b)``.

    Each end in turn moves to its best candidate with the other fixed, until neither moves.
    Candidates come widest first, so ties keep the wider range.
    """
    for _ in range(_MAX_ROUNDS):
        prev = (a.item(), b.item())
        a = lows[objective(lows, b.expand_as(lows)).argmin()]
        b = highs[objective(a.expand_as(highs), highs).argmin()]
        if (a.item(), b.item()) == prev:
            break
    return a, b


def _kl_windows(hist: torch.Tensor, starts: torch.Tensor, stops: torch.Tensor, levels: int) -> torch.Tensor:
    """KL(P || Q) of :func:`histogram_kl_range` for each window ``[starts, stops)`` of bins.

    ``starts``/``stops``: ``[K]`` int64, windows at least ``levels`` bins wide. Returns ``[K]`` float64.
    """
    n = hist.numel()
    c = torch.cat([hist.new_zeros(1), hist.cumsum(0)])
    idx = torch.arange(n)
    out = []
    for a, b in zip(starts.split(_CHUNK), stops.split(_CHUNK)):
        a, b = a[:, None], b[:, None]
        inside = (idx >= a) & (idx < b)
        counts = torch.where(inside, hist, 0.0)
        p = counts.scatter_add(1, a, c[a]).scatter_add(1, b - 1, c[-1] - c[b])  # outliers -> edge bins
        run = ((idx - a) * levels // (b - a)).clamp(0, levels - 1)
        nonzero = p > 0
        run_sum = torch.zeros(len(a), levels, dtype=torch.float64).scatter_add(1, run, counts)
        run_nonzero = torch.zeros(len(a), levels, dtype=torch.float64).scatter_add(1, run, nonzero.double())
        q = run_sum.gather(1, run) / run_nonzero.gather(1, run).clamp(min=1)
        # A run with no counts of its own under P's mass (a sparse tail folded onto the window
        # edge) gets a tiny count instead of an infinite KL, as MXNet's smoothing does.
        q = torch.where(nonzero, q.clamp(min=_KL_EPS), 0.0)
        p = p / p.sum(1, keepdim=True)
        q = q / q.sum(1, keepdim=True)
        out.append(torch.where(nonzero, p * (p.log() - q.log()), 0.0).sum(1))
    return torch.cat(out)
