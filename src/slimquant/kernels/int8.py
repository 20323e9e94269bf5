"""Int8 linear kernels: a pure-torch reference and faster versions of every op, chosen explicitly.

Ops (registry key -> signature; weights are int8 ``[n, k]``, symmetric per output channel):
    quantize_per_token   (x) -> (x_int8 [..., k], scale [..., 1] float32)
    int8_matmul          (a_int8 [..., k], w_int8 [n, k]) -> int32 [..., n]
    linear_w8a8_dynamic  (x, w_int8, w_scale [n], bias [n] | None) -> [..., n] x.dtype
    linear_w8a8_static   (x, input_scale, input_offset, w_int8, deq_scale [n], quant_bias [n]) -> [..., n] x.dtype
    linear_w8a16         (x, w_int8, w_scale [n]) -> [..., n] x.dtype
  fused producers and the linears that read their output (rows q int8 [M, k], xs float32 [M] or empty):
    rmsnorm                (x, weight [k], eps) -> y: the float norm alone (for weight-only readers)
    rmsnorm_quant          (x, weight [k], eps, input_scale | None, input_offset | None) -> (y, q, xs)
    silu_mul_quant         (g, u, input_scale | None, input_offset | None) -> (q, xs)
    linear_w8a8_dynamic_q  (q, xs, w_int8, w_scale, bias | None) -> float32 [M, n]
    linear_w8a8_static_q   (q, w_int8, deq_scale, quant_bias) -> float32 [M, n]

Select with ``get_kernel(op, impl)``. Implementations: ``"reference"`` (pure torch, the definition; tests
compare everything against it), ``"torch"`` (torch primitives, below; linear ops), ``"native"`` (the C++
kernels of :mod:`slimquant.kernels.native`, linear ops and the fused producers: one call per layer; W8A8
bit-identical to the reference, W8A16 and the producers' float values equal up to float32 rounding) and
``"fast"`` (native where it runs, i.e. CPU tensors and a successful build, else torch or, for the producers,
the reference; what the modules use). The torch kernels check the constraints of the
primitive they wrap and compute through the reference where they fail, so they are always safe to call;
:func:`fast_available` says whether the primitive exists in this torch build. ``"native"`` raises
:class:`SlimquantError` when the library cannot be built and takes the torch kernel for non-CPU inputs.

Torch paths (torch 2.13 CPU):
    ``torch._int_mm`` (int8 x int8 -> int32, oneDNN/VNNI): on CPU any M (0, 1, 3, ...) and odd K/N are
    exact, but K == 1, or a size-1 dim with transposed-looking strides, gives wrong numbers: we pass
    row-major copies and use the reference for K < 2. On CUDA it needs M > 16 and K, N multiples of 8,
    else we use the reference.
    ``torch._weight_int8pack_mm`` (float x int8 weight): only its bfloat16 kernel is vectorized on
    x86, and that kernel reads K in steps of 16 with aligned loads: K % 16 != 0 gives wrong results or
    a segfault, and an activation not 32-byte aligned segfaults. float32/float16 use a scalar loop ~10x
    slower than ``F.linear``, and bfloat16 is a GEMV that loses to dequantize + GEMM past ~256 rows. So
    W8A16 uses it for bfloat16 with K % 16 == 0 and M <= 128 only (copying a misaligned input); float32 gets
    ``F.linear(x, w.float()) * w_scale`` (scale on the output, no scaled weight), the rest the reference.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from slimquant.errors import SlimquantError
from slimquant.kernels import native
from slimquant.math.qparams import qparams_from_minmax
from slimquant.math.quant import quantize
from slimquant.types.qtype import qtype as lookup_qtype

__all__ = [
    "KERNELS",
    "fast_available",
    "fold_input_zero_point",
    "fold_static_w8a8",
    "get_kernel",
    "quantize_bias",
    "unfold_input_zero_point",
]

_INT8 = lookup_qtype("int8")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[..., k]`` -> ``[M, k]`` (a view when possible)."""
    return x.reshape(-1, x.shape[-1])


