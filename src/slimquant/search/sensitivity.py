"""Layer sensitivity: how much a model-level loss grows when only one layer is quantized, and cheap proxies of it.

Metrics (per planned Linear / Conv2d layer and per candidate recipe):

- ``ablation`` (exact): that layer alone is quantized (:func:`slimquant.pipeline.convert.quantized`: swapped in,
  the float module put back afterwards) and every calibration item runs through the model; the score is the
  loss against the float model's outputs: KL(float || quantized) per position for logits (``loss="kl"``), or
  the relative squared error ``sum((y_q - y)^2) / sum(y^2)`` (``loss="mse"``), or a callable's mean. Models whose
  repeated blocks slimquant knows replay the float blocks before the layer from a cache, so only the blocks
  from the layer on run: about half a forward pass per layer and item.
- ``fisher``: the second-order prediction of the same loss, ``1/2 sum_i F_ii d_i^2`` with ``d`` the weight
  change and ``F`` the Fisher information's diagonal at the float model per position, from one backward pass
  per item with labels sampled from the float model's own output (the squared gradient of the summed loss is
  then an unbiased estimate of the summed per-position diagonal: the cross terms have zero mean). For
  ``loss="mse"`` it is ``d^T diag(J^T J) d / sum(y^2)`` with ``J^T J``'s diagonal from random output directions.
- ``output_mse``: the layer's own relative output error on a sample of its float inputs (one layer, no model).
- ``weight_error``: the relative weight error ``||W_q - W||^2 / ||W||^2`` (data-free).
- ``act_range``: the layer input's max |x| over its RMS (msModelSlim's activation-range view; the same for
  every candidate).

Weights are solved with each recipe's data-free weight step (GPTQ's is round to nearest) and the layer's
input quantization (static ranges calibrated once per candidate); AWQ, the KV cache and attention quantization
are whole-model effects and left out; smoothing (``model`` steps) is applied to the model first, in place.
A cache directory keeps every finished layer, so a killed run resumes and later runs (fallback, tuning,
search) reuse the result when model, candidates, calibration data and metrics are the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from slimquant.adapters import block_list, is_causal_lm
from slimquant.algorithms import outside_blocks
from slimquant.errors import SlimquantError
from slimquant.formats.atomic import write_file_atomic
from slimquant.math.metrics import kl_divergence, spearman
from slimquant.pipeline.calibrate import forward_item, model_inputs
from slimquant.pipeline.convert import LayerPlan, calibrate_input_ranges, plan, quantized, refuse_quantized
from slimquant.pipeline.workdir import tensor_digest, weights_digest
from slimquant.types.spec import Recipe

log = logging.getLogger(__name__)

EXACT = "ablation"
METRICS = (EXACT, "fisher", "output_mse", "weight_error", "act_range")
LOSSES = ("auto", "kl", "mse")
FORMAT_VERSION = 1
SAMPLE_ROWS = 256  # input rows per Linear layer kept for output_mse


@dataclass(frozen=True)
class LayerScore:
    """One layer under one candidate: its scores by metric (a metric not measured is absent)."""

    layer: str
    kind: str
    candidate: str
    params: int
    scores: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "kind": self.kind, "candidate": self.candidate, "params": self.params,
                "scores": {k: _json_float(v) for k, v in self.scores.items()}}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerScore":
        return cls(d["layer"], d["kind"], d["candidate"], int(d["params"]),
                   {k: float("nan") if v is None else float(v) for k, v in d["scores"].items()})  # fmt: skip


def _json_float(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


@dataclass
class Sensitivity:
    """What :func:`layer_sensitivity` measured: a row per (layer, candidate), and how.

    ``candidates``: label -> the recipe's dict; ``loss``: what ``ablation`` (and ``fisher``) measure;
    ``calibration``: items and positions the scores average over; ``fingerprint``: what the cache is keyed on.
    """

    candidates: dict[str, dict[str, Any]]
    loss: str
    metrics: tuple[str, ...]
    rows: list[LayerScore] = field(default_factory=list)
    calibration: dict[str, int] = field(default_factory=dict)
    fingerprint: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    complete: bool = True
    timing: dict[str, float] = field(default_factory=dict)  # seconds by part: reference, fisher, per metric

    # -- lookups -------------------------------------------------------------------------------------------------
    def _candidate(self, candidate: str | None) -> str:
        if candidate is None:
            if len(self.candidates) != 1:
                raise SlimquantError(f"several candidates were measured; name one of: {', '.join(self.candidates)}")
            return next(iter(self.candidates))
        if candidate not in self.candidates:
            raise SlimquantError(f"unknown candidate {candidate!r}; measured: {', '.join(self.candidates)}")
        return candidate

    def _metric(self, metric: str) -> str:
        if metric not in self.metrics:
            raise SlimquantError(f"metric {metric!r} was not measured; measured: {', '.join(self.metrics)}")
        return metric

    def scores(self, metric: str = EXACT, candidate: str | None = None) -> dict[str, float]:
        """``{layer: score}`` of one metric under one candidate (the only one when None), in model order."""
        c, m = self._candidate(candidate), self._metric(metric)
        return {r.layer: r.scores[m] for r in self.rows if r.candidate == c and m in r.scores}

    def ranking(self, metric: str = EXACT, candidate: str | None = None) -> list[tuple[str, float]]:
        """Layers from most to least sensitive by ``metric`` (NaN last)."""
        items = self.scores(metric, candidate).items()
        return sorted(items, key=lambda kv: (not math.isfinite(kv[1]), -kv[1] if math.isfinite(kv[1]) else 0.0))

    def most_sensitive(self, n: int, metric: str = EXACT, candidate: str | None = None) -> list[str]:
        return [name for name, _ in self.ranking(metric, candidate)[:n]]

    def spearman(self, candidate: str | None = None, reference: str = EXACT) -> dict[str, float]:
        """Spearman's rank correlation of every other metric with ``reference`` over the layers of one candidate
        (layers where either is not finite are left out)."""
        ref = self.scores(reference, candidate)
        out = {}
        for m in self.metrics:
            if m == reference:
                continue
            other = self.scores(m, candidate)
            common = [n for n in ref if n in other and math.isfinite(ref[n]) and math.isfinite(other[n])]
            out[m] = spearman(torch.tensor([ref[n] for n in common]), torch.tensor([other[n] for n in common]))
        return out

    # -- serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": "slimquant-sensitivity", "version": FORMAT_VERSION, "candidates": self.candidates,
                "loss": self.loss, "metrics": list(self.metrics), "calibration": self.calibration,
                "fingerprint": self.fingerprint, "seconds": round(self.seconds, 2), "notes": self.notes,
                "complete": self.complete, "timing": {k: round(v, 3) for k, v in self.timing.items()},
                "rows": [r.to_dict() for r in self.rows]}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "sensitivity data") -> "Sensitivity":
        if not isinstance(d, Mapping) or d.get("format") != "slimquant-sensitivity":
            raise SlimquantError(f"{where} is not a slimquant sensitivity file (no 'format': 'slimquant-sensitivity')")
        if d.get("version") != FORMAT_VERSION:
            raise SlimquantError(f"{where}: sensitivity format version {d.get('version')!r}; this slimquant reads "
                                 f"{FORMAT_VERSION}")  # fmt: skip
        try:
            return cls(dict(d["candidates"]), str(d["loss"]), tuple(d["metrics"]),
                       [LayerScore.from_dict(r) for r in d["rows"]], dict(d.get("calibration", {})),
                       str(d.get("fingerprint", "")), float(d.get("seconds", 0.0)), list(d.get("notes", [])),
                       bool(d.get("complete", True)), {k: float(v) for k, v in d.get("timing", {}).items()})  # fmt: skip
        except (KeyError, TypeError, ValueError) as e:
            raise SlimquantError(f"{where}: malformed sensitivity data ({type(e).__name__}: {e})") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Sensitivity":
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SlimquantError(f"{p}: no such sensitivity file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SlimquantError(f"{p} is not valid JSON ({e})") from None
        return cls.from_dict(data, str(p))

    def to_markdown(self, top: int | None = None) -> str:
        """A table per candidate, most sensitive layer first by the exact metric (else the first measured), and
        each proxy's Spearman correlation with it."""
        key = EXACT if EXACT in self.metrics else self.metrics[0]
        lines = [f"# Layer sensitivity ({self.loss}; {self.calibration.get('items', '?')} calibration item(s), "
                 f"{self.calibration.get('positions', '?')} position(s))", ""]  # fmt: skip
        for label in self.candidates:
            rows = {r.layer: r for r in self.rows if r.candidate == label}
            ranked = self.ranking(key, label)[:top] if top else self.ranking(key, label)
            lines += [f"## {label}", "", "| rank | layer | kind | params | " + " | ".join(self.metrics) + " |",
                      "|---|---|---|---|" + "---|" * len(self.metrics)]  # fmt: skip
            for i, (name, _) in enumerate(ranked, 1):
                r = rows[name]
                cells = [_fmt(r.scores.get(m)) for m in self.metrics]
                lines.append(f"| {i} | {name} | {r.kind} | {r.params} | " + " | ".join(cells) + " |")
            if key == EXACT and len(self.metrics) > 1:
                rho = self.spearman(label)
                lines += ["", "Spearman rank correlation with the exact ablation: "
                          + ", ".join(f"{m} {v:+.3f}" for m, v in rho.items())]  # fmt: skip
            lines.append("")
        if self.notes:
            lines += ["Notes:", *[f"- {n}" for n in self.notes], ""]
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike, top: int = 20, metric: str | None = None, overwrite: bool = True) -> Path:
        """A PNG bar chart of the ``top`` most sensitive layers by ``metric`` (default: the exact one), a panel per
        candidate."""
        return write_file_atomic(path, self.png(top, metric), overwrite=overwrite)

    def png(self, top: int = 20, metric: str | None = None) -> bytes:
        """:meth:`plot`'s PNG image as bytes."""
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        metric = metric or (EXACT if EXACT in self.metrics else self.metrics[0])
        labels = list(self.candidates)
        fig, axes = plt.subplots(len(labels), 1, figsize=(10, 0.28 * top * len(labels) + 1.2 * len(labels)),
                                 squeeze=False)  # fmt: skip
        for ax, label in zip(axes[:, 0], labels):
            ranked = [(n, v) for n, v in self.ranking(metric, label) if math.isfinite(v)][:top]
            names = [n for n, _ in ranked][::-1]
            ax.barh(names, [v for _, v in ranked][::-1], color="#c0504d")
            ax.set_title(f"{label}: {metric} ({self.loss})", fontsize=9)
            ax.tick_params(axis="y", labelsize=7)
            if ranked and min(v for _, v in ranked) > 0 and max(v for _, v in ranked) / min(v for _, v in ranked) > 100:
                ax.set_xscale("log")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        return buf.getvalue()

    def save(self, directory: str | os.PathLike, top: int = 20, overwrite: bool = False) -> list[Path]:
        """``sensitivity.json``, ``sensitivity.md`` and ``sensitivity.png`` in ``directory`` (each written whole;
        existing ones refused unless ``overwrite``)."""
        d = Path(directory)
        files = [d / "sensitivity.json", d / "sensitivity.md", d / "sensitivity.png"]
        if not overwrite:
            there = [str(f) for f in files if f.exists()]
            if there:
                raise SlimquantError(f"{there[0]} exists; pass overwrite (--overwrite) to replace it")
        contents = [json.dumps(self.to_dict(), indent=1) + "\n", self.to_markdown(), self.png(top)]  # all, then write
        for f, data in zip(files, contents):
            write_file_atomic(f, data, overwrite=True)
        return files


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    if not math.isfinite(v):
        return "n/a"
    return f"{v:.4g}"


