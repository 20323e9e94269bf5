"""Unstructured and N:M weight sparsity: Wanda's mask (pure) and SparseGPT through the GPTQ sweep.

Shapes: ``W`` ``[n, k]`` (n outputs, k inputs), ``H = 2 X^T X / N`` ``[k, k]`` over the layer's calibration inputs.
A mask is bool ``[n, k]``, True where a weight is pruned. N:M groups are ``M`` consecutive inputs of one row, of
which at most ``N`` stay nonzero (2:4: half of each group of four).
"""

from __future__ import annotations

import torch

from slimquant.algorithms.gptq import GPTQResult, gptq
from slimquant.math.weights import QuantizedWeight, quantize_weight
from slimquant.types.spec import QuantSpec


def lowest_per_row(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """The mask of the lowest scores ``[n, k]`` compared within each row: ``floor(sparsity * k)`` of them
    (unstructured), or the lowest ``M - N`` of every ``M`` consecutive columns (``nm``)."""
    n, k = score.shape
    mask = torch.zeros(n, k, dtype=torch.bool)
    if nm is None:
        drop = int(k * sparsity)
        if drop:
            mask.scatter_(1, torch.topk(score, drop, dim=1, largest=False)[1], True)
        return mask
    keep, m = nm
    if k % m:
        raise ValueError(f"N:M pruning ({keep}:{m}) needs an input width that is a multiple of {m}, got {k}")
    groups = score.reshape(n, k // m, m)
    idx = torch.topk(groups, m - keep, dim=2, largest=False)[1]
    return mask.reshape(n, k // m, m).scatter_(2, idx, True).reshape(n, k)


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """Wanda's mask: score ``|W_ij| * ||x_j||`` (``input_norm`` ``[k]``: each input channel's L2 norm over the
    calibration tokens, or anything proportional to it), lowest per row."""
    return lowest_per_row(weight.detach().float().abs() * input_norm.float().reshape(1, -1), sparsity, nm)


def input_norms(hessian: torch.Tensor) -> torch.Tensor:
    """``[k]`` values proportional to each input channel's norm over the calibration tokens: ``sqrt(diag H)``."""
    return torch.diag(hessian).clamp(min=0).sqrt()


def wanda(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec | None, sparsity: float,
          nm: tuple[int, int] | None) -> tuple[QuantizedWeight | torch.Tensor, int]:  # fmt: skip
    """Prune with Wanda's mask, then round the kept weights to nearest on ``spec`` (pruned ones are exactly 0 on
    symmetric grids and on integer zero points). ``spec`` None: the pruned float weight. Returns ``(weight,
    pruned count)``."""
    mask = wanda_mask(weight, input_norms(hessian), sparsity, nm)
    w = weight.detach().float().masked_fill(mask, 0.0)
    if spec is None:
        return w, int(mask.sum())
    return quantize_weight(w, spec), int(mask.sum())


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec | None, sparsity: float,
              nm: tuple[int, int] | None, percdamp: float = 0.01, block_size: int = 128) -> GPTQResult:  # fmt: skip
    """SparseGPT, joint with quantization when ``spec`` is given: :func:`slimquant.algorithms.gptq.gptq` with its
    pruning mask, natural column order, parameters from the float weight."""
    return gptq(weight, hessian, spec, percdamp=percdamp, block_size=block_size, act_order=False, static_groups=True,
                sparsity=sparsity, nm=nm)  # fmt: skip
