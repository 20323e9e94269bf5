"""Weight algorithms: each is a pure solver ``(weight, spec, options) -> QuantizedWeight`` looked up
by name, so the pipeline never names one."""

from __future__ import annotations

from typing import Callable

import torch

from slimquant.errors import SlimquantError
from slimquant.math.weights import QuantizedWeight
from slimquant.types.spec import QuantSpec, Recipe

from slimquant.algorithms.rtn import rtn

WeightSolver = Callable[[torch.Tensor, QuantSpec, Recipe], QuantizedWeight]

_SOLVERS: dict[str, WeightSolver] = {"rtn": rtn}


def weight_solver(name: str) -> WeightSolver:
    try:
        return _SOLVERS[name]
    except KeyError:
        raise SlimquantError(f"unknown weight algorithm {name!r}; valid: {', '.join(_SOLVERS)}") from None


__all__ = ["weight_solver", "WeightSolver", "rtn"]
