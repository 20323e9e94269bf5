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


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of the 1-D ``x`` (float64), ties given the mean of the ranks they span."""
    x = x.double().reshape(-1)
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    values, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two equally long 1-D sequences (Pearson's r of their average ranks);
    NaN when either is constant or shorter than 2."""
    if a.numel() != b.numel():
        raise ValueError(f"spearman: {a.numel()} vs {b.numel()} values")
    if a.numel() < 2:
        return float("nan")
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")
