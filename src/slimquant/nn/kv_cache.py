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
from transformers.cache_utils import Cache, DynamicLayer

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


class Int8KVLayer(DynamicLayer):
    """One layer's cache: int8 ``keys``/``values`` ``[B, H, T, D]`` with ``key_scales``/``value_scales``
    ``[B, H, T, 1]``; grows by concatenation like :class:`DynamicLayer`."""

    is_croppable = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.keys = torch.empty(b, h, 0, d, dtype=torch.int8, device=self.device)
        self.values = torch.empty(b, h, 0, value_states.shape[-1], dtype=torch.int8, device=self.device)
        self.key_scales = torch.empty(b, h, 0, 1, dtype=torch.float32, device=self.device)
        self.value_scales = torch.empty(b, h, 0, 1, dtype=torch.float32, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        kq, ks = quantize_kv(key_states)
        vq, vs = quantize_kv(value_states)
        self.keys = torch.cat([self.keys, kq], dim=-2)
        self.values = torch.cat([self.values, vq], dim=-2)
        self.key_scales = torch.cat([self.key_scales, ks], dim=-2)
        self.value_scales = torch.cat([self.value_scales, vs], dim=-2)
        return dequantize_kv(self.keys, self.key_scales, self.dtype), dequantize_kv(self.values, self.value_scales, self.dtype)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            idx = beam_idx.to(self.device)
            for name in ("keys", "values", "key_scales", "value_scales"):
                setattr(self, name, getattr(self, name).index_select(0, idx))

    def reset(self) -> None:
        self.key_scales = self.value_scales = None
        super().reset()

    def nbytes(self) -> int:
        """Bytes held: int8 values plus float32 scales."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.key_scales, self.value_scales))


class StaticInt8KVLayer(DynamicLayer):
    """One layer's cache with fixed per-channel scales (msModelSlim C8): int8 ``keys``/``values``
    ``[B, H, T, D]`` only, ``q = clamp(round(x / scale), -128, 127)`` with ``scale`` ``[1, H, 1, D]``
    calibrated per (head, channel) from data; the scales belong to the model, not the cache."""

    is_croppable = False

    def __init__(self, key_scale: torch.Tensor, value_scale: torch.Tensor) -> None:
        super().__init__()
        self.key_scale, self.value_scale = key_scale, value_scale

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        if self.key_scale.shape != (1, h, 1, d) or self.value_scale.shape != (1, value_states.shape[1], 1, value_states.shape[-1]):
            raise SlimquantError(f"static KV scales {list(self.key_scale.shape)} do not fit keys {list(key_states.shape)}")
        self.keys = torch.empty(b, h, 0, d, dtype=torch.int8, device=self.device)
        self.values = torch.empty(b, value_states.shape[1], 0, value_states.shape[-1], dtype=torch.int8, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, quantize_kv_static(key_states, self.key_scale)], dim=-2)
        self.values = torch.cat([self.values, quantize_kv_static(value_states, self.value_scale)], dim=-2)
        return dequantize_kv(self.keys, self.key_scale, self.dtype), dequantize_kv(self.values, self.value_scale, self.dtype)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            idx = beam_idx.to(self.device)
            self.keys, self.values = self.keys.index_select(0, idx), self.values.index_select(0, idx)

    def nbytes(self) -> int:
        """Bytes held: the int8 values (the per-channel scales are part of the model)."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


def quantize_kv_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D]`` float -> int8 with fixed scales ``[1, H, 1, D]`` (symmetric, via :mod:`slimquant.math`)."""
    return quantize(x.float(), scale, None, _INT8)


class Int8KVCache(Cache):
    """An int8 cache: dynamic per-token scales (:class:`Int8KVLayer`, the default) or, given
    ``static_scales`` (one ``(key_scale, value_scale)`` pair ``[1, H, 1, D]`` per layer, in layer order),
    fixed per-channel scales (:class:`StaticInt8KVLayer`)."""

    def __init__(self, static_scales: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        if static_scales is None:
            super().__init__(layer_class_to_replicate=Int8KVLayer)
        else:
            super().__init__(layers=[StaticInt8KVLayer(k, v) for k, v in static_scales])

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


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
