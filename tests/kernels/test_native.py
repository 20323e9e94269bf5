"""Native C++ kernels (slimquant.kernels.native): the GEMV and GEMM paths, thread splits, the portable loops
and the AVX512 ones, the module paths that use them, and what happens when the library cannot be built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimquant.errors import SlimquantError
from slimquant.kernels import int8, native
from slimquant.kernels.int8 import fold_static_w8a8, get_kernel
from slimquant.kernels.weight_only import linear_w4a16_reference
from slimquant.math.packing import pack
from slimquant.math.weights import quantize_weight
from slimquant.nn.modules import QLinear
from slimquant.types.spec import QuantSpec

# rows straddle the GEMV (<= W8A8_GEMV_MAX_ROWS) / GEMM and the 4-row tiles; k straddles the 64-byte and 16-float
# steps (masked tails); n is not a multiple of the 4- or 8-row weight tiles
ROWS = [1, 2, 3, 4, 5, 7, 9, 33]
KN = [(576, 192), (65, 13), (17, 9), (2, 1), (1536, 7)]


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(params=["avx512", "avx2", "scalar"])
def isa(request: pytest.FixtureRequest, native_lib):  # noqa: ANN001
    """Every code path of the library this CPU runs; "scalar" forces the portable loops, "avx2" the AVX2 ones
    (what a CPU without AVX512 runs)."""
    feats = native_lib.cpu_features()
    if request.param == "avx512" and "avx512" not in feats:
        pytest.skip("this CPU has no AVX512")
    if request.param == "avx2" and "avx512" not in feats and "avx2" not in feats:
        pytest.skip("this CPU has no AVX2")
    native_lib.set_isa(request.param)
    yield request.param
    native_lib.set_isa(None)


@pytest.fixture(params=[1, 2])
def threads(request: pytest.FixtureRequest):  # noqa: ANN001
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _case(m: int, k: int, n: int, seed: int):
    g = _g(seed)
    x = torch.randn(m, k, generator=g) * 3
    x[0] = 0.0  # a zero row: scale 1
    if m > 2:
        x[1, 0] = 1e30  # one huge value: every other entry of the row rounds to 0
        x[2] = torch.randn(k, generator=g) * 1e-40  # denormals
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    ws = torch.rand(n, generator=g) * 0.01 + 1e-4
    return x, w, ws, torch.randn(n, generator=g)


@pytest.mark.parametrize(("k", "n"), KN)
@pytest.mark.parametrize("m", ROWS)
def test_w8a8_native_bits_equal_reference(m: int, k: int, n: int, isa: str, threads: int) -> None:
    x, w, ws, bias = _case(m, k, n, m * 100 + k)
    for b in (bias, None):
        ref = get_kernel("linear_w8a8_dynamic")(x, w, ws, b)
        assert torch.equal(get_kernel("linear_w8a8_dynamic", "native")(x, w, ws, b), ref)
    x = x.clamp(-20, 20)  # static: a range that makes some values clamp at both ends
    qb, dq = fold_static_w8a8(w, ws, 0.05, -3, bias)
    ref = get_kernel("linear_w8a8_static")(x, 0.05, -3, w, dq, qb)
    assert torch.equal(get_kernel("linear_w8a8_static", "native")(x, 0.05, -3, w, dq, qb), ref)


@pytest.mark.parametrize(("k", "n"), KN)
@pytest.mark.parametrize("m", [1, 3, 4, 5, 9, 16])
def test_w8a16_native_matches_reference(m: int, k: int, n: int, isa: str, threads: int) -> None:
    x, w, ws, _ = _case(m, k, n, 7)
    x = torch.randn(m, k, generator=_g(1))
    ref = get_kernel("linear_w8a16")(x, w, ws)
    out = get_kernel("linear_w8a16", "native")(x, w, ws)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


# (k, n, groups): per-channel and groups of 32 / 64 (the vector loops), groups of 8 / 40 / odd k (portable loops)
W4_SHAPES = [(576, 40, 9), (576, 33, 18), (576, 17, 1), (64, 5, 2), (96, 7, 12), (40, 9, 1), (15, 3, 1), (1536, 9, 24)]


def _w4_case(m: int, k: int, n: int, groups: int, asym: bool, qmin: int, seed: int):
    g = _g(seed)
    q = torch.randint(qmin, qmin + 16, (n, k), generator=g)
    q[0] = qmin + 15  # a row at the top of the grid and one at the bottom
    q[-1] = qmin
    packed = pack(q, 4, qmin)
    scale = torch.rand(n, groups, generator=g) * 0.02 + 1e-4
    scale[::3] *= -1  # GGUF's symmetric block types keep llama.cpp's signed scale d = max / qmin
    zp = torch.randn(n, groups, generator=g) * 4 + 0.3 if asym else None  # float zero points
    x = torch.randn(m, k, generator=g)
    return x, packed, scale, zp, torch.randn(n, generator=g)


@pytest.mark.parametrize(("k", "n", "groups"), W4_SHAPES)
@pytest.mark.parametrize("m", [1, 3, 4, 5, native.W4A16_GEMV_MAX_ROWS, native.W4A16_GEMV_MAX_ROWS + 1, 40])
@pytest.mark.parametrize(("asym", "qmin"), [(False, -8), (True, -8), (True, 0)], ids=["int4-sym", "int4-zp", "uint4-zp"])
def test_w4a16_native_matches_reference(m: int, k: int, n: int, groups: int, asym: bool, qmin: int, isa: str,
                                        threads: int) -> None:  # fmt: skip
    """The GEMV (up to W4A16_GEMV_MAX_ROWS rows) and the tiled GEMM against dequantize + F.linear."""
    x, packed, scale, zp, bias = _w4_case(m, k, n, groups, asym, qmin, m * 7 + k + n)
    for b in (bias, None):
        ref = linear_w4a16_reference(x, packed, scale, zp, qmin, b)
        out = native.w4a16(x, packed, scale, zp, qmin, b)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6 * float(ref.abs().max()))


def test_w4a16_gemm_tiles_hold_the_reference_weight(native_lib) -> None:  # noqa: ANN001
    """Tiles much smaller than the weight (one per 16 rows): the same result as one tile, and as the reference;
    the GEMM multiplies the reference's float32 weight bits, so a one-hot input reads a weight column exactly."""
    lib = native_lib.library()
    default = lib.w4_tile_bytes()
    x, packed, scale, zp, bias = _w4_case(40, 256, 70, 4, True, -8, 5)
    ref = linear_w4a16_reference(x, packed, scale, zp, -8, bias)
    lib.set_w4_tile_bytes(4096)
    try:
        small = native.w4a16(x, packed, scale, zp, -8, bias)
        eye = native.w4a16(torch.eye(256)[:20], packed, scale, zp, -8)
    finally:
        lib.set_w4_tile_bytes(default)
    torch.testing.assert_close(small, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    w_ref = linear_w4a16_reference(torch.eye(256)[:20], packed, scale, zp, -8)
    assert torch.equal(eye, w_ref)


def test_w4a16_input_shapes_and_errors(native_lib) -> None:  # noqa: ANN001
    x, packed, scale, zp, bias = _w4_case(6, 64, 8, 2, True, -8, 2)
    out = native.w4a16(x.reshape(2, 3, 64).double(), packed, scale, zp, -8, bias)
    assert out.shape == (2, 3, 8) and out.dtype == torch.float64
    assert native.w4a16(torch.empty(0, 64), packed, scale, zp, -8).shape == (0, 8)
    with pytest.raises(RuntimeError, match="63 features but the weight has 64"):
        native.w4a16(torch.randn(2, 63), packed, scale, zp, -8, k=64)
    with pytest.raises(RuntimeError, match="32 bytes, not 16"):
        native.w4a16(x, packed[:, :16], scale, zp, -8)
    with pytest.raises(RuntimeError, match="multiple of the number of groups"):
        native.w4a16(x, packed, torch.rand(8, 3), None, -8)
    with pytest.raises(RuntimeError, match="zero_point"):
        native.w4a16(x, packed, scale, torch.rand(8, 1, 2), -8)


def _gated_reference(x: torch.Tensor, gate: native.Packed4, up: native.Packed4) -> torch.Tensor:
    g = linear_w4a16_reference(x, gate.w, gate.scale, gate.zero_point, gate.qmin, gate.bias)
    return F.silu(g) * linear_w4a16_reference(x, up.w, up.scale, up.zero_point, up.qmin, up.bias)


def _gated_case(m: int, k: int, n: int, groups: int, asym: bool, qmin: int, seed: int, bias: bool):
    x, wg, sg, zg, bg = _w4_case(m, k, n, groups, asym, qmin, seed)
    _, wu, su, zu, bu = _w4_case(m, k, n, groups, asym, qmin, seed + 1)
    x = x * 4  # gate values well into both tails of silu
    return x, native.Packed4(wg, sg, zg, qmin, bg if bias else None), native.Packed4(wu, su, zu, qmin, bu if bias else None)


@pytest.mark.parametrize(("k", "n", "groups"), [(576, 40, 9), (96, 70, 12), (40, 9, 1), (1536, 9, 24)])
@pytest.mark.parametrize("m", [1, 5, native.W4A16_GEMV_MAX_ROWS, native.W4A16_GEMV_MAX_ROWS + 1, 40])
@pytest.mark.parametrize(("asym", "qmin"), [(False, -8), (True, 0)], ids=["int4-sym", "uint4-zp"])
def test_w4a16_gated_matches_reference(m: int, k: int, n: int, groups: int, asym: bool, qmin: int, isa: str,
                                       threads: int) -> None:  # fmt: skip
    """silu(gate) * up from both packed weights (two GEMVs, or one tiled GEMM with the epilogue) against the
    reference linears and torch's silu; with and without biases."""
    for bias in (True, False):
        x, gate, up = _gated_case(m, k, n, groups, asym, qmin, m + k + n, bias)
        ref = _gated_reference(x, gate, up)
        out = native.w4a16_gated(x, gate, up)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6 * float(ref.abs().max()))