# -- model outputs ------------------------------------------------------------------------------------------------
def output_tensor(out: Any) -> tuple[torch.Tensor, bool]:
    """The tensor a model's output is compared on, and whether it is logits (``.logits``)."""
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits, True
    if isinstance(out, torch.Tensor):
        return out, False
    if isinstance(out, Mapping):
        first = next((v for v in out.values() if isinstance(v, torch.Tensor)), None)
    elif isinstance(out, (tuple, list)):
        first = next((v for v in out if isinstance(v, torch.Tensor)), None)
    else:
        first = None
    if first is None:
        raise SlimquantError(f"cannot compare the model's output of type {type(out).__name__}: it holds no tensor")
    return first, False


def _call(model: nn.Module, item: Any, lm: bool) -> Any:
    return forward_item(model, item, use_cache=False) if lm else forward_item(model, item)


class _Replay(nn.Module):
    """Stands in for a float block whose output on the current calibration item is already known."""

    def __init__(self) -> None:
        super().__init__()
        self.output: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


@dataclass
class _LayerInputs:
    absmax: float = 0.0
    sumsq: float = 0.0
    count: int = 0
    rows: torch.Tensor | None = None  # Linear: a uniform sample of input rows; Conv2d: the first item's input
    keys: torch.Tensor | None = None


