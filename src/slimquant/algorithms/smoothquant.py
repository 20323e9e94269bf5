"""Equivalence transforms that rescale one op's output channels into the next linears' inputs.

``apply_smoothing(prev, linears, s)``: ``prev``'s output channel ``j`` is divided by ``s_j`` and every
linear's input column ``j`` multiplied by ``s_j``, which leaves the composed function unchanged.
The functions change the given modules' parameters in place and never walk a model.
"""

from __future__ import annotations

import torch
from torch import nn

from slimquant.errors import SlimquantError


def _is_conv1d(m: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: a linear layer whose weight is stored [in, out]
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def input_weight(m: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` view of a linear layer's weight (nn.Linear or GPT-2 Conv1D)."""
    if isinstance(m, nn.Linear):
        return m.weight
    if _is_conv1d(m):
        return m.weight.T
    raise SlimquantError(f"{type(m).__name__} is not a linear layer")


def weight_absmax_per_input(linears: list[nn.Module]) -> torch.Tensor:
    """``[k]`` max |W[:, j]| over all the given linears."""
    return torch.stack([input_weight(m).detach().abs().amax(dim=0).float() for m in linears]).amax(dim=0)


@torch.no_grad()
def apply_smoothing(prev: nn.Module, linears: list[nn.Module], s: torch.Tensor) -> None:
    """Divide ``prev``'s output channels by ``s`` and multiply the linears' input columns by ``s``.

    ``prev``: a norm (weight, optional bias: LayerNorm, RMSNorm, ...) or a linear layer.
    """
    s = s.detach().float()
    if isinstance(prev, nn.Linear) or _is_conv1d(prev):
        w = input_weight(prev)  # [out, in]: output channel = row
        if w.shape[0] != s.numel():
            raise SlimquantError(f"smoothing: {type(prev).__name__} has {w.shape[0]} outputs, scales have {s.numel()}")
        w.div_(s.to(w.dtype)[:, None])
    else:
        weight = getattr(prev, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.numel() != s.numel():
            raise SlimquantError(
                f"smoothing: {type(prev).__name__} has no per-channel weight of size {s.numel()} to absorb the scales"
            )
        weight.div_(s.to(weight.dtype))
    bias = getattr(prev, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(s.to(bias.dtype))
    for m in linears:
        w = input_weight(m)
        if w.shape[1] != s.numel():
            raise SlimquantError(f"smoothing: {type(m).__name__} has {w.shape[1]} inputs, scales have {s.numel()}")
        w.mul_(s.to(w.dtype)[None, :])


def smoothed_output_error(
    x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor, weight_spec, input_spec,
    reference: list[torch.Tensor] | None = None,
) -> float:
    """Mean squared output error of the linears when input and weights are quantized after smoothing.

    Args:
        x: ``[t, k]`` sample of the shared input (before smoothing).
        weights: ``[n_i, k]`` float weights of the linears fed by ``x`` (before smoothing).
        s: ``[k]`` candidate smoothing scales.
        weight_spec / input_spec: the recipe's weight and input QuantSpecs (input None: weight-only).
        reference: the float weights whose unquantized output is the target (default ``weights``; e.g. the
            weights before a change such as truncation, so the change's own error counts).
    """
    from slimquant.math.qparams import qparams_from_minmax
    from slimquant.math.quant import fake_quantize
    from slimquant.math.weights import dequantize_weight, quantize_weight
    from slimquant.types.qtype import qtype as lookup_qtype

    x = x.float()
    xs = x / s
    if input_spec is None:  # weight-only: the input stays float
        xq = xs
    else:
        qt = lookup_qtype(input_spec.qtype)
        if input_spec.dynamic:
            scale, zp = qparams_from_minmax(xs.amin(-1, keepdim=True), xs.amax(-1, keepdim=True), qt, True)
        else:
            scale, zp = qparams_from_minmax(xs.amin(), xs.amax(), qt, input_spec.symmetric)
        xq = fake_quantize(xs, scale, zp, qt)
    err = 0.0
    for w, ref in zip(weights, weights if reference is None else reference):
        w = w.float()
        wq = dequantize_weight(quantize_weight(w * s, weight_spec), weight_spec)
        err += float((xq @ wq.T - x @ ref.float().T).pow(2).mean())
    return err / len(weights)
