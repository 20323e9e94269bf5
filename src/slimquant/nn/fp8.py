"""fp8 W8A8: fp8 (e4m3) weights and fp8 inputs, the alternative to int8 :class:`QLinearW8A8`.

Tensors (msModelSlim description labels ``WFP8AFP8`` static, ``WFP8AFP8_DYNAMIC`` dynamic; config
``"quantize": "wfp8afp8"`` / ``"wfp8afp8_dynamic"``)::

    weight        float8_e4m3fn [n, k]   symmetric per channel (or per tensor): w ~ weight * weight_scale
    weight_scale  float32 [n, 1]
    input_scale   float32 [1]            static only: x_q = fp8(clamp(x / input_scale, -448, 448))
    bias          [n]                    model dtype, when the layer has one

    y = (x_q @ weight.T) * s * weight_scale.T + bias     s = input_scale, or max|x_t| / 448 per token

The forward runs :mod:`slimquant.kernels.fp8` (``kernel = "fast"``: ``torch._scaled_mm``;
``"reference"``: dequantize + ``F.linear``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimquant.kernels import fp8 as kf
from slimquant.nn.w8a8 import QuantizedInputLinear
from slimquant.types.spec import QuantSpec


class QLinearFP8(QuantizedInputLinear):
    """``nn.Linear`` with fp8 e4m3 weights and fp8 inputs (static per-tensor or dynamic per-token)."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, input_spec: QuantSpec,
                 bias: bool = True, dtype: torch.dtype = torch.float32, device: Any = None) -> None:  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.spec, self.input_spec, self.compute_dtype = spec, input_spec, dtype
        self.kernel = "fast"
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, 1, dtype=torch.float32, device=device))
        if not input_spec.dynamic:
            self.register_buffer("input_scale", torch.empty(1, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_float(cls, module: nn.Linear, w_fp8: torch.Tensor, w_scale: torch.Tensor, spec: QuantSpec,
                   input_spec: QuantSpec, input_scale: float | None = None,
                   method: dict[str, Any] | None = None) -> "QLinearFP8":  # fmt: skip
        """Build from a float Linear, its fp8 weight ``[n, k]`` and scale ``[n]`` (or ``[1]``); static
        layers also take the calibrated ``input_scale``."""
        n, k = w_fp8.shape
        q = cls(k, n, spec, input_spec, module.bias is not None, module.weight.dtype, module.weight.device)
        q.weight.copy_(w_fp8)
        q.method = dict(method or {})
        q.weight_scale.copy_(w_scale.reshape(-1).float().expand(n)[:, None])
        if not input_spec.dynamic:
            if input_scale is None:
                raise ValueError("a static fp8 layer needs input_scale")
            q.input_scale.fill_(input_scale)
        if module.bias is not None:
            q.bias.data.copy_(module.bias.detach())
        return q

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale).to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_spec.dynamic:
            return kf.get_kernel("linear_fp8_dynamic", self.kernel)(x, self.weight, self.weight_scale, self.bias)
        return kf.get_kernel("linear_fp8_static", self.kernel)(x, self.input_scale, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        mode = "dynamic per-token" if self.input_spec.dynamic else "static per-tensor"
        return f"{self.in_features}, {self.out_features}, weight={self.spec.describe()}, input=fp8 {mode}, kernel={self.kernel}"