# -- quantize_per_token ----------------------------------------------------------------------------


def quantize_per_token_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic int8 per row: scale = absmax / 127 (1.0 for all-zero rows), q = round(x / scale).

    ``x`` float ``[..., k]`` -> ``(q int8 [..., k], scale float32 [..., 1])``; via :mod:`slimquant.math`.
    """
    xf = x.float()
    scale, _ = qparams_from_minmax(xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True), _INT8, symmetric=True)
    return quantize(xf, scale, None, _INT8), scale


def quantize_per_token_fast(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same values as :func:`quantize_per_token_reference` bit for bit, in fewer ops (at M=1 each
    op's ~2-5 us overhead is the cost)."""
    xf = x.float()
    # max |x| (NaN propagates as in amin/amax); linalg.vector_norm(ord=inf) gives the same bits in one op but
    # is ~8x slower at 512 rows on CPU torch 2.13, as slow as the int8 matmul it feeds
    absmax = xf.abs().amax(-1, keepdim=True)
    scale = absmax.div_(127.0)  # == 2 * absmax / 254 of math.qparams, bit for bit
    scale = torch.where(scale > 0, scale, 1.0)  # as math.qparams._nonzero: zero (and NaN) rows get 1.0
    # |x / scale| <= 127 up to one rounding, but a denormal absmax makes a coarse scale: keep the clamp
    q = torch.div(xf, scale).round_().clamp_(-128, 127).to(torch.int8)
    return q, scale


# -- int8_matmul ---------------------------------------------------------------------------------


