"""Attention quantization (msModelSlim ``use_fa_quant``): static int8 per-head quantization of the
attention inputs Q, K and V of Hugging Face models, simulated in float on CPU.

Each quantized attention module holds three :class:`FAQuant` children, ``fa_q``, ``fa_k`` and ``fa_v``,
so its checkpoint tensors are ``<attn>.fa_q.scale`` float32 ``[heads, 1]`` and ``<attn>.fa_q.offset``
int8 ``[heads, 1]`` (zeros: symmetric), msModelSlim's ``FAQuant`` layout; K and V have the model's
key/value head count. The model then runs its attention through :data:`ATTENTION`, an implementation
registered with transformers' ``AttentionInterface`` that fake-quantizes Q, K, V of the modules that
hold ``fa_q`` (the others run unchanged) and hands them to transformers' SDPA attention.

Q and K are taken after the rotary embedding and K/V after the KV cache update, as a fused attention
kernel sees them.
"""

from __future__ import annotations

import contextlib

from typing import Any, Iterator, Sequence

import torch
from torch import nn

from slimquant.errors import SlimquantError
from slimquant.math.qparams import qparams_from_minmax
from slimquant.math.quant import dequantize, quantize
from slimquant.types.qtype import qtype as lookup_qtype

ATTENTION = "slimquant_fa_quant"
ROLES = ("fa_q", "fa_k", "fa_v")
_INT8 = lookup_qtype("int8")


