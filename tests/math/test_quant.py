"""quantize / dequantize / fake_quantize: exact grid round trips, error bounds, straight-through grad."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from slimquant.math import dequantize, fake_quantize, qparams_from_minmax, quantize, sqnr_db
from slimquant.types import QTYPES

INT_TYPES = ["int2", "int3", "int4", "int8", "uint4", "uint8"]
EPS32 = torch.finfo(torch.float32).eps


def t(x: list[float]) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _grid(name: str) -> torch.Tensor:
    qt = QTYPES[name]
    return torch.arange(int(qt.qmin), int(qt.qmax) + 1).to(qt.torch_dtype)


# -- exact tier -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", INT_TYPES)
def test_output_dtypes_and_clamping(name: str) -> None:
    qt = QTYPES[name]
    s = t([0.5])
    q = quantize(t([-1e6, 0.0, 1e6]), s, None, qt)
    assert q.dtype == qt.torch_dtype
    assert q.tolist() == [int(qt.qmin), 0, int(qt.qmax)]
    zp = t([3.0]) if not qt.signed else t([-1.0])
    q = quantize(t([-1e6, 1e6]), s, zp, qt)
    assert q.tolist() == [int(qt.qmin), int(qt.qmax)]


def test_rounding_is_half_to_even_then_shift() -> None:
    qt = QTYPES["int8"]
    x = t([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49, 0.51])
    assert quantize(x, t([1.0]), None, qt).tolist() == [0, 2, 2, 0, -2, -2, 0, 1]
    # integer zero point: round first, then add the zero point (seed 003)
    assert quantize(x, t([1.0]), t([10.0]), qt).tolist() == [10, 12, 12, 10, 8, 8, 10, 11]
    # float zero point: add, then round
    q = quantize(t([0.3, 0.3]), t([1.0]), t([0.4, 0.1]), qt, integer_zero_point=False)
    assert q.tolist() == [1, 0]


@pytest.mark.parametrize("name", INT_TYPES)
@pytest.mark.parametrize("scale", [1.0, 0.0625, 0.0029643137, 3.7, 1e-4])
def test_every_grid_value_round_trips_exactly(name: str, scale: float) -> None:
    qt = QTYPES[name]
    q = _grid(name)
    s = t([scale])
    zps = [None, t([0.0]), t([qt.qmin - 59.0]), t([qt.qmax + 17.0])]
    for zp in zps:
        x = dequantize(q, s, zp)
        assert x.dtype == torch.float32
        assert torch.equal(quantize(x, s, zp, qt), q)
    # fractional zero point, quantized with the float-zero-point rule
    zp = t([qt.qmin - 3.37])
    x = dequantize(q, s, zp)
    assert torch.equal(quantize(x, s, zp, qt, integer_zero_point=False), q)


@settings(deadline=None, max_examples=50)
@given(
    name=st.sampled_from(INT_TYPES),
    scale=st.floats(1e-4, 1e3, allow_nan=False),
    zp=st.integers(-500, 500) | st.none(),
    frac=st.floats(0.0, 0.99),
)
def test_grid_round_trip_property(name: str, scale: float, zp: int | None, frac: float) -> None:
    qt = QTYPES[name]
    q = _grid(name)
    s = t([scale])
    z = None if zp is None else t([float(zp)])
    assert torch.equal(quantize(dequantize(q, s, z), s, z, qt), q)
    zf = t([float(zp or 0) + frac])
    assert torch.equal(quantize(dequantize(q, s, zf), s, zf, qt, integer_zero_point=False), q)


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_grid_values_round_trip_exactly(name: str) -> None:
    qt = QTYPES[name]
    # every finite fp8 value
    raw = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(qt.torch_dtype)
    q = raw[torch.isfinite(raw.float())]
    for scale in (1.0, 0.25, 0.0123):
        s = t([scale])
        x = dequantize(q, s, None)
        back = quantize(x, s, None, qt)
        assert back.dtype == qt.torch_dtype
        assert torch.equal(back.float(), q.float())


def test_dequantize_formula_and_dtype() -> None:
    q = torch.tensor([0, 5, 255], dtype=torch.uint8)
    y = dequantize(q, t([0.5]), t([5.0]), dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert y.tolist() == [-2.5, 0.0, 125.0]


# -- error-bounded tier ---------------------------------------------------------------------------

values = st.lists(st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False, width=32), min_size=2, max_size=40)


@settings(deadline=None, max_examples=50)
@given(xs=values, name=st.sampled_from(INT_TYPES), symmetric=st.booleans(), izp=st.booleans())
def test_round_trip_error_is_at_most_half_a_step(xs: list[float], name: str, symmetric: bool, izp: bool) -> None:
    qt = QTYPES[name]
    x = t(xs)
    if symmetric and not qt.signed:
        x = x.abs()  # symmetric unsigned covers [0, rmax]
    rmin, rmax = x.min(), x.max()
    absmax = float(x.abs().max())
    assume(float(rmax - rmin) > 1e-4 * absmax)  # float32 zero points need some relative width
    scale, zp = qparams_from_minmax(rmin, rmax, qt, symmetric, integer_zero_point=izp)
    q = quantize(x, scale, zp, qt, integer_zero_point=izp)
    err = (dequantize(q, scale, zp) - x).abs()
    bound = float(scale) / 2 + 8 * EPS32 * absmax
    assert float(err.max()) <= bound, (float(err.max()), bound)


@pytest.mark.parametrize("name", INT_TYPES)
def test_round_trip_error_on_random_data_matches_uniform_noise(name: str) -> None:
    # RTN noise is ~uniform on [-s/2, s/2]: the observed max sits close to s/2 and the RMS near s/sqrt(12).
    torch.manual_seed(0)
    qt = QTYPES[name]
    x = torch.randn(4096)
    scale, zp = qparams_from_minmax(x.min(), x.max(), qt, symmetric=False)
    err = dequantize(quantize(x, scale, zp, qt), scale, zp) - x
    s = float(scale)
    assert float(err.abs().max()) <= s / 2 * (1 + 1e-5)
    rms = float(err.pow(2).mean().sqrt())
    assert 0.25 * s < rms < 0.33 * s  # s / sqrt(12) = 0.2887 s; observed 0.274 s (int2) to 0.290 s (8-bit)


FP8_BOUNDS = {  # (half ulp relative to |x| for normals, half the subnormal step relative to scale)
    "fp8_e4m3": (2.0**-4, 2.0**-10),
    "fp8_e5m2": (2.0**-3, 2.0**-17),
}


@settings(deadline=None, max_examples=50)
@given(xs=values, name=st.sampled_from(sorted(FP8_BOUNDS)))
def test_fp8_relative_error(xs: list[float], name: str) -> None:
    qt = QTYPES[name]
    x = t(xs)
    scale, zp = qparams_from_minmax(x.min(), x.max(), qt, symmetric=True)
    assert zp is None
    q = quantize(x, scale, None, qt)
    assert q.dtype == qt.torch_dtype
    deq = dequantize(q, scale, None)
    rel, sub = FP8_BOUNDS[name]
    bound = rel * x.abs() + sub * float(scale) + 4 * EPS32 * x.abs()
    assert bool(((deq - x).abs() <= bound).all())


def test_fp8_e4m3_error_on_gaussian_data() -> None:
    torch.manual_seed(0)
    x = torch.randn(4096)
    qt = QTYPES["fp8_e4m3"]
    scale, _ = qparams_from_minmax(x.min(), x.max(), qt, symmetric=True)
    deq = dequantize(quantize(x, scale, None, qt), scale, None)
    assert sqnr_db(x, deq) > 28.0  # observed 31.2 dB (3 mantissa bits)


# -- fake quantization ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "symmetric", "izp"),
    [("int8", True, True), ("int4", False, True), ("uint4", False, False), ("uint8", False, True),
     ("int2", True, True), ("fp8_e4m3", True, True), ("fp8_e5m2", True, True)],
)  # fmt: skip
def test_fake_quantize_forward_is_dequant_of_quant_and_gradient_is_identity(
    name: str, symmetric: bool, izp: bool
) -> None:
    torch.manual_seed(0)
    qt = QTYPES[name]
    x0 = torch.randn(8, 32)
    g = x0.view(8, 4, 8)
    scale, zp = qparams_from_minmax(g.amin(-1), g.amax(-1), qt, symmetric, integer_zero_point=izp)
    s = scale.unsqueeze(-1)
    z = None if zp is None else zp.unsqueeze(-1)
    x = g.clone().requires_grad_(True)
    y = fake_quantize(x, s, z, qt, integer_zero_point=izp)
    expected = dequantize(quantize(g, s, z, qt, integer_zero_point=izp), s, z)
    assert torch.equal(y.detach(), expected)
    assert not torch.equal(expected, g)  # quantization did change the values
    upstream = torch.randn_like(g)
    y.backward(upstream)
    assert torch.equal(x.grad, upstream)  # straight-through: d y / d x = 1 exactly


def test_fake_quantize_gradient_is_ones_even_where_values_clamp() -> None:
    qt = QTYPES["int8"]
    x = t([-10.0, -0.3, 0.0, 0.7, 10.0]).requires_grad_(True)
    s = t([1.0 / 127])  # range [-1, 1]: the ends clamp
    y = fake_quantize(x, s, None, qt)
    assert y.detach().tolist() == pytest.approx([-128 / 127, -38 / 127, 0.0, 89 / 127, 1.0], abs=1e-6)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(5))


def test_fake_quantize_keeps_the_input_dtype() -> None:
    x = torch.linspace(-1, 1, 17, dtype=torch.bfloat16)
    y = fake_quantize(x, t([1.0 / 7]), None, QTYPES["int4"])
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, dequantize(quantize(x, t([1.0 / 7]), None, QTYPES["int4"]), t([1.0 / 7]), None, torch.bfloat16))
