"""The recipe's ``model``-stage steps (smoothing before activation quantization: SmoothQuant, its alpha search,
gamma migration), run on the float model before any layer is quantized.

Each step's implementation (:mod:`slimquant.algorithms`) names the layers whose inputs it wants observed; this
module observes them on the calibration data in one pass per step and hands the statistics back.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from slimquant.algorithms import ModelTransform, implementation
from slimquant.errors import SlimquantError
from slimquant.pipeline.calibrate import observe_inputs, run_batches
from slimquant.types.report import StepRow
from slimquant.types.spec import Recipe


def run_model_steps(model: nn.Module, recipe: Recipe, calib_data: Any, show_progress: bool = True) -> list[StepRow]:
    """Apply every ``model``-stage step of ``recipe`` to the float ``model`` in place, in order; returns their
    report rows (one per smoothing group)."""
    rows: list[StepRow] = []
    for step in recipe.steps_of("model"):
        impl = implementation(step)
        assert isinstance(impl, ModelTransform)
        request = impl.observe(model, step, recipe)  # type: ignore[misc]
        stats = None
        if request is not None:
            if calib_data is None:
                raise SlimquantError(f"{step.TYPE} needs calibration data (calib_data)")
            with observe_inputs(model, request.layers, request.observers, request.sample_rows) as stats:
                run_batches(model, calib_data, show_progress, desc=f"{step.TYPE} statistics")
        step_rows = impl.apply(model, step, recipe, stats, show_progress)  # type: ignore[misc]
        rows += [StepRow.from_dict(r, step.TYPE) for r in step_rows]
    return rows
