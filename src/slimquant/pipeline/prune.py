"""Structured pruning: SCOP for convolutional networks and calibration-scored MLP channels for LLMs.

**SCOP** (Tang et al. 2020; MindSpore Golden Stick): :func:`prepare_scop` puts a :class:`~slimquant.nn.knockoff.
KnockoffConv2d` on every prunable convolution followed by a BatchNorm2d (:func:`slimquant.surgery.prune.
channel_groups`) and returns a :class:`ScopModel` whose forward appends knockoffs of the batch (default: the batch
in a random order, as Golden Stick's callback does; or the user's ``knockoff(x)``) and returns the real half's
output. Train it with any loop and loss: only the ``kf_scale`` parameters train (everything else is frozen, and
BatchNorm statistics stay those of real data). :func:`prune_scop` then scores each channel ``|gamma| * (2 beta -
1)`` (its BN scale times how much it prefers real features over knockoffs), removes the lowest-scoring ``rate`` of
each layer's channels physically (the convolution, its BatchNorms and the readers' inputs) and gives back the
model as it was otherwise (parameters trainable again) for fine-tuning.

**LLM MLP channels** (:func:`prune_mlp`): the intermediate channels of every gated MLP scored on calibration data
by ``||x_j||_2 * ||W_down[:, j]||_2`` (the channel's activation norm over the calibration tokens times its output
weights' norm: the structured form of Wanda's ``|W| * ||x||``), the lowest ``rate`` of every layer removed (the same
count everywhere, so ``config.intermediate_size`` still describes the model and it saves / loads as a
transformers model).

Both return a :class:`PruneResult`: the pruned model, the plan (kept channels per layer, JSON) and per-layer rows.
Prune first, then quantize (:func:`slimquant.quantize`) or train with quantization (:func:`slimquant.prepare_qat`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from slimquant.adapters import gated_mlps
from slimquant.errors import SlimquantError
from slimquant.nn.knockoff import KnockoffConv2d
from slimquant.surgery import select, set_module
from slimquant.surgery.prune import ChannelGroup, apply_plan, channel_groups, shrink_channels, shrink_mlp

log = logging.getLogger(__name__)

PLAN_FILE, WEIGHTS_FILE = "pruning.json", "model.safetensors"


def check_rate(rate: Any, what: str = "rate") -> float:
    """``rate`` as a float in (0, 1), else a :class:`SlimquantError` naming it."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < float(rate) < 1.0:
        raise SlimquantError(f"pruning {what} must be a fraction of channels in (0, 1), got {rate!r}")
    return float(rate)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def pruned_count(rate: float, channels: int) -> int:
    """Channels ``rate`` removes from ``channels``: rounded down (``0.29 * 100`` is 29, not float's 28.999...),
    always leaving one."""
    return min(math.floor(rate * channels + 1e-9), channels - 1)


