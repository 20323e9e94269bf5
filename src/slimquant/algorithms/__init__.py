"""Weight algorithms, registered by name: each declares what it needs and holds a pure solver, so the pipeline
runs whichever one a recipe names without naming any itself.

A :class:`WeightAlgorithm` solves one ``[n, k]`` float32 weight: ``solve(layer, w, h, spec, recipe)`` ->
``(QuantizedWeight, report fields)``, where ``h`` is the layer's input Hessian ``2/N X^T X`` ``[k, k]`` when the
algorithm ``needs_hessian`` (it then runs block by block in :mod:`slimquant.pipeline.sequential`, each block
calibrated on the previous quantized blocks' outputs), else None. Layers outside the model's repeated blocks
have no calibrated inputs there; a calibrated algorithm names the data-free one they use (``outside_blocks``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from slimquant.errors import SlimquantError
from slimquant.math.weights import QuantizedWeight, quantize_weight
from slimquant.types.spec import QuantSpec, Recipe

from slimquant.algorithms.rtn import rtn

log = logging.getLogger(__name__)

WeightSolver = Callable[[torch.Tensor, QuantSpec, Recipe], QuantizedWeight]
Solve = Callable[[str, torch.Tensor, "torch.Tensor | None", QuantSpec, Recipe], "tuple[QuantizedWeight, dict[str, Any]]"]


@dataclass(frozen=True)
class WeightAlgorithm:
    name: str
    solve: Solve
    needs_hessian: bool = False
    outside_blocks: str | None = None  # data-free algorithm for layers outside the blocks (calibrated ones only)

    def data_free(self) -> "WeightAlgorithm":
        """The algorithm that quantizes layers without calibrated inputs: this one, or its ``outside_blocks``."""
        return weight_algorithm(self.outside_blocks) if self.needs_hessian else self

    def solver(self) -> WeightSolver:
        """``(w, spec, recipe) -> QuantizedWeight`` of a data-free algorithm."""
        if self.needs_hessian:
            raise SlimquantError(f"weight algorithm {self.name!r} needs calibration inputs; it has no data-free solver")
        return lambda w, spec, recipe: self.solve("", w, None, spec, recipe)[0]


_REGISTRY: dict[str, WeightAlgorithm] = {}


def register_weight_algorithm(algorithm: WeightAlgorithm) -> WeightAlgorithm:
    """Add ``algorithm`` under its name (a name registered twice is an error)."""
    if algorithm.name in _REGISTRY:
        raise SlimquantError(f"weight algorithm {algorithm.name!r} is already registered")
    if algorithm.needs_hessian and algorithm.outside_blocks is None:
        raise SlimquantError(f"weight algorithm {algorithm.name!r} needs a data-free outside_blocks algorithm")
    _REGISTRY[algorithm.name] = algorithm
    return algorithm


def weight_algorithm(name: str) -> WeightAlgorithm:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SlimquantError(f"unknown weight algorithm {name!r}; valid: {', '.join(_REGISTRY)}") from None


def weight_solver(name: str) -> WeightSolver:
    """The data-free solver of ``name`` (for a calibrated algorithm, the one its outside-block layers use)."""
    return weight_algorithm(name).data_free().solver()


def _solve_rtn(layer: str, w: torch.Tensor, h: torch.Tensor | None, spec: QuantSpec,
               recipe: Recipe) -> tuple[QuantizedWeight, dict[str, Any]]:  # fmt: skip
    return rtn(w, spec, recipe), {"algorithm": "rtn"}


def _solve_gptq(layer: str, w: torch.Tensor, h: torch.Tensor | None, spec: QuantSpec,
                recipe: Recipe) -> tuple[QuantizedWeight, dict[str, Any]]:  # fmt: skip
    from slimquant.algorithms.gptq import GPTQError, gptq

    try:
        res = gptq(w, h, spec, percdamp=recipe.gptq_percdamp, act_order=recipe.gptq_act_order,
                   static_groups=recipe.gptq_static_groups, clip_search=recipe.clip_search)  # fmt: skip
    except GPTQError as e:
        log.warning("%s: %s; falling back to RTN for this layer", layer, e)
        return quantize_weight(w, spec, clip_search=recipe.clip_search), {"algorithm": "rtn", "fallback": str(e)}
    return res.weight, {"algorithm": "gptq", "damp": res.damp, "dead_columns": res.dead_columns}


register_weight_algorithm(WeightAlgorithm("rtn", _solve_rtn))
register_weight_algorithm(WeightAlgorithm("gptq", _solve_gptq, needs_hessian=True, outside_blocks="rtn"))

__all__ = ["WeightAlgorithm", "register_weight_algorithm", "weight_algorithm", "weight_solver", "WeightSolver", "rtn"]