class _Loss:
    """The model-level loss of one item's output against the float output, summed (``total``) over ``positions``."""

    def __init__(self, loss: str | Callable[[torch.Tensor, torch.Tensor], Any]) -> None:
        self.loss = loss

    def __call__(self, ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
        """(numerator, denominator) summed over items, so the score is their ratio."""
        if callable(self.loss):
            v = self.loss(ref, out)
            return float(v), 1.0
        if self.loss == "kl":
            kl = kl_divergence(ref.float(), out.float())
            return float(kl.sum()), float(kl.numel())
        diff = (out.double() - ref.double()).pow(2).sum()
        return float(diff), float(ref.double().pow(2).sum())


@dataclass
class _Reference:
    outputs: list[torch.Tensor]
    block_outputs: list[list[Any]] | None  # [block][item]
    inputs: dict[str, _LayerInputs]
    positions: int  # distributions over the last dimension (what KL averages over)
    logits: bool
    sumsq: float = 0.0  # sum of the squared outputs (what the mse loss divides by)


class _Runner:
    """Runs calibration items through the model and scores the outputs against the float model's."""

    def __init__(self, model: nn.Module, items: list[Any], loss: _Loss, ref: _Reference, blocks: nn.ModuleList | None,
                 block_path: str | None, lm: bool) -> None:  # fmt: skip
        self.model, self.items, self.loss, self.ref = model, items, loss, ref
        self.blocks, self.block_path, self.lm = blocks, block_path, lm

    def first_block(self, layer: str) -> int:
        """Index of the block holding ``layer`` (the float blocks before it are replayed), 0 if outside the blocks."""
        if self.blocks is None or self.ref.block_outputs is None or not layer.startswith(f"{self.block_path}."):
            return 0
        return int(layer[len(self.block_path) + 1 :].split(".", 1)[0])

    @contextlib.contextmanager
    def replaying(self, start: int) -> Iterator[list[_Replay]]:
        replays = [_Replay() for _ in range(start)]
        assert self.blocks is not None or not replays
        originals = []
        try:
            for i, r in enumerate(replays):
                originals.append(self.blocks[i])  # type: ignore[index]
                self.blocks[i] = r  # type: ignore[index]
            yield replays
        finally:
            for i, m in enumerate(originals):
                self.blocks[i] = m  # type: ignore[index]

    def score(self, layer: str) -> float:
        start = self.first_block(layer)
        num = den = 0.0
        with torch.no_grad(), self.replaying(start) as replays:
            for k, item in enumerate(self.items):
                for i, r in enumerate(replays):
                    r.output = self.ref.block_outputs[i][k]  # type: ignore[index]
                out, _ = output_tensor(_call(self.model, item, self.lm))
                n, d = self.loss(self.ref.outputs[k], out)
                num, den = num + n, den + d
        return num / den if den > 0 else float("nan")


def _reference(model: nn.Module, items: list[Any], layers: dict[str, nn.Module], blocks: nn.ModuleList | None,
               lm: bool, show_progress: bool, keep_outputs: bool = True) -> _Reference:  # fmt: skip
    """One float pass: the outputs (unless ``keep_outputs`` is false: then only their count and sum of squares),
    every block's output (for replay) and the planned layers' input statistics."""
    outputs: list[torch.Tensor] = []
    positions, sumsq = 0, 0.0
    block_outputs: list[list[Any]] | None = [[] for _ in blocks] if blocks is not None else None
    inputs = {name: _LayerInputs() for name in layers}
    gen = torch.Generator().manual_seed(0)
    handles = []

    def on_input(name: str, module: nn.Module) -> Callable[..., None]:
        st = inputs[name]

        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, torch.Tensor):
                raise SlimquantError(f"layer {name}: cannot observe a non-tensor input")
            x = x.detach()
            st.absmax = max(st.absmax, float(x.abs().max())) if x.numel() else st.absmax
            st.sumsq += float(x.double().pow(2).sum())
            st.count += x.numel()
            if isinstance(module, nn.Conv2d):
                if st.rows is None:
                    st.rows = x[:8].float().cpu().clone()
                return
            rows = x.reshape(-1, x.shape[-1]).float().cpu()
            keys = torch.rand(len(rows), generator=gen)
            if st.rows is not None and st.keys is not None:
                keys, rows = torch.cat([st.keys, keys]), torch.cat([st.rows, rows])
            keep = torch.argsort(keys)[:SAMPLE_ROWS]
            st.keys, st.rows = keys[keep], rows[keep].clone()

        return hook

    def on_block(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            block_outputs[i].append(_detach(out))  # type: ignore[index]

        return hook

    logits = False
    try:
        for name, m in layers.items():
            handles.append(m.register_forward_pre_hook(on_input(name, m), with_kwargs=True))
        if blocks is not None:
            handles += [b.register_forward_hook(on_block(i)) for i, b in enumerate(blocks)]
        with torch.no_grad():
            for item in tqdm(items, desc="float reference", disable=not show_progress, unit="item"):
                out, logits = output_tensor(_call(model, item, lm))
                positions += out[..., 0].numel()
                sumsq += float(out.detach().double().pow(2).sum())
                if keep_outputs:
                    outputs.append(out.detach().float().clone())
    finally:
        for h in handles:
            h.remove()
    return _Reference(outputs, block_outputs, inputs, positions, logits, sumsq)


def _sample(logp: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One label per row of ``logp`` drawn from its distribution with the CPU generator ``gen`` (the same draws
    whatever device the model runs on), on ``logp``'s device."""
    return torch.multinomial(logp.detach().float().exp().cpu(), 1, generator=gen).to(logp.device)


def _detach(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, tuple):
        return tuple(_detach(o) for o in out)
    if isinstance(out, list):
        return [_detach(o) for o in out]
    return out


def _fisher(model: nn.Module, items: list[Any], layers: dict[str, nn.Module], loss: str, lm: bool,
            ref: _Reference, show_progress: bool) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per layer, the diagonal the ``fisher`` score weighs squared weight changes with (see the module docstring),
    already divided by what the loss divides by."""
    weights = {name: m.weight for name, m in layers.items()}
    acc = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    gen = torch.Generator().manual_seed(0)
    try:
        for p in params:
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        with torch.enable_grad():
            for item in tqdm(items, desc="fisher", disable=not show_progress, unit="item"):
                out, _ = output_tensor(_call(model, item, lm))
                if loss == "kl":
                    flat = out.float().reshape(-1, out.shape[-1])
                    logp = torch.log_softmax(flat, dim=-1)
                    y = _sample(logp, gen)
                    objective = logp.gather(1, y).sum()
                else:
                    v = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out.device)
                    objective = (out.float() * v).sum()
                grads = torch.autograd.grad(objective, list(weights.values()), allow_unused=True)
                for name, g in zip(weights, grads):
                    if g is not None:
                        acc[name] += g.detach().float().pow(2)
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)
    if loss == "kl":
        return {n: a / (2.0 * ref.positions) for n, a in acc.items()}
    return {n: a / max(ref.sumsq, 1e-30) for n, a in acc.items()}


def fisher_diagonal(model: nn.Module, layers: Mapping[str, nn.Module], calib_data: Any, loss: str = "auto",
                    show_progress: bool = True) -> dict[str, torch.Tensor]:
    """The ``fisher`` proxy's diagonal per layer (``{name: float32 tensor shaped like its weight}``): the predicted
    loss growth of a weight change ``d`` of layer ``name`` is ``(F * d**2).sum()`` (see the module docstring).
    ``loss``: ``"kl"``, ``"mse"`` or ``"auto"`` (``kl`` when the model returns ``.logits``)."""
    if loss not in LOSSES:
        raise SlimquantError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
    items = model_inputs(calib_data)
    lm = is_causal_lm(model)
    ref = _reference(model, items, {}, None, lm, show_progress, keep_outputs=False)
    kind = ("kl" if ref.logits else "mse") if loss == "auto" else loss
    return _fisher(model, items, dict(layers), kind, lm, ref, show_progress)


def kfac_factors(model: nn.Module, layers: Mapping[str, nn.Module], calib_data: Any, loss: str = "auto",
                 show_progress: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per Linear layer, ``(g, H)``: the predicted loss growth of a weight change ``D`` is
    ``(g[:, None] * (D @ H) * D).sum()``, i.e. ``sum_i g_i D_i H D_i^T``, with ``H = sum_t x_t x_t^T`` over the
    layer's calibration inputs and ``g_i`` the mean over positions of the squared output gradient of channel
    ``i`` (labels sampled from the float model, as for ``fisher``), already divided by what the loss divides by.
    The Fisher of the weights factored as (diagonal output Fisher) x (input second moment), K-FAC style: unlike the
    diagonal ``fisher`` it sees input correlations, so it credits weight errors that a calibrated solver such as
    GPTQ pushed into directions the inputs do not excite. Conv2d layers are not covered (use ``fisher_diagonal``).
    """
    if loss not in LOSSES:
        raise SlimquantError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
    lins = {n: m for n, m in layers.items() if isinstance(m, nn.Linear)}
    items = model_inputs(calib_data)
    lm = is_causal_lm(model)
    ref = _reference(model, items, {}, None, lm, show_progress, keep_outputs=False)
    kind = ("kl" if ref.logits else "mse") if loss == "auto" else loss
    g2 = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in lins.items()}
    hess = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float32) for n, m in lins.items()}
    count = {n: 0 for n in lins}
    captured: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(0)

    def hook(name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu()
            hess[name] += x.T @ x
            count[name] += x.shape[0]
            captured[name] = out

        return fn

    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    handles = [m.register_forward_hook(hook(n)) for n, m in lins.items()]
    try:
        for p in params:
            p.requires_grad_(False)
        for m in lins.values():
            m.weight.requires_grad_(True)
        with torch.enable_grad():
            for item in tqdm(items, desc="kfac", disable=not show_progress, unit="item"):
                captured.clear()
                out, _ = output_tensor(_call(model, item, lm))
                if kind == "kl":
                    logp = torch.log_softmax(out.float().reshape(-1, out.shape[-1]), dim=-1)
                    y = _sample(logp, gen)
                    objective = logp.gather(1, y).sum()
                else:
                    v = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out.device)
                    objective = (out.float() * v).sum()
                names = [n for n in lins if n in captured]
                grads = torch.autograd.grad(objective, [captured[n] for n in names], allow_unused=True)
                for n, g in zip(names, grads):
                    if g is not None:
                        g2[n] += g.detach().reshape(-1, g.shape[-1]).double().pow(2).sum(0).cpu()
    finally:
        for h in handles:
            h.remove()
        for p, w in zip(params, was):
            p.requires_grad_(w)
        captured.clear()
    if kind == "kl":
        denom = 2.0 * ref.positions
    else:
        denom = ref.sumsq
    return {n: ((g2[n] / max(count[n], 1)).float() / max(denom, 1e-30), hess[n]) for n in lins}


