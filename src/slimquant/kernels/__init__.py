"""Ops used by the quantized modules. Each op has a pure-torch reference; faster variants are
registered beside it and tested against it."""

from slimquant.kernels.weight_only import dequantize_stored_weight, stored_weight_layout

__all__ = ["dequantize_stored_weight", "stored_weight_layout"]
