"""Clipping ranges from calibration statistics: re-binning, percentile, MSE, KL (entropy), sigma.

Exact tier on hand-made histograms (flat histograms have piecewise-linear CDFs, so quantiles are
exact), an error-bounded tier on heavy-tailed samples (observed values in comments), and properties.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimquant.math import fake_quantize, qparams_from_minmax
from slimquant.math.ranges import (
    histogram_kl_range,
    histogram_mse_range,
    histogram_percentile_range,
    histogram_quant_error,
    rebin_histogram,
    sigma_range,
)
from slimquant.types import QTYPES

F64 = torch.float64
INT8 = QTYPES["int8"]


def f64(x: list[float]) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def hist_of(x: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A histogram over [min, max], as the observers build it."""
    lo, hi = x.min().item(), x.max().item()
    return torch.histc(x.double(), bins, lo, hi), torch.linspace(lo, hi, bins + 1, dtype=F64)


def floats(r: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    return float(r[0]), float(r[1])


def quant_mse(x: torch.Tensor, rmin: torch.Tensor, rmax: torch.Tensor, symmetric: bool) -> float:
    scale, zp = qparams_from_minmax(rmin, rmax, INT8, symmetric)
    return (fake_quantize(x, scale, zp, INT8) - x).pow(2).mean().item()


def heavy_tailed(n: int) -> torch.Tensor:
    """Laplace(0, 1) samples with three huge outliers (the body ends near +-13)."""
    x = torch.distributions.Laplace(0.0, 1.0).sample((n,))
    x[:3] = torch.tensor([100.0, -100.0, 80.0])
    return x


# -- re-binning ------------------------------------------------------------------------------------


def test_rebin_onto_aligned_coarser_bins_is_exact() -> None:
    new = rebin_histogram(torch.arange(1.0, 9.0), torch.arange(9.0), torch.arange(0.0, 17.0, 2.0))
    assert new.dtype == F64
    assert torch.equal(new, f64([3, 7, 11, 15, 0, 0, 0, 0]))


def test_rebin_splits_bins_by_overlap_and_moves_point_masses_whole() -> None:
    assert torch.equal(rebin_histogram(f64([4, 0]), f64([0, 1, 2]), f64([-1, 0.5, 3])), f64([2, 2]))
    # A zero-width histogram (every value equal so far) is a point mass.
    assert torch.equal(rebin_histogram(f64([5]), f64([1.5, 1.5]), f64([0, 1, 2, 3])), f64([0, 5, 0]))
    assert torch.equal(rebin_histogram(f64([5]), f64([0, 0]), f64([0, 1, 2, 3])), f64([5, 0, 0]))
    assert torch.equal(rebin_histogram(f64([5]), f64([2, 2]), f64([0, 1, 2, 3])), f64([0, 0, 5]))  # on an edge
    assert torch.equal(rebin_histogram(f64([5]), f64([3, 3]), f64([0, 1, 2, 3])), f64([0, 0, 5]))
    with pytest.raises(ValueError, match="cover"):
        rebin_histogram(f64([1, 1]), f64([0, 1, 2]), f64([0.5, 1, 2]))


@settings(deadline=None, max_examples=50)
@given(
    counts=st.lists(st.integers(0, 1000), min_size=1, max_size=40),
    grow_lo=st.floats(0, 10),
    grow_hi=st.floats(0, 10),
    bins=st.integers(1, 64),
)
def test_rebin_keeps_the_total(counts: list[int], grow_lo: float, grow_hi: float, bins: int) -> None:
    hist = f64(counts)
    edges = torch.linspace(-1.0, 2.0, len(counts) + 1, dtype=F64)
    new = rebin_histogram(hist, edges, torch.linspace(-1.0 - grow_lo, 2.0 + grow_hi, bins + 1, dtype=F64))
    assert bool((new >= -1e-9).all())
    assert new.sum().item() == pytest.approx(hist.sum().item(), rel=1e-12, abs=1e-9)


# -- percentile ------------------------------------------------------------------------------------


def test_percentile_of_a_flat_histogram_is_exact() -> None:
    flat = torch.ones(10, dtype=F64)
    assert floats(histogram_percentile_range(flat, torch.arange(11.0), 80)) == (1.0, 9.0)  # 1 count off each tail
    assert floats(histogram_percentile_range(flat, torch.arange(11.0), 100)) == (0.0, 10.0)
    # |x| over [-5, 5]: density 2 per unit of |x|; dropping 2 counts leaves T = 4.
    assert floats(histogram_percentile_range(flat, torch.arange(11.0) - 5, 80, symmetric=True)) == (-4.0, 4.0)
    # Over [-2, 8], |x| mass is 4 in [0, 2] and 6 in [2, 8]: T = 6, and -T lies outside the data.
    assert floats(histogram_percentile_range(flat, torch.arange(11.0) - 2, 80, symmetric=True)) == (-2.0, 6.0)


def test_percentile_excludes_outliers_of_uniform_data() -> None:
    x = torch.rand(100_000) * 2 - 1
    x[:10] = torch.tensor([50.0, -50.0] * 5)
    hist, edges = hist_of(x, 2048)
    width = 100 / 2048  # the ends are only known to a bin
    rmin, rmax = floats(histogram_percentile_range(hist, edges, 99.9))  # 50 samples off each tail
    assert rmin == pytest.approx(-1.0, abs=width) and rmax == pytest.approx(1.0, abs=width)
    rmin, rmax = floats(histogram_percentile_range(hist, edges, 99.9, symmetric=True))
    assert rmin == -rmax and rmax == pytest.approx(1.0, abs=width)


@pytest.mark.parametrize("percentile", [0.0, -1.0, 100.5])
def test_percentile_must_be_in_0_100(percentile: float) -> None:
    with pytest.raises(ValueError, match="percentile"):
        histogram_percentile_range(f64([1]), f64([0, 1]), percentile)


@settings(deadline=None, max_examples=50)
@given(
    counts=st.lists(st.integers(0, 100), min_size=1, max_size=30).filter(any),
    p=st.floats(50, 100),
    symmetric=st.booleans(),
)
def test_percentile_range_is_inside_and_widens_with_the_percentile(
    counts: list[int], p: float, symmetric: bool
) -> None:
    edges = torch.linspace(-3.0, 5.0, len(counts) + 1, dtype=F64)
    rmin, rmax = histogram_percentile_range(f64(counts), edges, p, symmetric)
    wmin, wmax = histogram_percentile_range(f64(counts), edges, (p + 100) / 2, symmetric)
    assert -3.0 <= wmin <= rmin <= rmax <= wmax <= 5.0


# -- expected quantization error and the MSE search ------------------------------------------------


@pytest.mark.parametrize(("name", "symmetric"), [("int8", False), ("int4", True), ("uint4", False), ("int3", True)])
def test_quant_error_matches_dense_samples(name: str, symmetric: bool) -> None:
    """The closed-form per-bin integral against fake-quantizing 4000 evenly spread points per bin."""
    qt = QTYPES[name]
    hist, edges = f64([3, 0, 10, 7, 1, 5]), torch.linspace(-3.0, 5.0, 7, dtype=F64)
    rmin, rmax = f64([-3.0, -1.0, -0.3, 0.5]), f64([5.0, 4.0, 0.9, 2.0])  # full, clipped, tiny, off zero
    expected = histogram_quant_error(hist, edges, rmin, rmax, qt, symmetric)
    per_bin = 4000
    u = (torch.arange(per_bin, dtype=F64) + 0.5) / per_bin
    x = (edges[:-1, None] + u * torch.diff(edges)[:, None]).flatten()
    w = (hist / per_bin).repeat_interleave(per_bin)
    for k in range(len(rmin)):
        scale, zp = qparams_from_minmax(rmin[k], rmax[k], qt, symmetric)
        brute = (w * (fake_quantize(x, scale, zp, qt).double() - x) ** 2).sum()
        assert expected[k].item() == pytest.approx(brute.item(), rel=2e-3)


@pytest.mark.parametrize("search", [histogram_mse_range, histogram_kl_range])
def test_error_searches_need_integer_qtypes(search) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="integer qtype"):
        search(f64([1, 2]), f64([0, 1, 2]), QTYPES["fp8_e4m3"], True)


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_range_clips_heavy_tails_and_beats_minmax(symmetric: bool) -> None:
    x = heavy_tailed(200_000)
    hist, edges = hist_of(x, 2048)
    rmin, rmax = histogram_mse_range(hist, edges, INT8, symmetric)
    assert -100.0 <= rmin <= rmax <= 100.0 and (rmin > -100.0 or rmax < 100.0)
    assert rmin < -10.0 and rmax > 10.0  # the body stays in range
    ratio = quant_mse(x, rmin, rmax, symmetric) / quant_mse(x, x.min(), x.max(), symmetric)
    assert ratio < 0.75  # observed 0.68 (asymmetric [-65.6, 73.6]) and 0.68 (symmetric, T = 70.8)


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_range_of_gaussian_data_stays_inside_the_observed_range(symmetric: bool) -> None:
    x = torch.randn(200_000)
    hist, edges = hist_of(x, 2048)
    rmin, rmax = histogram_mse_range(hist, edges, INT8, symmetric)
    assert x.min() <= rmin < -3.0 and 3.0 < rmax <= x.max()
    ratio = quant_mse(x, rmin, rmax, symmetric) / quant_mse(x, x.min(), x.max(), symmetric)
    assert ratio < 0.9  # observed 0.85 (asymmetric) and 0.80 (symmetric)


