"""AutoRound (SignRound; Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for the Quantization of
LLMs", 2023): the rounding of every weight of a block and the range of every group, tuned together so the
quantized block reproduces the float block's output.

For a linear's weight ``W [n, k]`` viewed as groups ``[n, G, g]`` (:func:`slimquant.math.weights.grouped`), the
trainable parameters are

* ``v [n, k]`` in ``[-0.5, 0.5]``: added to ``W / scale`` before rounding, so each weight may round to its other
  neighbouring level (0 = round to nearest);
* ``min_scale``, ``max_scale`` ``[n, G]`` in ``[0, 1]`` (``minmax``): factors on the group's minimum and maximum,
  the range the scale and zero point are computed from with the spec's own rules
  (:func:`slimquant.math.qparams.qparams_from_minmax`), so the tuned grid is exactly the spec's grid.

:func:`signround_qdq` is the differentiable quantize-dequantize (straight-through rounding); its ``q``, ``scale``
and ``zero_point`` at the end are what the checkpoint stores, so the deployed layer computes exactly the tuned
weights. :func:`tune_block` runs the paper's loop on one block: per step, a batch of calibration items through the
block with every planned linear fake-quantized, MSE against the float block's output on the float model's inputs,
gradients summed over the batch, then ``p -= lr_t * sign(grad)`` with ``lr_t`` decaying linearly from ``lr`` to 0
and the parameters projected back into their ranges. The kept parameters are those of the step whose batch loss,
relative to the same items' loss at round-to-nearest, was lowest (the paper keeps the lowest raw batch loss; with
batches of a few short items that comparison favours easy items, the relative one does not). A step whose loss is
not finite stops the block's tuning; the best parameters so far are kept and the report says so.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from slimquant.algorithms import block_output
from slimquant.math.gguf_grid import snap
from slimquant.math.qparams import grid, qparams_from_minmax
from slimquant.math.quant import round_ste
from slimquant.math.weights import QuantizedWeight, check_weight_shape, grouped
from slimquant.types.gguf_types import gguf_type
from slimquant.types.qtype import qtype as lookup_qtype
from slimquant.types.spec import QuantSpec

log = logging.getLogger(__name__)


def _ste(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` forward, the gradient of ``x`` backward."""
    return x + (value - x).detach()


def signround_qdq(
    w: torch.Tensor,
    v: torch.Tensor,
    min_scale: torch.Tensor | None,
    max_scale: torch.Tensor | None,
    spec: QuantSpec,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize-dequantize ``w [n, k]`` (float32) with rounding offsets ``v [n, k]`` and range factors ``[n, G]``
    (None: 1). Returns ``(w_hat [n, k], q [n, k] float holding the integer levels, scale [n, G], zero_point [n, G]
    or None)``; differentiable in ``v`` and the factors (rounding straight through), constant in ``w``.

    Exactly :func:`slimquant.math.quant.quantize` / ``dequantize`` with the tuned parameters: ``round(w / s + v)
    + z`` for integer zero points, ``round(w / s + z + v)`` for float ones, clamped to the grid; GGUF grids snap
    the scales (and minima) to the type's storage (straight through). One difference at the start: for the
    symmetric GGUF 32-blocks (Q4_0, Q5_0, Q8_0) round-to-nearest picks per group between this positive scale and
    llama.cpp's signed one (:func:`slimquant.math.weights.quantize_weight`); AutoRound starts from the positive one."""
    qt = lookup_qtype(spec.qtype)
    qmin, qmax = grid(qt)
    wg = grouped(w, spec)  # [n, G, g]
    rmin, rmax = wg.amin(dim=-1), wg.amax(dim=-1)
    gt = gguf_type(spec.gguf) if spec.gguf is not None else None
    if gt is not None and gt.is_k and not gt.symmetric:
        rmin = rmin.clamp(max=0.0)  # as quantize_weight: K-type minima are stored as -dmin * mn, mn >= 0
    if min_scale is not None:
        rmin = rmin * min_scale
    if max_scale is not None:
        rmax = rmax * max_scale
    scale, zp = qparams_from_minmax(rmin, rmax, qt, spec.symmetric, integer_zero_point=False)
    izp = spec.zero_point == "int"
    if zp is not None and izp:
        zp = qmin - round_ste(rmin / scale)  # rounded before the shift, exactly as qparams_from_minmax's integer zero point
    if gt is not None:
        s_snap, z_snap = snap(scale.detach(), None if zp is None else zp.detach(), gt)
        scale = _ste(scale, s_snap)
        zp = None if zp is None else _ste(zp, z_snap)  # type: ignore[arg-type]
    s = scale.unsqueeze(-1)
    z = None if zp is None else zp.unsqueeze(-1)
    y = wg / s + grouped(v, spec)
    if z is not None and not izp:
        y = y + z
    q = round_ste(y)
    if z is not None and izp:
        q = q + z
    q = torch.clamp(q, qmin, qmax)
    w_hat = (q - z) * s if z is not None else q * s
    return w_hat.reshape(w.shape), q.reshape(w.shape), scale, zp


def quantized_weight(w: torch.Tensor, v: torch.Tensor, min_scale: torch.Tensor | None,
                     max_scale: torch.Tensor | None, spec: QuantSpec) -> QuantizedWeight:  # fmt: skip
    """The :class:`QuantizedWeight` that :func:`signround_qdq` computes (what the checkpoint stores)."""
    with torch.no_grad():
        _, q, scale, zp = signround_qdq(w, v, min_scale, max_scale, spec)
    qt = lookup_qtype(spec.qtype)
    qi = q.to(torch.int16).to(qt.torch_dtype) if qt.signed else q.to(torch.uint8)
    return QuantizedWeight(qi, scale.detach().float().contiguous(), None if zp is None else zp.detach().float().contiguous())


class SignRoundWeight(nn.Module):
    """The fake quantization of one linear's weight with its trainable ``v`` / ``min_scale`` / ``max_scale``, as a
    parametrization (``torch.nn.utils.parametrize.register_parametrization(linear, "weight", it)``: the layer then
    computes with ``signround_qdq(weight)``; removing the parametrization with ``leave_parametrized=False`` gives the
    float weight back untouched)."""

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, minmax: bool) -> None:
        super().__init__()
        w = weight.detach().float()
        check_weight_shape(tuple(w.shape), spec)  # type: ignore[arg-type]
        self.spec = spec
        self.v = nn.Parameter(torch.zeros_like(w))
        groups = grouped(w, spec).shape[:2]
        self.min_scale = nn.Parameter(torch.ones(groups, device=w.device)) if minmax else None
        self.max_scale = nn.Parameter(torch.ones(groups, device=w.device)) if minmax else None

    def tuned(self) -> list[nn.Parameter]:
        return [p for p in (self.v, self.min_scale, self.max_scale) if p is not None]

    def project(self) -> None:
        """Put the parameters back into their ranges (after a step)."""
        with torch.no_grad():
            self.v.clamp_(-0.5, 0.5)
            for p in (self.min_scale, self.max_scale):
                if p is not None:
                    p.clamp_(0.0, 1.0)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return signround_qdq(weight.float(), self.v, self.min_scale, self.max_scale, self.spec)[0].to(weight.dtype)

    def result(self, weight: torch.Tensor) -> QuantizedWeight:
        """The checkpoint's :class:`QuantizedWeight` of the float ``weight`` with the current parameters."""
        return quantized_weight(weight.detach().float(), self.v, self.min_scale, self.max_scale, self.spec)