@dataclass
class PruneResult:
    """``model``: the pruned model (physically smaller); ``plan``: ``{"conv" | "mlp": {layer: kept channels}}``
    (re-applies to a fresh instance of the architecture: :func:`slimquant.surgery.prune.apply_plan`); ``layers``:
    one row per pruned layer (channels before / after, score range); ``skipped``: layers left alone and why;
    parameter counts before and after."""

    model: nn.Module
    plan: dict[str, Any]
    layers: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``model.safetensors`` (the pruned model's state) and ``pruning.json`` (plan and rows) into
        ``directory``, atomically (a temporary directory renamed into place); an existing one only with
        ``overwrite``. Reload with :func:`load_pruned`."""
        from safetensors.torch import save_model

        from slimquant.formats.atomic import atomic_directory

        meta = {"plan": self.plan, "layers": self.layers, "skipped": self.skipped, "params_before": self.params_before,
                "params_after": self.params_after}  # fmt: skip
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            save_model(self.model, str(tmp / WEIGHTS_FILE))  # tied tensors (embeddings / lm_head) stored once
            (tmp / PLAN_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        return Path(directory)


def load_pruned(directory: str | os.PathLike, model: nn.Module, example: Any = None) -> nn.Module:
    """The pruned model saved by :meth:`PruneResult.save`: ``model`` (a fresh instance of the original
    architecture) is shrunk by the saved plan (``example``: one input batch, needed for convolution plans) and
    loaded with the saved tensors (safetensors; every key must match)."""
    from safetensors.torch import load_model

    d = Path(directory)
    plan_file, weights = d / PLAN_FILE, d / WEIGHTS_FILE
    for f in (plan_file, weights):
        if not f.is_file():
            raise SlimquantError(f"{d} is not a pruned model directory: {f.name} is missing")
    try:
        meta = json.loads(plan_file.read_text(encoding="utf-8"))
        plan = meta["plan"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise SlimquantError(f"{plan_file}: not a pruning record ({type(e).__name__}: {e})") from None
    apply_plan(model, plan, example)
    missing, unexpected = load_model(model, str(weights), strict=False)
    if missing or unexpected:
        raise SlimquantError(f"{weights}: does not match the pruned {type(model).__name__} (missing "
                             f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")  # fmt: skip
    return model


def permuted_batch(x: torch.Tensor) -> torch.Tensor:
    """The default knockoffs: the batch in a random order (same distribution, unrelated to each position's label)."""
    return x[torch.randperm(x.shape[0], device=x.device)]


class ScopModel(nn.Module):
    """``model`` with knockoff convolutions; ``forward(x, *rest)`` runs ``[x; knockoff(x)]`` and returns the first
    half of the output (a tensor output batched on dim 0). Train only :meth:`kf_parameters` (the rest is frozen);
    :meth:`train` keeps BatchNorm layers in eval mode. Finish with :func:`prune_scop`."""

    def __init__(self, model: nn.Module, groups: dict[str, ChannelGroup], skipped: dict[str, str],
                 knockoff: Callable[[torch.Tensor], torch.Tensor], trainable: dict[str, bool]) -> None:  # fmt: skip
        super().__init__()
        self.model = model
        self.groups, self.skipped, self.knockoff = groups, skipped, knockoff
        self._trainable = trainable  # parameter name -> requires_grad before prepare_scop
        self.params_before = _params(model) - sum(m.kf_scale.numel() for m in self.knockoffs().values())

    def knockoffs(self) -> dict[str, KnockoffConv2d]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, KnockoffConv2d)}

    def kf_parameters(self) -> list[nn.Parameter]:
        """The parameters SCOP trains (one ``kf_scale`` per knockoff convolution)."""
        return [m.kf_scale for m in self.knockoffs().values()]

    def train(self, mode: bool = True) -> "ScopModel":
        super().train(mode)
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()  # statistics of real data only (the doubled batch would mix in knockoffs)
        return self

    def forward(self, x: torch.Tensor, *rest: Any, **kwargs: Any) -> Any:
        if not self.training:
            return self.model(x, *rest, **kwargs)
        n = x.shape[0]
        xk = self.knockoff(x)
        if xk.shape != x.shape:
            raise SlimquantError(f"knockoff(x) must have the batch's shape {tuple(x.shape)}, got {tuple(xk.shape)}")
        out = self.model(torch.cat((x, xk), dim=0), *rest, **kwargs)
        if not isinstance(out, torch.Tensor) or out.shape[0] != 2 * n:
            raise SlimquantError("SCOP needs a model whose output is one tensor batched on dimension 0")
        return out[:n]


def prepare_scop(model: nn.Module, example: Any, layers: list[str] | tuple[str, ...] | None = None,
                 knockoff: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ScopModel:  # fmt: skip
    """SCOP's knockoff phase: every prunable Conv2d followed by a BatchNorm2d (``layers``: only those matching these
    names / globs / ``re:`` patterns) gets a learned knockoff mix. ``example``: one input batch (shapes for the
    channel tracing). Returns the :class:`ScopModel` to train (optimizer over ``scop.kf_parameters()``)."""
    if isinstance(model, ScopModel):
        raise SlimquantError("the model already has knockoff layers (prepare_scop ran); train it, then prune_scop")
    groups, skipped = channel_groups(model, example)
    for name, g in list(groups.items()):
        if g.bn is None or not model.get_submodule(g.bn).affine:
            skipped[name] = "no affine BatchNorm2d right after it (SCOP scores channels by the BN scale)"
            del groups[name]
    if layers is not None:
        sel = select(list(groups) + list(skipped), tuple(layers))
        if sel.unmatched_patterns:
            raise SlimquantError(f"prepare_scop layers: {list(sel.unmatched_patterns)} match no convolution; prunable: "
                                 f"{sorted(groups)}")  # fmt: skip
        chosen = set(sel.matched)
        named = [p for p in layers if p in skipped]  # named exactly, but not prunable: say why
        if named:
            raise SlimquantError(f"prepare_scop layers: {named[0]} cannot be pruned ({skipped[named[0]]})")
        for name in list(groups):
            if name not in chosen:
                skipped[name] = "not selected"
                del groups[name]
    if not groups:
        why = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:4]) or "it has no nn.Conv2d"
        raise SlimquantError(f"{type(model).__name__} has no convolution SCOP can prune ({why})")
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for name in groups:
        set_module(model, name, KnockoffConv2d(model.get_submodule(name)))
    log.info("SCOP: %d convolution(s) with knockoff mixes, %d left alone", len(groups), len(skipped))
    return ScopModel(model, groups, skipped, knockoff or permuted_batch, trainable)