class FAQuant(nn.Module):
    """Static symmetric int8 quantization of a ``[batch, heads, tokens, head_dim]`` tensor, one scale per head.

    While :func:`observing` holds it, it records the per-head max |x| and passes ``x`` through unchanged;
    while :func:`measuring_error` holds the attention it belongs to, ``error`` accumulates that attention's
    quantization error (see :func:`fa_quant_attention`).
    """

    def __init__(self, heads: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.register_buffer("scale", torch.ones(heads, 1, dtype=torch.float32, device=device))
        self.register_buffer("offset", torch.zeros(heads, 1, dtype=torch.int8, device=device))
        self.observing = False
        self.absmax: torch.Tensor | None = None
        self.error: dict[str, float] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.heads:
            raise SlimquantError(f"attention quantization expects [batch, {self.heads}, tokens, head_dim], got {list(x.shape)}")
        if self.observing:
            m = x.detach().float().abs().amax(dim=(0, 2, 3))
            if not torch.isfinite(m).all():
                raise SlimquantError("attention input has NaN/Inf values during calibration")
            self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
            return x
        scale = self.scale.reshape(1, -1, 1, 1)
        # offsets are zero (symmetric), so the grid is q = round(x / scale) clamped to [-128, 127]
        return dequantize(quantize(x, scale, None, _INT8), scale, None, x.dtype)

    def set_range_from_observed(self) -> None:
        """Scale = max |x| / 127 per head (seed 003's symmetric int8 rule) from what was observed."""
        if self.absmax is None:
            raise SlimquantError("attention quantization saw no calibration data (did the calibration reach attention?)")
        scale, _ = qparams_from_minmax(-self.absmax, self.absmax, _INT8, symmetric=True)
        self.scale = scale.reshape(-1, 1).to(self.scale.device)
        self.offset = torch.zeros_like(self.offset)
        self.absmax = None

    def extra_repr(self) -> str:
        return f"heads={self.heads}, int8 per-head symmetric static"


def attention_heads(module: nn.Module) -> tuple[int, int]:
    """(query heads, key/value heads) of a transformers attention module."""
    config = getattr(module, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    if not isinstance(heads, int) or not isinstance(kv, int):
        raise SlimquantError(f"{type(module).__name__}: cannot read num_attention_heads from its config")
    return heads, kv


def attention_modules(model: nn.Module) -> list[str]:
    """Names of the modules that run attention through transformers' AttentionInterface (they carry
    ``config`` and ``layer_idx``: Llama, Qwen, Mistral, OPT, GPT-2, ... in transformers 5)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise SlimquantError("attention quantization needs a Hugging Face transformers model")
    names = [n for n, m in model.named_modules()
             if n and hasattr(m, "layer_idx") and getattr(m, "config", None) is not None
             and type(m).__name__.endswith("Attention")]  # fmt: skip
    if not names:
        raise SlimquantError(f"attention quantization: no attention module found in {type(model).__name__} "
                             "(it must run attention through transformers' AttentionInterface)")  # fmt: skip
    return names


def attach(model: nn.Module, names: list[str], device: torch.device | str | None = None) -> None:
    """Give each named attention module ``fa_q``/``fa_k``/``fa_v`` and switch the model to :data:`ATTENTION`."""
    register()
    impl = model.config._attn_implementation
    if impl not in ("sdpa", "eager", ATTENTION, None):
        raise SlimquantError(f"attention quantization runs on SDPA attention; this model uses {impl!r}")
    for name in names:
        attn = model.get_submodule(name)
        heads, kv = attention_heads(attn)
        attn.fa_q = FAQuant(heads, device)
        attn.fa_k = FAQuant(kv, device)
        attn.fa_v = FAQuant(kv, device)
    set_attention(model, ATTENTION)


def quantized_attention(model: nn.Module) -> list[str]:
    """Names of the modules holding attention quantizers."""
    return [n for n, m in model.named_modules() if isinstance(getattr(m, "fa_q", None), FAQuant)]


def detach(attn: nn.Module) -> None:
    """Remove the quantizers of one attention module (it then runs float)."""
    for role in ROLES:
        if hasattr(attn, role):
            delattr(attn, role)


def set_attention(model: nn.Module, implementation: str) -> None:
    """Set the attention implementation on the model's config and every sub-config (unlike
    ``set_attn_implementation`` this accepts implementations registered at run time)."""
    seen: set[int] = set()
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "_attn_implementation") and id(config) not in seen:
            seen.add(id(config))
            config._attn_implementation = implementation


def fa_quant_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:  # fmt: skip
    """transformers attention function: SDPA on fake-quantized Q, K, V where the module holds ``fa_q``.

    While :func:`measuring_error` holds the module, it runs both float and quantized attention, accumulates
    the squared error and the float output's squared norm in ``module.fa_q.error``, and returns the float
    output (so each layer's error is measured with float inputs).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if getattr(module, "fa_q", None) is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    quantized = (module.fa_q(query), module.fa_k(key), module.fa_v(value))
    measure = module.fa_q.error
    if measure is None:
        return sdpa_attention_forward(module, *quantized, attention_mask, **kwargs)
    ref, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out, _ = sdpa_attention_forward(module, *quantized, attention_mask, **kwargs)
    measure["err"] += float((out.float() - ref.float()).pow(2).sum())
    measure["ref"] += float(ref.float().pow(2).sum())
    return ref, weights


@contextlib.contextmanager
def observing(quantizers: Sequence[FAQuant]) -> Iterator[None]:
    """Calibration mode for ``quantizers`` (they record max |x| and pass x through); each gets back the mode it
    had on exit (so nested uses compose)."""
    before = [q.observing for q in quantizers]
    for q in quantizers:
        q.observing = True
    try:
        yield
    finally:
        for q, was in zip(quantizers, before):
            q.observing = was


@contextlib.contextmanager
def measuring_error(modules: dict[str, nn.Module]) -> Iterator[dict[str, dict[str, float]]]:
    """Error-measuring mode for the quantized attention ``modules`` (by name): yields ``{name: {"err", "ref"}}``,
    filled by every forward inside the block; the modules compute as before after it."""
    out = {n: {"err": 0.0, "ref": 0.0} for n in modules}
    before = {n: m.fa_q.error for n, m in modules.items()}
    for n, m in modules.items():
        m.fa_q.error = out[n]
    try:
        yield out
    finally:
        for n, m in modules.items():
            m.fa_q.error = before[n]


_REGISTERED = False


def register() -> None:
    """Register :data:`ATTENTION` with transformers (attention function + SDPA's mask builder); idempotent."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, fa_quant_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    _REGISTERED = True
