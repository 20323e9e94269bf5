"""Round-to-nearest weight quantization, optionally with the MSE clipping search. Needs no data."""

from __future__ import annotations

import torch

from slimquant.math.weights import QuantizedWeight, quantize_weight
from slimquant.types.spec import QuantSpec


def rtn(weight: torch.Tensor, spec: QuantSpec, clip_search: bool = False) -> QuantizedWeight:
    """Quantize a ``[n, k]`` weight by rounding to the nearest grid point (``clip_search``: per channel/group,
    the clipping ratio with the lowest MSE)."""
    return quantize_weight(weight, spec, clip_search=clip_search)