def test_w4a16_gated_tiles_and_shapes(native_lib) -> None:  # noqa: ANN001
    """Tiles of one column block each (the two weights side by side in one buffer), leading dims, other dtypes,
    empty inputs and mismatched weights."""
    lib = native_lib.library()
    default = lib.w4_tile_bytes()
    x, gate, up = _gated_case(40, 256, 70, 4, True, -8, 9, True)
    ref = _gated_reference(x, gate, up)
    lib.set_w4_tile_bytes(4096)
    try:
        small = native.w4a16_gated(x, gate, up)
    finally:
        lib.set_w4_tile_bytes(default)
    torch.testing.assert_close(small, ref, rtol=1e-5, atol=2e-6 * float(ref.abs().max()))
    out = native.w4a16_gated(x.reshape(4, 10, 256).double(), gate, up)
    assert out.shape == (4, 10, 70) and out.dtype == torch.float64
    torch.testing.assert_close(out.reshape(40, 70).float(), ref, rtol=1e-5, atol=2e-6 * float(ref.abs().max()))
    assert native.w4a16_gated(torch.empty(0, 256), gate, up).shape == (0, 70)
    with pytest.raises(RuntimeError, match="same rows"):
        native.w4a16_gated(x, gate, up._replace(w=up.w[:60], scale=up.scale[:60], zero_point=up.zero_point[:60]))
    with pytest.raises(RuntimeError, match="255 features but the weights have 256"):
        native.w4a16_gated(torch.randn(20, 255), gate, up, k=256)
    with pytest.raises(RuntimeError, match="128 bytes, not 64"):
        native.w4a16_gated(x, gate, up._replace(w=up.w[:, :64]))


