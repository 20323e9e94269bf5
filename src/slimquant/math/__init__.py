"""Pure tensor math: qparams, (de)quantization, fake-quant, packing, weight RTN, metrics.

Nothing here walks modules or imports transformers.
"""

from slimquant.math.metrics import cosine_similarity, kl_divergence, sqnr_db, top1_agreement
from slimquant.math.packing import pack, packed_size, unpack
from slimquant.math.qparams import grid, qparams_from_minmax
from slimquant.math.quant import dequantize, fake_quantize, quantize
from slimquant.math.weights import QuantizedWeight, check_weight_shape, dequantize_weight, grouped, quantize_weight

__all__ = [
    "qparams_from_minmax",
    "grid",
    "quantize",
    "dequantize",
    "fake_quantize",
    "pack",
    "unpack",
    "packed_size",
    "QuantizedWeight",
    "quantize_weight",
    "dequantize_weight",
    "check_weight_shape",
    "grouped",
    "sqnr_db",
    "cosine_similarity",
    "kl_divergence",
    "top1_agreement",
]
