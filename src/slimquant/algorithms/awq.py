"""AWQ (activation-aware weight quantization; msModelSlim ``anti_method m3``), as pure functions.

Both searches see the calibration inputs ``x`` of a layer group only through two statistics, accumulated over
every calibration token: the per-channel mean ``|x|`` and the Gram matrix ``H = 2/N sum x^T x`` (GPTQ's Hessian,
:class:`slimquant.algorithms.gptq.HessianAccumulator`). The output error of a weight change ``D = W' - W`` is
then ``|| x D^T ||^2 / N = tr(D H D^T) / 2`` exactly, without keeping or re-multiplying the activations.

* **scales** (:func:`awq_search`): per input channel ``s = mean|x|^r``, normalised so that
  ``sqrt(max(s) * min(s)) == 1``, for ``r`` on a grid in [0, 1). The weights become ``W * s`` (the op before
  them absorbs ``1 / s``: an exact equivalence in float), so salient channels, those with large activations,
  get finer steps. The ratio with the lowest output error of ``Q(W s) / s`` summed over the group's linears
  wins; ``r = 0`` (no scaling, plain RTN) is on the grid, so the search never does worse than RTN on the
  calibration data.
* **clipping** (:func:`awq_clip`): per output channel and group, shrink the symmetric range ``[-m, m]`` of the
  (scaled) weight by factors down to ``1 - max_shrink`` and keep the one with the lowest output error of that
  group's share of the dot product (the group's diagonal block of ``H``). The full range is on the grid.

The transforms are applied by :mod:`slimquant.pipeline.sequential` (block by block, on the inputs the already
quantized blocks produce).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimquant.math.weights import dequantize_weight, quantize_weight
from slimquant.types.spec import Granularity, QuantSpec

DEFAULT_GRID = 20
CLIP_MAX_SHRINK = 0.5
CLIP_CHANNEL_BATCH = 512  # output channels per step of the clipping search (bounds its memory)


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """RTN quantize then dequantize ``w [n, k]`` (float32)."""
    return dequantize_weight(quantize_weight(w, spec), spec)


def output_error(d: torch.Tensor, h: torch.Tensor) -> float:
    """Mean squared output error per token and output of a weight change ``d [n, k]`` under ``h = 2/N X^T X``."""
    return float(((d @ h) * d).sum()) / 2 / max(d.shape[0], 1)


def awq_scales(act_mean_abs: torch.Tensor, ratio: float) -> torch.Tensor:
    """``[k]`` AWQ scales for one ratio: ``mean|x|^ratio`` (floored at 1e-4), divided by ``sqrt(max * min)``."""
    s = act_mean_abs.float().pow(ratio).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@dataclass
class AWQSearch:
    ratio: float
    scales: torch.Tensor  # [k]
    errors: dict[float, float] = field(default_factory=dict)  # ratio -> output MSE

    @property
    def gain(self) -> float:
        """Output error with no scaling (ratio 0) over the chosen ratio's (>= 1)."""
        best = self.errors[self.ratio]
        return self.errors[0.0] / best if best > 0 else 1.0


def awq_search(
    act_mean_abs: torch.Tensor, h: torch.Tensor, weights: list[torch.Tensor], specs: list[QuantSpec | None],
    grid: int = DEFAULT_GRID,
) -> AWQSearch:  # fmt: skip
    """The AWQ scale search for linears that share one input: ``act_mean_abs [k]`` its per-channel mean
    ``|x|``, ``h [k, k]`` its ``2/N X^T X``; ``weights`` their ``[n_i, k]`` float weights; ``specs`` each one's
    weight spec (None: the layer stays float; it is scaled with the others but adds no error)."""
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    h = h.float()
    ws = [w.detach().float() for w in weights]
    errors: dict[float, float] = {}
    best_ratio, best_err, best_s = 0.0, float("inf"), torch.ones_like(act_mean_abs, dtype=torch.float32)
    for i in range(grid):
        ratio = i / grid
        s = awq_scales(act_mean_abs, ratio)
        err = 0.0
        for w, spec in zip(ws, specs):
            if spec is not None:
                err += output_error(fake_quantize(w * s, spec) / s - w, h)
        errors[ratio] = err
        if err < best_err:
            best_ratio, best_err, best_s = ratio, err, s
    return AWQSearch(best_ratio, best_s, errors)


def awq_clip(
    h: torch.Tensor, w: torch.Tensor, spec: QuantSpec, grid: int = DEFAULT_GRID, max_shrink: float = CLIP_MAX_SHRINK
) -> tuple[torch.Tensor, float]:
    """``(clipped w [n, k], mean shrink factor)``: ``w`` clamped per output channel and group to the symmetric
    range with the lowest output error under ``h [k, k]`` (the input's ``2/N X^T X``). Per-tensor specs are
    returned unchanged (one range for the whole matrix: nothing per channel to search)."""
    if spec.granularity is Granularity.PER_TENSOR:
        return w, 1.0
    n, k = w.shape
    gs = int(spec.group_size) if spec.granularity is Granularity.PER_GROUP else k
    groups = k // gs
    hf = h.float()
    hb = torch.stack([hf[g * gs : (g + 1) * gs, g * gs : (g + 1) * gs] for g in range(groups)])  # [G, gs, gs]
    out = w.detach().float().clone()
    shrinks = []
    steps = max(1, int(grid * max_shrink))
    for lo in range(0, n, CLIP_CHANNEL_BATCH):
        wb = out[lo : lo + CLIP_CHANNEL_BATCH]  # [b, k], a view of out
        wg = wb.reshape(-1, groups, gs)  # [b, G, gs]
        org_max = wg.abs().amax(-1, keepdim=True)  # [b, G, 1]
        best_max = org_max.clone()
        best_err = torch.full(org_max.shape[:2], float("inf"))
        for i in range(steps):
            max_val = org_max * (1 - i / grid)
            cur = torch.clamp(wg, -max_val, max_val)
            d = fake_quantize(cur.reshape(wb.shape), spec).reshape(wg.shape) - wg
            err = torch.einsum("bgi,gij,bgj->bg", d, hb, d)  # each group's share of the output error
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better.unsqueeze(-1), max_val, best_max)
        wg.copy_(torch.clamp(wg, -best_max, best_max))
        shrinks.append((best_max / org_max.clamp(min=1e-30)).flatten())
    return out, float(torch.cat(shrinks).mean())
