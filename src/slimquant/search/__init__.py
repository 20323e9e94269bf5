"""Accuracy-driven compression: layer sensitivity (and, built on it, fallback, tuning and bit-width search)."""

from slimquant.search.bits import Evaluation, SearchConfig, SearchResult, bit_search
from slimquant.search.fallback import fallback_chooser
from slimquant.search.sensitivity import METRICS, LayerScore, Sensitivity, layer_sensitivity
from slimquant.search.tune import Trial, TuningConfig, TuningResult, autotune

__all__ = ["METRICS", "Evaluation", "LayerScore", "SearchConfig", "SearchResult", "Sensitivity", "Trial",
           "TuningConfig", "TuningResult", "autotune", "bit_search", "fallback_chooser", "layer_sensitivity"]
