"""An int8 KV cache for Hugging Face models: keys and values are stored as int8 plus one float32
scale per (batch, head, token), so the cache memory really shrinks (fp32: 4 bytes per element;
here 1 byte plus 4 bytes per head_dim elements).

Quantization is symmetric and dynamic per token and head: ``s = max|x| / 127`` over ``head_dim``,
``q = round(x / s)``. :meth:`Int8KVLayer.update` returns the dequantized keys and values, so the
attention of the current tokens also sees the quantized cache (prefill measures its accuracy cost).

Use: ``model.generate(ids, past_key_values=Int8KVCache())`` or ``model(ids, past_key_values=Int8KVCache(),
use_cache=True)``; :func:`slimquant.kv_cache` builds one for a model whose recipe quantizes the KV cache.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from slimquant.kernels.int8 import get_kernel


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


class Int8KVCache(Cache):
    """A dynamic cache whose every layer is an :class:`Int8KVLayer`."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=Int8KVLayer)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
