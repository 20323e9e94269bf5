"""fp8 (e4m3) linear kernels: fp8 weights per output channel and fp8 inputs, reference and fast.

Ops (weights ``float8_e4m3fn [n, k]`` with float32 scales ``[n]``):
    quantize_fp8_per_token (x) -> (x_fp8 [..., k], scale [..., 1] float32)      scale = max|x_t| / 448
    linear_fp8_dynamic     (x, w_fp8, w_scale [n], bias | None) -> [..., n] x.dtype
    linear_fp8_static      (x, input_scale [1], w_fp8, w_scale [n], bias | None) -> [..., n] x.dtype

Arithmetic (both)::

    x_q = fp8(clamp(x / s, -448, 448))                  s per token (dynamic) or one calibrated s (static)
    y   = (x_q @ w_fp8.T) * s * w_scale + bias          products of two e4m3 values are exact in float32

The reference dequantizes to float32 and multiplies with ``F.linear``; the fast kernel runs
``torch._scaled_mm`` on the fp8 operands (oneDNN on CPU in torch 2.13) with row-wise scales. Both
compute in float32 with different accumulation orders, so they agree to float32 rounding, not bit for bit.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from slimquant.errors import SlimquantError
from slimquant.math.qparams import qparams_from_minmax
from slimquant.math.quant import quantize
from slimquant.types.qtype import qtype as lookup_qtype

_FP8 = lookup_qtype("fp8_e4m3")


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 e4m3 per row: scale = max|x| / 448 (1.0 for all-zero rows), via :mod:`slimquant.math`."""
    xf = x.float()
    scale, _ = qparams_from_minmax(xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True), _FP8, symmetric=True)
    return quantize(xf, scale, None, _FP8), scale


def quantize_fp8_static(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    return quantize(x.float(), input_scale.float().reshape(()), None, _FP8)


def _finish(y: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, n: int) -> torch.Tensor:
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


def _scaled_reference(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    return F.linear(xq.float(), w.float()) * xs * w_scale.reshape(1, -1).float()


def _scaled_fast(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    if xq.shape[0] == 0 or not hasattr(torch, "_scaled_mm"):
        return _scaled_reference(xq, xs, w, w_scale)
    m, n = xq.shape[0], w.shape[0]
    scale_a = xs.float().reshape(-1, 1).expand(m, 1).contiguous()
    scale_b = w_scale.float().reshape(1, -1).expand(1, n).contiguous()
    return torch._scaled_mm(xq.contiguous(), w.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.float32)


def _dynamic(mm: Callable, x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    xq, xs = quantize_fp8_per_token(_rows(x))
    return _finish(mm(xq, xs, w, w_scale), bias, x, w.shape[0])


def _static(mm: Callable, x: torch.Tensor, input_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    xq = quantize_fp8_static(_rows(x), input_scale)
    return _finish(mm(xq, input_scale.float().reshape(1, 1), w, w_scale), bias, x, w.shape[0])


def linear_fp8_dynamic_reference(x, w, w_scale, bias=None):  # type: ignore[no-untyped-def]
    return _dynamic(_scaled_reference, x, w, w_scale, bias)


def linear_fp8_dynamic_fast(x, w, w_scale, bias=None):  # type: ignore[no-untyped-def]
    return _dynamic(_scaled_fast, x, w, w_scale, bias)


def linear_fp8_static_reference(x, input_scale, w, w_scale, bias=None):  # type: ignore[no-untyped-def]
    return _static(_scaled_reference, x, input_scale, w, w_scale, bias)


def linear_fp8_static_fast(x, input_scale, w, w_scale, bias=None):  # type: ignore[no-untyped-def]
    return _static(_scaled_fast, x, input_scale, w, w_scale, bias)


KERNELS: dict[str, dict[str, Callable]] = {
    "linear_fp8_dynamic": {"reference": linear_fp8_dynamic_reference, "fast": linear_fp8_dynamic_fast},
    "linear_fp8_static": {"reference": linear_fp8_static_reference, "fast": linear_fp8_static_fast},
}


def get_kernel(op: str, impl: str = "reference") -> Callable:
    if op not in KERNELS:
        raise SlimquantError(f"unknown fp8 kernel op {op!r}; valid ops: {', '.join(sorted(KERNELS))}")
    if impl not in KERNELS[op]:
        raise SlimquantError(f"unknown implementation {impl!r} of {op!r}; valid: {', '.join(sorted(KERNELS[op]))}")
    return KERNELS[op][impl]
