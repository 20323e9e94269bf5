"""CBQ (Ding et al., "CBQ: Cross-Block Quantization for Large Language Models", ICLR 2025): reconstruction over
windows of consecutive blocks with LoRA-Rounding, after a coarse-to-fine outlier pre-processing.

* :func:`slimquant.math.outliers.coarse_to_fine_outliers` (pure math, used by the pre-processing step): CBQ's
  outlier detection on a set of magnitudes.
* :class:`LoRARoundingWeight`: a linear's fake-quantized weight with a learnable rounding offset per weight that
  is the rectified sigmoid (AdaRound's ``h``, ``zeta = 1.1``, ``gamma = -0.1``) of a low-rank matrix ``A1 @ A2``,
  minus one half: ``v = h(A1 @ A2) - 0.5`` in ``[-0.5, 0.5]`` is added to ``w / s`` before rounding (``A1``
  starts at 0, so ``v`` starts at 0: round to nearest). Each group's range has learnable factors in ``[0, 1]``
  (the weight's step size, learned through the spec's own qparams rules). The forward pass rounds hard with a
  straight-through gradient (as AutoRound's), so the rounding it trains is the one it deploys and no annealed
  regulariser is needed to push soft values to 0 / 1.
* :class:`InputFakeQuant`: a layer's input quantization as the deployed W8A8 layer does it (static: the
  calibrated range, with learnable factors on both ends, i.e. a learnable step size and offset; dynamic: per
  token), for the forward pass of the reconstruction.
* :func:`tune_window`: the reconstruction of one window: MSE plus ``kl_weight`` times the KL divergence between
  the softmax (over the hidden dimension) of the float window's output and of the quantized window's, on the
  quantized model's inputs and, homologously, on the float model's inputs; Adam; the step with the lowest loss
  relative to the same items' loss at round to nearest is kept.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from slimquant.algorithms.autoround import quantized_weight, signround_qdq
from slimquant.math.qparams import grid, qparams_from_minmax
from slimquant.math.quant import fake_quantize, learned_fake_quantize
from slimquant.math.weights import QuantizedWeight, check_weight_shape, grouped
from slimquant.types.qtype import qtype as lookup_qtype
from slimquant.types.spec import QuantSpec

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """AdaRound's ``h(x) = clamp(sigmoid(x) * (zeta - gamma) + gamma, 0, 1)``; ``h(0) = 0.5``."""
    return torch.clamp(torch.sigmoid(x) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


class LoRARoundingWeight(nn.Module):
    """One linear's fake-quantized weight with LoRA-Rounding and learnable group ranges, as a parametrization
    (``torch.nn.utils.parametrize.register_parametrization(linear, "weight", it)``; removing it with
    ``leave_parametrized=False`` gives the float weight back untouched)."""

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        w = weight.detach().float()
        check_weight_shape(tuple(w.shape), spec)  # type: ignore[arg-type]
        self.spec = spec
        n, k = w.shape
        r = max(1, min(rank, n, k))
        self.a1 = nn.Parameter(torch.zeros(n, r, device=w.device))
        self.a2 = nn.Parameter(torch.randn(r, k, generator=generator).to(w.device))
        groups = grouped(w, spec).shape[:2]
        self.min_scale = nn.Parameter(torch.ones(groups, device=w.device))
        self.max_scale = nn.Parameter(torch.ones(groups, device=w.device))

    def tuned(self) -> list[nn.Parameter]:
        return [self.a1, self.a2, self.min_scale, self.max_scale]

    def offsets(self) -> torch.Tensor:
        """The rounding offsets ``v = h(A1 @ A2) - 0.5`` ``[n, k]``."""
        return rectified_sigmoid(self.a1 @ self.a2) - 0.5

    def project(self) -> None:
        with torch.no_grad():
            self.min_scale.clamp_(0.0, 1.0)
            self.max_scale.clamp_(0.0, 1.0)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return signround_qdq(weight.float(), self.offsets(), self.min_scale, self.max_scale, self.spec)[0].to(weight.dtype)

    def result(self, weight: torch.Tensor) -> QuantizedWeight:
        """The checkpoint's :class:`QuantizedWeight` of the float ``weight`` with the current parameters."""
        with torch.no_grad():
            v = self.offsets()
        return quantized_weight(weight.detach().float(), v, self.min_scale, self.max_scale, self.spec)


class InputFakeQuant(nn.Module):
    """A linear's input quantization as its deployed W8A8 module computes it. Static (``rmin`` / ``rmax`` the
    calibrated range): ``scale, zero point = qparams_from_minmax(rmin * lo, rmax * hi)`` with learnable factors
    ``lo``, ``hi`` in ``[0.25, 1.5]`` (``learn=False``: fixed at 1), then ``clamp(round(x / scale) + zp)`` with
    LSQ's gradients; :meth:`range` is the tuned range the deployed layer gets. Dynamic (``rmin`` None): per
    token, symmetric, nothing to learn."""

    LOW, HIGH = 0.25, 1.5

    def __init__(self, spec: QuantSpec, rmin: float | None, rmax: float | None, learn: bool) -> None:
        super().__init__()
        self.spec = spec
        self.qt = lookup_qtype(spec.qtype)
        self.dynamic = rmin is None
        self.register_buffer("rmin", torch.tensor(0.0 if rmin is None else float(rmin)))
        self.register_buffer("rmax", torch.tensor(0.0 if rmax is None else float(rmax)))
        self.lo = nn.Parameter(torch.ones(()), requires_grad=learn and not self.dynamic)
        self.hi = nn.Parameter(torch.ones(()), requires_grad=learn and not self.dynamic)

    def tuned(self) -> list[nn.Parameter]:
        return [p for p in (self.lo, self.hi) if p.requires_grad]

    def project(self) -> None:
        with torch.no_grad():
            self.lo.clamp_(self.LOW, self.HIGH)
            self.hi.clamp_(self.LOW, self.HIGH)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return qparams_from_minmax(self.rmin * self.lo, self.rmax * self.hi, self.qt, self.spec.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.dynamic:
            scale, _ = qparams_from_minmax(xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True), self.qt, True)
            return fake_quantize(xf, scale.detach(), None, self.qt).to(x.dtype)
        scale, zp = self.qparams()
        qmin, qmax = grid(self.qt)
        factor = 1.0 / math.sqrt(max(xf.numel(), 1) * qmax)
        return learned_fake_quantize(xf, scale, None if zp is None else zp.detach(), qmin, qmax, factor).to(x.dtype)

    def range(self) -> dict[str, Any] | None:
        """The tuned static range (``{"rmin", "rmax", "rule"}``), or None for dynamic inputs."""
        if self.dynamic:
            return None
        with torch.no_grad():
            rmin, rmax = float(self.rmin * self.lo), float(self.rmax * self.hi)
        return {"rmin": rmin, "rmax": rmax, "rule": f"cbq (calibrated x [{float(self.lo.detach()):.4g}, {float(self.hi.detach()):.4g}])"}


def window_distance(out: torch.Tensor, target: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """CBQ's reconstruction distance: ``mean (out - target)^2 + kl_weight * mean_t KL(softmax(target_t) ||
    softmax(out_t))``, the softmax over the hidden dimension of each token ``t``."""
    out, target = out.float(), target.float()
    loss = F.mse_loss(out, target)
    if kl_weight:
        lt, lo = F.log_softmax(target, dim=-1), F.log_softmax(out, dim=-1)
        loss = loss + kl_weight * (lt.exp() * (lt - lo)).sum(-1).mean()
    return loss


def tune_window(run: Callable[[int, bool], torch.Tensor], targets: list[torch.Tensor], params: list[nn.Parameter],
                project: Callable[[], None], iters: int, lr: float, batch_size: int, kl_weight: float,
                homologous: bool, seed: int = 0, show_progress: bool = False,
                desc: str = "cbq") -> dict[str, Any]:  # fmt: skip
    """Train ``params`` so ``run(j, float_input)`` (the quantized window's output for item ``j`` on the quantized
    model's inputs, or with ``float_input`` the float model's) matches ``targets[j]`` (the float window's output on
    the float model's inputs), leaving them at the kept step's values. Returns the report fields."""
    n_items = len(targets)
    branches = (False, True) if homologous else (False,)

    def loss_of(j: int) -> torch.Tensor:
        return sum(window_distance(run(j, fi), targets[j], kl_weight) for fi in branches)  # type: ignore[return-value]

    with torch.no_grad(), parametrize.cached():
        base = [float(loss_of(j)) for j in range(n_items)]
    best_rel, best_step = 1.0, -1
    best = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    stopped, steps = None, 0
    bs = min(batch_size, n_items)
    order, pos = torch.randperm(n_items, generator=gen), 0
    for step in tqdm(range(iters), desc=desc, disable=not show_progress, unit="step", leave=False):
        if pos + bs > n_items:
            order, pos = torch.randperm(n_items, generator=gen), 0
        batch = order[pos : pos + bs].tolist()
        pos += bs
        opt.zero_grad(set_to_none=True)
        rel, finite = 0.0, True
        with torch.enable_grad(), parametrize.cached():  # each weight fake-quantized once per step
            total = 0.0
            for j in batch:
                loss = loss_of(j)
                if not torch.isfinite(loss):
                    finite = False
                    break
                total = total + loss / len(batch)
                rel += float(loss.detach()) / max(base[j], 1e-30) / len(batch)
            if finite:
                total.backward()  # type: ignore[union-attr]
        if not finite:
            stopped = f"non-finite loss at step {step}; kept step {best_step}"
            log.warning("%s: %s", desc, stopped)
            break
        steps = step + 1
        if rel < best_rel:  # measured with the parameters before this step's update
            best_rel, best_step = rel, step
            for b, p in zip(best, params):
                b.copy_(p.detach())
        opt.step()
        project()
    with torch.no_grad():
        for b, p in zip(best, params):
            p.copy_(b)
            p.grad = None
    loss_rtn = sum(base) / max(n_items, 1)
    if not math.isfinite(loss_rtn):
        stopped = stopped or "non-finite loss at round to nearest"
    out = {"loss_start": loss_rtn, "best_rel_loss": round(best_rel, 6), "best_step": best_step, "steps": steps}
    if stopped:
        out["stopped"] = stopped
    return out