@pytest.mark.parametrize(("k", "n"), KN)
@pytest.mark.parametrize("m", ROWS)
def test_w8a8_native_on_quantized_rows_bits_equal_reference(m: int, k: int, n: int, isa: str, threads: int) -> None:
    x, w, ws, bias = _case(m, k, n, m * 10 + k)
    q, xs = int8.quantize_input_reference(x)
    for b in (bias, None):
        assert torch.equal(get_kernel("linear_w8a8_dynamic_q", "native")(q, xs, w, ws, b),
                           get_kernel("linear_w8a8_dynamic_q")(q, xs, w, ws, b))  # fmt: skip
    qb, dq = fold_static_w8a8(w, ws, 0.05, -3, bias)
    q, _ = int8.quantize_input_reference(x.clamp(-20, 20), torch.tensor([0.05]), torch.tensor([-3.0]))
    assert torch.equal(get_kernel("linear_w8a8_static_q", "native")(q, w, dq, qb),
                       get_kernel("linear_w8a8_static_q")(q, w, dq, qb))  # fmt: skip


STATIC = (torch.tensor([0.03]), torch.tensor([4.0]))


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize(("m", "k"), [(1, 576), (5, 65), (33, 16), (3, 1)])
def test_rmsnorm_quant_native(m: int, k: int, static: bool, isa: str, threads: int) -> None:
    """The norm equals the reference to float32 rounding (the sum of squares runs in another order); its int8
    rows are exactly the reference quantization of the norm it returns."""
    g = _g(k)
    x = torch.randn(2, m, k, generator=g) * 3
    x[0, 0] = 0.0  # a zero row: rsqrt(eps), scale 1
    weight = torch.rand(k, generator=g) + 0.5
    params = STATIC if static else (None, None)
    y, q, xs = get_kernel("rmsnorm_quant", "native")(x, weight, 1e-5, *params)
    y_ref, _, _ = get_kernel("rmsnorm_quant")(x, weight, 1e-5, *params)
    torch.testing.assert_close(y, y_ref, rtol=2e-6, atol=1e-6)
    q_ref, xs_ref = int8.quantize_input_reference(y, *params)
    assert torch.equal(q, q_ref) and torch.equal(xs, xs_ref)


