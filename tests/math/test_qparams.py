"""qparams_from_minmax against Intel Neural Compressor's formulas, on hand-computed numbers.

INC (docs/source/quantization.md):
    asymmetric: scale = (rmax - rmin) / (qmax - qmin); zero_point = round(qmin - rmin / scale)
    symmetric int8: scale = 2 * max(|rmin|, |rmax|) / (qmax - qmin - 1) = absmax / 127
    symmetric uint8: scale = max(rmin, rmax) / (qmax - qmin)
qmin is even for every grid, so round(qmin - r) == qmin - round(r) even on ties (half to even).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimquant.math import dequantize, grid, qparams_from_minmax, quantize
from slimquant.types import QTYPES

INT_TYPES = ["int2", "int3", "int4", "int8", "uint4", "uint8"]
F32 = torch.float32

# The seed example (INC docs): a 2x3 weight.
W = torch.tensor([[0.6839, 0.4741, 0.7451], [0.9301, 0.1742, 0.6835]])


def t(x: float | list[float]) -> torch.Tensor:
    return torch.tensor(x, dtype=F32)


def test_seed_example_per_tensor_uint8_asymmetric() -> None:
    scale, zp = qparams_from_minmax(W.min(), W.max(), QTYPES["uint8"], symmetric=False)
    assert torch.equal(scale, (t(0.9301) - t(0.1742)) / 255)
    assert scale.item() == pytest.approx((0.9301 - 0.1742) / 255, rel=1e-6)  # 0.0029643137
    # zero_point = qmin - round(rmin / scale) = 0 - round(58.766) = -59
    assert torch.equal(zp, t(-59.0))
    # Hand-computed grid values: round(W / scale) - 59.
    q = quantize(W, scale, zp, QTYPES["uint8"])
    assert q.dtype == torch.uint8
    assert torch.equal(q, torch.tensor([[172, 101, 192], [255, 0, 172]], dtype=torch.uint8))


def test_seed_example_per_channel_uint8_and_int8_asymmetric() -> None:
    rmin, rmax = W.amin(dim=1), W.amax(dim=1)
    scale, zp = qparams_from_minmax(rmin, rmax, QTYPES["uint8"], symmetric=False)
    assert torch.equal(scale, (rmax - rmin) / 255)
    # round(0.4741 / 0.0010627) = 446, round(0.1742 / 0.0029643) = 59
    assert torch.equal(zp, t([-446.0, -59.0]))
    scale8, zp8 = qparams_from_minmax(rmin, rmax, QTYPES["int8"], symmetric=False)
    assert torch.equal(scale8, scale)  # same number of steps (255)
    assert torch.equal(zp8, t([-128.0 - 446.0, -128.0 - 59.0]))


@pytest.mark.parametrize(("name", "half"), [("int8", 127), ("int4", 7), ("int3", 3), ("int2", 1)])
def test_symmetric_signed_is_absmax_over_half_the_grid(name: str, half: int) -> None:
    rmin, rmax = t([-0.5, -0.2, -3.0, 0.0]), t([0.3, 0.9, 3.0, 0.25])
    scale, zp = qparams_from_minmax(rmin, rmax, QTYPES[name], symmetric=True)
    assert zp is None
    assert torch.equal(scale, t([0.5, 0.9, 3.0, 0.25]) / half)


def test_symmetric_int8_seed_example() -> None:
    scale, zp = qparams_from_minmax(W.min(), W.max(), QTYPES["int8"], symmetric=True)
    assert zp is None
    assert torch.equal(scale, t(0.9301) / 127)  # 0.0073236


@pytest.mark.parametrize(("name", "steps"), [("uint8", 255), ("uint4", 15)])
def test_symmetric_unsigned_is_max_over_the_grid(name: str, steps: int) -> None:
    rmin, rmax = t([0.0, 0.1, -1.0]), t([2.0, 0.9, 0.5])
    scale, zp = qparams_from_minmax(rmin, rmax, QTYPES[name], symmetric=True)
    assert zp is None
    assert torch.equal(scale, t([2.0, 0.9, 0.5]) / steps)


def test_symmetric_unsigned_with_no_positive_values_gets_a_finite_scale() -> None:
    scale, zp = qparams_from_minmax(t([-2.0]), t([-1.0]), QTYPES["uint8"], symmetric=True)
    assert zp is None and torch.equal(scale, t([1.0]))


@pytest.mark.parametrize("name", INT_TYPES)
def test_asymmetric_formula(name: str) -> None:
    qt = QTYPES[name]
    rmin, rmax = t([-1.3, 0.2, -7.0, -0.01]), t([0.7, 1.9, -2.0, 5.0])
    scale, zp = qparams_from_minmax(rmin, rmax, qt, symmetric=False)
    expected_scale = (rmax - rmin) / (qt.qmax - qt.qmin)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(zp, qt.qmin - torch.round(rmin / expected_scale))
    assert torch.equal(zp, torch.round(zp))  # integers held in float32
    assert zp.dtype == F32


def test_asymmetric_zero_point_rounds_ties_to_even() -> None:
    # scale = 255 / 255 = 1; rmin / scale = -2.5 and -3.5 are exact ties.
    scale, zp = qparams_from_minmax(t([-2.5, -3.5]), t([252.5, 251.5]), QTYPES["uint8"], symmetric=False)
    assert torch.equal(scale, t([1.0, 1.0]))
    assert torch.equal(zp, t([2.0, 4.0]))  # INC: round(0 + 2.5) = 2, round(0 + 3.5) = 4


def test_zero_point_is_not_clamped_to_the_grid() -> None:
    # An all-positive uint8 range puts the zero point far below qmin (seed 003 keeps it).
    scale, zp = qparams_from_minmax(t([10.0]), t([10.0 + 2.55]), QTYPES["uint8"], symmetric=False)
    assert zp.item() == -1000.0
    q = quantize(t([10.0, 12.55]), scale, zp, QTYPES["uint8"])
    assert torch.equal(q, torch.tensor([0, 255], dtype=torch.uint8))


@pytest.mark.parametrize(
    ("name", "grid_"), [("int8", (-64.0, 63.0)), ("uint8", (0.0, 127.0))]
)
def test_reduce_range_uses_7_bits(name: str, grid_: tuple[float, float]) -> None:
    qt = QTYPES[name]
    assert grid(qt, reduce_range=True) == grid_
    assert grid(qt) == (qt.qmin, qt.qmax)
    rmin, rmax = t([-1.0]), t([3.0])
    scale, zp = qparams_from_minmax(rmin, rmax, qt, symmetric=False, reduce_range=True)
    assert torch.equal(scale, t([4.0]) / 127)
    assert torch.equal(zp, grid_[0] - torch.round(rmin / scale))
    q = quantize(torch.cat([rmin, rmax]), scale, zp, qt, reduce_range=True)
    assert q.min().item() >= grid_[0] and q.max().item() <= grid_[1]
    assert q.max().item() == grid_[1]  # rmax lands on the reduced top


def test_reduce_range_symmetric_int8_is_absmax_over_63() -> None:
    scale, zp = qparams_from_minmax(t([-0.5]), t([2.0]), QTYPES["int8"], symmetric=True, reduce_range=True)
    assert zp is None and torch.equal(scale, t([2.0]) / 63)


@pytest.mark.parametrize("name", ["int2", "int3", "int4", "uint4"])
def test_reduce_range_rejects_low_bit_types(name: str) -> None:
    with pytest.raises(ValueError, match=f"reduce_range only applies to 8-bit types, not {name}"):
        qparams_from_minmax(t([0.0]), t([1.0]), QTYPES[name], symmetric=False, reduce_range=True)


@pytest.mark.parametrize(("name", "fmax"), [("fp8_e4m3", 448.0), ("fp8_e5m2", 57344.0)])
def test_fp8_scale_is_absmax_over_largest_finite(name: str, fmax: float) -> None:
    for symmetric in (True, False):  # fp8 has no zero point either way
        scale, zp = qparams_from_minmax(t([-3.0, 0.0]), t([1.0, 0.0]), QTYPES[name], symmetric=symmetric)
        assert zp is None
        assert torch.equal(scale, t([3.0 / fmax, 1.0]))  # the all-zero range gets scale 1


@pytest.mark.parametrize("name", INT_TYPES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_range_reproduces_zero(name: str, symmetric: bool) -> None:
    qt = QTYPES[name]
    zero = torch.zeros(3)
    scale, zp = qparams_from_minmax(zero, zero, qt, symmetric=symmetric)
    assert torch.equal(scale, torch.ones(3))
    if symmetric:
        assert zp is None
    else:
        assert torch.equal(zp, torch.full((3,), qt.qmin))
    x = torch.zeros(3)
    assert torch.equal(dequantize(quantize(x, scale, zp, qt), scale, zp), x)


# Constants whose old fallback scale |c| / 127 (or / 255, / 7 ...) did not multiply back to c.
_CONSTANTS = torch.cat([
    t([0.1, -0.3, 1.0 / 3.0, 7.77, -1e-3, 123.456, 1e-6, -2.0, 1e-44]),
    torch.randn(300, generator=torch.Generator().manual_seed(0)) * 10.0,
])


@pytest.mark.parametrize("name", INT_TYPES)
@pytest.mark.parametrize("integer_zero_point", [True, False])
def test_constant_range_reproduces_the_constant_exactly_asymmetric(name: str, integer_zero_point: bool) -> None:
    qt = QTYPES[name]
    c = _CONSTANTS
    scale, zp = qparams_from_minmax(c, c, qt, symmetric=False, integer_zero_point=integer_zero_point)
    assert bool((scale > 0).all()) and bool(torch.isfinite(zp).all())
    q = quantize(c, scale, zp, qt, integer_zero_point=integer_zero_point)
    assert bool((q.float() >= qt.qmin).all()) and bool((q.float() <= qt.qmax).all())
    assert torch.equal(dequantize(q, scale, zp), c)


@pytest.mark.parametrize("name", ["int2", "int3", "int4", "int8"])
def test_constant_range_symmetric_follows_inc_within_one_ulp(name: str) -> None:
    # Symmetric keeps INC's absmax / half-grid scale, so c comes back as half * (c / half): within 1 ulp.
    qt = QTYPES[name]
    c = _CONSTANTS[_CONSTANTS.abs() > 1e-30]
    scale, zp = qparams_from_minmax(c, c, qt, symmetric=True)
    deq = dequantize(quantize(c, scale, zp, qt), scale, zp)
    ulp = torch.finfo(F32).eps * c.abs()
    assert bool(((deq - c).abs() <= ulp).all())


@pytest.mark.parametrize("name", INT_TYPES)
def test_float_zero_point_puts_the_range_ends_on_the_grid_ends(name: str) -> None:
    qt = QTYPES[name]
    rmin, rmax = t([-1.3, 0.2, 0.05]), t([0.7, 1.9, 0.0501])
    scale, zp = qparams_from_minmax(rmin, rmax, qt, symmetric=False, integer_zero_point=False)
    assert torch.equal(scale, (rmax - rmin) / (qt.qmax - qt.qmin))
    assert torch.equal(zp, qt.qmin - rmin / scale)  # unrounded
    assert not torch.equal(zp, torch.round(zp))  # these ranges have fractional zero points
    lo = quantize(rmin, scale, zp, qt, integer_zero_point=False)
    hi = quantize(rmax, scale, zp, qt, integer_zero_point=False)
    assert bool((lo.float() == qt.qmin).all()) and bool((hi.float() == qt.qmax).all())
    torch.testing.assert_close(dequantize(lo, scale, zp), rmin, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dequantize(hi, scale, zp), rmax, rtol=1e-6, atol=1e-7)


def test_shapes_broadcast_unchanged() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16)
    for symmetric in (True, False):
        scale, zp = qparams_from_minmax(x.amin(-1), x.amax(-1), QTYPES["int4"], symmetric)
        assert scale.shape == (4, 3) and scale.dtype == F32
        assert zp is None if symmetric else zp.shape == (4, 3)


def test_half_precision_ranges_are_computed_in_float32() -> None:
    scale, zp = qparams_from_minmax(t([-1.0]).half(), t([3.0]).bfloat16(), QTYPES["uint8"], symmetric=False)
    assert scale.dtype == F32 and zp.dtype == F32
    assert torch.equal(scale, t([4.0]) / 255)


finite = st.floats(-1e4, 1e4, allow_nan=False, allow_subnormal=False, width=32)


@settings(deadline=None, max_examples=50)
@given(a=finite, b=finite, name=st.sampled_from(INT_TYPES + ["fp8_e4m3", "fp8_e5m2"]), symmetric=st.booleans())
def test_scale_is_always_positive_and_finite(a: float, b: float, name: str, symmetric: bool) -> None:
    rmin, rmax = t([min(a, b)]), t([max(a, b)])
    scale, zp = qparams_from_minmax(rmin, rmax, QTYPES[name], symmetric=symmetric)
    assert bool((scale > 0).all()) and bool(torch.isfinite(scale).all())
    if zp is not None:
        assert bool(torch.isfinite(zp).all())