# -- candidates and caching ---------------------------------------------------------------------------------------
def candidate_label(recipe: Recipe) -> str:
    """A short name of what a recipe does to a layer (weights, inputs, weight algorithm)."""
    w = recipe.weight.describe() if recipe.weight is not None else "float"
    if recipe.input is not None:
        w += f" / in {recipe.input.describe()}{' dynamic' if recipe.input.dynamic else ' static'}"
    steps = "+".join(s.TYPE for s in recipe.steps)
    return f"{w} ({steps})"


def _candidates(candidates: Recipe | Sequence[Recipe] | Mapping[str, Recipe]) -> dict[str, Recipe]:
    if isinstance(candidates, Recipe):
        candidates = [candidates]
    if isinstance(candidates, Mapping):
        out = dict(candidates)
    else:
        out = {}
        for r in candidates:
            if not isinstance(r, Recipe):
                raise SlimquantError(f"candidates are Recipes, got {type(r).__name__}")
            label = candidate_label(r)
            if label in out:
                label += f" #{len(out) + 1}"
            out[label] = r
    if not out:
        raise SlimquantError("no candidate recipe given")
    for label, r in out.items():
        if not isinstance(r, Recipe):
            raise SlimquantError(f"candidate {label!r}: expected a Recipe, got {type(r).__name__}")
        if r.weight is None and not r.overrides:
            raise SlimquantError(f"candidate {label!r} quantizes no weights")
    return out