@pytest.mark.parametrize(("m", "k"), [(1, 576), (5, 65), (40, 24), (3, 1), (2, 7)])
def test_rmsnorm_native(m: int, k: int, isa: str, threads: int) -> None:
    """The float norm alone: the reference to float32 rounding on every code path (vector loops with and without
    a tail, rows in parallel), and exactly the ``y`` of ``rmsnorm_quant`` on the same path."""
    g = _g(k + 1)
    x = torch.randn(2, m, k, generator=g) * 3
    x[0, 0] = 0.0
    weight = torch.rand(k, generator=g) + 0.5
    y = get_kernel("rmsnorm", "native")(x, weight, 1e-5)
    assert y.shape == x.shape and y.dtype == torch.float32
    torch.testing.assert_close(y, get_kernel("rmsnorm")(x, weight, 1e-5), rtol=2e-6, atol=1e-6)
    assert torch.equal(y, get_kernel("rmsnorm_quant", "native")(x, weight, 1e-5)[0])
    assert native.rmsnorm(torch.empty(0, k), weight, 1e-5).shape == (0, k)
    with pytest.raises(RuntimeError, match="weight must be contiguous float32"):
        native.rmsnorm(x, weight[:-1] if k > 1 else weight.double(), 1e-5)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize(("m", "k"), [(1, 1536), (7, 65), (33, 16)])
