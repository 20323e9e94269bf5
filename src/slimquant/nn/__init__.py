"""Quantized module classes. :data:`QMODULES` names every class a checkpoint may hold."""

from slimquant.nn.modules import QConv2d, QEmbedding, QLinear, QModule, tied_linear
from slimquant.nn.fp8 import QLinearFP8
from slimquant.nn.w8a8 import QLinearW8A8
from slimquant.nn.input_quant import QConv2dInputQuant, QLinearInputQuant

QMODULES: dict[str, type[QModule]] = {c.__name__: c for c in (QLinear, QConv2d, QEmbedding, QLinearW8A8, QLinearFP8,
                                                              QLinearInputQuant, QConv2dInputQuant)}  # fmt: skip

__all__ = ["QLinear", "QConv2d", "QEmbedding", "QLinearW8A8", "QLinearFP8", "QLinearInputQuant", "QConv2dInputQuant",
           "QModule", "QMODULES", "tied_linear"]
