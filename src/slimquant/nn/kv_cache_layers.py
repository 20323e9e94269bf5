"""The transformers ``Cache`` classes of the int8 KV cache (:mod:`slimquant.nn.kv_cache` re-exports them): kept
apart so that reading and writing checkpoints (:mod:`slimquant.formats`) never imports transformers."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from slimquant.errors import SlimquantError
from slimquant.nn.kv_cache import dequantize_kv, quantize_kv, quantize_kv_static


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