@dataclass
class BlockTuning:
    """What :func:`tune_block` did: ``loss_rtn`` the mean block-output MSE over every item at round to nearest
    (the start), ``best_rel`` the kept step's batch loss relative to the same items' loss at the start,
    ``best_step`` which step that was (0-based; -1: none was better than the start, which is kept), ``steps`` how
    many ran, ``stopped`` why tuning ended early (a non-finite loss) or None."""

    loss_rtn: float
    best_rel: float
    best_step: int
    steps: int
    stopped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"block_mse_rtn": self.loss_rtn, "best_rel_loss": round(self.best_rel, 6), "best_step": self.best_step,
                "steps": self.steps, **({"stopped": self.stopped} if self.stopped else {})}  # fmt: skip


def tune_block(block: nn.Module, wrapped: dict[str, SignRoundWeight], data: Any, iters: int, lr: float,
               batch_size: int, seed: int = 0, show_progress: bool = False, desc: str = "autoround") -> BlockTuning:  # fmt: skip
    """Tune the :class:`SignRoundWeight` parametrizations ``wrapped`` (already registered on ``block``'s linears)
    on ``data`` (:class:`slimquant.algorithms.BlockData`: items and float targets) and leave each at its best
    parameters."""
    params = [p for m in wrapped.values() for p in m.tuned()]
    frozen = [p for p in block.parameters() if p.requires_grad and all(p is not q for q in params)]
    for p in frozen:
        p.requires_grad_(False)
    n_items = len(data)
    try:
        with torch.no_grad():
            base = [float(F.mse_loss(block_output(block(*a, **k)).float(), data.target(j).float()))
                    for j, (a, k) in ((j, data.item(j)) for j in range(n_items))]  # fmt: skip
        best_rel, best_step = 1.0, -1
        best = [p.detach().clone() for p in params]
        gen = torch.Generator().manual_seed(seed)
        stopped, steps = None, 0
        bs = min(batch_size, n_items)
        order = torch.randperm(n_items, generator=gen)
        pos = 0
        for step in tqdm(range(iters), desc=desc, disable=not show_progress, unit="step", leave=False):
            if pos + bs > n_items:  # a new pass over the items, in a new order
                order, pos = torch.randperm(n_items, generator=gen), 0
            batch = order[pos : pos + bs].tolist()
            pos += bs
            for p in params:
                p.grad = None
            rel = 0.0
            finite = True
            with torch.enable_grad():
                for j in batch:
                    a, k = data.item(j)
                    loss = F.mse_loss(block_output(block(*a, **k)).float(), data.target(j).float())
                    if not torch.isfinite(loss):
                        finite = False
                        break
                    (loss / len(batch)).backward()
                    rel += float(loss.detach()) / max(base[j], 1e-30) / len(batch)
            if not finite:
                stopped = f"non-finite loss at step {step}; kept step {best_step}"
                log.warning("%s: %s", desc, stopped)
                break
            steps = step + 1
            if rel < best_rel:  # the parameters this loss was measured with (before this step's update)
                best_rel, best_step = rel, step
                for b, p in zip(best, params):
                    b.copy_(p.detach())
            lr_t = lr * (1.0 - step / iters)
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.sub_(lr_t * torch.sign(p.grad))
            for m in wrapped.values():
                m.project()
        with torch.no_grad():
            for b, p in zip(best, params):
                p.copy_(b)
            for p in params:
                p.grad = None
    finally:
        for p in frozen:
            p.requires_grad_(True)
    loss_rtn = sum(base) / max(n_items, 1)
    if not math.isfinite(loss_rtn):
        stopped = stopped or "non-finite loss at round to nearest"
    return BlockTuning(loss_rtn, best_rel, best_step, steps, stopped)
