"""Accuracy-driven compression: layer sensitivity (and, built on it, fallback, tuning and bit-width search)."""

from slimquant.search.fallback import fallback_chooser
from slimquant.search.sensitivity import METRICS, LayerScore, Sensitivity, layer_sensitivity
from slimquant.search.tune import Trial, TuningConfig, TuningResult, autotune

__all__ = ["METRICS", "LayerScore", "Sensitivity", "Trial", "TuningConfig", "TuningResult", "autotune",
           "fallback_chooser", "layer_sensitivity"]