def test_silu_mul_quant_native(m: int, k: int, static: bool, isa: str, threads: int) -> None:
    """int8 rows of silu(g) * u: the native exp is within a few ulp of torch's, so a value on a rounding edge may
    land one step away; the scales agree to float32 rounding."""
    g = _g(m + k)
    gate = torch.randn(m, k, generator=g) * 6
    gate[0, :3] = torch.tensor([100.0, -100.0, 0.0])  # exp overflow / underflow edges
    up = torch.randn(m, k, generator=g)
    params = STATIC if static else (None, None)
    q, xs = get_kernel("silu_mul_quant", "native")(gate, up, *params)
    q_ref, xs_ref = get_kernel("silu_mul_quant")(gate, up, *params)
    diff = (q.int() - q_ref.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3
    torch.testing.assert_close(xs, xs_ref, rtol=1e-6, atol=0)


class _Recorder:
    """Stands in for the compiled library: records (function, rows) per call and delegates."""

    def __init__(self, lib) -> None:  # noqa: ANN001
        self.lib, self.calls = lib, []

    def __getattr__(self, name: str):  # noqa: ANN204
        real = getattr(self.lib, name)

        def call(x, *args):  # noqa: ANN001, ANN202
            self.calls.append((name, x.numel() // max(x.shape[-1], 1)))
            return real(x, *args)

        return call


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch, native_lib) -> _Recorder:  # noqa: ANN001
    rec = _Recorder(native_lib.library())
    monkeypatch.setitem(native._state, "module", rec)
    return rec


def test_w8a16_native_takes_the_dequantized_gemm_beyond_its_rows(recorder: _Recorder) -> None:
    w, ws = torch.randint(-127, 128, (8, 32), dtype=torch.int8), torch.rand(8)
    for m in (1, native.W8A16_GEMV_MAX_ROWS, native.W8A16_GEMV_MAX_ROWS + 1):
        get_kernel("linear_w8a16", "fast")(torch.randn(m, 32), w, ws)
    get_kernel("linear_w8a16", "fast")(torch.randn(2, 32).bfloat16(), w, ws)  # the reference computes in bf16
    assert recorder.calls == [("w8a16", 1), ("w8a16", native.W8A16_GEMV_MAX_ROWS)]


def test_fast_uses_native_when_built(recorder: _Recorder) -> None:
    x, w, ws, bias = _case(3, 32, 8, 0)
    qb, dq = fold_static_w8a8(w, ws, 0.05, 0, bias)
    get_kernel("linear_w8a8_dynamic", "fast")(x, w, ws, bias)
    get_kernel("linear_w8a8_static", "fast")(x, 0.05, 0, w, dq, qb)
    get_kernel("linear_w8a8_dynamic", "torch")(x, w, ws, bias)
    assert recorder.calls == [("w8a8_dynamic", 3), ("w8a8_static", 3)]


def _qlinear(k: int, n: int, spec: QuantSpec, bias: bool = True) -> QLinear:
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=_g(3)))
    return QLinear.from_float(lin, quantize_weight(lin.weight.detach(), spec), spec)


