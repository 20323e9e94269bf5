"""Quantized module classes (real classes, reference forward)."""

from slimquant.nn.modules import QMODULES, QConv2d, QEmbedding, QLinear, tied_linear

__all__ = ["QLinear", "QConv2d", "QEmbedding", "QMODULES", "tied_linear"]
