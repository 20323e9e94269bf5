"""W8A8 linear layers: int8 weights and int8 activations, in msModelSlim's tensor layout.

Static (calibrated, per-tensor asymmetric input), description label ``W8A8``::

    weight       int8   [n, k]   symmetric per-channel (or per-tensor) integers
    input_scale  [1]             float16 / bfloat16 like the model (float32 for float32 models)
    input_offset [1]             same dtype, an integer value
    quant_bias   int32  [n]      round(bias / deq_scale) - input_offset * weight.sum(1)
    deq_scale    int64  [n]      float16 models: the float32 bits of input_scale * weight_scale
                 float32 [n]     bfloat16 / float32 models: the value itself

    x_q = clamp(round(x / input_scale) + input_offset, -128, 127)
    y   = (x_q @ weight.T + quant_bias) * deq_scale          (int32 accumulation)

Dynamic (per-token symmetric input computed at run time), label ``W8A8_DYNAMIC``::

    weight int8 [n, k], weight_scale float32 [n, 1], weight_offset float32 [n, 1] (zeros), bias [n]

    s_t = max|x_t| / 127 per token;  y = (round(x / s_t) @ weight.T) * s_t * weight_scale.T + bias

The forward runs the integer kernels of :mod:`slimquant.kernels.int8`; ``kernel = "reference"``
selects their pure-torch references (tests, debugging).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from slimquant.kernels import int8 as k8
from slimquant.nn.modules import QModule
from slimquant.types.spec import QuantSpec


def io_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of input_scale/input_offset: the model's half type, float32 otherwise."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def deq_scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """msModelSlim stores deq_scale as int64 (float32 bits) for float16 models, float32 otherwise."""
    return torch.int64 if dtype == torch.float16 else torch.float32


class QuantizedInputLinear(QModule):
    """Checkpoint codec shared by linear layers that also quantize their input (int8 and fp8 W8A8): the
    constructor takes ``(in_features, out_features, spec, input_spec, bias, dtype, device)``."""

    in_features: int
    out_features: int
    input_spec: QuantSpec

    def manifest_args(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "input_spec": self.input_spec.to_dict()}  # fmt: skip

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> "QuantizedInputLinear":
        spec, dtype, bias, args = cls._entry_basics(entry)
        input_spec = QuantSpec.from_dict(args["input_spec"])
        return cls(args["in_features"], args["out_features"], spec, input_spec, bias, dtype, "meta")  # type: ignore[call-arg]


class QLinearW8A8(QuantizedInputLinear):
    """``nn.Linear`` with int8 weights and int8 inputs (static per-tensor or dynamic per-token)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        input_spec: QuantSpec,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: Any = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.spec, self.input_spec, self.compute_dtype = spec, input_spec, dtype
        self.kernel = "fast"
        # set by slimquant.surgery.fuse: the fused producer (slimquant.nn.fused.FusedRMSNorm) that may hand this
        # layer its int8 input rows; unregistered (the producer is a sibling module, not a child)
        object.__setattr__(self, "rows_from", None)
        n, k = out_features, in_features
        self.register_buffer("weight", torch.empty(n, k, dtype=torch.int8, device=device))
        self.has_bias = bias
        if input_spec.dynamic:
            self.register_buffer("weight_scale", torch.empty(n, 1, dtype=torch.float32, device=device))
            self.register_buffer("weight_offset", torch.empty(n, 1, dtype=torch.float32, device=device))
            if bias:
                self.bias = nn.Parameter(torch.empty(n, dtype=dtype, device=device), requires_grad=False)
            else:
                self.register_parameter("bias", None)
        else:
            self.register_buffer("input_scale", torch.empty(1, dtype=io_dtype(dtype), device=device))
            self.register_buffer("input_offset", torch.empty(1, dtype=io_dtype(dtype), device=device))
            self.register_buffer("quant_bias", torch.empty(n, dtype=torch.int32, device=device))
            self.register_buffer("deq_scale", torch.empty(n, dtype=deq_scale_dtype(dtype), device=device))
            self.register_parameter("bias", None)  # folded into quant_bias

    @classmethod
    def from_float(
        cls,
        module: nn.Linear,
        w_int8: torch.Tensor,
        w_scale: torch.Tensor,
        spec: QuantSpec,
        input_spec: QuantSpec,
        input_scale: float | None = None,
        input_offset: float | None = None,
    ) -> "QLinearW8A8":
        """Build from a float Linear, its int8 weight ``[n, k]`` and weight scale ``[n]`` (or ``[1]``);
        static layers also take the calibrated ``input_scale`` / ``input_offset``."""
        n, k = w_int8.shape
        q = cls(k, n, spec, input_spec, module.bias is not None, module.weight.dtype, module.weight.device)
        q.weight.copy_(w_int8)
        w_scale = w_scale.reshape(-1).float().expand(n)
        bias = None if module.bias is None else module.bias.detach().float()
        if input_spec.dynamic:
            q.weight_scale.copy_(w_scale[:, None])
            q.weight_offset.zero_()
            if bias is not None:
                q.bias.data.copy_(bias)
            return q
        if input_scale is None or input_offset is None:
            raise ValueError("a static W8A8 layer needs input_scale and input_offset")
        # Round the input parameters to their stored dtype first, so the folded integers match them.
        q.input_scale.fill_(input_scale)
        q.input_offset.fill_(input_offset)
        quant_bias, deq = k8.fold_static_w8a8(
            w_int8, w_scale, float(q.input_scale.float()), int(q.input_offset.float()), bias
        )
        q.quant_bias.copy_(quant_bias)
        q.deq_scale.copy_(k8.deq_scale_to_int64(deq) if q.deq_scale.dtype == torch.int64 else deq)
        return q

    def float_deq_scale(self) -> torch.Tensor:
        """deq_scale as float32 ``[n]`` whichever way it is stored."""
        if self.deq_scale.dtype == torch.int64:
            return k8.deq_scale_from_int64(self.deq_scale)
        return self.deq_scale

    def weight_scale_vector(self) -> torch.Tensor:
        """The per-output-channel weight scale ``[n]`` float32."""
        if self.input_spec.dynamic:
            return self.weight_scale[:, 0]
        return self.float_deq_scale() / self.input_scale.float()

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale_vector()[:, None]).to(dtype or self.compute_dtype)

    def input_key(self) -> tuple:
        """How this layer quantizes its input: ``("dynamic",)`` or ``("static", input_scale, input_offset)``;
        layers with equal keys quantize a shared input to the same int8 rows."""
        if self.input_spec.dynamic:
            return ("dynamic",)
        return ("static", float(self.input_scale.float()), float(self.input_offset.float()))

    def forward_rows(self, q: torch.Tensor, xs: torch.Tensor, lead_shape: Sequence[int]) -> torch.Tensor:
        """The layer's output from its input already quantized (``q`` int8 ``[M, k]``, ``xs`` float32 ``[M]`` per
        token or empty when static) -> float32 ``[*lead_shape, n]``: the bits ``forward`` gives on the float rows."""
        if self.input_spec.dynamic:
            op = k8.get_kernel("linear_w8a8_dynamic_q", self.kernel)
            y = op(q, xs, self.weight, self.weight_scale, self.bias)
        else:
            op = k8.get_kernel("linear_w8a8_static_q", self.kernel)
            y = op(q, self.weight, self.float_deq_scale(), self.quant_bias)
        return y.view(*lead_shape, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows_from is not None and self.kernel == "fast":
            rows = self.rows_from.rows_for(x)
            if rows is not None:
                return self.forward_rows(rows[0], rows[1], x.shape[:-1])
        # Tensors go to the kernels as stored: weight_scale [n, 1] (the kernel views it as [n]) and the
        # 1-element input_scale / input_offset (no float()/int() host reads per call; same values).
        if self.input_spec.dynamic:
            op = k8.get_kernel("linear_w8a8_dynamic", self.kernel)
            return op(x, self.weight, self.weight_scale, self.bias)
        op = k8.get_kernel("linear_w8a8_static", self.kernel)
        return op(x, self.input_scale, self.input_offset, self.weight, self.float_deq_scale(), self.quant_bias)

    # -- checkpoint codec ----------------------------------------------------------------------
    def manifest_entry(self) -> dict[str, Any]:
        entry = super().manifest_entry()
        entry["bias"] = self.has_bias  # the static layout folds the bias into quant_bias
        return entry

    def tensor_label(self) -> str:
        return "W8A8_DYNAMIC" if self.input_spec.dynamic else "W8A8"

    def extra_repr(self) -> str:
        mode = "dynamic per-token" if self.input_spec.dynamic else "static per-tensor"
        return f"{self.in_features}, {self.out_features}, weight={self.spec.describe()}, input={mode}, kernel={self.kernel}"
