"""W8A8 linear layers: int8 weights and int8 activations, as logical tensors.

Static (calibrated, per-tensor asymmetric input)::

    weight            int8   [n, k]   symmetric per-channel (or per-tensor) integers
    input_scale       [1]             float16 / bfloat16 like the model (float32 for float32 models)
    input_zero_point  [1]             same dtype, an integer value
    acc_scale         float32 [n]     input_scale * weight_scale: what the int32 accumulator is multiplied by
    acc_bias          int32  [n]      round(bias / acc_scale): the bias in accumulator units (zeros without one)

    x_q = clamp(round(x / input_scale) + input_zero_point, -128, 127)
    y   = ((x_q - input_zero_point) @ weight.T + acc_bias) * acc_scale      (int32 accumulation)

The kernels add the zero point's share to the bias once (``quant_bias = acc_bias - input_zero_point *
weight.sum(1)``, kept beside the tensors and recomputed when they change); msModelSlim's checkpoint stores
that folded form and ``deq_scale`` as int64 bits for float16 models (:mod:`slimquant.formats.msmodelslim`).

Dynamic (per-token symmetric input computed at run time)::

    weight int8 [n, k], weight_scale float32 [n, 1], bias [n]

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


class QuantizedInputLinear(QModule):
    """Manifest entry shared by linear layers that also quantize their input (int8 and fp8 W8A8): the
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
            if bias:
                self.bias = nn.Parameter(torch.empty(n, dtype=dtype, device=device), requires_grad=False)
            else:
                self.register_parameter("bias", None)
        else:
            self.register_buffer("input_scale", torch.empty(1, dtype=io_dtype(dtype), device=device))
            self.register_buffer("input_zero_point", torch.empty(1, dtype=io_dtype(dtype), device=device))
            self.register_buffer("acc_scale", torch.empty(n, dtype=torch.float32, device=device))
            self.register_buffer("acc_bias", torch.empty(n, dtype=torch.int32, device=device))
            self.register_parameter("bias", None)  # in acc_bias
        object.__setattr__(self, "_folded", None)  # (weight, acc_bias, zero point, their versions, quant_bias)

    @classmethod
    def from_float(
        cls,
        module: nn.Linear,
        w_int8: torch.Tensor,
        w_scale: torch.Tensor,
        spec: QuantSpec,
        input_spec: QuantSpec,
        input_scale: float | None = None,
        input_zero_point: float | None = None,
        method: dict[str, Any] | None = None,
    ) -> "QLinearW8A8":
        """Build from a float Linear, its int8 weight ``[n, k]`` and weight scale ``[n]`` (or ``[1]``);
        static layers also take the calibrated ``input_scale`` / ``input_zero_point``."""
        n, k = w_int8.shape
        q = cls(k, n, spec, input_spec, module.bias is not None, module.weight.dtype, module.weight.device)
        q.weight.copy_(w_int8)
        q.method = dict(method or {})
        w_scale = w_scale.reshape(-1).float().expand(n)
        bias = None if module.bias is None else module.bias.detach().float()
        if input_spec.dynamic:
            q.weight_scale.copy_(w_scale[:, None])
            if bias is not None:
                q.bias.data.copy_(bias)
            return q
        if input_scale is None or input_zero_point is None:
            raise ValueError("a static W8A8 layer needs input_scale and input_zero_point")
        # Round the input parameters to their dtype first, so the accumulator constants match them.
        q.input_scale.fill_(input_scale)
        q.input_zero_point.fill_(input_zero_point)
        acc_bias, acc_scale = k8.quantize_bias(w_scale, float(q.input_scale.float()), bias)
        q.acc_bias.copy_(acc_bias)
        q.acc_scale.copy_(acc_scale)
        return q

    def _quant_bias(self) -> torch.Tensor:
        """``acc_bias - input_zero_point * weight.sum(1)`` (what the static kernels add), computed once and again
        only when ``weight``, ``acc_bias`` or ``input_zero_point`` change (replaced, moved, or edited in place).
        Runs on every forward: a handful of identity and version checks."""
        b = self._buffers
        w, acc, zp = b["weight"], b["acc_bias"], b["input_zero_point"]
        try:
            versions = (w._version, acc._version, zp._version)
        except RuntimeError:  # inference tensors have no version counter (and cannot be edited in place outside it)
            versions = None
        c = self._folded
        if c is not None and c[0] is w and c[1] is acc and c[2] is zp and c[3] == versions:
            return c[4]
        quant_bias = k8.fold_input_zero_point(acc, int(zp.float()), w)
        object.__setattr__(self, "_folded", (w, acc, zp, versions, quant_bias))
        return quant_bias

    def weight_scale_vector(self) -> torch.Tensor:
        """The per-output-channel weight scale ``[n]`` float32 (static layers: ``acc_scale / input_scale``)."""
        if self.input_spec.dynamic:
            return self.weight_scale[:, 0]
        return self.acc_scale / self.input_scale.float()

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale_vector()[:, None]).to(dtype or self.compute_dtype)

    def input_key(self) -> tuple:
        """How this layer quantizes its input: ``("dynamic",)`` or ``("static", input_scale, input_zero_point)``;
        layers with equal keys quantize a shared input to the same int8 rows."""
        if self.input_spec.dynamic:
            return ("dynamic",)
        return ("static", float(self.input_scale.float()), float(self.input_zero_point.float()))

    def forward_rows(self, q: torch.Tensor, xs: torch.Tensor, lead_shape: Sequence[int]) -> torch.Tensor:
        """The layer's output from its input already quantized (``q`` int8 ``[M, k]``, ``xs`` float32 ``[M]`` per
        token or empty when static) -> float32 ``[*lead_shape, n]``: the bits ``forward`` gives on the float rows."""
        if self.input_spec.dynamic:
            op = k8.get_kernel("linear_w8a8_dynamic_q", self.kernel)
            y = op(q, xs, self.weight, self.weight_scale, self.bias)
        else:
            op = k8.get_kernel("linear_w8a8_static_q", self.kernel)
            y = op(q, self.weight, self.acc_scale, self._quant_bias())
        return y.view(*lead_shape, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._refuse_training()
        if self.rows_from is not None and self.kernel == "fast":
            rows = self.rows_from.rows_for(x)
            if rows is not None:
                return self.forward_rows(rows[0], rows[1], x.shape[:-1])
        # Tensors go to the kernels as stored: weight_scale [n, 1] (the kernel views it as [n]) and the
        # 1-element input_scale / input_zero_point (no float()/int() host reads per call; same values).
        if self.input_spec.dynamic:
            op = k8.get_kernel("linear_w8a8_dynamic", self.kernel)
            return op(x, self.weight, self.weight_scale, self.bias)
        op = k8.get_kernel("linear_w8a8_static", self.kernel)
        return op(x, self.input_scale, self.input_zero_point, self.weight, self.acc_scale, self._quant_bias())

    def manifest_entry(self) -> dict[str, Any]:
        entry = super().manifest_entry()
        entry["bias"] = self.has_bias  # static layers hold the bias in acc_bias
        return entry

    def extra_repr(self) -> str:
        mode = "dynamic per-token" if self.input_spec.dynamic else "static per-tensor"
        return f"{self.in_features}, {self.out_features}, weight={self.spec.describe()}, input={mode}, kernel={self.kernel}"
