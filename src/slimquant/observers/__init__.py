"""Stateful calibration statistics: min/max, moving average, histogram (percentile/MSE/KL), sigma."""

from slimquant.observers.observers import (
    HISTOGRAM_METHODS,
    OBSERVERS,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    Observer,
    SigmaObserver,
    TokenQuantileObserver,
    make_observer,
)

__all__ = [
    "Observer",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "HistogramObserver",
    "SigmaObserver",
    "TokenQuantileObserver",
    "make_observer",
    "OBSERVERS",
    "HISTOGRAM_METHODS",
]
