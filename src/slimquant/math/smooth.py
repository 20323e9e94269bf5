"""Smoothing scales for equivalence transforms (pure).

A smoothing scale ``s [k]`` moves quantization difficulty between a layer's input and its weight:
``x @ W.T == (x / s) @ (W * s).T``.
"""

from __future__ import annotations

import torch


def gamma_migration_scales(gamma: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Outlier Suppression's gamma migration: ``s = gamma`` (the norm's per-channel weight), so the
    norm's weight becomes 1 and the following linears absorb it. Near-zero entries get 1."""
    g = gamma.detach().float()
    return torch.where(g.abs() > eps, g, torch.ones_like(g))


def smoothquant_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float, eps: float = 1e-5) -> torch.Tensor:
    """SmoothQuant's ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` per input channel.

    Args:
        act_absmax: ``[k]`` per-channel max |input| over calibration data.
        weight_absmax: ``[k]`` per-input-channel max |weight| over every linear fed by the input.
        alpha: migration strength in [0, 1]; 0.5 splits the difficulty evenly.
    Returns:
        ``[k]`` float32, positive; channels that never saw input (or have zero weights) get 1.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = act_absmax.float().clamp(min=eps)
    w = weight_absmax.float().clamp(min=eps)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    dead = (act_absmax <= 0) | (weight_absmax <= 0)
    return torch.where(dead | ~torch.isfinite(s), torch.ones_like(s), s.clamp(min=eps))


def outlier_suppression_scales(ranges: torch.Tensor, threshold: float) -> torch.Tensor:
    """OS+'s channel-wise scaling: ``s_j = max(1, range_j / threshold)``, so every channel's range is at most
    ``threshold`` after dividing by ``s`` (channels already inside keep ``s = 1``).

    Args:
        ranges: ``[k]`` per-channel max |input| over calibration data.
        threshold: the largest range a channel keeps (positive).
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    return torch.clamp(ranges.float() / threshold, min=1.0)