@pytest.mark.parametrize("spec", [
    QuantSpec("int8", "per_channel"),
    QuantSpec("int8", "per_channel", symmetric=False),
    QuantSpec("int8", "per_tensor", symmetric=False),
    QuantSpec("int8", "per_group", group_size=32, symmetric=False),
    QuantSpec("int8", "per_group", group_size=16),
    QuantSpec("int4", "per_group", group_size=32),
    QuantSpec("int4", "per_group", group_size=32, symmetric=False),
    QuantSpec("int4", "per_group", group_size=32, symmetric=False, zero_point="float"),
    QuantSpec("uint4", "per_group", group_size=48, symmetric=False),
    QuantSpec("int4", "per_channel"),
    QuantSpec("int4", "per_tensor", symmetric=False),
], ids=lambda s: s.describe())  # fmt: skip
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_qlinear_native_matches_reference(spec: QuantSpec, rows: int, isa: str) -> None:
    q = _qlinear(96, 40, spec)
    x = torch.randn(2, rows, 96, generator=_g(4)) if rows > 1 else torch.randn(1, 1, 96, generator=_g(4))
    q.kernel = "reference"
    ref = q(x)
    q.kernel = "native"
    out = q(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_qlinear_native_routing(recorder: _Recorder) -> None:
    """The int8 GEMV runs for int8 weights at up to W8A16_GEMV_MAX_ROWS float32 rows; packed 2-bit, uint8, group
    sizes that are not multiples of 16, longer inputs, half inputs and kernel "torch" take dequantize + F.linear;
    packed 4-bit weights take the native 4-bit kernels for float32 inputs of any length."""
    q8 = _qlinear(96, 8, QuantSpec("int8", "per_channel"))
    q8(torch.randn(1, 96))
    q8(torch.randn(2, 8, 96))  # 16 rows
    q8(torch.randn(17, 96))
    q8.kernel = "torch"
    q8(torch.randn(1, 96))
    assert recorder.calls == [("w8a16", 1), ("w8a16", 16)]
    recorder.calls.clear()
    for spec in (QuantSpec("int2", "per_group", group_size=32), QuantSpec("uint8", "per_channel", symmetric=False),
                 QuantSpec("int8", "per_group", group_size=24)):  # fmt: skip
        _qlinear(96, 8, spec)(torch.randn(1, 96))
    _qlinear(96, 8, QuantSpec("int8", "per_channel")).bfloat16()(torch.randn(1, 96).bfloat16())
    assert recorder.calls == []
    q4 = _qlinear(96, 8, QuantSpec("int4", "per_group", group_size=32))  # 4-bit: any number of rows
    q4(torch.randn(1, 96))
    q4(torch.randn(3, 40, 96))
    q4.bfloat16()(torch.randn(1, 96).bfloat16())
    q4.float().kernel = "torch"
    q4(torch.randn(1, 96))
    assert recorder.calls == [("w4a16", 1), ("w4a16", 120)]


@pytest.mark.parametrize("spec", [QuantSpec("int4", "per_group", group_size=32), QuantSpec("int8", "per_channel")],
                         ids=lambda s: s.describe())  # fmt: skip
def test_inputs_that_need_a_gradient_take_the_differentiable_path(recorder: _Recorder, spec: QuantSpec) -> None:
    """The native kernels have no backward: an input that requires grad (under grad mode) gets dequantize +
    F.linear, and its gradient is x's through the dequantized weight."""
    q = _qlinear(96, 8, spec)
    x = torch.randn(2, 96, requires_grad=True)
    q(x).sum().backward()
    assert recorder.calls == []
    torch.testing.assert_close(x.grad, q.dequantized_weight().sum(0).expand(2, 96))
    with torch.no_grad():
        q(x)
    assert [c[0] for c in recorder.calls] == ["w4a16" if spec.qtype == "int4" else "w8a16"]


def test_unavailable_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed build: "native" says why, "fast" and the modules' default quietly take the torch kernels."""
    monkeypatch.setitem(native._state, "module", None)
    monkeypatch.setitem(native._state, "error", "RuntimeError: no compiler")
    assert not native.available() and native.unavailable_reason() == "RuntimeError: no compiler"
    x, w, ws, bias = _case(2, 32, 8, 1)
    with pytest.raises(SlimquantError, match="no compiler"):
        get_kernel("linear_w8a8_dynamic", "native")(x, w, ws, bias)
    assert torch.equal(get_kernel("linear_w8a8_dynamic", "fast")(x, w, ws, bias),
                       get_kernel("linear_w8a8_dynamic")(x, w, ws, bias))  # fmt: skip
    q = _qlinear(32, 8, QuantSpec("int8", "per_channel"))
    torch.testing.assert_close(q(x), F.linear(x, q.dequantized_weight(), q.bias))
    q.kernel = "native"
    with pytest.raises(SlimquantError, match="native.*no compiler"):
        q(x)


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("SLIMQUANT_NATIVE", "0")
    assert not native.available()
    assert "SLIMQUANT_NATIVE=0" in native.unavailable_reason()


def test_build_name_tracks_source_and_torch(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    a = native._build_name()
    src = tmp_path / "k.cpp"
    src.write_bytes(native.SOURCE.read_bytes() + b"\n// changed\n")
    monkeypatch.setattr(native, "SOURCE", src)
    assert native._build_name() != a
    monkeypatch.setenv("SLIMQUANT_CACHE_DIR", str(tmp_path / "c"))
    assert native.cache_dir() == tmp_path / "c" / "torch_extensions"


def test_cpu_features_string(native_lib) -> None:  # noqa: ANN001
    assert native_lib.cpu_features() in ("avx512 avx512vnni", "avx512", "avx2", "scalar")
    with pytest.raises(ValueError, match="avx512"):
        native_lib.set_isa("sse9")
    assert int8.get_kernel("linear_w8a16", "native") is int8.linear_w8a16_native


def test_scratch_buffers_from_inference_mode_work_outside_it(native_lib) -> None:
    """The kernels' per-thread scratch tensors, first allocated under ``torch.inference_mode``, are reused by
    later calls under ``torch.no_grad`` (an inference tensor there could not be written)."""
    torch.manual_seed(0)
    w = torch.randint(-127, 128, (64, 96), dtype=torch.int8)
    s = torch.rand(64) + 0.01
    x = torch.randn(700, 96)  # past the GEMV rows: the int32 accumulators come from the scratch too
    with torch.inference_mode():
        a = native_lib.w8a8_dynamic(x, w, s)
    with torch.no_grad():
        b = native_lib.w8a8_dynamic(x, w, s)
    assert torch.equal(a, b)