def _ablation_recipe(recipe: Recipe) -> Recipe:
    """The recipe a single layer is quantized with: the data-free form of its weight step, nothing else."""
    return dataclasses.replace(recipe, steps=(outside_blocks(recipe.weight_step),), kv=None, fa=None, fa_amp=0)


def _fingerprint(model: nn.Module, candidates: Mapping[str, Recipe], items: list[Any], metrics: Sequence[str],
                 loss: str, layers: Sequence[str] | None) -> str:  # fmt: skip
    tensors: list[torch.Tensor] = []
    for item in items:
        values = item.values() if isinstance(item, dict) else item if isinstance(item, (tuple, list)) else [item]
        tensors += [v for v in values if isinstance(v, torch.Tensor)]
    data = {"version": FORMAT_VERSION, "class": type(model).__name__, "weights": weights_digest(model),
            "candidates": {k: r.to_dict() for k, r in candidates.items()}, "calibration": tensor_digest(tensors),
            "metrics": sorted(metrics), "loss": loss, "layers": None if layers is None else sorted(layers)}  # fmt: skip
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    """``$SLIMQUANT_CACHE_DIR/sensitivity``, else ``$XDG_CACHE_HOME/slimquant/sensitivity`` (``~/.cache``)."""
    root = os.environ.get("SLIMQUANT_CACHE_DIR")
    if root:
        return Path(root) / "sensitivity"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slimquant" / "sensitivity"


