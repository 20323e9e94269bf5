"""Float ops fused with the int8 input quantization of the W8A8 layers they feed (inference only).

A W8A8 layer quantizes its float input before its int8 GEMM. Where a Llama-style RMSNorm feeds W8A8 layers
(``input_layernorm -> q/k/v_proj``, ``post_attention_layernorm -> gate/up_proj``) or the gated MLP's
``silu(gate) * up`` feeds ``down_proj``, one native pass can compute the float op and its int8 rows at once:

* :class:`FusedRMSNorm` returns the norm's float output ``y`` as before and hands its int8 rows to the
  layers that read ``y`` (attached to ``y``, so they live exactly as long as it; every reader checks that the
  rows were quantized its way). The three attention projections quantize their shared input once instead
  of three times.
* :class:`FusedGatedMLP` never writes ``silu(gate) * up`` in float: ``down_proj`` reads the int8 rows.

Both keep the state-dict keys of the modules they replace and hold the original module (unregistered) for
everything else: the fused path runs only when every W8A8 layer involved uses the default ``"fast"`` kernel,
the native library is built and the tensors are float32 on the CPU (and need no gradient); otherwise the original module computes
exactly as before. The fused path differs from the unfused one only by float32 rounding in the norm's sum of
squares and in ``exp`` (the int8 rows are those of the float values it computes). Built by
:func:`slimquant.surgery.fuse.fuse_w8a8_inputs`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from slimquant.kernels import int8 as k8
from slimquant.kernels import native
from slimquant.nn.w8a8 import QLinearW8A8, attach_rows


def _runs_fused(x: torch.Tensor, layers: Sequence[QLinearW8A8]) -> bool:
    return (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        and not (x.requires_grad and torch.is_grad_enabled())  # the native kernels have no backward
        and all(layer.kernel == "fast" for layer in layers)
        and native.library() is not None
    )


def _input_params(layer: QLinearW8A8) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The static (input_scale, input_offset) a producer quantizes with, (None, None) per token."""
    if layer.input_spec.dynamic:
        return None, None
    return layer.input_scale, layer.input_offset


class FusedRMSNorm(nn.Module):
    """A Llama-style RMSNorm (``weight * (x * rsqrt(mean(x^2) + eps))`` in float32) whose output is read only
    by W8A8 layers that quantize it the same way: the native kernel writes the norm and the int8 rows once."""

    def __init__(self, norm: nn.Module, readers: Sequence[QLinearW8A8], key: tuple) -> None:
        super().__init__()
        self.weight = norm.weight  # the same Parameter: same state-dict key, shared with the original
        self.variance_epsilon = float(norm.variance_epsilon)  # type: ignore[arg-type]
        self.input_key = key
        object.__setattr__(self, "original", norm)  # unregistered: the exact float path
        object.__setattr__(self, "readers", tuple(readers))  # unregistered: they live in the attention/MLP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != torch.float32 or not _runs_fused(x, self.readers):
            return self.original(x)
        scale, offset = _input_params(self.readers[0])
        op = k8.get_kernel("rmsnorm_quant", "fast")
        y, q, xs = op(x, self.weight, self.variance_epsilon, scale, offset)
        attach_rows(y, self.input_key, q, xs)
        return y

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}, int8 rows for {len(self.readers)} W8A8 layer(s)"


class FusedGatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` where ``down`` is W8A8: ``silu(g) * u`` goes straight to int8 rows."""

    def __init__(self, mlp: nn.Module, gate: str, up: str, down: str, act: str) -> None:
        super().__init__()
        for name, child in mlp.named_children():  # same children, same names: same state-dict keys
            self.add_module(name, child)
        self.names = (gate, up, down)
        self.act_name = act  # a child like the others
        object.__setattr__(self, "original", mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        if not _runs_fused(x, (down,)):
            return self.original(x)
        g, u = gate(x), up(x)
        if g.dtype != torch.float32 or u.dtype != torch.float32:
            return down(getattr(self, self.act_name)(g) * u)
        scale, offset = _input_params(down)
        q, xs = k8.get_kernel("silu_mul_quant", "fast")(g, u, scale, offset)
        return down.forward_rows(q, xs, g.shape[:-1])

    def extra_repr(self) -> str:
        return "silu(gate) * up quantized to int8 for {} in one pass".format(self.names[2])


def is_silu(act: Any) -> bool:
    """Whether the activation module ``act`` is SiLU (what :class:`FusedGatedMLP`'s kernel computes)."""
    if isinstance(act, nn.SiLU):
        return True
    return type(act).__name__ == "SiLUActivation"  # transformers' ACT2FN["silu"]
