"""slimquant: quantize trained PyTorch models so they deploy smaller and faster."""

from slimquant.api import (apply_pruning, convert, distill, evaluate, kv_cache, load, load_pruned, prepare_qat,
                           prepare_scop, prune_mlp, prune_scop, quantize, register_transformers, save)
from slimquant.errors import NotSupportedYet, SlimquantError
from slimquant.models.loading import LoadedModel, load_model
from slimquant.search.bits import SearchConfig, SearchResult, bit_search
from slimquant.search.sensitivity import Sensitivity, layer_sensitivity
from slimquant.search.tune import TuningConfig, TuningResult, autotune
from slimquant.types import (AWQ, CBQ, GPTQ, QAT, RTN, AutoRound, CBQPreprocess, GammaMigration, Granularity,
                             LayerOverride, OutlierSuppression, QuantSpec, Recipe, SmoothQuant, SmoothQuantSearch,
                             SparseGPT, Wanda)  # fmt: skip
from slimquant.types.report import ConversionReport, LayerRow, StepRow
from slimquant.types.result import QuantizationResult

__version__ = "0.1.0"

__all__ = [
    "quantize",
    "prepare_qat",
    "convert",
    "distill",
    "prepare_scop",
    "prune_scop",
    "prune_mlp",
    "load_pruned",
    "apply_pruning",
    "save",
    "load",
    "load_model",
    "evaluate",
    "kv_cache",
    "register_transformers",
    "autotune",
    "bit_search",
    "SearchConfig",
    "SearchResult",
    "TuningConfig",
    "TuningResult",
    "layer_sensitivity",
    "Sensitivity",
    "Recipe",
    "QuantSpec",
    "Granularity",
    "LayerOverride",
    "RTN",
    "GPTQ",
    "AutoRound",
    "CBQ",
    "CBQPreprocess",
    "QAT",
    "AWQ",
    "SmoothQuant",
    "SmoothQuantSearch",
    "GammaMigration",
    "OutlierSuppression",
    "SparseGPT",
    "Wanda",
    "LoadedModel",
    "QuantizationResult",
    "ConversionReport",
    "LayerRow",
    "StepRow",
    "SlimquantError",
    "NotSupportedYet",
    "__version__",
]