def cache_file(cache_dir: str | os.PathLike, fingerprint: str) -> Path:
    return Path(cache_dir) / f"sensitivity-{fingerprint}.json"


def _blocks(model: nn.Module) -> tuple[nn.ModuleList | None, str | None]:
    try:
        path = block_list(model)
    except SlimquantError:
        return None, None
    blocks = model.get_submodule(path)
    return (blocks, path) if isinstance(blocks, nn.ModuleList) else (None, None)


# -- the measurement ----------------------------------------------------------------------------------------------
def layer_sensitivity(
    model: nn.Module,
    candidates: Recipe | Sequence[Recipe] | Mapping[str, Recipe],
    calib_data: Any,
    metrics: Sequence[str] = METRICS,
    loss: str | Callable[[torch.Tensor, torch.Tensor], Any] = "auto",
    layers: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
) -> Sensitivity:
    """Measure every planned Linear / Conv2d layer's sensitivity under each candidate recipe (see the module
    docstring for the metrics).

    ``model``: the float model (any ``nn.Module``; Hugging Face causal LMs are run with ``use_cache=False``).
    ``candidates``: a Recipe, a list of them, or ``{label: Recipe}``; each recipe's plan decides the layers
    (``disable_names``, ``disable_last_linear`` and overrides apply). A recipe's smoothing (``model`` steps) is
    applied to ``model`` in place first (outputs unchanged up to rounding); all candidates must then share it.
    ``calib_data``: as for :func:`slimquant.quantize` (``[N, L]`` token windows or an iterable of model inputs).
    ``loss``: ``"kl"`` (outputs are logits over the last dimension), ``"mse"`` (relative squared error),
    ``"auto"`` (``kl`` when the model returns ``.logits``, else ``mse``) or ``callable(float_out, quant_out)``
    returning a number, averaged over items (the ``fisher`` proxy then is not available).
    ``layers``: only these layer names (default: every planned Linear / Conv2d layer).
    ``cache_dir``: keep the result (and, while running, every finished layer) in
    ``<cache_dir>/sensitivity-<fingerprint>.json``; the same inputs again reuse or resume it.
    Memory: the float outputs of every item, every block's output (for replay) and, with ``fisher``, one float32
    tensor per planned weight.
    """
    t0 = time.perf_counter()
    refuse_quantized(model, "sensitivity needs the float model")
    metrics = tuple(dict.fromkeys(metrics))
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise SlimquantError(f"unknown sensitivity metric {bad[0] if bad else '(none given)'}; valid: {', '.join(METRICS)}")
    if not callable(loss) and loss not in LOSSES:
        raise SlimquantError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)} or a callable(float_out, quant_out)")
    cands = _candidates(candidates)
    items = model_inputs(calib_data)
    model_steps = {json.dumps([s.to_dict() for s in r.steps_of("model")], sort_keys=True) for r in cands.values()}
    if len(model_steps) > 1:
        raise SlimquantError("the candidates smooth the model differently (their model steps differ); measure them "
                             "separately")  # fmt: skip
    fingerprint = "" if callable(loss) else _fingerprint(model, cands, items, metrics, str(loss), layers)
    cached: Sensitivity | None = None
    path = cache_file(cache_dir, fingerprint) if cache_dir is not None and fingerprint else None
    if cache_dir is not None and not fingerprint:
        log.warning("a callable loss cannot be fingerprinted: the sensitivity is not cached")
    if path is not None and path.is_file():
        try:
            cached = Sensitivity.load(path)
        except SlimquantError as e:
            log.warning("ignoring the sensitivity cache %s: %s", path, e)
        if cached is not None and cached.fingerprint == fingerprint and cached.complete:
            log.info("sensitivity: reusing %s", path)
            return cached
    first = next(iter(cands.values()))
    if first.steps_of("model"):
        from slimquant.pipeline.model_steps import run_model_steps

        log.info("sensitivity: applying %s to the model first (in place)", ", ".join(s.TYPE for s in first.steps_of("model")))
        run_model_steps(model, first, calib_data, show_progress)

    plans: dict[str, list[LayerPlan]] = {}
    for label, r in cands.items():
        lps = [dataclasses.replace(lp, step=outside_blocks(lp.step)) for lp in plan(model, r)[0]
               if lp.kind in ("linear", "conv2d")]  # fmt: skip
        if layers is not None:
            wanted = set(layers)
            missing = wanted - {lp.name for lp in lps}
            if missing:
                raise SlimquantError(f"layer {sorted(missing)[0]} is not a planned Linear/Conv2d layer of candidate "
                                     f"{label!r}")  # fmt: skip
            lps = [lp for lp in lps if lp.name in wanted]
        plans[label] = lps
    modules = {lp.name: model.get_submodule(lp.name) for lps in plans.values() for lp in lps}
    if not modules:
        raise SlimquantError("no layer to measure: the candidates plan no Linear / Conv2d layer")

    lm = is_causal_lm(model)
    blocks, block_path = _blocks(model)
    t_ref = time.perf_counter()
    ref = _reference(model, items, modules, blocks, lm, show_progress)
    timing = {"reference": time.perf_counter() - t_ref}
    kind = loss if callable(loss) else ("kl" if ref.logits else "mse") if loss == "auto" else loss
    loss_name = getattr(loss, "__name__", "custom") if callable(loss) else str(kind)
    notes: list[str] = []
    if any(r.steps_of("block") or r.weight_step.NEEDS for r in cands.values()):
        notes.append("weights solved with each recipe's data-free weight step (block steps such as AWQ and "
                     "calibrated solvers such as GPTQ run only in the real conversion)")  # fmt: skip
    want = [m for m in metrics]
    if "fisher" in want and callable(loss):
        want.remove("fisher")
        notes.append("fisher not measured: it needs loss 'kl' or 'mse'")
    t_fisher = time.perf_counter()
    fisher = _fisher(model, items, modules, str(kind), lm, ref, show_progress) if "fisher" in want else {}
    if "fisher" in want:
        timing["fisher"] = time.perf_counter() - t_fisher

    result = Sensitivity({k: r.to_dict() for k, r in cands.items()}, loss_name, tuple(want),
                         calibration={"items": len(items), "positions": ref.positions}, fingerprint=fingerprint,
                         notes=notes, complete=False, timing=timing)  # fmt: skip
    done = {(r.layer, r.candidate): r for r in (cached.rows if cached is not None and cached.fingerprint == fingerprint else [])}
    if done:
        log.info("sensitivity: resuming, %d layer score(s) already in %s", len(done), path)
    runner = _Runner(model, items, _Loss(kind), ref, blocks, block_path, lm)
    for label, r in cands.items():
        abl = _ablation_recipe(r)
        lps = plans[label]
        static = [lp for lp in lps if lp.kind == "linear" and lp.input is not None and not lp.input.dynamic]
        # static input ranges: one calibration pass per candidate, not one per layer
        ranges = calibrate_input_ranges(model, abl, static, calib_data, show_progress) if static else None
        for lp in tqdm(lps, desc=f"sensitivity {label}", disable=not show_progress, unit="layer"):
            if (lp.name, label) in done:
                result.rows.append(done[(lp.name, label)])
                continue
            result.rows.append(_measure(model, abl, lp, label, want, ranges, runner, ref, fisher, calib_data, timing))
            if path is not None:
                write_file_atomic(path, json.dumps(result.to_dict()) + "\n")
    result.complete = True
    result.seconds = time.perf_counter() - t0 + (cached.seconds if cached is not None and done else 0.0)
    if path is not None:
        write_file_atomic(path, json.dumps(result.to_dict()) + "\n")
    return result


