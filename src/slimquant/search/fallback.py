"""Automatic fallback (msModelSlim ``--disable_level L<n>``): the ``n`` planned Linear layers whose quantization
alone costs the model most stay float.

The ranking is :func:`slimquant.search.sensitivity.layer_sensitivity` on the model as the conversion sees it
(after its smoothing steps), with the recipe's data-free weight step, on the first calibration items.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

from torch import nn

from slimquant.errors import SlimquantError
from slimquant.pipeline.calibrate import model_inputs
from slimquant.pipeline.convert import LayerPlan, convert, refuse_quantized
from slimquant.search.sensitivity import EXACT, Sensitivity, layer_sensitivity
from slimquant.surgery.fuse import fuse_for_inference
from slimquant.types.result import QuantizationResult
from slimquant.types.spec import Recipe

log = logging.getLogger(__name__)

# Calibration items the ranking runs on (every planned layer runs them once more): the first ones given.
FALLBACK_ITEMS = 4


def without_model_steps(recipe: Recipe) -> Recipe:
    """``recipe`` less its ``model`` steps (for a model they were already applied to) and its fallback."""
    return dataclasses.replace(recipe, steps=tuple(s for s in recipe.steps if s.STAGE != "model"), disable_level=0)


def fallback_chooser(
    recipe: Recipe,
    sensitivity: Sensitivity | None = None,
    candidate: str | None = None,
    metric: str | None = None,
    items: int = FALLBACK_ITEMS,
    cache_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
) -> Callable[[nn.Module, list[LayerPlan], Any], dict[str, str]]:
    """The ``fallback`` :func:`slimquant.pipeline.convert.convert` calls for ``recipe.disable_level``: it ranks the
    planned Linear layers by ``metric`` and returns the top ``disable_level`` with their score as the reason.

    ``sensitivity``: a measurement to reuse (``candidate``: which of its candidates, when it holds several); it
    must cover every planned layer. Otherwise the layers are measured on the first ``items`` calibration items
    (``cache_dir``: reuse / resume, see :func:`layer_sensitivity`). ``metric``: what to rank by; default the
    exact ablation, or a given sensitivity's first metric when it holds no ablation.
    """
    n = recipe.disable_level
    if not isinstance(items, int) or items < 1:
        raise SlimquantError(f"items must be a positive number of calibration items, got {items!r}")

    def choose(model: nn.Module, layers: list[LayerPlan], calib_data: Any) -> dict[str, str]:
        names = [lp.name for lp in layers]
        if not names:
            return {}
        if n >= len(names):
            log.warning("disable_level L%d: the plan has only %d Linear layer(s); all stay float", n, len(names))
        sens = sensitivity
        by = metric or EXACT
        if sens is None:
            sample = model_inputs(calib_data)[:items]
            sens = layer_sensitivity(model, without_model_steps(recipe), sample, metrics=(by,), layers=names,
                                     cache_dir=cache_dir, show_progress=show_progress)  # fmt: skip
        elif metric is None and EXACT not in sens.metrics:
            by = sens.metrics[0]
        scores = sens.scores(by, candidate)
        missing = [name for name in names if name not in scores]
        if missing:
            raise SlimquantError(f"the sensitivity given has no {by} score for layer {missing[0]} (of {len(missing)} "
                                 "planned layer(s) it lacks); measure it with the same recipe and model")  # fmt: skip
        ranked = sorted(names, key=lambda name: -scores[name] if scores[name] == scores[name] else float("inf"))
        out = {}
        for i, name in enumerate(ranked[:n], 1):
            out[name] = (f"disable_level L{n}: sensitivity rank {i} of {len(ranked)} ({by}, {sens.loss} "
                         f"{scores[name]:.3g})")  # fmt: skip
        return out

    return choose


def quantize_model(
    model: nn.Module, recipe: Recipe, calib_data: Any = None, show_progress: bool = True,
    stream: Any = None, work_dir: str | os.PathLike | None = None, max_activation_gb: float | None = None,
    sensitivity: Sensitivity | None = None, sensitivity_cache: str | os.PathLike | None = None,
) -> QuantizationResult:  # fmt: skip
    """What :func:`slimquant.quantize` runs (see there): the conversion, with the fallback chooser when
    ``recipe.disable_level`` asks for one, then the fused W8A8 input producers."""
    if not isinstance(model, nn.Module):
        raise SlimquantError(f"quantize takes an nn.Module, got {type(model).__name__}"
                             + ("; pass its .model" if hasattr(model, "model") else ""))  # fmt: skip
    refuse_quantized(model)
    if calib_data is not None and not recipe.needs_calibration:
        log.info("calib_data is not used: %s is data-free", recipe.quant_type)
        calib_data = None
    fallback = None
    if recipe.disable_level:
        fallback = fallback_chooser(recipe, sensitivity=sensitivity, cache_dir=sensitivity_cache,
                                    show_progress=show_progress)  # fmt: skip
    elif sensitivity is not None:
        raise SlimquantError("sensitivity= ranks layers for recipe.disable_level, which is 0")
    result = convert(model, recipe, show_progress=show_progress, calib_data=calib_data, stream=stream,
                     work_dir=work_dir, max_activation_gb=max_activation_gb, fallback=fallback)  # fmt: skip
    fuse_for_inference(model)
    n = len(result.report.layers) if result.report is not None else 0
    log.info("quantized %d layer(s) with %s (%s)", n, recipe.algorithm, recipe.quant_type)
    return result
