"""Round-to-nearest weight quantization, optionally with the MSE clipping search. Needs no data."""

from __future__ import annotations

import torch

from slimquant.math.weights import QuantizedWeight, quantize_weight
from slimquant.types.spec import QuantSpec, Recipe


def rtn(weight: torch.Tensor, spec: QuantSpec, recipe: Recipe) -> QuantizedWeight:
    """Quantize a ``[n, k]`` weight by rounding to the nearest grid point."""
    return quantize_weight(weight, spec, clip_search=recipe.clip_search)