def _measure(model: nn.Module, recipe: Recipe, lp: LayerPlan, label: str, want: Sequence[str],
             ranges: dict[str, dict[str, Any]] | None, runner: _Runner, ref: _Reference,
             fisher: dict[str, torch.Tensor], calib_data: Any, timing: dict[str, float]) -> LayerScore:  # fmt: skip
    """One layer's scores; the time each metric took is added to ``timing`` (``quantize``: swapping the layer in)."""
    float_mod = model.get_submodule(lp.name)
    clock = [time.perf_counter()]

    def lap(what: str) -> None:
        now = time.perf_counter()
        timing[what] = timing.get(what, 0.0) + now - clock[0]
        clock[0] = now

    w = float_mod.weight.detach()
    scores: dict[str, float] = {}
    st = ref.inputs[lp.name]
    if "act_range" in want:
        rms = math.sqrt(st.sumsq / st.count) if st.count else 0.0
        scores["act_range"] = st.absmax / rms if rms > 0 else float("nan")
    with quantized(model, recipe, layers=[lp], input_ranges=ranges,
                   calib_data=calib_data if ranges is None else None) as _:  # fmt: skip
        qmod = model.get_submodule(lp.name)
        delta = qmod.dequantized_weight(torch.float32).reshape(w.shape) - w.float()
        lap("quantize")
        if "weight_error" in want:
            scores["weight_error"] = float(delta.double().pow(2).sum() / w.double().pow(2).sum().clamp_min(1e-300))
        if "fisher" in want:
            scores["fisher"] = float((fisher[lp.name].double() * delta.double().pow(2)).sum())
        lap("weight_error+fisher")
        if "output_mse" in want:
            if st.rows is None or not len(st.rows):
                scores["output_mse"] = float("nan")
            else:
                with torch.no_grad():
                    x = st.rows.to(w.device, w.dtype)
                    yf, yq = float_mod(x).double(), qmod(x).double()
                scores["output_mse"] = float((yq - yf).pow(2).sum() / yf.pow(2).sum().clamp_min(1e-300))
            lap("output_mse")
        if EXACT in want:
            scores[EXACT] = runner.score(lp.name)
            lap(EXACT)
    return LayerScore(lp.name, lp.kind, label, int(w.numel()), scores)
