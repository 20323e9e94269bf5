"""quantize_weight / dequantize_weight: parameter shapes, per-group error bounds, clip search, Q4_1 data."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimquant.math import (
    QuantizedWeight,
    check_weight_shape,
    dequantize_weight,
    grouped,
    quantize_weight,
    sqnr_db,
)
from slimquant.math.qparams import qparams_from_minmax
from slimquant.math.quant import dequantize, quantize
from slimquant.math.weights import clip_grid
from slimquant.types import QTYPES, Granularity, QuantSpec

EPS32 = torch.finfo(torch.float32).eps
PT, PC, PG = Granularity.PER_TENSOR, Granularity.PER_CHANNEL, Granularity.PER_GROUP


def _w(n: int = 16, k: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def _group_sq_error(w: torch.Tensor, qw: QuantizedWeight, spec: QuantSpec) -> torch.Tensor:
    """Per-group squared reconstruction error, shape [n, G] ([1, 1] per tensor)."""
    return (grouped(dequantize_weight(qw, spec), spec) - grouped(w, spec)).pow(2).sum(-1)


# -- shapes / exact ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "scale_shape"),
    [
        (QuantSpec("int8", PT), (1, 1)),
        (QuantSpec("int8", PC), (16, 1)),
        (QuantSpec("int4", PG, 32), (16, 4)),
        (QuantSpec("int4", PG, 64, symmetric=False), (16, 2)),
        (QuantSpec("uint4", PG, 128, symmetric=False, zero_point="float"), (16, 1)),
        (QuantSpec("uint8", PC, symmetric=False), (16, 1)),
        (QuantSpec("fp8_e4m3", PC), (16, 1)),
    ],
)
def test_parameter_shapes_and_dtypes(spec: QuantSpec, scale_shape: tuple[int, int]) -> None:
    qt = QTYPES[spec.qtype]
    qw = quantize_weight(_w(), spec)
    assert qw.q.shape == (16, 128) and qw.q.dtype == qt.torch_dtype
    assert qw.scale.shape == scale_shape and qw.scale.dtype == torch.float32
    if spec.symmetric:
        assert qw.zero_point is None
    else:
        assert qw.zero_point.shape == scale_shape and qw.zero_point.dtype == torch.float32
    if not qt.is_float:
        assert qw.q.min().item() >= qt.qmin and qw.q.max().item() <= qt.qmax
    assert qw.scale.is_contiguous()


def test_grouped_views() -> None:
    w = torch.arange(2 * 8, dtype=torch.float32).reshape(2, 8)
    assert grouped(w, QuantSpec("int8", PT)).shape == (1, 1, 16)
    assert grouped(w, QuantSpec("int8", PC)).shape == (2, 1, 8)
    g = grouped(torch.arange(2 * 16.0).reshape(2, 16), QuantSpec("int4", PG, 8))
    assert g.shape == (2, 2, 8)
    assert g[1, 1].tolist() == list(range(24, 32))  # groups are consecutive input elements of a row


def test_per_group_parameters_match_per_channel_of_each_block() -> None:
    # Quantizing [n, k] per group of g is the same as quantizing [n*G, g] per channel.
    w = _w(8, 64)
    for spec_kw in ({"symmetric": True}, {"symmetric": False}, {"symmetric": False, "zero_point": "float"}):
        qg = quantize_weight(w, QuantSpec("int4", PG, 16, **spec_kw))
        qc = quantize_weight(w.reshape(32, 16), QuantSpec("int4", PC, **spec_kw))
        assert torch.equal(qg.q, qc.q.reshape(8, 64))
        assert torch.equal(qg.scale, qc.scale.reshape(8, 4))
        if qg.zero_point is not None:
            assert torch.equal(qg.zero_point, qc.zero_point.reshape(8, 4))


def test_dequantize_weight_is_q_minus_zero_point_times_scale() -> None:
    w = _w(4, 64)
    spec = QuantSpec("int4", PG, 32, symmetric=False)
    qw = quantize_weight(w, spec)
    q = qw.q.float().reshape(4, 2, 32)
    expected = ((q - qw.zero_point[..., None]) * qw.scale[..., None]).reshape(4, 64)
    assert torch.equal(dequantize_weight(qw, spec), expected)
    assert torch.equal(dequantize_weight(qw, spec, torch.bfloat16), expected.bfloat16())


def test_input_dtype_is_irrelevant_beyond_its_values() -> None:
    w = _w(4, 64).bfloat16()
    spec = QuantSpec("int8", PC)
    a, b = quantize_weight(w, spec), quantize_weight(w.float(), spec)
    assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)


def test_q4_1_style_data_is_reproduced_by_float_zero_point() -> None:
    # GGUF Q4_1: each block of 32 is min + d * q with q in 0..15. A 4-bit g32 asymmetric spec with a
    # float zero point recovers every block (each block holds both q = 0 and q = 15, so its range is exact).
    g = torch.Generator().manual_seed(1)
    n, k = 8, 128
    q = torch.randint(0, 16, (n, k // 32, 32), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    q = q[..., torch.randperm(32, generator=g)]
    d = torch.rand(n, k // 32, 1, generator=g) * 0.05 + 1e-3
    m = torch.randn(n, k // 32, 1, generator=g) * 0.3
    w = (m + d * q).reshape(n, k)
    for qtype in ("int4", "uint4"):
        spec = QuantSpec(qtype, PG, 32, symmetric=False, zero_point="float")
        qw = quantize_weight(w, spec)
        torch.testing.assert_close(qw.scale, d.squeeze(-1), rtol=1e-5, atol=0)
        qmin = int(QTYPES[qtype].qmin)
        assert torch.equal(qw.q.to(torch.int64).reshape(n, k // 32, 32), q + qmin)
        assert torch.allclose(dequantize_weight(qw, spec), w, rtol=0, atol=1e-6)
    # The integer zero point cannot: rounding the offset shifts most blocks off their grid.
    spec_int = QuantSpec("int4", PG, 32, symmetric=False)
    err_int = (dequantize_weight(quantize_weight(w, spec_int), spec_int) - w).abs().max().item()
    assert err_int > 1e-3  # observed 0.019 (float zero point: 1.2e-7)


# -- error-bounded -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec("int8", PT),
        QuantSpec("int8", PC),
        QuantSpec("int8", PC, symmetric=False),
        QuantSpec("uint8", PC, symmetric=False),
        QuantSpec("int4", PG, 32),
        QuantSpec("int4", PG, 32, symmetric=False),
        QuantSpec("uint4", PG, 64, symmetric=False, zero_point="float"),
        QuantSpec("int3", PG, 64, symmetric=False),
        QuantSpec("int2", PG, 32, symmetric=False),
    ],
    ids=lambda s: s.describe(),
)
def test_rtn_error_is_at_most_half_a_step_per_group(spec: QuantSpec) -> None:
    w = _w(16, 128, seed=3)
    qw = quantize_weight(w, spec)
    err = (grouped(dequantize_weight(qw, spec), spec) - grouped(w, spec)).abs().amax(-1)
    bound = qw.scale / 2 + 8 * EPS32 * grouped(w, spec).abs().amax(-1)
    assert bool((err <= bound).all())
    assert bool((err > qw.scale / 4).all())  # and not trivially small: observed 0.42-0.50 s per group (int2 g32)


def test_more_bits_and_smaller_groups_reduce_error() -> None:
    w = _w(32, 256, seed=4)
    s = {
        name: sqnr_db(w, dequantize_weight(quantize_weight(w, spec), spec))
        for name, spec in {
            "int8 pc": QuantSpec("int8", PC),
            "int4 pc": QuantSpec("int4", PC),
            "int4 g32": QuantSpec("int4", PG, 32),
            "int3 g32": QuantSpec("int3", PG, 32),
            "int2 g32": QuantSpec("int2", PG, 32),
        }.items()
    }
    # observed: int8 pc 42.8, int4 pc 17.7, int4 g32 20.3, int3 g32 12.9, int2 g32 3.7 dB
    assert s["int8 pc"] > 38
    assert s["int8 pc"] > s["int4 g32"] > s["int4 pc"]
    assert s["int4 g32"] > s["int3 g32"] > s["int2 g32"]


@st.composite
def specs_st(draw: st.DrawFn) -> QuantSpec:
    gran = draw(st.sampled_from([PT, PC, PG]))
    return QuantSpec(
        draw(st.sampled_from(["int2", "int3", "int4", "int8", "uint4", "uint8"])),
        gran,
        16 if gran is PG else None,
        draw(st.booleans()),
        zero_point=draw(st.sampled_from(["int", "float"])),
    )


@settings(deadline=None, max_examples=40)
@given(spec=specs_st(), seed=st.integers(0, 2**31 - 1), df=st.sampled_from([1.5, 3.0, 30.0]))
def test_clip_search_never_increases_any_group_error(spec: QuantSpec, seed: int, df: float) -> None:
    torch.manual_seed(seed)
    w = torch.distributions.StudentT(df).sample((6, 48))
    if spec.symmetric and not QTYPES[spec.qtype].signed:
        w = w.abs()  # symmetric unsigned grids cover [0, max]
    rtn = _group_sq_error(w, quantize_weight(w, spec), spec)
    clip = _group_sq_error(w, quantize_weight(w, spec, clip_search=True), spec)
    assert bool((clip <= rtn).all()), (clip - rtn).max()


@pytest.mark.parametrize(
    ("spec", "max_ratio"),
    [  # observed clip / rtn total squared error on this Student-t(2) weight:
        (QuantSpec("int4", PG, 64), 0.90),  # 0.866
        (QuantSpec("int3", PG, 64), 0.80),  # 0.764
        (QuantSpec("int4", PC), 0.85),  # 0.813
        (QuantSpec("int3", PG, 64, symmetric=False), 0.95),  # 0.913
        (QuantSpec("int3", PC, symmetric=False, zero_point="float"), 0.60),  # 0.541
    ],
    ids=lambda v: v.describe() if isinstance(v, QuantSpec) else str(v),
)
def test_clip_search_strictly_helps_on_heavy_tailed_weights(spec: QuantSpec, max_ratio: float) -> None:
    torch.manual_seed(0)
    w = torch.distributions.StudentT(2.0).sample((32, 256))
    rtn = _group_sq_error(w, quantize_weight(w, spec), spec).sum()
    clip = _group_sq_error(w, quantize_weight(w, spec, clip_search=True), spec).sum()
    assert clip < max_ratio * rtn


def test_clip_search_helps_a_weight_with_a_few_outliers() -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 256) * 0.02
    w[torch.arange(32), torch.randint(0, 256, (32,))] = 0.1  # one 5-sigma outlier per row
    spec = QuantSpec("int4", PG, 128)
    rtn = _group_sq_error(w, quantize_weight(w, spec), spec)
    clip = _group_sq_error(w, quantize_weight(w, spec, clip_search=True), spec)
    assert bool((clip <= rtn).all())
    assert clip.sum() < 0.85 * rtn.sum()  # observed ratio 0.770 (int3: 0.474)


def test_clip_search_with_custom_grid_only_shrinks_the_range() -> None:
    w = _w(8, 64, seed=5)
    spec = QuantSpec("int4", PC)
    rtn = quantize_weight(w, spec)
    clip = quantize_weight(w, spec, clip_search=True, grid_points=5, max_shrink=0.4)
    ratio = clip.scale / rtn.scale
    allowed = torch.tensor([1.0, 0.92, 0.84, 0.76, 0.68, 0.6])
    assert bool(((ratio[..., None] - allowed).abs().amin(-1) < 1e-5).all())


def _diagonal_search_error(w: torch.Tensor, spec: QuantSpec, steps: int, span: float) -> torch.Tensor:
    """Per-group error of the best range among min/max shrunk by the same ratio (the 1-D search)."""
    qt = QTYPES[spec.qtype]
    wg = grouped(w, spec)
    best = None
    for i in range(steps + 1):
        r = 1.0 - span * i / steps
        scale, zp = qparams_from_minmax(wg.amin(-1) * r, wg.amax(-1) * r, qt, False,
                                        integer_zero_point=spec.zero_point == "int")  # fmt: skip
        q = quantize(wg, scale[..., None], zp[..., None], qt, integer_zero_point=spec.zero_point == "int")
        err = (dequantize(q, scale[..., None], zp[..., None]) - wg).pow(2).sum(-1)
        best = err if best is None else torch.minimum(best, err)
    return best


@pytest.mark.parametrize("zero_point", ["int", "float"])
@pytest.mark.parametrize("qtype", ["int2", "int3", "int4", "uint8"])
def test_asymmetric_search_is_at_least_as_good_as_the_diagonal_in_every_group(qtype: str, zero_point: str) -> None:
    torch.manual_seed(3)
    w = torch.distributions.StudentT(3.0).sample((16, 128))
    spec = QuantSpec(qtype, PG, 32, symmetric=False, zero_point=zero_point)
    steps, span = clip_grid(QTYPES[qtype].bits, symmetric=False)
    two_d = _group_sq_error(w, quantize_weight(w, spec, clip_search=True), spec)
    assert bool((two_d <= _diagonal_search_error(w, spec, steps, span) * (1 + 1e-6)).all())


def test_asymmetric_search_beats_the_diagonal_on_a_one_sided_outlier() -> None:
    # Shrinking both ends by one ratio cannot serve a range stretched on one side only.
    torch.manual_seed(0)
    w = torch.randn(32, 64) * 0.02
    w[:, 7] = 0.09  # one large positive weight per row; the negative side is Gaussian
    spec = QuantSpec("int4", PC, symmetric=False, zero_point="float")
    steps, span = clip_grid(4, symmetric=False)
    rtn = quantize_weight(w, spec)
    clip = quantize_weight(w, spec, clip_search=True)
    err = _group_sq_error(w, clip, spec).sum()
    assert err < 0.93 * _diagonal_search_error(w, spec, steps, span).sum()  # observed 0.880
    assert err < 0.88 * _group_sq_error(w, rtn, spec).sum()  # observed 0.824


# -- errors --------------------------------------------------------------------------------------


def test_group_size_not_dividing_k_names_the_numbers() -> None:
    msg = r"in_features 96 is not divisible by group_size 64 \(group sizes that divide it: \[32\]\)"
    with pytest.raises(ValueError, match=msg):
        quantize_weight(_w(4, 96), QuantSpec("int4", PG, 64))
    # only group sizes the command line accepts are suggested (96 would be refused by --group_size)
    with pytest.raises(ValueError, match=r"^in_features 96 is not divisible by group_size 64 \(group sizes that divide it: \[32\]\)$"):
        check_weight_shape((4, 96), QuantSpec("int4", PG, 64))
    with pytest.raises(ValueError, match=r"^in_features 100 is not divisible by group_size 32 \(none of the group sizes .* per channel\)$"):
        check_weight_shape((4, 100), QuantSpec("int4", PG, 32))
    check_weight_shape((4, 128), QuantSpec("int4", PG, 32))  # fine


def test_per_token_is_rejected_for_weights() -> None:
    with pytest.raises(ValueError, match="per_token granularity does not apply to weights"):
        quantize_weight(_w(4, 32), QuantSpec("int8", Granularity.PER_TOKEN))
