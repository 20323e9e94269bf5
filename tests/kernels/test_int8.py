"""Int8 kernels: every fast kernel against its reference, the static W8A8 bias / zero-point fold and its inverse."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimquant.errors import SlimquantError
from slimquant.kernels import int8
from slimquant.kernels.int8 import (
    KERNELS,
    fast_available,
    fold_input_zero_point,
    fold_static_w8a8,
    unfold_input_zero_point,
    get_kernel,
    quantize_per_token_reference,
)



@pytest.fixture(params=["torch", "native", "fast"])
def impl(request: pytest.FixtureRequest) -> str:
    """Implementations of the linear ops that must agree with the reference ("fast" is native or torch)."""
    if request.param == "native":
        request.getfixturevalue("native_lib")
    return request.param


# (leading dims of x, k, n): M = 1, 3, 17, 0, 3-D; k and n odd or not multiples of 8
SHAPES = [((1,), 576, 192), ((3,), 41, 24), ((17,), 40, 7), ((2, 5), 33, 9), ((0,), 16, 8), ((4,), 1, 3)]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weights(n: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    return w, torch.rand(n, generator=g) * 0.01 + 1e-3


def _x(lead: tuple[int, ...], k: int, g: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x = torch.randn(*lead, k, generator=g)
    if x.numel():
        x.reshape(-1, k)[0] = 0.0  # a zero row
    return x.to(dtype)


# -- quantize_per_token --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("lead", "k", "n"), SHAPES)
def test_quantize_per_token_fast_is_bit_exact(lead: tuple[int, ...], k: int, n: int, dtype: torch.dtype) -> None:
    x = _x(lead, k, _gen(), dtype)
    q_ref, s_ref = get_kernel("quantize_per_token")(x)
    q, s = get_kernel("quantize_per_token", "fast")(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == x.shape and s.shape == (*lead, 1)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_quantize_per_token_values() -> None:
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.54, 0.5], [-3.0, 1.5, 0.0]])
    q, s = get_kernel("quantize_per_token", "fast")(x)
    assert torch.equal(s, torch.tensor([[1.0], [2.54 / 127], [3.0 / 127]]))  # zero row -> scale 1
    assert torch.equal(q[0], torch.zeros(3, dtype=torch.int8))
    assert q[1, 1] == -127 and q[2, 0] == -127 and q[2, 1] == 64  # 63.5 rounds half to even


# -- int8_matmul ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("lead", "k", "n"), SHAPES)
def test_int8_matmul_fast_equals_reference(lead: tuple[int, ...], k: int, n: int) -> None:
    g = _gen(1)
    a = torch.randint(-128, 128, (*lead, k), dtype=torch.int8, generator=g)
    w, _ = _weights(n, k, g)
    ref = get_kernel("int8_matmul")(a, w)
    out = get_kernel("int8_matmul", "fast")(a, w)
    assert out.dtype == torch.int32 and out.shape == (*lead, n)
    assert torch.equal(out, ref)


def test_int8_matmul_degenerate_strides() -> None:
    """torch._int_mm returns wrong numbers for a [1, k] operand with strides (1, 1) and for k == 1."""
    g = _gen(10)
    a = torch.randint(-128, 128, (40, 1), dtype=torch.int8, generator=g).T  # [1, 40], strides (1, 1)
    w = torch.randint(-128, 128, (6, 40), dtype=torch.int8, generator=g)
    w1 = torch.randint(-128, 128, (6, 1), dtype=torch.int8, generator=g)  # w1.T: [1, 6], strides (1, 1)
    a1 = torch.randint(-128, 128, (5, 1), dtype=torch.int8, generator=g)
    fast, ref = get_kernel("int8_matmul", "fast"), get_kernel("int8_matmul")
    assert torch.equal(fast(a, w), ref(a, w))
    assert torch.equal(fast(a1, w1), ref(a1, w1))
    assert torch.equal(fast(w[:, ::2], w[:3, ::2]), ref(w[:, ::2], w[:3, ::2]))


def test_int8_matmul_extremes_are_exact() -> None:
    a = torch.full((3, 1536), -128, dtype=torch.int8)
    w = torch.full((5, 1536), -128, dtype=torch.int8)
    out = get_kernel("int8_matmul", "fast")(a, w)
    assert torch.equal(out, torch.full((3, 5), 128 * 128 * 1536, dtype=torch.int32))


# -- linear_w8a8_dynamic -------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("lead", "k", "n"), SHAPES)
def test_w8a8_dynamic_fast_equals_reference(lead: tuple[int, ...], k: int, n: int, with_bias: bool, impl: str) -> None:
    g = _gen(2)
    x = _x(lead, k, g)
    w, ws = _weights(n, k, g)
    bias = torch.randn(n, generator=g) if with_bias else None
    ref = get_kernel("linear_w8a8_dynamic")(x, w, ws, bias)
    out = get_kernel("linear_w8a8_dynamic", impl)(x, w, ws, bias)
    assert out.shape == (*lead, n) and out.dtype == x.dtype
    assert torch.equal(out, ref)  # same int32 accumulators, same float op order


def test_w8a8_dynamic_matches_its_definition_and_float() -> None:
    g = _gen(3)
    x = torch.randn(2, 7, 96, generator=g)
    w, ws = _weights(48, 96, g)
    bias = torch.randn(48, generator=g)
    out = get_kernel("linear_w8a8_dynamic", "fast")(x, w, ws, bias.to(torch.bfloat16).float())
    q, s = int8.quantize_per_token_reference(x)
    want = (q.double() @ w.double().T) * s.double() * ws.double() + bias.to(torch.bfloat16).double()
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    y_float = F.linear(x, w.float() * ws[:, None])
    rel = (out - y_float - bias.to(torch.bfloat16).float()).norm() / y_float.norm()
    assert rel < 0.02  # activation rounding only; observed 0.0064


@pytest.mark.parametrize("rows", [2, 5])
def test_w8a8_dynamic_bf16_input(impl: str, rows: int) -> None:
    g = _gen(4)
    x = torch.randn(rows, 64, generator=g).to(torch.bfloat16)
    w, ws = _weights(24, 64, g)
    ref = get_kernel("linear_w8a8_dynamic")(x, w, ws)
    out = get_kernel("linear_w8a8_dynamic", impl)(x, w, ws)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)


# -- linear_w8a8_static and its fold -------------------------------------------------------------


def _static_case(lead: tuple[int, ...], k: int, n: int, seed: int = 5):
    g = _gen(seed)
    x = _x(lead, k, g) * 2.0
    w, ws = _weights(n, k, g)
    bias = torch.randn(n, generator=g)
    input_scale, input_offset = 0.03, 7  # |x| up to ~8 -> |x / s| up to ~270: both ends clamp
    quant_bias, deq_scale = fold_static_w8a8(w, ws, input_scale, input_offset, bias)
    return x, w, ws, bias, input_scale, input_offset, quant_bias, deq_scale


@pytest.mark.parametrize(("lead", "k", "n"), SHAPES)
def test_w8a8_static_fast_equals_reference(lead: tuple[int, ...], k: int, n: int, impl: str) -> None:
    x, w, _, _, s, off, qb, dq = _static_case(lead, k, n)
    ref = get_kernel("linear_w8a8_static")(x, s, off, w, dq, qb)
    out = get_kernel("linear_w8a8_static", impl)(x, s, off, w, dq, qb)
    assert out.shape == (*lead, n) and out.dtype == torch.float32
    assert torch.equal(out, ref)


def test_fold_dtypes_and_values() -> None:
    w = torch.tensor([[1, -2, 3], [127, -128, 0]], dtype=torch.int8)
    ws = torch.tensor([0.5, 0.25])
    qb, dq = fold_static_w8a8(w, ws, 0.1, 3, torch.tensor([1.0, -0.3]))
    assert qb.dtype == torch.int32 and dq.dtype == torch.float32
    assert torch.equal(dq, (0.1 * ws.double()).float())
    # round(1 / 0.05) - 3 * 2 = 14; round(-0.3 / 0.025) - 3 * (-1) = -9
    assert qb.tolist() == [14, -9]
    qb0, _ = fold_static_w8a8(w, ws, 0.1, 0, None)
    assert qb0.tolist() == [0, 0]


def test_fold_integer_identity_is_exact() -> None:
    """acc + quant_bias == round(x / s) @ w.T + round(bias / deq_scale) exactly, when nothing clamps."""
    x, w, ws, bias, s, off, qb, dq = _static_case((9,), 40, 12)
    x = x.clamp(-3.0, 3.0)  # |x / s| <= 100, + offset 7 stays in int8
    xq = int8.quantize(x, torch.tensor(s), torch.tensor(float(off)), int8._INT8)
    acc = get_kernel("int8_matmul", "fast")(xq, w) + qb
    r = torch.round(x / torch.tensor(s)).to(torch.int64)
    want = r @ w.to(torch.int64).T + torch.round(bias.double() / dq.double()).to(torch.int64)
    assert torch.equal(acc.to(torch.int64), want)


@pytest.mark.parametrize(("lead", "k", "n"), SHAPES)
def test_folded_static_equals_float_formula(lead: tuple[int, ...], k: int, n: int) -> None:
    """Integer formula == fake-quantized x times dequantized weights + float bias, up to float rounding
    and the bias rounding (<= deq_scale / 2)."""
    x, w, ws, bias, s, off, qb, dq = _static_case(lead, k, n)
    out = get_kernel("linear_w8a8_static", "fast")(x, s, off, w, dq, qb)
    xq = torch.clamp(torch.round(x.double() / s) + off, -128, 127)
    x_fq = (xq - off) * s  # fake-quant x, clamping included
    y_float = x_fq @ (w.double() * ws.double()[:, None]).T + bias.double()
    err = (out.double() - y_float).abs()
    assert torch.all(err <= dq.double() / 2 + 1e-6 * (1 + y_float.abs()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w8a8_static_low_precision_input(dtype: torch.dtype, impl: str) -> None:
    x, w, _, _, s, off, qb, dq = _static_case((3,), 48, 16)
    x = x.to(dtype)
    out = get_kernel("linear_w8a8_static", impl)(x, s, off, w, dq, qb)
    assert out.dtype == dtype and torch.equal(out, get_kernel("linear_w8a8_static")(x, s, off, w, dq, qb))


def test_unfolding_the_input_zero_point_is_exact() -> None:
    g = _gen(6)
    w = torch.randint(-127, 128, (32, 40), generator=g, dtype=torch.int8)
    acc_bias = torch.randint(-(2**20), 2**20, (32,), generator=g, dtype=torch.int32)
    for zp in (-128, -3, 0, 127):
        qb = fold_input_zero_point(acc_bias, zp, w)
        assert qb.dtype == torch.int32
        assert torch.equal(qb.long(), acc_bias.long() - zp * w.long().sum(1))
        assert torch.equal(unfold_input_zero_point(qb, zp, w), acc_bias)


# -- linear_w8a16 --------------------------------------------------------------------------------


@pytest.mark.parametrize(("lead", "k", "n"), SHAPES)
def test_w8a16_fast_float32(lead: tuple[int, ...], k: int, n: int, impl: str) -> None:
    g = _gen(7)
    x = _x(lead, k, g)
    w, ws = _weights(n, k, g)
    ref = get_kernel("linear_w8a16")(x, w, ws)
    out = get_kernel("linear_w8a16", impl)(x, w, ws)
    assert out.shape == (*lead, n) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("lead", "k"), [((1,), 576), ((3,), 64), ((17,), 32), ((2, 3), 48), ((3,), 40), ((1,), 41), ((130,), 32)]
)
def test_w8a16_fast_bfloat16(lead: tuple[int, ...], k: int, impl: str) -> None:
    """torch: k % 16 == 0 and M <= 128 run torch._weight_int8pack_mm; k = 40, 41 (wrong or crashing there)
    and M = 130 take the reference. native: up to 16 rows in float32, then torch."""
    g = _gen(8)
    x = _x(lead, k, g, torch.bfloat16)
    w, ws = _weights(24, k, g)
    ref = get_kernel("linear_w8a16")(x, w, ws)
    out = get_kernel("linear_w8a16", impl)(x, w, ws)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.float().abs().max().item())


def test_w8a16_fast_misaligned_bfloat16_input(impl: str) -> None:
    """An activation view 2 bytes off alignment would segfault torch._weight_int8pack_mm; we copy it."""
    g = _gen(9)
    base = torch.randn(3 * 64 + 1, generator=g).to(torch.bfloat16)
    x = base[1:].view(3, 64)
    assert x.data_ptr() % 32 != 0
    w, ws = _weights(16, 64, g)
    ref = get_kernel("linear_w8a16")(x, w, ws)
    out = get_kernel("linear_w8a16", impl)(x, w, ws)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.float().abs().max().item())


def test_w8a16_fast_float16_does_not_overflow_before_scaling(impl: str) -> None:
    x = torch.full((2, 64), 100.0, dtype=torch.float16)  # x @ q.T = 812800 > float16 max
    w = torch.full((4, 64), 127, dtype=torch.int8)
    ws = torch.full((4,), 1e-3)
    out = get_kernel("linear_w8a16", impl)(x, w, ws)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), torch.full((2, 4), 812.8), rtol=1e-3, atol=0.0)


# -- registry ------------------------------------------------------------------------------------


def test_registry_has_reference_and_fast_for_every_op() -> None:
    assert set(KERNELS) == {"quantize_per_token", "int8_matmul", "linear_w8a8_dynamic", "linear_w8a8_static",
                            "linear_w8a16", "rmsnorm", "rmsnorm_quant", "silu_mul_quant", "linear_w8a8_dynamic_q",
                            "linear_w8a8_static_q"}  # fmt: skip
    for op, impls in KERNELS.items():
        want = {"reference", "fast"} | ({"torch", "native"} if op.startswith("linear_") else set())
        want |= {"native"} if op.endswith("_quant") or op == "rmsnorm" else set()
        assert set(impls) == want
        assert get_kernel(op) is impls["reference"]
        assert fast_available(op) is True  # the pinned torch has every primitive (_int_mm, _weight_int8pack_mm)


def test_fast_available_is_false_without_the_torch_primitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch, "_int_mm")
    assert fast_available("int8_matmul") is False and fast_available("linear_w8a8_static") is False
    assert fast_available("quantize_per_token") is True  # needs no primitive
    assert fast_available("linear_w8a16") is hasattr(torch, "_weight_int8pack_mm")
    with pytest.raises(SlimquantError):
        fast_available("no_such_op")


def test_registry_errors_list_valid_names() -> None:
    with pytest.raises(SlimquantError, match="linear_w8a16.*quantize_per_token"):
        get_kernel("linear_w4a16")
    with pytest.raises(SlimquantError, match="'cuda'.*fast, reference"):
        get_kernel("int8_matmul", "cuda")
    with pytest.raises(SlimquantError, match="valid ops"):
        fast_available("nope")


@pytest.mark.parametrize(("m", "k", "dtype", "used"), [
    (1, 576, torch.bfloat16, True), (128, 64, torch.bfloat16, True), (129, 64, torch.bfloat16, False),
    (1, 40, torch.bfloat16, False), (1, 576, torch.float32, False), (1, 576, torch.float16, False),
])
def test_w8a16_torch_routes_to_int8pack(
    monkeypatch: pytest.MonkeyPatch, m: int, k: int, dtype: torch.dtype, used: bool
) -> None:
    if not hasattr(torch, "_weight_int8pack_mm"):
        pytest.skip("no torch._weight_int8pack_mm in this build")
    calls = []
    real = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(1) or real(*a))
    w, ws = _weights(8, k, _gen(11))
    get_kernel("linear_w8a16", "torch")(torch.randn(m, k).to(dtype), w, ws)
    assert bool(calls) == used


def test_fold_rejects_int32_overflow() -> None:
    w = torch.ones(2, 4, dtype=torch.int8)
    with pytest.raises(SlimquantError, match="overflows int32"):
        fold_static_w8a8(w, torch.full((2,), 1e-4), 1e-4, 0, torch.tensor([1e3, 0.0]))


@pytest.mark.parametrize("impl", ["reference", "torch", "fast"])
@pytest.mark.parametrize("m", [1, 3, 5, 40])
def test_linears_on_quantized_rows_equal_the_plain_linears(m: int, impl: str) -> None:
    """``*_q(quantize_input(x))`` is the plain linear on ``x``, bit for bit, in every implementation."""
    from slimquant.kernels.int8 import quantize_input_reference

    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 48, generator=g) * 2
    x[0] = 0.0  # a zero row: scale 1
    w = torch.randint(-128, 128, (20, 48), dtype=torch.int8, generator=g)
    ws, bias = torch.rand(20, generator=g) * 0.01 + 1e-4, torch.randn(20, generator=g)
    for b in (bias, None):
        q, xs = quantize_input_reference(x)
        assert q.dtype == torch.int8 and xs.shape == (m,)
        out = get_kernel("linear_w8a8_dynamic_q", impl)(q, xs, w, ws, b)
        assert torch.equal(out, get_kernel("linear_w8a8_dynamic")(x, w, ws, b))
    s, off = torch.tensor([0.02]), torch.tensor([-5.0])
    qb, dq = fold_static_w8a8(w, ws, 0.02, -5, bias)
    q, xs = quantize_input_reference(x, s, off)
    assert xs.numel() == 0
    out = get_kernel("linear_w8a8_static_q", impl)(q, w, dq, qb)
    assert torch.equal(out, get_kernel("linear_w8a8_static")(x, s, off, w, dq, qb))


def test_fused_producer_references_are_the_float_op_then_the_linear_quantization() -> None:
    from slimquant.kernels.int8 import quantize_input_reference

    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(2, 3, 32, generator=g), torch.rand(32, generator=g) + 0.5
    y, q, xs = get_kernel("rmsnorm_quant")(x, weight, 1e-6)
    want = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert torch.equal(y, want) and y.shape == x.shape
    q2, xs2 = quantize_per_token_reference(want.reshape(6, 32))
    assert torch.equal(q, q2) and torch.equal(xs, xs2.reshape(-1))
    gate, up = torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g)
    s, off = torch.tensor([0.01]), torch.tensor([2.0])
    q, xs = get_kernel("silu_mul_quant")(gate, up, s, off)
    assert torch.equal(q, quantize_input_reference(F.silu(gate) * up, s, off)[0]) and xs.numel() == 0
