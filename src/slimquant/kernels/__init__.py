"""Ops used by the quantized modules. Each op has a pure-torch reference; faster variants are
registered beside it and tested against it."""

from slimquant.kernels.weight_only import dequantize_weight_tensors, weight_layout

__all__ = ["dequantize_weight_tensors", "weight_layout"]