def prune_scop(scop: ScopModel, rate: float | dict[str, float]) -> PruneResult:
    """Remove the lowest-scoring ``rate`` (in (0, 1); or per layer ``{name: rate}``, unnamed layers kept whole) of
    each knockoff layer's output channels, physically; the model's parameters become trainable again as before
    :func:`prepare_scop` (fine-tune next). Returns the :class:`PruneResult` (``.model`` is the original model
    object, pruned)."""
    if not isinstance(scop, ScopModel):
        raise SlimquantError("prune_scop takes the model prepare_scop returned (after training its knockoff mixes)")
    if not scop.knockoffs():
        raise SlimquantError("this ScopModel was already pruned (prune_scop ran on it); prepare_scop a model again")
    rates = ({n: check_rate(r, f"rate of {n}") for n, r in rate.items()} if isinstance(rate, dict)
             else {n: check_rate(rate) for n in scop.groups})  # fmt: skip
    unknown = sorted(set(rates) - set(scop.groups))
    if unknown:
        raise SlimquantError(f"pruning rate for {unknown[0]}, which is not a knockoff layer; they are: {sorted(scop.groups)}")
    model = scop.model
    knock = scop.knockoffs()
    keeps: dict[str, torch.Tensor] = {}
    rows = []
    for name, g in scop.groups.items():
        kf = knock[name].kf_scale.detach().clamp(0, 1).cpu()
        gamma = model.get_submodule(g.bn).weight.detach().abs().cpu()  # type: ignore[arg-type]
        score = gamma * (2 * kf - 1)
        n_prune = pruned_count(rates.get(name, 0.0), g.channels) if name in rates else 0
        order = torch.argsort(score, descending=True, stable=True)
        keeps[name] = order[: g.channels - n_prune].sort().values
        rows.append({"name": name, "channels": g.channels, "kept": g.channels - n_prune,
                     "rate": rates.get(name, 0.0), "kf_scale_mean": round(float(kf.mean()), 4),
                     "score_cut": round(float(score[order[g.channels - n_prune - 1]]), 6)})  # fmt: skip
    for name, m in knock.items():
        set_module(model, name, m.conv)
    for n, p in model.named_parameters():
        p.requires_grad_(scop._trainable.get(n, True))
    for m in model.modules():  # ScopModel.train kept the BatchNorms in eval mode; they follow the model again
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train(model.training)
    for name, keep in keeps.items():
        shrink_channels(model, scop.groups[name], keep)
    after = _params(model)
    log.info("SCOP pruned %d layer(s): %d -> %d parameters", len(keeps), scop.params_before, after)
    plan = {"version": 1, "conv": {n: keeps[n].tolist() for n in keeps}}
    return PruneResult(model, plan, rows, dict(scop.skipped), scop.params_before, after)


def prune_mlp(model: nn.Module, calib_data: Any, rate: float, show_progress: bool = True) -> PruneResult:
    """Remove the ``rate`` (in (0, 1)) of every gated MLP's intermediate channels with the lowest
    ``||x_j||_2 * ||W_down[:, j]||_2`` on ``calib_data`` (token windows, or model inputs as
    :func:`slimquant.quantize` takes them), in place; updates ``config.intermediate_size``."""
    from slimquant.pipeline.calibrate import run_batches

    rate = check_rate(rate)
    layouts = dict(gated_mlps(model))  # from the architecture description; an unknown one is an error naming it
    mlps = list(layouts)
    cfg = getattr(model, "config", None)
    widths = {model.get_submodule(f"{p}.{layouts[p].down}").in_features for p in mlps}
    if cfg is not None and hasattr(cfg, "intermediate_size") and len(widths) != 1:
        raise SlimquantError(f"the gated MLPs of {type(model).__name__} have different widths ({sorted(widths)}): one "
                             "config.intermediate_size could not describe them after pruning")  # fmt: skip
    sq: dict[str, torch.Tensor] = {}
    handles = []
    for prefix in mlps:
        def hook(_m: nn.Module, args: tuple, p: str = prefix) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sq[p] = sq.get(p, 0) + x.pow(2).sum(0)

        handles.append(model.get_submodule(f"{prefix}.{layouts[prefix].down}").register_forward_pre_hook(hook))
    before = _params(model)
    try:
        run_batches(model, calib_data, show_progress, desc="MLP pruning scores")
    finally:
        for h in handles:
            h.remove()
    rows, plan = [], {}
    silent = [p for p in mlps if p not in sq]
    if silent:
        raise SlimquantError(f"{silent[0]}: no calibration token reached this MLP (of {len(silent)}); MLP pruning scores "
                             "channels by their activations on the calibration data")  # fmt: skip
    for prefix in mlps:
        down = model.get_submodule(f"{prefix}.{layouts[prefix].down}")
        width = down.in_features
        score = sq[prefix].sqrt().to(down.weight.device) * down.weight.detach().float().norm(dim=0)
        n_keep = width - pruned_count(rate, width)
        keep = torch.argsort(score, descending=True, stable=True)[:n_keep].sort().values
        shrink_mlp(model, prefix, layouts[prefix], keep)
        plan[prefix] = keep.tolist()
        rows.append({"name": prefix, "channels": width, "kept": n_keep, "rate": rate})
    if cfg is not None and hasattr(cfg, "intermediate_size"):
        cfg.intermediate_size = rows[0]["kept"]
    return PruneResult(model, {"version": 1, "mlp": plan}, rows, {}, before, _params(model))