# -- KL (entropy calibration) ----------------------------------------------------------------------


def kl_reference(hist: list[float], zero: int, levels: int) -> int:
    """Half-width (in bins) of the best window [zero - i, zero + i]: a plain loop over the windows."""
    n = len(hist)
    best, best_i = math.inf, -1
    for i in range(max(zero, n - zero), 0, -1):  # widest first; a strict < keeps the wider on ties
        a, b = max(zero - i, 0), min(zero + i, n)
        if b - a < levels:
            continue
        own = hist[a:b]
        p = list(own)
        p[0] += sum(hist[:a])
        p[-1] += sum(hist[b:])
        run = [j * levels // len(own) for j in range(len(own))]
        q = [0.0] * len(own)
        for r in range(levels):
            members = [j for j in range(len(own)) if run[j] == r and p[j] > 0]
            total = sum(own[j] for j in range(len(own)) if run[j] == r)
            for j in members:
                q[j] = max(total / len(members), 1e-4)  # MXNet-style floor for runs with no own counts
        sp, sq = sum(p), sum(q)
        kl = sum(pj / sp * math.log((pj / sp) / (qj / sq)) for pj, qj in zip(p, q) if pj > 0)
        if kl < best:
            best, best_i = kl, i
    return best_i


@pytest.mark.parametrize(("name", "seed"), [("int4", 0), ("int3", 1), ("int4", 2)])
def test_kl_symmetric_matches_a_loop_reference(name: str, seed: int) -> None:
    # A decaying |x| histogram with empty bins in its tail, over [0, 16): folding it changes nothing.
    g = torch.Generator().manual_seed(seed)
    hist = (torch.rand(64, generator=g) * 200 * torch.exp(-torch.arange(64) / 12)).floor().double()
    edges = torch.linspace(0.0, 16.0, 65, dtype=F64)
    qt = QTYPES[name]
    i = kl_reference(hist.tolist(), 0, int(qt.qmax) + 1)
    assert floats(histogram_kl_range(hist, edges, qt, symmetric=True)) == (0.0, pytest.approx(i * 0.25, rel=1e-12))


@pytest.mark.parametrize("seed", [0, 1])
def test_kl_asymmetric_matches_a_loop_reference(seed: int) -> None:
    # Edges on multiples of 0.5 from -12 to 20: already aligned on 0 (bin 24), so no re-binning.
    g = torch.Generator().manual_seed(seed)
    centre = torch.arange(64) - 24
    hist = (torch.rand(64, generator=g) * 300 * torch.exp(-centre.abs() / 8)).floor().double()
    edges = (torch.arange(65) - 24).double() / 2
    i = kl_reference(hist.tolist(), 24, 16)  # int4 asymmetric: 16 levels
    rmin, rmax = floats(histogram_kl_range(hist, edges, QTYPES["int4"], symmetric=False))
    assert (rmin, rmax) == (pytest.approx(max(-i * 0.5, -12.0)), pytest.approx(min(i * 0.5, 20.0)))


@pytest.mark.parametrize("symmetric", [False, True])
def test_kl_range_clips_heavy_tails_and_beats_minmax(symmetric: bool) -> None:
    # KL ignores how far the clipped values lie, so it only lowers the MSE when the outliers are
    # few among many values: with 200k samples the three clipped ones double the MSE instead.
    x = heavy_tailed(1_000_000)
    hist, edges = hist_of(x, 1024)
    rmin, rmax = histogram_kl_range(hist, edges, INT8, symmetric)
    assert -100.0 < rmin < -8.0 and 8.0 < rmax < 100.0
    ratio = quant_mse(x, rmin, rmax, symmetric) / quant_mse(x, x.min(), x.max(), symmetric)
    assert ratio < 0.6  # observed 0.35 (asymmetric, T = 25) and 0.41 (symmetric, T = 12.7)


def test_kl_keeps_the_full_range_when_there_are_fewer_bins_than_levels() -> None:
    hist, edges = f64([1, 5, 1]), f64([-1, 0, 1, 2])
    assert floats(histogram_kl_range(hist, edges, INT8, symmetric=True)) == (-1.0, 2.0)


@pytest.mark.parametrize("symmetric", [False, True])
def test_degenerate_histograms_keep_their_range(symmetric: bool) -> None:
    point, empty = (f64([7]), f64([2, 2])), (f64([0, 0]), f64([-1, 0, 3]))
    for hist, edges in (point, empty):
        expected = (edges[0].item(), edges[-1].item())
        assert floats(histogram_percentile_range(hist, edges, 99.0, symmetric)) == expected
        assert floats(histogram_mse_range(hist, edges, INT8, symmetric)) == expected
        assert floats(histogram_kl_range(hist, edges, INT8, symmetric)) == expected


# -- sigma -----------------------------------------------------------------------------------------


def test_sigma_range_formula_and_intersection() -> None:
    mean, std = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 2.0, 0.5])
    rmin, rmax = sigma_range(mean, std, 3.0)
    assert torch.equal(rmin, torch.tensor([-3.0, -5.0, -3.5]))
    assert torch.equal(rmax, torch.tensor([3.0, 7.0, -0.5]))
    rmin, rmax = sigma_range(mean, std, 3.0, torch.tensor([-1.0, -9.0, -3.0]), torch.tensor([9.0, 2.0, 0.0]))
    assert torch.equal(rmin, torch.tensor([-1.0, -5.0, -3.0]))
    assert torch.equal(rmax, torch.tensor([3.0, 2.0, -0.5]))


@pytest.mark.parametrize("k", [0.0, -1.0, math.nan])
def test_sigma_factor_must_be_positive(k: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        sigma_range(torch.tensor(0.0), torch.tensor(1.0), k)
