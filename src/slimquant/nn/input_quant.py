"""Weight-quantized Linear / Conv2d layers that also quantize their input, for the weight / input pairs the
int8 W8A8 kernels do not run (int2-8 weights of any granularity with int2-8 inputs: W4A8, W4A4, W8A8 convolutions).

Logical tensors: those of :class:`QLinear` / :class:`QConv2d` (``weight``, ``weight_scale``,
``weight_zero_point``, ``bias``) plus, for a static input spec::

    input_scale       float32 [1]
    input_zero_point  float32 [1]   an integer value (0 for symmetric inputs)

    x_q = clamp(round(x / input_scale) + input_zero_point, qmin, qmax);  x' = (x_q - input_zero_point) * input_scale

and nothing more for a dynamic one (per-token symmetric scales computed at run time, Linear only). The layer
then computes like its weight-only class on ``x'`` (the reference arithmetic: these integer pairs have no
integer kernel here), so its outputs equal a fake-quantized layer's with the same parameters
(:mod:`slimquant.nn.qat`) up to float32 rounding in the matmul.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimquant.math.qparams import qparams_from_minmax
from slimquant.math.quant import dequantize, quantize
from slimquant.types.qtype import qtype as lookup_qtype
from slimquant.types.spec import QuantSpec
from slimquant.nn.modules import QConv2d, QLinear


def quantize_input(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None,
                   zero_point: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """``x`` quantized to ``spec``'s grid and back, in ``x``'s dtype: static with ``scale`` / ``zero_point``
    (``[1]``), or dynamic per token (per row of the last dim, symmetric) when ``spec.dynamic``."""
    qt = lookup_qtype(spec.qtype)
    if spec.dynamic:
        rows = x.detach().float()
        s, _ = qparams_from_minmax(rows.amin(-1, keepdim=True), rows.amax(-1, keepdim=True), qt, True)
        return dequantize(quantize(x, s, None, qt), s, None, x.dtype)
    zp = zero_point if not spec.symmetric else None
    return dequantize(quantize(x, scale, zp, qt), scale, zp, x.dtype)


class _InputQuant:
    """The input half shared by :class:`QLinearInputQuant` and :class:`QConv2dInputQuant`."""

    input_spec: QuantSpec

    def _init_input(self, input_spec: QuantSpec, device: Any) -> None:
        self.input_spec = input_spec
        if not input_spec.dynamic:
            self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=device))  # type: ignore[attr-defined]
            self.register_buffer("input_zero_point", torch.zeros(1, dtype=torch.float32, device=device))  # type: ignore[attr-defined]

    def set_input_params(self, scale: float | torch.Tensor, zero_point: float | torch.Tensor | None) -> None:
        """The static input's ``scale`` and ``zero_point`` (None / ignored for symmetric inputs: 0)."""
        self.input_scale.fill_(float(scale))  # type: ignore[attr-defined]
        self.input_zero_point.fill_(0.0 if zero_point is None or self.input_spec.symmetric else float(zero_point))  # type: ignore[attr-defined]

    def _quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_spec.dynamic:
            return quantize_input(x, self.input_spec, None, None)
        return quantize_input(x, self.input_spec, self.input_scale, self.input_zero_point)  # type: ignore[attr-defined]


class QLinearInputQuant(_InputQuant, QLinear):
    """:class:`QLinear` whose input is quantized to ``input_spec`` first (static per tensor, or dynamic per
    token)."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, input_spec: QuantSpec,
                 bias: bool = True, dtype: torch.dtype = torch.float32, device: Any = None) -> None:  # fmt: skip
        QLinear.__init__(self, in_features, out_features, spec, bias, dtype, device)
        self._init_input(input_spec, device)

    def manifest_args(self) -> dict[str, Any]:
        return {**super().manifest_args(), "input_spec": self.input_spec.to_dict()}

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> "QLinearInputQuant":
        spec, dtype, bias, args = cls._entry_basics(entry)
        return cls(args["in_features"], args["out_features"], spec, QuantSpec.from_dict(args["input_spec"]), bias,
                   dtype, "meta")  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return QLinear.forward(self, self._quantized_input(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, input={self.input_spec.describe()}"


class QConv2dInputQuant(_InputQuant, QConv2d):
    """:class:`QConv2d` whose input is quantized to ``input_spec`` (static, per tensor) first."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], spec: QuantSpec,
                 input_spec: QuantSpec, stride: tuple[int, int] = (1, 1), padding: Any = (0, 0),
                 dilation: tuple[int, int] = (1, 1), groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 dtype: torch.dtype = torch.float32, device: Any = None) -> None:  # fmt: skip
        if input_spec.dynamic:
            raise ValueError("a convolution's input is quantized statically (per tensor); dynamic per-token "
                             "scales apply to Linear layers")  # fmt: skip
        QConv2d.__init__(self, in_channels, out_channels, kernel_size, spec, stride, padding, dilation, groups, bias,
                         padding_mode, dtype, device)  # fmt: skip
        self._init_input(input_spec, device)

    def manifest_args(self) -> dict[str, Any]:
        return {**super().manifest_args(), "input_spec": self.input_spec.to_dict()}

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> "QConv2dInputQuant":
        spec, dtype, bias, a = cls._entry_basics(entry)
        padding = a["padding"] if isinstance(a["padding"], str) else tuple(a["padding"])
        return cls(a["in_channels"], a["out_channels"], tuple(a["kernel_size"]), spec,
                   QuantSpec.from_dict(a["input_spec"]), tuple(a["stride"]), padding, tuple(a["dilation"]),
                   a["groups"], bias, a["padding_mode"], dtype, "meta")  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return QConv2d.forward(self, self._quantized_input(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, input={self.input_spec.describe()}"


def with_input_quant(module: nn.Module) -> bool:
    """Whether ``module`` is one of this file's classes."""
    return isinstance(module, _InputQuant)
