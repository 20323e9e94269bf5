"""Float ops fused with the int8 input quantization of the W8A8 layers they feed, and 4-bit gated MLPs
(inference only).

A W8A8 layer quantizes its float input before its int8 GEMM. Where a Llama-style RMSNorm feeds W8A8 layers
(``input_layernorm -> q/k/v_proj``, ``post_attention_layernorm -> gate/up_proj``) or the gated MLP's
``silu(gate) * up`` feeds ``down_proj``, one native pass can compute the float op and its int8 rows at once:

* :class:`FusedRMSNorm` returns the norm's float output ``y`` as before and keeps its int8 rows for the
  layers that read ``y`` (wired to it by the fusion, all quantizing their input the same way). A reader takes
  the rows only when its input *is* that ``y``, unchanged: a forward hook that returns another tensor, or one
  that edits ``y`` in place (seen by its version counter; inference tensors have none, so under
  ``torch.inference_mode`` the rows are kept only while no hook that could edit ``y`` is registered), makes
  the readers quantize the tensor they get. The rows are dropped once every reader took them, when ``y`` is
  freed, or at the next call. The three attention projections quantize their shared input once instead of
  three times.
* :class:`FusedGatedMLP` never writes ``silu(gate) * up`` in float: ``down_proj`` reads the int8 rows.

Gated MLPs whose ``gate`` and ``up`` are packed 4-bit (W4A16) layers get :class:`FusedW4A16GatedMLP`: one native
call computes ``silu(gate(x)) * up(x)`` from both packed weights (at prefill one tiled GEMM for the two, the
products never written whole). An RMSNorm read only by weight-only quantized layers (W4A16, W8A16) has no int8 rows
to write: :class:`NativeRMSNorm` computes it in one native pass per row instead of transformers' five torch ops.

All of them keep the state-dict keys of the modules they replace and hold the original module (unregistered) for
everything else: the fused path runs only when every quantized layer involved uses the default ``"fast"`` kernel
(or ``"native"`` for the weight-only ones), the native library is built and the tensors are float32 on the CPU
(and need no gradient, the norm's weight included); otherwise the original module computes exactly as before. The fused path differs from the unfused one only by float32 rounding in the norm's sum of
squares and in ``exp`` (the int8 rows are those of the float values it computes). Built by
:func:`slimquant.surgery.fuse.fuse_for_inference`.
"""

from __future__ import annotations

import weakref
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.modules import module as _module

from slimquant.kernels import int8 as k8
from slimquant.kernels import native
from slimquant.nn.modules import QLinear
from slimquant.nn.w8a8 import QLinearW8A8


def _runs_native_norm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a native norm kernel may compute ``weight``'s norm of ``x``: float32 CPU tensors, no gradient
    wanted (the native kernels have no backward) and the library built."""
    return (
        x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and native.library() is not None
    )


def _runs_fused(x: torch.Tensor, layers: Sequence[QLinearW8A8]) -> bool:
    return (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        and not (x.requires_grad and torch.is_grad_enabled())  # the native kernels have no backward
        and all(layer.kernel == "fast" for layer in layers)
        and native.library() is not None
    )


def _input_params(layer: QLinearW8A8) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The static (input_scale, input_zero_point) a producer quantizes with, (None, None) per token."""
    if layer.input_spec.dynamic:
        return None, None
    return layer.input_scale, layer.input_zero_point


class FusedRMSNorm(nn.Module):
    """A Llama-style RMSNorm (``weight * (x * rsqrt(mean(x^2) + eps))`` in float32) whose output is read only
    by W8A8 layers that quantize it the same way: the native kernel writes the norm and the int8 rows once.

    ``watched``: the modules between the norm and its readers whose forward pre-hooks could edit the output in
    place before a reader sees it (the readers and their parents)."""

    def __init__(self, norm: nn.Module, readers: Sequence[QLinearW8A8], key: tuple,
                 watched: Sequence[nn.Module] = ()) -> None:  # fmt: skip
        super().__init__()
        self.weight = norm.weight  # the same Parameter: same state-dict key, shared with the original
        self.variance_epsilon = float(norm.variance_epsilon)  # type: ignore[arg-type]
        self.input_key = key
        object.__setattr__(self, "original", norm)  # unregistered: the exact float path
        object.__setattr__(self, "readers", tuple(readers))  # unregistered: they live in the attention/MLP
        object.__setattr__(self, "watched", tuple(watched) or tuple(readers))
        # the last output's rows: (weak ref to y, y's version or None, q, xs, readers that took them)
        self._rows: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._rows = None
        if not _runs_native_norm(x, self.weight) or not _runs_fused(x, self.readers):
            return self.original(x)
        scale, offset = _input_params(self.readers[0])
        op = k8.get_kernel("rmsnorm_quant", "fast")
        y, q, xs = op(x, self.weight, self.variance_epsilon, scale, offset)
        if y.is_inference():  # no version counter: an in-place edit could not be seen
            if self._hooked():
                return y
            version = None
        else:
            version = y._version
        self._rows = (weakref.ref(y, self._forget), version, q, xs, [0])
        return y

    def rows_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The int8 rows (q int8 ``[M, k]``, xs float32 ``[M]`` or empty) of ``x`` if ``x`` is this norm's last
        output, unchanged since; else None (the reader then quantizes ``x`` itself)."""
        entry = self._rows
        if entry is None:
            return None
        ref, version, q, xs, taken = entry
        if ref() is not x or (version is not None and x._version != version):
            return None
        taken[0] += 1
        if taken[0] >= len(self.readers):
            self._rows = None
        return q, xs

    def _forget(self, _ref: Any) -> None:
        entry = self._rows
        if entry is not None and entry[0] is _ref:
            self._rows = None

    def _hooked(self) -> bool:
        """Whether a hook could edit this norm's output before its readers see it."""
        if self._forward_hooks or _module._global_forward_hooks or _module._global_forward_pre_hooks:
            return True
        return any(m._forward_pre_hooks for m in self.watched)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}, int8 rows for {len(self.readers)} W8A8 layer(s)"


