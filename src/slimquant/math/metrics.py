"""Error metrics between a reference and an approximation (pure functions)."""

from __future__ import annotations

import torch


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB; ``inf`` when identical."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10.0 * torch.log10(ref.pow(2).sum() / noise))


def cosine_similarity(a: torch.Tensor, b: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Cosine similarity along ``dim`` (float64 accumulation)."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=dim)


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(P_ref || P) from logits ``[..., vocab]``; returns ``[...]`` float64 (nats)."""
    lp = torch.log_softmax(ref_logits.double(), dim=-1)
    lq = torch.log_softmax(logits.double(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(dim=-1)


def top1_agreement(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-position 1.0 where both argmaxes agree, else 0.0."""
    return (ref_logits.argmax(dim=-1) == logits.argmax(dim=-1)).double()
