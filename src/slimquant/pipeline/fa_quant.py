"""Calibrate attention quantization (Recipe.fa): per-head Q/K/V ranges, then the fa_amp fallback.

Runs on the model as it will be deployed (after its linear layers are quantized), so the ranges are
those of the quantized projections' outputs.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from slimquant.errors import SlimquantError
from slimquant.nn import fa_quant
from slimquant.pipeline.calibrate import run_batches
from slimquant.types.spec import Recipe

log = logging.getLogger(__name__)


def calibrate_attention(model: nn.Module, recipe: Recipe, calib_data: Any, show_progress: bool = True) -> dict[str, Any]:
    """Attach and calibrate Q/K/V quantizers on every attention module; leave ``recipe.fa_amp`` of them float.

    Returns ``{"quantized": [names], "float": [names], "relative_error": {name: err}}``; the relative
    error (``||out_q - out||^2 / ||out||^2`` of the attention output on the calibration data, each layer
    measured alone) is only computed when ``fa_amp`` > 0.
    """
    if calib_data is None:
        raise SlimquantError("attention quantization (fa) needs calibration data (calib_data)")
    names = fa_quant.attention_modules(model)
    if recipe.fa_amp > len(names):
        raise SlimquantError(f"fa_amp {recipe.fa_amp}: the model has only {len(names)} attention layer(s)")
    device = next((p.device for p in model.parameters()), None)
    fa_quant.attach(model, names, device)
    quantizers = [getattr(model.get_submodule(n), role) for n in names for role in fa_quant.ROLES]
    with fa_quant.observing(quantizers):
        run_batches(model, calib_data, show_progress, desc="attention calibration")
    for name in names:
        for role in fa_quant.ROLES:
            try:
                getattr(model.get_submodule(name), role).set_range_from_observed()
            except SlimquantError as e:
                raise SlimquantError(f"layer {name}.{role}: {e}") from None
    errors: dict[str, float] = {}
    fallback: list[str] = []
    if recipe.fa_amp:
        modules = {n: model.get_submodule(n) for n in names}
        with fa_quant.measuring_error(modules) as measured:
            run_batches(model, calib_data, show_progress, desc="attention sensitivity")
        errors = {n: e["err"] / max(e["ref"], 1e-30) for n, e in measured.items()}
        fallback = sorted(names, key=lambda n: errors[n], reverse=True)[: recipe.fa_amp]
        for n in fallback:
            fa_quant.detach(modules[n])
            log.info("attention %s stays float (fa_amp): relative output error %.3g", n, errors[n])
    quantized = [n for n in names if n not in fallback]
    log.info("attention quantization: Q/K/V int8 per head in %d layer(s), %d float", len(quantized), len(fallback))
    return {"quantized": quantized, "float": fallback, "relative_error": errors}