class NativeRMSNorm(nn.Module):
    """A Llama-style RMSNorm (``weight * (x * rsqrt(mean(x^2) + eps))`` in float32) computed by the native kernel
    (``rmsnorm`` of :mod:`slimquant.kernels.int8`: one pass per row, rows in parallel), for a norm whose readers
    are weight-only quantized layers. Same ``weight`` Parameter (same state-dict key); the original module
    (unregistered) computes instead whenever the native kernel cannot or should not: other dtypes or devices, a
    gradient wanted for ``x`` or ``weight``, no native library, or a reader set to a kernel other than
    ``"fast"`` / ``"native"`` (asking for the reference computation). Outputs equal the original's up to float32
    rounding (the sum of squares in another order)."""

    def __init__(self, norm: nn.Module, readers: Sequence[QLinear] = ()) -> None:
        super().__init__()
        self.weight = norm.weight  # the same Parameter: same state-dict key, shared with the original
        self.variance_epsilon = float(norm.variance_epsilon)  # type: ignore[arg-type]
        object.__setattr__(self, "original", norm)  # unregistered: the exact float path
        object.__setattr__(self, "readers", tuple(readers))  # unregistered: they live in the attention/MLP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _runs_native_norm(x, self.weight) or any(r.kernel not in ("fast", "native") for r in self.readers):
            return self.original(x)
        return k8.get_kernel("rmsnorm", "fast")(x, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}, native"


class _GatedMLP(nn.Module):
    """A gated SiLU MLP ``down(act(gate(x)) * up(x))`` with the original's children under their names (same
    state-dict keys) and the original module (unregistered) for the unfused path."""

    def __init__(self, mlp: nn.Module, gate: str, up: str, down: str, act: str) -> None:
        super().__init__()
        for name, child in mlp.named_children():  # same children, same names: same state-dict keys
            self.add_module(name, child)
        self.names = (gate, up, down)
        self.act_name = act  # a child like the others
        object.__setattr__(self, "original", mlp)


class FusedGatedMLP(_GatedMLP):
    """``down(silu(gate(x)) * up(x))`` where ``down`` is W8A8: ``silu(g) * u`` goes straight to int8 rows."""

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


class FusedW4A16GatedMLP(_GatedMLP):
    """``down(silu(gate(x)) * up(x))`` where ``gate`` and ``up`` are packed 4-bit :class:`QLinear` layers: one
    native call (:func:`slimquant.kernels.native.w4a16_gated`) computes ``silu(gate(x)) * up(x)``. Past
    ``W4A16_GEMV_MAX_ROWS`` rows (prefill) it runs one tiled GEMM for both weights and applies ``silu * up`` to
    each tile's products while they are in cache, so neither ``gate(x)`` nor ``up(x)`` is written whole; fewer
    rows run the two nibble GEMVs and ``silu * up`` in one call. ``down`` runs as it is. Outputs equal the
    unfused module's up to float32 rounding (summation order, a Cephes-style ``exp``).

    The original module computes instead when the input is not float32 on the CPU or needs a gradient, when
    ``gate`` or ``up`` use a kernel other than ``"fast"`` / ``"native"``, when the native library is not built,
    or when a forward hook (gate's, up's, the activation's or a global one) is registered, so hooks see the calls
    they expect."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        parts = self._packed(x, gate, up, getattr(self, self.act_name))
        if parts is None:
            return self.original(x)
        return down(native.w4a16_gated(x, parts[0], parts[1], gate.weight_cols))

    @staticmethod
    def _packed(x: torch.Tensor, gate: nn.Module, up: nn.Module,
                act: nn.Module) -> tuple[native.Packed4, native.Packed4] | None:  # fmt: skip
        if x.dtype != torch.float32 or x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
            return None
        if type(gate) is not QLinear or type(up) is not QLinear:  # weight-only layers (not input-quantizing ones)
            return None
        if act._forward_hooks or act._forward_pre_hooks:
            return None
        if {gate.kernel, up.kernel} - {"fast", "native"} or native.library() is None:
            return None
        if _module._global_forward_hooks or _module._global_forward_pre_hooks:
            return None
        if gate._forward_hooks or gate._forward_pre_hooks or up._forward_hooks or up._forward_pre_hooks:
            return None
        pg, pu = gate.packed4(), up.packed4()
        if pg is None or pu is None or gate.weight_cols != x.shape[-1] or up.weight_cols != x.shape[-1]:
            return None
        if gate.weight_rows != up.weight_rows or pg.scale.device.type != "cpu" or pu.scale.device.type != "cpu":
            return None
        return pg, pu

    def extra_repr(self) -> str:
        return "silu({}) * {} from their packed 4-bit weights in one native call".format(*self.names[:2])


def is_silu(act: Any) -> bool:
    """Whether the activation module ``act`` is SiLU (what :class:`FusedGatedMLP`'s kernel computes)."""
    if isinstance(act, nn.SiLU):
        return True
    return type(act).__name__ == "SiLUActivation"  # transformers' ACT2FN["silu"]
