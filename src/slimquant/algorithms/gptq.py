"""GPTQ (Frantar et al., 2022) as a pure solver: ``(W, H, spec) -> QuantizedWeight``.

Columns of ``W`` ``[n, k]`` are quantized one at a time; each column's rounding error is spread over the
columns not yet quantized through the inverse Hessian ``H = 2 X^T X / N`` of the layer's inputs, so the
layer's *output* error on the calibration inputs is minimised rather than the weight error. Columns are
processed in blocks (lazy batch updates); ``act_order`` visits columns by decreasing ``diag(H)``.

Quantization parameters come from :func:`slimquant.math.weights.quantize_weight` (same rules as RTN,
including the optional clipping search): per channel and per tensor from the whole weight up front; per
group when the sweep reaches the group's first column, from the group's error-updated values; with
``static_groups`` (forced by ``act_order`` with groups, so that groups stay contiguous in the checkpoint
layout and no column permutation has to be stored, and by GGUF grids, whose K-type super-blocks share one
fp16 scale across 8 or 16 groups) all groups up front from the original weight.

:mod:`slimquant.pipeline.sequential` collects ``H`` per layer block by block and calls this. This solver's keyword
defaults are the paper's reference variant (natural order, groups from the error-updated weight); the recipe step
:class:`slimquant.types.steps.GPTQ` defaults to act-order with static groups, which BENCHMARKS.md found robust.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimquant.math.quant import dequantize, quantize
from slimquant.math.weights import QuantizedWeight, check_weight_shape, quantize_weight
from slimquant.types.qtype import qtype as lookup_qtype
from slimquant.types.spec import Granularity, QuantSpec


class GPTQError(ValueError):
    """The Hessian stayed not positive definite after every dampening retry."""


@dataclass(frozen=True)
class GPTQResult:
    weight: QuantizedWeight | None  # None when no spec was given (pruning alone: see ``pruned``)
    damp: float  # the dampening fraction that made H positive definite
    dead_columns: int  # input channels never active in calibration (diag(H) == 0): quantized as zeros
    pruned: torch.Tensor | None = None  # spec None: the float [n, k] weight after pruning and error compensation
    pruned_count: int = 0  # weights set to zero by the sparsity mask


class HessianAccumulator:
    """Running ``H = 2/N * sum x^T x`` over calibration inputs ``x`` ``[..., k]`` (float32, as GPTQ's
    reference implementation)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.h = torch.zeros(k, k, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if x.shape[1] != self.k:
            raise ValueError(f"input width {x.shape[1]} does not match the Hessian's {self.k}")
        m = x.shape[0]
        if m == 0:
            return
        self.h.mul_(self.n / (self.n + m)).add_(x.T @ x, alpha=2.0 / (self.n + m))
        self.n += m

    def hessian(self, copy: bool = True) -> torch.Tensor:
        """``H`` (a copy unless ``copy=False``: then the accumulator's own tensor, not to be modified)."""
        return self.h.clone() if copy else self.h


def _inverse_cholesky(h: torch.Tensor, percdamp: float, retries: int) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, raising the dampening x10 per retry."""
    mean_diag = float(torch.diag(h).mean())
    damp = percdamp
    # at most three [k, k] matrices alive besides h (a k = 6912 Hessian is 191 MB in float32)
    for _ in range(retries + 1):
        hd = h.clone()
        hd.diagonal().add_(damp * mean_diag)
        chol, info = torch.linalg.cholesky_ex(hd)
        del hd
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            del chol
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            del inv
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper, damp
        damp *= 10.0
    raise GPTQError(f"Hessian is not positive definite even with dampening {damp / 10:g} x mean(diag)")


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec | None,
    *,
    percdamp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    clip_search: bool = False,
    retries: int = 3,
    sparsity: float = 0.0,
    nm: tuple[int, int] | None = None,
) -> GPTQResult:
    """Quantize ``weight`` ``[n, k]`` to ``spec`` minimising the output error under ``hessian`` ``[k, k]``.

    ``percdamp``: dampening as a fraction of the mean Hessian diagonal, multiplied by 10 up to ``retries``
    times until the Cholesky factorisation succeeds (else :class:`GPTQError`: the caller falls back to RTN).

    SparseGPT (``sparsity`` > 0, ``nm``: ``(N, M)`` for N:M, None for unstructured): each block of columns first
    chooses the weights it prunes by the OBS saliency ``w^2 / [H^-1]_jj^2`` on the error-updated weights
    (unstructured: the lowest ``sparsity`` of the block; N:M: the lowest ``M - N`` of every ``M`` columns of a
    row), which are then set to exactly 0 (their quantization code dequantizes to 0) and their error spread like
    the rounding errors. ``spec`` None prunes without quantizing (``GPTQResult.pruned``). N:M needs the natural
    column order and ``block_size`` a multiple of M.
    """
    if spec is not None:
        check_weight_shape(tuple(weight.shape), spec)  # type: ignore[arg-type]
    n, k = weight.shape
    if nm is not None and (act_order or block_size % nm[1] or k % nm[1]):
        raise ValueError(f"N:M pruning ({nm[0]}:{nm[1]}) needs the natural column order, a block size and an input "
                         f"width ({k}) that are multiples of {nm[1]}")  # fmt: skip
    if hessian.shape != (k, k):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match the weight's {k} input columns")
    if not torch.isfinite(hessian).all():
        raise GPTQError("Hessian has NaN/Inf values")
    qt = None if spec is None else lookup_qtype(spec.qtype)
    izp = spec is not None and spec.zero_point == "int"
    per_group = spec is not None and spec.granularity is Granularity.PER_GROUP
    g = int(spec.group_size) if per_group else k  # type: ignore[arg-type, union-attr]
    # GGUF grids fix their fp16 / super-block scales for the whole row up front
    static_groups = static_groups or (act_order and per_group) or (spec is not None and spec.gguf is not None)

    w = weight.detach().float().clone()
    h = hessian.detach().float()  # not modified below unless copied first
    dead = torch.diag(h) == 0
    if bool(dead.any()):
        h = h.clone()
        h[dead, dead] = 1.0
        w[:, dead] = 0.0

    # Parameters fixed up front (per channel, per tensor, static groups): [n, G] (or [1, 1]).
    scale = zp = None
    if spec is None:
        pass
    elif not per_group or static_groups:
        first = quantize_weight(w, spec, clip_search=clip_search)
        scale, zp = first.scale.clone(), None if first.zero_point is None else first.zero_point.clone()
    else:
        scale = torch.empty(n, k // g)
        zp = None if spec.symmetric or qt.is_float else torch.empty(n, k // g)  # type: ignore[union-attr]

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    if act_order:
        w, h = w[:, perm], h.index_select(0, perm).index_select(1, perm)
    hinv, damp = _inverse_cholesky(h, percdamp, retries)
    del h

    # a block starts on a group boundary and holds whole groups, so a group's columns are in one block
    block = max(g, (block_size // g) * g) if per_group and not static_groups else block_size
    q_out = torch.empty(n, k, dtype=torch.float32 if qt is None else qt.torch_dtype)
    group_spec = None if spec is None else QuantSpec(spec.qtype, Granularity.PER_CHANNEL, None, spec.symmetric,
                                                     zero_point=spec.zero_point)  # fmt: skip
    pruned = 0

    def params(col: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[n, 1] scale / zero point of original column ``col``."""
        assert scale is not None and spec is not None
        if spec.granularity is Granularity.PER_TENSOR:
            return scale.reshape(1, 1).expand(n, 1), None if zp is None else zp.reshape(1, 1).expand(n, 1)
        gi = col // g if per_group else 0
        return scale[:, gi : gi + 1], None if zp is None else zp[:, gi : gi + 1]

    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        mask1 = None
        if sparsity > 0 and nm is None:  # unstructured: the block's least salient weights
            salience = w1.pow(2) / torch.diag(hinv1).reshape(1, -1).pow(2)
            thresh = torch.sort(salience.flatten())[0][int(salience.numel() * sparsity)]
            mask1 = salience <= thresh
        elif nm is not None:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            col = i1 + i  # position in the (possibly permuted) order
            orig = int(perm[col])
            if nm is not None and i % nm[1] == 0:  # the next M columns: prune M - N per row
                salience = w1[:, i : i + nm[1]].pow(2) / torch.diag(hinv1)[i : i + nm[1]].reshape(1, -1).pow(2)
                mask1.scatter_(1, i + torch.topk(salience, nm[1] - nm[0], dim=1, largest=False)[1], True)  # type: ignore[union-attr]
            if per_group and not static_groups and orig % g == 0:
                fresh = quantize_weight(w1[:, i : i + g], group_spec, clip_search=clip_search)  # type: ignore[arg-type]
                scale[:, orig // g] = fresh.scale[:, 0]
                if zp is not None and fresh.zero_point is not None:
                    zp[:, orig // g] = fresh.zero_point[:, 0]
            col_w = w1[:, i : i + 1]
            if qt is None:
                q = dq = col_w.clone()
            else:
                s, z = params(orig)
                q = quantize(col_w, s, z, qt, integer_zero_point=izp)
                dq = dequantize(q, s, z)
            if mask1 is not None:
                drop = mask1[:, i : i + 1]
                pruned += int(drop.sum())
                dq = dq.masked_fill(drop, 0.0)
                if qt is None or z is None:
                    q = q.masked_fill(drop, 0)
                else:  # asymmetric: the code of 0 is the (integer) zero point
                    q = torch.where(drop, z.to(q.dtype), q)
            q_out[:, orig] = q[:, 0]
            e = (col_w - dq) / hinv1[i, i]
            w1[:, i:] -= e @ hinv1[i : i + 1, i:]
            err1[:, i : i + 1] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if spec is None:
        return GPTQResult(None, damp, int(dead.sum()), pruned=q_out, pruned_count=pruned)
    assert scale is not None
    qw = QuantizedWeight(q_out, scale.contiguous(), None if zp is None else zp.contiguous())
    return GPTQResult(qw, damp, int(dead.sum()), pruned_count=pruned)
