"""Calibrate the static int8 KV cache (Recipe.kv = KV_INT8_STATIC, msModelSlim C8).

The calibration windows run through the model (as it will be deployed) with a cache that records,
per layer, the max |key| and |value| of every (head, channel) as the model writes them (keys after
the rotary embedding), then scale = max / 127 goes onto each attention's k_proj / v_proj.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from slimquant.errors import SlimquantError
from slimquant.math.qparams import qparams_from_minmax
from slimquant.nn.kv_cache import attach_kv_scales, kv_projections
from slimquant.pipeline.calibrate import model_inputs, run_batches
from slimquant.types.qtype import qtype as lookup_qtype

log = logging.getLogger(__name__)


class _ObservingCache(DynamicCache):
    """A float cache that records per-(head, channel) max |x| of keys and values per layer into ``stats``."""

    def __init__(self, stats: dict[int, list[torch.Tensor | None]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._stats = stats

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        slot = self._stats.setdefault(layer_idx, [None, None])
        for i, x in enumerate((key_states, value_states)):
            m = x.detach().float().abs().amax(dim=(0, 2))  # [H, D]
            if not torch.isfinite(m).all():
                raise SlimquantError(f"layer {layer_idx}: KV cache values are NaN/Inf during calibration")
            slot[i] = m if slot[i] is None else torch.maximum(slot[i], m)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def _with_cache(calib_data: Any, stats: dict) -> list[dict[str, Any]]:
    out = []
    for item in model_inputs(calib_data):
        if isinstance(item, torch.Tensor):
            item = {"input_ids": item}
        if not isinstance(item, dict):
            raise SlimquantError("static KV-cache calibration needs token windows or dicts of model inputs")
        out.append({**item, "past_key_values": _ObservingCache(stats), "use_cache": True})
    return out


def calibrate_kv(model: nn.Module, calib_data: Any, show_progress: bool = True) -> dict[str, Any]:
    """Attach static per-channel KV scales to ``model``; returns ``{"layers": n, "absmax": {layer: (k, v)}}``."""
    if calib_data is None:
        raise SlimquantError("a static KV cache (per-channel scales) needs calibration data (calib_data)")
    entries = kv_projections(model)
    stats: dict[int, list[torch.Tensor | None]] = {}
    run_batches(model, _with_cache(calib_data, stats), show_progress, desc="KV-cache calibration")
    int8 = lookup_qtype("int8")
    scales: dict[str, torch.Tensor] = {}
    summary = {}
    for idx, k_name, v_name in entries:
        if idx not in stats:
            raise SlimquantError(f"layer {idx} ({k_name}) wrote nothing to the KV cache during calibration")
        for name, m in zip((k_name, v_name), stats[idx]):
            scale, _ = qparams_from_minmax(-m, m, int8, symmetric=True)  # type: ignore[arg-type,operator]
            scales[name] = scale.reshape(-1)
        summary[idx] = (float(stats[idx][0].max()), float(stats[idx][1].max()))  # type: ignore[union-attr]
    attach_kv_scales(model, entries, scales)
    log.info("static KV cache: per-channel int8 scales for %d layer(s)", len(entries))
    return {"layers": len(entries), "absmax": summary}