def int8_matmul_reference(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ w.T`` in int64, returned as int32.

    ``a`` int8 ``[..., k]``, ``w`` int8 ``[n, k]`` -> int32 ``[..., n]``; |sum| <= 2^14 * k fits int32
    for k < 2^17.
    """
    return (a.to(torch.int64) @ w.to(torch.int64).T).to(torch.int32)


def _int_mm_ok(m: int, k: int, n: int, device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return m > 16 and k % 8 == 0 and n % 8 == 0
    return False


def _row_major(t: torch.Tensor) -> torch.Tensor:
    # torch._int_mm (oneDNN) misreads a size-1 dim whose stride looks transposed (e.g. [1, k] with
    # strides (1, 1)) and returns wrong numbers; fresh row-major strides (k, 1) avoid it.
    return t if t.stride() == (t.shape[1], 1) else t.clone(memory_format=torch.contiguous_format)


def int8_matmul_fast(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm`` on ``[M, k] x [k, n]``; the reference where its constraints fail (see module doc)."""
    a2 = a if a.dim() == 2 else _rows(a)
    m, k = a2.shape
    n = w.shape[0]
    # k == 1: w.T is [1, n] with strides (1, 1) whatever we do, which _int_mm gets wrong
    if k < 2 or not hasattr(torch, "_int_mm") or not _int_mm_ok(m, k, n, a.device):
        return int8_matmul_reference(a, w)
    # w.T as a view: oneDNN takes the transposed layout, and at M=1 it is ~2x faster than a copy
    out = torch._int_mm(_row_major(a2), _row_major(w).T)
    return out if a.dim() == 2 else out.reshape(*a.shape[:-1], n)


# -- linear_w8a8_dynamic -------------------------------------------------------------------------


def _w8a8_dynamic(
    quant: Callable, mm: Callable, x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    q, s = quant(x)
    # (float(acc) * s) * w_scale (+ bias) in this order in both impls -> same bits; in place after the
    # first product, which is the one fresh [..., n] float32 tensor (int32 * float32 casts acc anyway)
    y = mm(q, w).float().mul_(s).mul_(w_scale.reshape(-1).float())
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype)


def linear_w8a8_dynamic_reference(
    x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token dynamic int8 activations x per-channel int8 weights, int32 accumulation.

    ``x`` float ``[..., k]``, ``w_int8`` ``[n, k]``, ``w_scale`` float32 ``[n]`` (or ``[n, 1]``),
    ``bias`` ``[n]`` or None -> ``y = acc * x_scale * w_scale + bias``, ``[..., n]`` in ``x.dtype``.
    """
    return _w8a8_dynamic(quantize_per_token_reference, int8_matmul_reference, x, w_int8, w_scale, bias)


def linear_w8a8_dynamic_torch(
    x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`linear_w8a8_dynamic_reference` with ``torch._int_mm``; identical accumulators and outputs."""
    return _w8a8_dynamic(quantize_per_token_fast, int8_matmul_fast, x, w_int8, w_scale, bias)


# -- linear_w8a8_static (msModelSlim W8A8) -------------------------------------------------------


def linear_w8a8_static_reference(
    x: torch.Tensor,
    input_scale: float | torch.Tensor,
    input_offset: int | torch.Tensor,
    w_int8: torch.Tensor,
    deq_scale: torch.Tensor,
    quant_bias: torch.Tensor,
) -> torch.Tensor:
    """msModelSlim W8A8: ``x_q = clamp(round(x / input_scale) + input_offset, -128, 127)`` int8,
    ``y = (x_q @ w_int8.T + quant_bias) * deq_scale``.

    ``x`` float ``[..., k]``, ``input_scale`` / ``input_offset`` numbers or 1-element tensors, ``w_int8`` ``[n, k]``,
    ``deq_scale`` float32 ``[n]``, ``quant_bias`` int32 ``[n]`` from :func:`fold_static_w8a8` -> ``[..., n]`` in
    ``x.dtype``.
    """
    scale = torch.tensor(float(input_scale), dtype=torch.float32, device=x.device)
    zp = torch.tensor(float(input_offset), dtype=torch.float32, device=x.device)
    xq = quantize(x.float(), scale, zp, _INT8)
    acc = int8_matmul_reference(xq, w_int8) + quant_bias.to(torch.int32)
    return (acc.float() * deq_scale.float()).to(x.dtype)


def linear_w8a8_static_torch(
    x: torch.Tensor,
    input_scale: float | torch.Tensor,
    input_offset: int | torch.Tensor,
    w_int8: torch.Tensor,
    deq_scale: torch.Tensor,
    quant_bias: torch.Tensor,
) -> torch.Tensor:
    """:func:`linear_w8a8_static_reference` with ``torch._int_mm`` and fewer ops; identical outputs."""
    # float32 division as the reference's 0-d float32 tensor. A 1-element tensor (what QLinearW8A8 passes)
    # is used as is: no host sync to read it, and the same float32 values as float(t) / int(t)
    if isinstance(input_scale, torch.Tensor):
        scale, offset = input_scale.float(), input_offset.float()  # type: ignore[union-attr]
    else:
        scale, offset = float(input_scale), int(input_offset)
    xq = torch.div(x.float(), scale).round_().add_(offset).clamp_(-128, 127)
    acc = int8_matmul_fast(xq.to(torch.int8), w_int8).add_(quant_bias.to(torch.int32))
    return (acc * deq_scale.float()).to(x.dtype)  # int32 * float32 == acc.float() * deq_scale


def quantize_bias(
    w_scale: torch.Tensor, input_scale: float, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A static W8A8 layer's accumulator constants: ``(acc_bias int32 [n], acc_scale float32 [n])``.

    ``acc_scale = input_scale * w_scale`` (what the int32 accumulator is multiplied by) and
    ``acc_bias = round(bias / acc_scale)`` (the bias in accumulator units; zeros without a bias), so
    ``((x_q - input_zero_point) @ w.T + acc_bias) * acc_scale == (round(x / s) @ w.T) * acc_scale + bias`` up to
    the bias rounding. The division uses the float32 ``acc_scale`` (what dequantization multiplies by) in float64.
    """
    acc_scale = (float(input_scale) * w_scale.reshape(-1).double()).float()
    b = torch.zeros_like(acc_scale, dtype=torch.float64) if bias is None else bias.double()
    acc_bias = torch.round(b / acc_scale.double())
    return _int32(acc_bias, "the bias in accumulator units"), acc_scale


def fold_input_zero_point(acc_bias: torch.Tensor, input_zero_point: int, w_int8: torch.Tensor) -> torch.Tensor:
    """``quant_bias = acc_bias - input_zero_point * w_int8.sum(1)`` (int32 ``[n]``): the bias the static kernels
    add to ``x_q @ w.T``, with ``x_q`` carrying the input zero point."""
    return _int32(acc_bias.to(torch.int64) - int(input_zero_point) * w_int8.to(torch.int64).sum(1), "quant_bias")


def unfold_input_zero_point(quant_bias: torch.Tensor, input_zero_point: int, w_int8: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fold_input_zero_point` (exact integer arithmetic)."""
    acc_bias = quant_bias.to(torch.int64) + int(input_zero_point) * w_int8.to(torch.int64).sum(1)
    return _int32(acc_bias, "the bias in accumulator units")


def _int32(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.numel() and not t.is_meta and t.abs().max() >= 2**31:
        raise SlimquantError(f"{what} overflows int32: bias too large for input_scale * w_scale")
    return t.to(torch.int32)


def fold_static_w8a8(
    w_int8: torch.Tensor,
    w_scale: torch.Tensor,
    input_scale: float,
    input_offset: int,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float bias and activation zero point folded into the static kernels' ``(quant_bias int32 [n], deq_scale
    float32 [n])``: :func:`quantize_bias` then :func:`fold_input_zero_point`."""
    acc_bias, acc_scale = quantize_bias(w_scale, input_scale, bias)
    return fold_input_zero_point(acc_bias, input_offset, w_int8), acc_scale


# -- linear_w8a16 (weight-only) ------------------------------------------------------------------


def linear_w8a16_reference(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Weight-only int8: ``F.linear(x, w_int8 * w_scale)``.

    ``x`` float ``[..., k]``, ``w_int8`` ``[n, k]``, ``w_scale`` float32 ``[n]`` (or ``[n, 1]``) ->
    ``[..., n]`` in ``x.dtype``; the weight is dequantized in float32, then cast to ``x.dtype``.
    """
    w = w_int8.float() * w_scale.reshape(-1, 1).float()
    return F.linear(x, w.to(x.dtype))


# torch._weight_int8pack_mm is a GEMV-style kernel (~25 us per row at 576x1536, one thread) while the
# reference pays a fixed ~1-3 ms to dequantize and then runs a bfloat16 GEMM: they cross near 256 rows.
_INT8PACK_MAX_ROWS = 128


def _int8pack_ok(x2: torch.Tensor) -> bool:
    m, k = x2.shape
    return (
        hasattr(torch, "_weight_int8pack_mm")
        and x2.device.type == "cpu"
        and x2.dtype == torch.bfloat16
        and 0 < m <= _INT8PACK_MAX_ROWS
        and k > 0
        and k % 16 == 0
    )


def linear_w8a16_torch(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Per input, one path:
    bfloat16, M <= 128 rows, k % 16 == 0: ``torch._weight_int8pack_mm`` (scale rounded to bfloat16, so it
    matches the reference to bfloat16 precision); float32: ``F.linear(x, w.float()) * w_scale`` (the
    scale on the ``[M, n]`` output instead of the ``[n, k]`` weight; equal up to float rounding);
    anything else: the reference.
    """
    k, n = x.shape[-1], w_int8.shape[0]
    x2 = _rows(x)
    if _int8pack_ok(x2):
        x2 = x2.contiguous()
        if x2.data_ptr() % 32:  # its kernel uses aligned 32-byte loads; a fresh tensor is 64-byte aligned
            x2 = x2.clone()
        w = w_int8.contiguous()
        if w.data_ptr() % 16:
            w = w.clone()
        y = torch._weight_int8pack_mm(x2, w, w_scale.reshape(-1).to(torch.bfloat16))
    elif x.dtype == torch.float32:
        y = F.linear(x2, w_int8.float()) * w_scale.reshape(-1).float()
    else:
        return linear_w8a16_reference(x, w_int8, w_scale)
    return y.reshape(*x.shape[:-1], n)


# -- native (C++) kernels and the "fast" choice ----------------------------------------------------


def _native_runs(x: torch.Tensor) -> bool:
    """Whether the native kernels run for ``x``: a CPU tensor and a built library."""
    return x.device.type == "cpu" and native.library() is not None


def _require_native() -> None:
    if not native.available():
        raise SlimquantError(f"native CPU kernels unavailable: {native.unavailable_reason()}")


def _as_tensor(v: float | torch.Tensor) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float32)


def linear_w8a8_dynamic_native(
    x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`linear_w8a8_dynamic_reference` in one C++ call (:mod:`slimquant.kernels.native`); identical bits.
    Non-CPU inputs take :func:`linear_w8a8_dynamic_torch`."""
    _require_native()
    return linear_w8a8_dynamic_fast(x, w_int8, w_scale, bias)


def linear_w8a8_static_native(
    x: torch.Tensor,
    input_scale: float | torch.Tensor,
    input_offset: int | torch.Tensor,
    w_int8: torch.Tensor,
    deq_scale: torch.Tensor,
    quant_bias: torch.Tensor,
) -> torch.Tensor:
    """:func:`linear_w8a8_static_reference` in one C++ call; identical bits. Non-CPU inputs take the torch kernel."""
    _require_native()
    return linear_w8a8_static_fast(x, input_scale, input_offset, w_int8, deq_scale, quant_bias)


def linear_w8a16_native(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """:func:`linear_w8a16_reference` as a C++ GEMV that reads the int8 weight once (no dequantized copy) for
    up to ``native.W8A16_GEMV_MAX_ROWS`` float32 rows; more rows, other dtypes (the reference computes in the
    input's dtype) and non-CPU inputs take :func:`linear_w8a16_torch`. Equal to the reference up to float32
    summation order."""
    _require_native()
    return linear_w8a16_fast(x, w_int8, w_scale)


# "fast": the native kernel where it runs, else the torch one (what the quantized modules use by default)


def linear_w8a8_dynamic_fast(
    x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    if not _native_runs(x):
        return linear_w8a8_dynamic_torch(x, w_int8, w_scale, bias)
    return native.w8a8_dynamic(x, w_int8, w_scale, bias)


def linear_w8a8_static_fast(
    x: torch.Tensor,
    input_scale: float | torch.Tensor,
    input_offset: int | torch.Tensor,
    w_int8: torch.Tensor,
    deq_scale: torch.Tensor,
    quant_bias: torch.Tensor,
) -> torch.Tensor:
    if not _native_runs(x):
        return linear_w8a8_static_torch(x, input_scale, input_offset, w_int8, deq_scale, quant_bias)
    return native.w8a8_static(x, _as_tensor(input_scale), _as_tensor(input_offset), w_int8, deq_scale, quant_bias)


def linear_w8a16_fast(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    if not _native_runs(x) or x.dtype != torch.float32 or x.numel() > native.W8A16_GEMV_MAX_ROWS * x.shape[-1]:
        return linear_w8a16_torch(x, w_int8, w_scale)
    return native.w8a16(x, w_int8, w_scale)


# -- fused producers: the float op before a W8A8 layer writes the layer's int8 input ---------------
# (slimquant.nn.fused). Quantized rows are ``(q int8 [M, k], xs float32 [M])``: per-token scales, or an empty
# ``xs`` with a layer's static ``input_scale`` / ``input_offset``. Feeding them to the ``*_q`` linears gives
# the same bits as the plain linear on the float rows.


def quantize_input_reference(
    x: torch.Tensor, input_scale: torch.Tensor | None = None, input_offset: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` float ``[..., k]`` -> ``(q int8 [M, k], xs float32 [M])``, quantized as the W8A8 linears do:
    per token (:func:`quantize_per_token_reference`) or, given ``input_scale`` / ``input_offset``, per tensor
    as :func:`linear_w8a8_static_reference` (``xs`` then empty)."""
    x2 = _rows(x).float()
    if input_scale is None:
        q, scale = quantize_per_token_reference(x2)
        return q, scale.reshape(-1)
    scale = torch.tensor(float(input_scale), dtype=torch.float32, device=x.device)
    zp = torch.tensor(float(input_offset), dtype=torch.float32, device=x.device)  # type: ignore[arg-type]
    return quantize(x2, scale, zp, _INT8), torch.empty(0, dtype=torch.float32, device=x.device)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama-style RMSNorm in float32, ``y = weight * (x * rsqrt(mean(x^2) + eps))`` (``[..., k]``)."""
    xf = x.float()
    return weight.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))


def rmsnorm_quant_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, input_scale: torch.Tensor | None = None,
    input_offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`rmsnorm_reference` ``y`` and :func:`quantize_input_reference` of ``y``: ``(y, q [M, k], xs [M])``."""
    y = rmsnorm_reference(x, weight, eps)
    return (y, *quantize_input_reference(y, input_scale, input_offset))


def silu_mul_quant_reference(
    g: torch.Tensor, u: torch.Tensor, input_scale: torch.Tensor | None = None, input_offset: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_input_reference` of ``F.silu(g) * u`` (float32, ``[..., k]`` each)."""
    return quantize_input_reference(F.silu(g.float()) * u.float(), input_scale, input_offset)


def _w8a8_dynamic_q(mm: Callable, q: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    # the float steps of _w8a8_dynamic, in its order
    y = mm(q, w).float().mul_(xs.reshape(-1, 1)).mul_(w_scale.reshape(-1).float())
    return y.add_(bias.float()) if bias is not None else y


def linear_w8a8_dynamic_q_reference(
    q: torch.Tensor, xs: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`linear_w8a8_dynamic_reference` from rows already quantized per token (``q [M, k]``, ``xs [M]``)
    -> float32 ``[M, n]``."""
    return _w8a8_dynamic_q(int8_matmul_reference, q, xs, w_int8, w_scale, bias)


def linear_w8a8_dynamic_q_torch(
    q: torch.Tensor, xs: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return _w8a8_dynamic_q(int8_matmul_fast, q, xs, w_int8, w_scale, bias)


def linear_w8a8_static_q_reference(
    q: torch.Tensor, w_int8: torch.Tensor, deq_scale: torch.Tensor, quant_bias: torch.Tensor
) -> torch.Tensor:
    """:func:`linear_w8a8_static_reference` from rows already quantized with its input parameters -> float32."""
    return (int8_matmul_reference(q, w_int8) + quant_bias.to(torch.int32)).float() * deq_scale.float()


def linear_w8a8_static_q_torch(
    q: torch.Tensor, w_int8: torch.Tensor, deq_scale: torch.Tensor, quant_bias: torch.Tensor
) -> torch.Tensor:
    return int8_matmul_fast(q, w_int8).add_(quant_bias.to(torch.int32)) * deq_scale.float()


Kernel = Callable[..., object]


def _native_variants(fallback: Kernel, native_impl: Kernel) -> tuple[Kernel, Kernel]:
    """``(native, fast)`` of an op whose first argument is a tensor: both run ``native_impl`` for CPU tensors
    when the library is built; otherwise ``native`` raises and ``fast`` runs ``fallback``."""

    def run_native(*args: object) -> object:
        _require_native()
        return run_fast(*args)

    def run_fast(*args: object) -> object:
        return native_impl(*args) if _native_runs(args[0]) else fallback(*args)  # type: ignore[arg-type]

    return run_native, run_fast


# late-bound (lambda) so tests can stand in for the library
_rms_native, _rms_fast = _native_variants(rmsnorm_quant_reference, lambda *a: native.rmsnorm_quant(*a))
_norm_native, _norm_fast = _native_variants(rmsnorm_reference, lambda *a: native.rmsnorm(*a))
_silu_native, _silu_fast = _native_variants(silu_mul_quant_reference, lambda *a: native.silu_mul_quant(*a))
_dyn_q_native, _dyn_q_fast = _native_variants(linear_w8a8_dynamic_q_torch, lambda *a: native.w8a8_dynamic_q(*a))
_sta_q_native, _sta_q_fast = _native_variants(linear_w8a8_static_q_torch, lambda *a: native.w8a8_static_q(*a))


# -- registry ------------------------------------------------------------------------------------

# impls: "reference" (pure torch, the definition), "torch" (torch primitives: _int_mm, _weight_int8pack_mm),
# "native" (C++, :mod:`slimquant.kernels.native`; SlimquantError when it cannot be built), "fast" (native where
# it runs, else torch; for the producers else the reference)
KERNELS: dict[str, dict[str, Kernel]] = {
    "quantize_per_token": {"reference": quantize_per_token_reference, "fast": quantize_per_token_fast},
    "int8_matmul": {"reference": int8_matmul_reference, "fast": int8_matmul_fast},
    "linear_w8a8_dynamic": {"reference": linear_w8a8_dynamic_reference, "torch": linear_w8a8_dynamic_torch,
                            "native": linear_w8a8_dynamic_native, "fast": linear_w8a8_dynamic_fast},
    "linear_w8a8_static": {"reference": linear_w8a8_static_reference, "torch": linear_w8a8_static_torch,
                           "native": linear_w8a8_static_native, "fast": linear_w8a8_static_fast},
    "linear_w8a16": {"reference": linear_w8a16_reference, "torch": linear_w8a16_torch,
                     "native": linear_w8a16_native, "fast": linear_w8a16_fast},
    "rmsnorm": {"reference": rmsnorm_reference, "native": _norm_native, "fast": _norm_fast},
    "rmsnorm_quant": {"reference": rmsnorm_quant_reference, "native": _rms_native, "fast": _rms_fast},
    "silu_mul_quant": {"reference": silu_mul_quant_reference, "native": _silu_native, "fast": _silu_fast},
    "linear_w8a8_dynamic_q": {"reference": linear_w8a8_dynamic_q_reference, "torch": linear_w8a8_dynamic_q_torch,
                              "native": _dyn_q_native, "fast": _dyn_q_fast},
    "linear_w8a8_static_q": {"reference": linear_w8a8_static_q_reference, "torch": linear_w8a8_static_q_torch,
                             "native": _sta_q_native, "fast": _sta_q_fast},
}  # fmt: skip

# the torch primitive each "torch"/"fast" kernel wraps (None: pure torch, always available)
_PRIMITIVE: dict[str, str | None] = {
    "quantize_per_token": None,
    "int8_matmul": "_int_mm",
    "linear_w8a8_dynamic": "_int_mm",
    "linear_w8a8_static": "_int_mm",
    "linear_w8a16": "_weight_int8pack_mm",
    "rmsnorm": None,
    "rmsnorm_quant": None,
    "silu_mul_quant": None,
    "linear_w8a8_dynamic_q": "_int_mm",
    "linear_w8a8_static_q": "_int_mm",
}


def _impls(op: str) -> dict[str, Kernel]:
    if op not in KERNELS:
        raise SlimquantError(f"unknown int8 kernel op {op!r}; valid ops: {', '.join(sorted(KERNELS))}")
    return KERNELS[op]


def get_kernel(op: str, impl: str = "reference") -> Kernel:
    """The ``impl`` implementation of ``op``: ``"reference"`` and ``"fast"`` for every op, ``"torch"`` for the
    linear ops, ``"native"`` for the linear ops and the fused producers (``rmsnorm``, ``rmsnorm_quant``, ``silu_mul_quant``).

    Unknown names raise :class:`SlimquantError` listing the valid ones."""
    impls = _impls(op)
    if impl not in impls:
        raise SlimquantError(f"unknown implementation {impl!r} of {op!r}; valid: {', '.join(sorted(impls))}")
    return impls[impl]


def fast_available(op: str) -> bool:
    """Whether this torch build has the primitive behind ``op``'s torch kernel. When False that kernel still
    runs, through the reference; when True it still falls back for some inputs (module doc). The native
    kernels are reported by :func:`slimquant.kernels.native.available`."""
    _impls(op)
    prim = _PRIMITIVE[op]
    return prim is None or hasattr(torch, prim)
