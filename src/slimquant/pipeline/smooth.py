"""Outlier handling before activation quantization (msModelSlim ``anti_method``): observe the inputs
of each smoothing group on calibration data, pick scales, and apply the equivalence transform.

Which op feeds which linears comes from :mod:`slimquant.adapters`; the scales from
:mod:`slimquant.math.smooth`; the transform from :mod:`slimquant.algorithms.smoothquant`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from slimquant.adapters import smooth_groups
from slimquant.algorithms.smoothquant import (
    apply_smoothing,
    input_weight,
    smoothed_output_error,
    weight_absmax_per_input,
)
from slimquant.math.smooth import gamma_migration_scales, smoothquant_scales
from slimquant.observers import make_observer
from slimquant.pipeline.calibrate import observe_inputs, run_batches
from slimquant.types.spec import Recipe

log = logging.getLogger(__name__)

# m4: the alpha grid searched per group (plus "no smoothing"), by output error on sampled inputs.
ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SAMPLE_ROWS = 512


def smooth_model(model: nn.Module, recipe: Recipe, calib_data: Any, show_progress: bool = True) -> list[dict[str, Any]]:
    """Apply ``recipe.smooth`` (m1 / m2 / m4) to the float ``model`` in place; returns one row per group."""
    if recipe.smooth == "m2":
        return _gamma_migration(model)
    groups = smooth_groups(model)
    selected = [(prev, lins) for prev, lins in groups]
    firsts = [lins[0] for _, lins in selected]
    sample_rows = SAMPLE_ROWS if recipe.smooth == "m4" else 0
    with observe_inputs(model, firsts, lambda: {"absmax": make_observer("minmax", axis=-1)}, sample_rows) as stats:
        run_batches(model, calib_data, show_progress, desc=f"smoothing statistics ({recipe.smooth})")
    rows = []
    for prev_name, lin_names in tqdm(selected, desc=f"smooth {recipe.smooth}", disable=not show_progress, unit="group"):
        st = stats[lin_names[0]]
        lo, hi = st.observers["absmax"].range()
        act_absmax = torch.maximum(lo.abs(), hi.abs())
        linears = [model.get_submodule(n) for n in lin_names]
        w_absmax = weight_absmax_per_input(linears)
        if recipe.smooth == "m4":
            alpha, errors = _search_alpha(st.sample(), linears, act_absmax, w_absmax, recipe)
        else:
            alpha, errors = recipe.smooth_alpha, {}
        if alpha is not None:
            s = smoothquant_scales(act_absmax, w_absmax, alpha)
            apply_smoothing(model.get_submodule(prev_name), linears, s)
        rows.append({"prev": prev_name, "linears": list(lin_names), "alpha": alpha,
                     "act_absmax_before": round(float(act_absmax.max()), 4),
                     "act_absmax_after": round(float((act_absmax / s).max()) if alpha is not None else float(act_absmax.max()), 4),
                     "errors": errors})  # fmt: skip
    log.info("%s smoothing applied to %d group(s)", recipe.smooth, sum(r["alpha"] is not None for r in rows))
    return rows


def _gamma_migration(model: nn.Module) -> list[dict[str, Any]]:
    """m2: move every norm's weight into the linears it feeds (groups fed by a linear are left alone)."""
    rows = []
    for prev_name, lin_names in smooth_groups(model):
        prev = model.get_submodule(prev_name)
        if isinstance(prev, nn.Linear) or not isinstance(getattr(prev, "weight", None), torch.Tensor):
            continue
        s = gamma_migration_scales(prev.weight)
        apply_smoothing(prev, [model.get_submodule(n) for n in lin_names], s)
        rows.append({"prev": prev_name, "linears": list(lin_names), "alpha": "gamma",
                     "gamma_absmax": round(float(s.abs().max()), 4)})  # fmt: skip
    log.info("m2 gamma migration applied to %d norm(s)", len(rows))
    return rows


def _search_alpha(
    x: torch.Tensor, linears: list[nn.Module], act_absmax: torch.Tensor, w_absmax: torch.Tensor, recipe: Recipe
) -> tuple[float | None, dict[str, float]]:
    """The alpha (None = leave unsmoothed) with the lowest quantized output error on ``x``."""
    weights = [input_weight(m).detach() for m in linears]
    ones = torch.ones_like(act_absmax)
    errors = {"none": smoothed_output_error(x, weights, ones, recipe.weight, recipe.input)}
    for a in ALPHA_GRID:
        s = smoothquant_scales(act_absmax, w_absmax, a)
        errors[str(a)] = smoothed_output_error(x, weights, s, recipe.weight, recipe.input)
    best = min(errors, key=lambda k: errors[k])
    return (None if best == "none" else float(best)), errors
