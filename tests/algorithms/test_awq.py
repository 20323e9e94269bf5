"""AWQ searches (pure): scale normalisation, the ratio search never worse than no scaling, clipping never worse
than the full range, per-tensor and float layers."""

from __future__ import annotations

import pytest
import torch

from slimquant.algorithms.awq import awq_clip, awq_scales, awq_search, fake_quantize, output_error
from slimquant.algorithms.gptq import HessianAccumulator
from slimquant.types.spec import Granularity, QuantSpec

W3 = QuantSpec("int3", Granularity.PER_GROUP, 32, symmetric=False)
W4C = QuantSpec("int4", Granularity.PER_CHANNEL)


def _salient(t: int = 256, k: int = 64, n: int = 48, seed: int = 0):
    """Inputs with four channels 30x larger than the rest (what AWQ is for), and random weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    x[:, :4] *= 30.0
    return x, torch.randn(n, k, generator=g) * 0.05


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acc = HessianAccumulator(x.shape[1])
    acc.add(x[: len(x) // 2])
    acc.add(x[len(x) // 2 :])
    return x.abs().mean(0), acc.hessian()


def test_output_error_is_the_mean_squared_output_change() -> None:
    x, w = _salient()
    d = torch.randn(w.shape, generator=torch.Generator().manual_seed(5)) * 0.01
    _, h = _stats(x)
    assert abs(output_error(d, h) - float((x @ d.T).pow(2).mean())) < 1e-4 * float((x @ d.T).pow(2).mean())


def test_scales_are_normalised_and_ratio_zero_is_identity() -> None:
    a = torch.tensor([0.0, 0.5, 2.0, 8.0])
    s = awq_scales(a, 0.5)
    assert torch.isclose((s.max() * s.min()).sqrt(), torch.tensor(1.0))
    assert bool((s > 0).all())
    assert torch.equal(awq_scales(a, 0.0), torch.ones(4))


def test_search_beats_no_scaling_on_salient_channels() -> None:
    x, w = _salient()
    res = awq_search(*_stats(x), [w], [W3], grid=10)
    assert set(res.errors) == {i / 10 for i in range(10)}
    assert res.ratio > 0 and res.errors[res.ratio] == min(res.errors.values())
    assert res.gain > 1.5  # observed 3.07 (ratio 0.4)
    # the transform itself is exact in float: (x / s) @ (w * s).T == x @ w.T
    torch.testing.assert_close((x / res.scales) @ (w * res.scales).T, x @ w.T, rtol=1e-4, atol=1e-4)


def test_search_keeps_no_scaling_when_nothing_helps() -> None:
    x = torch.ones(32, 16)  # every channel alike: all ratios give the same scales (ones)
    res = awq_search(*_stats(x), [torch.randn(8, 16)], [W4C], grid=5)
    assert res.ratio == 0.0 and torch.equal(res.scales, torch.ones(16))


def test_float_layers_add_no_error() -> None:
    x, w = _salient()
    alone = awq_search(*_stats(x), [w], [W3], grid=4)
    with_float = awq_search(*_stats(x), [w, torch.randn(8, 64)], [W3, None], grid=4)
    assert alone.errors == with_float.errors
    with pytest.raises(ValueError, match="grid"):
        awq_search(*_stats(x), [w], [W3], grid=0)


@pytest.mark.parametrize("spec", [W3, W4C, QuantSpec("int4", Granularity.PER_GROUP, 16)], ids=lambda s: s.describe())
def test_clip_never_worse_than_the_full_range(spec: QuantSpec) -> None:
    x, w = _salient(seed=1)
    w[:, 10] *= 8.0  # weight outliers worth clipping
    clipped, shrink = awq_clip(_stats(x)[1], w, spec, grid=10)
    assert clipped.shape == w.shape and 0.5 <= shrink <= 1.0
    assert bool((clipped.abs() <= w.abs() + 1e-7).all())

    def err(v: torch.Tensor) -> float:
        return float((x @ (fake_quantize(v, spec) - w).T).pow(2).mean())

    assert err(clipped) <= err(w) * (1 + 1e-6)
    assert shrink < 1.0  # some range was shrunk on this data


def test_clip_leaves_per_tensor_alone() -> None:
    x, w = _salient()
    out, shrink = awq_clip(_stats(x)[1], w, QuantSpec("int4", Granularity.PER_TENSOR))
    assert out is w and shrink == 1.0
