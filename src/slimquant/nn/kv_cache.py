"""An int8 KV cache for Hugging Face models: keys and values are stored as int8 plus one float32
scale per (batch, head, token), so the cache memory really shrinks (fp32: 4 bytes per element;
here 1 byte plus 4 bytes per head_dim elements).

Quantization is symmetric and dynamic per token and head: ``s = max|x| / 127`` over ``head_dim``,
``q = round(x / s)``. :meth:`Int8KVLayer.update` returns the dequantized keys and values, so the
attention of the current tokens also sees the quantized cache (prefill measures its accuracy cost).

Static per-channel scales (msModelSlim C8, ``Recipe(kv=KV_INT8_STATIC)``): one scale per (head, channel)
calibrated on data and stored in the checkpoint as ``<attn>.k_proj.kv_cache_scale`` / ``kv_cache_offset``
(and ``v_proj``); the cache then holds int8 values only (:class:`StaticInt8KVLayer`).

Use: ``model.generate(ids, past_key_values=Int8KVCache())`` or ``model(ids, past_key_values=Int8KVCache(),
use_cache=True)``; :func:`slimquant.kv_cache` builds one for a model whose recipe quantizes the KV cache.
"""

from __future__ import annotations

import torch
from torch import nn

from slimquant.errors import SlimquantError
from slimquant.kernels.int8 import get_kernel
from slimquant.math.quant import quantize
from slimquant.types.qtype import qtype as lookup_qtype

_INT8 = lookup_qtype("int8")


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, H, T, D]`` float -> (int8 ``[B, H, T, D]``, float32 scale ``[B, H, T, 1]``), per token and head."""
    return get_kernel("quantize_per_token", "fast")(x)


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def quantize_kv_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D]`` float -> int8 with fixed scales ``[1, H, 1, D]`` (symmetric, via :mod:`slimquant.math`)."""
    return quantize(x.float(), scale, None, _INT8)


# The Cache classes need transformers; they are imported on first use (``from slimquant.nn.kv_cache import
# Int8KVCache`` works as before), so that this module, and the checkpoint codec using it, do not.
_LAZY = ("Int8KVLayer", "StaticInt8KVLayer", "Int8KVCache")


def __getattr__(name: str):  # noqa: ANN202 - PEP 562
    if name in _LAZY:
        from slimquant.nn import kv_cache_layers

        return getattr(kv_cache_layers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- static per-channel scales (msModelSlim C8): stored on each attention's k_proj / v_proj ------------------

KV_SCALE, KV_OFFSET = "kv_cache_scale", "kv_cache_offset"


def kv_projections(model: nn.Module) -> list[tuple[int, str, str]]:
    """``(layer_idx, k_proj name, v_proj name)`` of every attention module, in layer order; the modules
    whose outputs become the cached keys and values, where C8 stores the scales."""
    from slimquant.nn.fa_quant import attention_modules

    out = []
    for name in attention_modules(model):
        attn = model.get_submodule(name)
        if not (hasattr(attn, "k_proj") and hasattr(attn, "v_proj")):
            raise SlimquantError(f"static KV-cache scales are stored on k_proj/v_proj (msModelSlim C8); {name} "
                                 f"({type(attn).__name__}) has none: use the dynamic per-token KV cache")  # fmt: skip
        out.append((int(attn.layer_idx), f"{name}.k_proj", f"{name}.v_proj"))
    return sorted(out)


def attach_kv_scales(model: nn.Module, entries: list[tuple[int, str, str]], scales: dict[str, torch.Tensor] | None = None,
                     device: torch.device | str | None = None) -> None:  # fmt: skip
    """Register ``kv_cache_scale`` / ``kv_cache_offset`` (float32 ``[heads * head_dim]``; offsets are zero)
    on the k/v projections: the given ``scales`` (by projection name), or empty ones on ``device``
    (loading) sized from the projection's output width."""
    for _, *names in entries:
        for name in names:
            proj = model.get_submodule(name)
            if scales is not None:
                s = scales[name].reshape(-1).float()
            else:
                s = torch.empty(int(proj.out_features), dtype=torch.float32, device=device)
            proj.register_buffer(KV_SCALE, s)
            proj.register_buffer(KV_OFFSET, torch.zeros_like(s))


def static_kv_scales(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The model's per-layer ``(key_scale, value_scale)`` ``[1, H, 1, D]`` for :class:`Int8KVCache`."""
    from slimquant.nn.fa_quant import attention_heads

    out = []
    for _, k_name, v_name in kv_projections(model):
        heads = attention_heads(model.get_submodule(k_name.rpartition(".")[0]))[1]
        pair = []
        for name in (k_name, v_name):
            s = getattr(model.get_submodule(name), KV_SCALE, None)
            if s is None:
                raise SlimquantError(f"{name} has no {KV_SCALE}: the model was not calibrated for a static KV cache")
            pair.append(s.reshape(1, heads, 1, -1))
        out.append((pair[0], pair[1]))
    return out
