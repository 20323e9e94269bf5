"""Calibration observers: exact min/max and moving averages, histogram growth, histogram and sigma
ranges, input validation and the registry."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimquant.math import fake_quantize, qparams_from_minmax
from slimquant.math.ranges import sigma_range
from slimquant.observers import (
    HISTOGRAM_METHODS,
    OBSERVERS,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    SigmaObserver,
    make_observer,
)
from slimquant.types import QTYPES

F32 = torch.float32
INT8 = QTYPES["int8"]


def batches() -> list[torch.Tensor]:
    """Calibration batches of a Linear input ``[..., 16]`` in mixed dtypes and leading shapes."""
    return [torch.randn(4, 7, 16) * 3, (torch.randn(5, 16) + 2).half(), torch.randn(2, 3, 16).bfloat16() - 1]


def all_rows(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x.float().reshape(-1, 16) for x in xs])


# -- min/max and moving average --------------------------------------------------------------------


def test_minmax_per_tensor_is_exact_over_batches_of_any_float_dtype() -> None:
    obs = MinMaxObserver()
    xs = batches()
    for x in xs:
        obs.update(x)
    rmin, rmax = obs.range()
    emin, emax = torch.aminmax(all_rows(xs))
    assert rmin.shape == () and rmin.dtype == F32
    assert torch.equal(rmin, emin) and torch.equal(rmax, emax)
    scale, zp = obs.qparams(INT8, symmetric=False)
    escale, ezp = qparams_from_minmax(emin, emax, INT8, symmetric=False)
    assert torch.equal(scale, escale) and zp is not None and ezp is not None and torch.equal(zp, ezp)


def test_minmax_per_channel_keeps_the_axis() -> None:
    obs = MinMaxObserver(axis=-1)  # per input channel of a Linear
    xs = batches()
    for x in xs:
        obs.update(x)
    rmin, rmax = obs.range()
    emin, emax = torch.aminmax(all_rows(xs), dim=0)
    assert rmin.shape == (16,)
    assert torch.equal(rmin, emin) and torch.equal(rmax, emax)
    conv = MinMaxObserver(axis=1)  # per channel of an NCHW activation
    x1, x2 = torch.randn(2, 3, 4, 4), torch.randn(5, 3, 2, 2)
    conv.update(x1)
    conv.update(x2)
    both = torch.cat([x1.transpose(0, 1).reshape(3, -1), x2.transpose(0, 1).reshape(3, -1)], dim=1)
    assert torch.equal(conv.range()[0], both.amin(1)) and torch.equal(conv.range()[1], both.amax(1))
    with pytest.raises(ValueError, match="channels"):
        conv.update(torch.randn(2, 4, 2, 2))


@settings(deadline=None, max_examples=30)
@given(
    values=st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=60),
    cuts=st.lists(st.integers(0, 60), max_size=4),
)
def test_minmax_does_not_depend_on_how_the_data_is_split(values: list[float], cuts: list[int]) -> None:
    x = torch.tensor(values)
    obs = MinMaxObserver()
    bounds = [0, *sorted(c for c in cuts if c <= len(values)), len(values)]
    for a, b in zip(bounds, bounds[1:]):
        obs.update(x[a:b])  # empty pieces are ignored
    (rmin, rmax), (emin, emax) = obs.range(), torch.aminmax(x)
    assert torch.equal(rmin, emin) and torch.equal(rmax, emax)


@pytest.mark.parametrize("axis", [None, -1])
def test_moving_average_follows_its_formula_exactly(axis: int | None) -> None:
    c = 0.25
    obs = MovingAverageMinMaxObserver(averaging_constant=c, axis=axis)
    xs = [torch.randn(3, 8) * s for s in (1.0, 4.0, 0.5, 2.0)]
    reduce = torch.aminmax if axis is None else (lambda t: torch.aminmax(t, dim=0))
    emin, emax = reduce(xs[0])
    obs.update(xs[0])
    for x in xs[1:]:
        obs.update(x)
        bmin, bmax = reduce(x)
        emin, emax = emin + c * (bmin - emin), emax + c * (bmax - emax)
    rmin, rmax = obs.range()
    assert torch.equal(rmin, emin) and torch.equal(rmax, emax)


@pytest.mark.parametrize("c", [0.0, -0.1, 1.5])
def test_averaging_constant_must_be_in_0_1(c: float) -> None:
    with pytest.raises(ValueError, match="averaging_constant"):
        MovingAverageMinMaxObserver(averaging_constant=c)


# -- histogram -------------------------------------------------------------------------------------


def test_histogram_counts_one_value_per_bin() -> None:
    obs = HistogramObserver(bins=16)
    obs.update(torch.arange(16.0))
    hist, edges = obs.histogram()
    assert torch.equal(hist, torch.ones(16, dtype=torch.float64))
    assert torch.equal(edges, torch.linspace(0, 15, 17, dtype=torch.float64))


def test_histogram_grows_and_keeps_the_total_count() -> None:
    obs = HistogramObserver(bins=256)
    obs.update(torch.rand(1000))  # [0, 1)
    obs.update(torch.rand(500) * 5 - 3)  # wider on both sides
    obs.update(torch.rand(200).half())  # inside: no re-binning
    obs.update(torch.tensor([7.5]))  # wider on the top only
    hist, edges = obs.histogram()
    assert hist.sum().item() == pytest.approx(1701, rel=1e-12)
    assert edges[-1].item() == 7.5 and edges[0].item() >= -3.0
    # The first 1000 + 200 values stay within [0, 1] (up to one bin of smearing per re-binning).
    inside = hist[(edges[:-1] >= -0.1) & (edges[1:] <= 1.1)].sum().item()
    assert 1200 <= inside <= 1200 + 500 * 1.2 / 5 + 1  # plus the wide batch's share of [0, 1]


def test_histogram_of_a_constant_then_wider_data() -> None:
    obs = HistogramObserver(bins=8)
    obs.update(torch.full((10,), 2.0))
    assert [v.item() for v in obs.range()] == [2.0, 2.0]
    obs.update(torch.tensor([0.0, 4.0]))
    hist, _ = obs.histogram()  # 2.0 is now an edge: it goes right, as new values on an edge do
    assert torch.equal(hist, torch.tensor([1.0, 0, 0, 0, 10, 0, 0, 1], dtype=torch.float64))


def test_histogram_percentile_excludes_outliers() -> None:
    obs = HistogramObserver(method="percentile", percentile=99.9)
    for _ in range(4):
        obs.update(torch.rand(25_000) * 2 - 1)
    obs.update(torch.tensor([60.0, -40.0]))  # grows the histogram 50-fold
    rmin, rmax = obs.range()
    assert rmin.dtype == F32 and rmin.shape == ()
    assert -1.1 < rmin.item() < -0.95 and 0.95 < rmax.item() < 1.1  # bins are 0.05 wide by now


@pytest.mark.parametrize("method", ["mse", "kl"])
def test_histogram_search_clips_outliers_and_lowers_the_error(method: str) -> None:
    x = torch.distributions.StudentT(4.0).sample((1_000_000,))
    x[:3] = torch.tensor([100.0, -100.0, 80.0])
    obs = HistogramObserver(bins=1024, method=method, symmetric=True)
    for b in x.split(250_000):
        obs.update(b)
    rmin, rmax = obs.range()
    assert x.min() < rmin < -8.0 and 8.0 < rmax < x.max()
    scale, zp = obs.qparams(INT8, symmetric=True)  # the same search as range() here
    assert zp is None and torch.equal(scale, qparams_from_minmax(rmin, rmax, INT8, True)[0])
    ref_scale, _ = qparams_from_minmax(x.min(), x.max(), INT8, True)
    err = (fake_quantize(x, scale, None, INT8) - x).pow(2).mean()
    ref = (fake_quantize(x, ref_scale, None, INT8) - x).pow(2).mean()
    assert err / ref < 0.5  # observed 0.33 (mse, T = 36.4) and 0.36 (kl, T = 24.9)


def test_histogram_qparams_search_for_the_requested_grid() -> None:
    obs = HistogramObserver(bins=512, method="mse", qt="int8", symmetric=True)
    x = torch.distributions.Laplace(0.0, 1.0).sample((100_000,))
    obs.update(x)
    t8 = obs.range()[1].item()
    scale4, _ = obs.qparams("int4", symmetric=True)
    assert scale4.item() * 7 < t8  # 4 bits clip harder than 8: observed T = 4.7 vs 9.6


def test_histogram_rejects_unknown_methods_listing_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="percentile, mse, kl"):
        HistogramObserver(method="entropy")
    assert HISTOGRAM_METHODS == ("percentile", "mse", "kl")


# -- sigma -----------------------------------------------------------------------------------------


def test_sigma_observer_matches_the_statistics_of_all_batches() -> None:
    obs = SigmaObserver(k=2.0)
    xs = batches()
    for x in xs:
        obs.update(x)
    data = all_rows(xs).double()
    mean, std = data.mean(), data.std(correction=0)
    emin, emax = sigma_range(mean, std, 2.0, data.min(), data.max())
    rmin, rmax = obs.range()
    assert rmin.shape == () and rmin.dtype == F32
    assert rmin.item() == pytest.approx(emin.item(), rel=1e-6) and rmax.item() == pytest.approx(emax.item(), rel=1e-6)


def test_sigma_observer_per_channel_is_clipped_to_the_observed_range() -> None:
    obs = SigmaObserver(k=100.0, axis=-1)  # so wide that min/max decide
    xs = batches()
    for x in xs:
        obs.update(x)
    rmin, rmax = obs.range()
    emin, emax = torch.aminmax(all_rows(xs), dim=0)
    assert torch.equal(rmin, emin) and torch.equal(rmax, emax)


# -- validation, reset, registry -------------------------------------------------------------------


@pytest.mark.parametrize("name", OBSERVERS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_are_loud(name: str, bad: float) -> None:
    obs = make_observer(name)
    with pytest.raises(ValueError, match="NaN/Inf"):
        obs.update(torch.tensor([1.0, bad]).half())


@pytest.mark.parametrize("name", OBSERVERS)
def test_empty_batches_are_ignored_and_reset_forgets(name: str) -> None:
    obs = make_observer(name)
    obs.update(torch.empty(0, 16))
    with pytest.raises(RuntimeError, match="no data"):
        obs.range()
    obs.update(torch.tensor([-1.0, 3.0]))
    obs.reset()
    with pytest.raises(RuntimeError, match="no data"):
        obs.range()
    obs.update(torch.tensor([0.5, 1.5]))
    rmin, rmax = obs.range()  # histogram ranges spread each value over its bin (1/2048 wide here)
    assert (rmin.item(), rmax.item()) == (pytest.approx(0.5, abs=1e-3), pytest.approx(1.5, abs=1e-3))


def test_registry_builds_each_observer_with_its_arguments() -> None:
    assert OBSERVERS == ("minmax", "moving_average", "histogram_percentile", "histogram_mse", "histogram_kl", "sigma",
                         "token_quantile")  # fmt: skip
    assert type(make_observer("minmax", axis=-1)) is MinMaxObserver
    assert make_observer("moving_average", averaging_constant=0.5).averaging_constant == 0.5
    for method in HISTOGRAM_METHODS:
        obs = make_observer(f"histogram_{method}", bins=64)
        assert isinstance(obs, HistogramObserver) and (obs.method, obs.bins) == (method, 64)
    assert make_observer("sigma", k=2.5).k == 2.5
    assert make_observer("token_quantile", quantile=0.99).quantile == 0.99


def test_registry_rejects_unknown_names_listing_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid: minmax, moving_average, histogram_percentile") as e:
        make_observer("histogram")
    assert "sigma" in str(e.value)


def test_token_quantile_observer_clips_outlier_tokens():
    from slimquant.observers import TokenQuantileObserver

    obs = TokenQuantileObserver()
    x = torch.randn(1000, 8)
    x[0, 3] = 50.0  # one outlier token
    obs.update(x[:500])
    obs.update(x[500:])
    lo, hi = obs.range()  # quantile 1: plain min-max
    assert float(hi) == 50.0 and float(lo) == float(x.min())
    lo99, hi99 = obs.range_at(0.99)
    assert float(hi99) < 5.0 and float(lo99) > float(x.min())
    maxs = x.amax(1).double()
    assert float(hi99) == pytest.approx(float(torch.quantile(maxs, 0.99)), rel=1e-6)
    with pytest.raises(ValueError, match="quantile"):
        TokenQuantileObserver(0.0)
