"""The AutoML bit-width search: one option (weight bits, group size, input bits) per layer, found by an agent
(:mod:`slimquant.search.agents`) that is rewarded with the measured accuracy, size, FLOPs and latency.

Each evaluated configuration is assembled from per-layer quantized modules computed once
(:class:`slimquant.search.space.Assembly`), so an evaluation costs the user's eval function (and, when latency is
an objective, a timed forward on this machine with slimquant's real kernels), not a quantization.

Objectives (``SearchConfig.objective_keys``; ``accuracy`` is required):

- ``accuracy``: the user's metric of the model (``higher_is_better``, else lower, e.g. perplexity or KL).
- ``compress_ratio``: percent of the searchable layers' float32 bytes saved (0 for float; int8 weights with
  float32 scales save about 75; the seed's ``compress_threshold: 40`` asks for at least 40).
- ``flops``: the searchable layers' bit-weighted GFLOPs on the example input: ``2 * MACs * w_bits * a_bits /
  (32 * 32)`` per layer (BOPs / 1024, HAQ's compute measure; float layers count 32 x 32).
- ``latency``: milliseconds, median of ``repeat_times`` runs of the example input on this machine: for causal
  LMs a prefill of the input plus ``decode_tokens`` greedy decode steps on its KV cache, else one forward pass.

Reward (higher is better; what the agents maximize), with ``acc`` the accuracy's change relative to the float
model (``(metric - float) / |float|``, sign-flipped for lower-is-better metrics; ``/ 1`` when float is 0):

- ``acc_first``: ``acc`` minus the relative violation of each latency / compress threshold. A
  ``compress_threshold`` is enforced as HAQ does (every proposal is lowered to fit the size budget, the layers
  that add the least predicted loss per byte first), so the reward then is accuracy at that size.
- ``compress_first``: ``m`` (the ``metric_to_reward`` gain: compress_ratio / 100, or the FLOPs or latency saved
  relative to float; below 1, and negative for a configuration slower than float) when every threshold is met, else ``m - 1 -`` the relative violations;
  needs ``acc_threshold``.
- ``custom_reward: true``: ``acc + metric_ratio * m`` (thresholds still decide feasibility and the best).

Thresholds: ``acc_threshold`` (the metric's value, absolute), ``latency_threshold`` (ms; latency is measured when
it is given even if it is not an objective), ``compress_threshold`` (percent saved). The best configuration is the highest reward among those meeting every threshold given; when
none does, the highest reward, and :attr:`SearchResult.unmet` says which thresholds no configuration met.
``stop_early`` ends the search at the first configuration meeting every threshold.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from slimquant.errors import SlimquantError
from slimquant.formats.atomic import write_file_atomic
from slimquant.pipeline.calibrate import model_inputs
from slimquant.pipeline.convert import refuse_quantized
from slimquant.pipeline.workdir import tensor_digest, weights_digest
from slimquant.search.agents import AGENTS, FEATURES, Problem, agent_name, make_agent
from slimquant.search.pareto import pareto_front
from slimquant.search.sensitivity import _call, fisher_diagonal, is_causal_lm, kfac_factors
from slimquant.search.space import Assembly, Option, bit_options
from slimquant.search.tune import _time_limit
from slimquant.types.qtype import qtype as lookup_qtype
from slimquant.types.spec import Recipe

log = logging.getLogger(__name__)

OBJECTIVES = ("accuracy", "compress_ratio", "flops", "latency")
MAXIMIZE = {"accuracy": True, "compress_ratio": True, "flops": False, "latency": False}
REWARD_TYPES = ("acc_first", "compress_first")
SENSITIVITIES = ("auto", "fisher", "kfac")
HISTORY = "history.jsonl"
FISHER_ITEMS = 8
FORMAT_VERSION = 2


@dataclass(frozen=True)
class SearchConfig:
    """The seed's ``nas.search_algorithm`` (and evaluator) settings; see the module docstring.

    ``agent``: ``rl`` (DDPG; the seed's ``MsQuantRL``), ``evolutionary``, ``greedy`` or ``random``.
    ``max_episode``: configurations evaluated (a proposal already evaluated is answered from the history and not
    counted). ``num_warmup``: random episodes first (``rl``: they fill the replay memory). ``timeout``: seconds
    one evaluation may take. ``sensitivity``: the predicted loss per (layer, option) the agents' state, the greedy
    path and the size budget use: ``fisher`` (the diagonal Fisher of the weights), ``kfac`` (output-gradient
    Fisher x input second moment for Linear layers, which sees what a calibrated solver such as GPTQ
    compensates; Conv2d layers keep ``fisher``), ``auto`` (``kfac`` when the base weight step is calibrated, else
    ``fisher``); from the first 8 calibration items. On a tiny Llama, ``fisher`` over-predicts GPTQ layers' KL
    2.6-9x while ``kfac`` stays within 0.3-1.03x (RTN: both calibrated, Spearman 0.98-1.0 vs the exact KL)."""

    agent: str = "rl"
    max_episode: int = 100
    num_warmup: int = 10
    objective_keys: Sequence[str] = ("accuracy", "compress_ratio")
    reward_type: str = "acc_first"
    custom_reward: bool = False
    metric_to_reward: str = "compress_ratio"
    metric_ratio: float = 0.5
    stop_early: bool = False
    acc_threshold: float | None = None
    latency_threshold: float | None = None
    compress_threshold: float | None = None
    higher_is_better: bool = True
    seed: int = 0
    repeat_times: int = 3
    decode_tokens: int = 8
    timeout: float | None = None
    sensitivity: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "agent", agent_name(self.agent))
        if self.sensitivity not in SENSITIVITIES:
            raise SlimquantError(f"unknown sensitivity {self.sensitivity!r}; valid: {', '.join(SENSITIVITIES)}")
        if isinstance(self.objective_keys, str) or not isinstance(self.objective_keys, Sequence):
            raise SlimquantError("objective_keys is a list, e.g. [accuracy, compress_ratio]")
        keys = tuple(dict.fromkeys(str(k) for k in self.objective_keys))
        object.__setattr__(self, "objective_keys", keys)
        bad = [k for k in keys if k not in OBJECTIVES]
        if bad:
            raise SlimquantError(f"unknown objective_keys entry {bad[0]!r}; valid: {', '.join(OBJECTIVES)}")
        if "accuracy" not in keys:
            raise SlimquantError("objective_keys must include accuracy")
        for name in ("max_episode", "repeat_times", "decode_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "decode_tokens" else 1):
                raise SlimquantError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(self.num_warmup, bool) or not isinstance(self.num_warmup, int) or self.num_warmup < 0:
            raise SlimquantError(f"num_warmup must be an integer >= 0, got {self.num_warmup!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SlimquantError(f"seed must be an integer, got {self.seed!r}")
        if self.reward_type not in REWARD_TYPES:
            raise SlimquantError(f"unknown reward_type {self.reward_type!r}; valid: {', '.join(REWARD_TYPES)}")
        if self.metric_to_reward not in OBJECTIVES[1:]:
            raise SlimquantError(f"metric_to_reward {self.metric_to_reward!r}; valid: {', '.join(OBJECTIVES[1:])}")
        uses_metric = self.custom_reward or self.reward_type == "compress_first"
        if uses_metric and self.metric_to_reward not in keys:
            raise SlimquantError(f"metric_to_reward {self.metric_to_reward} must be one of objective_keys ({', '.join(keys)})")
        for name in ("custom_reward", "stop_early", "higher_is_better"):
            if not isinstance(getattr(self, name), bool):
                raise SlimquantError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("metric_ratio", "acc_threshold", "latency_threshold", "compress_threshold", "timeout"):
            v = getattr(self, name)
            if v is None and name != "metric_ratio":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SlimquantError(f"{name} must be a number, got {v!r}")
        if self.metric_ratio < 0:
            raise SlimquantError(f"metric_ratio must be >= 0, got {self.metric_ratio}")
        if self.latency_threshold is not None and self.latency_threshold <= 0:
            raise SlimquantError("latency_threshold is in milliseconds and must be > 0")
        if self.compress_threshold is not None and not 0 <= self.compress_threshold < 100:
            raise SlimquantError(f"compress_threshold is the percent of float32 bytes saved, in [0, 100); got "
                                 f"{self.compress_threshold}")  # fmt: skip
        if self.timeout is not None and self.timeout <= 0:
            raise SlimquantError("timeout must be a positive number of seconds")
        if self.reward_type == "compress_first" and self.acc_threshold is None and not self.custom_reward:
            raise SlimquantError("reward_type compress_first needs acc_threshold: the accuracy compression may not "
                                 "go below (or set custom_reward)")  # fmt: skip

    @property
    def measures_latency(self) -> bool:
        """Latency is measured when it is an objective or has a threshold (the seed sets ``latency_threshold``
        with objective_keys [accuracy, compress_ratio, flops]: the threshold is then a constraint only)."""
        return "latency" in self.objective_keys or self.latency_threshold is not None

    @property
    def thresholds(self) -> dict[str, float]:
        out = {"accuracy": self.acc_threshold, "latency": self.latency_threshold, "compress_ratio": self.compress_threshold}
        return {k: float(v) for k, v in out.items() if v is not None}

    def fingerprint_fields(self) -> dict[str, Any]:
        """What a resumed search must share with the first run (not max_episode, stop_early or timeout)."""
        d = dataclasses.asdict(self)
        for k in ("max_episode", "stop_early", "timeout"):
            d.pop(k)
        d["objective_keys"] = list(self.objective_keys)
        return d


@dataclass
class Evaluation:
    """One evaluated configuration (``choice``: layer -> option label; ``accuracy`` None when it failed)."""

    index: int
    agent: str
    choice: dict[str, str]
    accuracy: float | None
    compress_ratio: float
    size_bytes: int
    flops: float
    latency: float | None = None
    prefill_ms: float | None = None
    decode_ms: float | None = None
    reward: float | None = None
    feasible: bool = False
    error: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Evaluation":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def objectives(self, keys: Sequence[str]) -> dict[str, float]:
        out = {}
        for k in keys:
            v = getattr(self, k)
            out[k] = float("nan") if v is None else float(v)
        return out


@dataclass
class SearchResult:
    """What :func:`bit_search` found. ``best``: the chosen configuration (None if every evaluation failed);
    ``unmet``: the thresholds no evaluated configuration met (empty when the best meets all);
    ``history``: every evaluation in order; ``baseline``: the float model's."""

    config: SearchConfig
    baseline: Evaluation
    history: list[Evaluation]
    best: Evaluation | None
    unmet: list[str]
    options: list[str]
    layers: list[str]
    approximate: bool
    seconds: float = 0.0
    space: Assembly | None = field(default=None, repr=False)

    @property
    def maximize(self) -> dict[str, bool]:
        return {k: MAXIMIZE[k] if k != "accuracy" else self.config.higher_is_better for k in self.config.objective_keys}

    def pareto(self) -> list[Evaluation]:
        """The evaluated configurations no other one beats in every objective, by compress ratio."""
        ok = [e for e in self.history if e.accuracy is not None]
        front = [ok[i] for i in pareto_front([e.objectives(self.config.objective_keys) for e in ok], self.maximize)]
        return sorted(front, key=lambda e: e.compress_ratio)

    @property
    def recipe(self) -> Recipe | None:
        """The best configuration as a recipe (one override per layer), for ``slimquant quantize --recipe``."""
        if self.best is None or self.space is None:
            return None
        return self.space.recipe(self.best.choice)

    def bits(self) -> dict[str, str]:
        return dict(self.best.choice) if self.best is not None else {}

    def _row(self, e: Evaluation, label: str) -> str:
        acc = "failed" if e.accuracy is None else f"{e.accuracy + 0.0:.6g}"
        lat = "" if e.latency is None else f"{e.latency:.1f}"
        counts = {o: sum(1 for v in e.choice.values() if v == o) for o in self.options}
        mix = " ".join(f"{o}:{n}" for o, n in counts.items() if n)
        reward = "" if e.reward is None else f"{e.reward:.4g}"
        return (f"| {label} | {acc} | {e.compress_ratio:.1f} | {e.size_bytes / 2**20:.2f} | {e.flops:.4g} | {lat} | "
                f"{reward} | {'yes' if e.feasible else 'no'} | {mix} |")  # fmt: skip

    def to_markdown(self) -> str:
        c = self.config
        head = ("| configuration | accuracy | compress % | MiB | GFLOPs (bit-weighted) | latency ms | reward | meets "
                "thresholds | options (layers) |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
        thr = ", ".join(f"{k} {'>=' if MAXIMIZE.get(k, True) and (k != 'accuracy' or c.higher_is_better) else '<='} {v:g}"
                        for k, v in c.thresholds.items()) or "none"  # fmt: skip
        lines = [f"# Bit-width search ({c.agent}, {len(self.history)} evaluations, {self.seconds:.0f} s)", "",
                 f"Objectives: {', '.join(c.objective_keys)}; reward {c.reward_type}"
                 f"{' (custom: accuracy + ' + str(c.metric_ratio) + ' x ' + c.metric_to_reward + ')' if c.custom_reward else ''}"
                 f"; thresholds: {thr}; accuracy is {'higher' if c.higher_is_better else 'lower'}-is-better.",
                 f"Options per layer: {', '.join(self.options)}; {len(self.layers)} searchable layers."]  # fmt: skip
        if self.approximate:
            lines.append("Calibrated weight step: each option's layers come from a run of that option over the whole "
                         "model; the saved checkpoint is quantized for real and may differ slightly.")  # fmt: skip
        if self.unmet:
            lines += ["", "**Not met by any configuration:** " + "; ".join(self.unmet)]
        lines += ["", "## Best", "", head, self._row(self.baseline, "float")]
        if self.best is not None:
            lines.append(self._row(self.best, f"#{self.best.index + 1} (best)"))
        lines += ["", "## Pareto front", "", head, self._row(self.baseline, "float")]
        lines += [self._row(e, f"#{e.index + 1}") for e in self.pareto()]
        failed = [e for e in self.history if e.accuracy is None]
        if failed:
            lines += ["", "## Failed evaluations", ""] + [f"- #{e.index + 1}: {e.error}" for e in failed]
        return "\n".join(lines) + "\n"

    def bits_markdown(self) -> str:
        if self.best is None or self.space is None:
            return "No configuration was evaluated successfully.\n"
        lines = ["| layer | option | bytes |", "|---|---|---|"]
        for name, label in self.best.choice.items():
            lines.append(f"| {name} | {label} | {self.space.layer_bytes(name, label)} |")
        return "\n".join(lines) + "\n"

    def png(self) -> bytes:
        """Accuracy against size (compress %) and, when measured, latency and FLOPs: every evaluation, the Pareto
        front, the best and the float model."""
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        axes_keys = [k for k in ("compress_ratio", "latency", "flops") if k in self.config.objective_keys]
        axes_keys = axes_keys or ["compress_ratio"]
        fig, axes = plt.subplots(1, len(axes_keys), figsize=(5.5 * len(axes_keys), 4.2), squeeze=False)
        ok = [e for e in self.history if e.accuracy is not None]
        front = self.pareto()
        labels = {"compress_ratio": "float32 bytes saved (%)", "latency": "latency (ms)", "flops": "bit-weighted GFLOPs"}
        for ax, key in zip(axes[0], axes_keys):
            xs = [getattr(e, key) for e in ok]
            ax.scatter(xs, [e.accuracy for e in ok], s=12, c="0.6", label="evaluated")
            ax.scatter([getattr(e, key) for e in front], [e.accuracy for e in front], s=28, facecolors="none",
                       edgecolors="tab:red", label="Pareto front (all objectives)")  # fmt: skip
            two = {"accuracy": self.maximize["accuracy"], key: MAXIMIZE[key]}
            pts = [e for e in ok if getattr(e, key) is not None]
            f2 = sorted((pts[i] for i in pareto_front([e.objectives(list(two)) for e in pts], two)),
                        key=lambda e: getattr(e, key))  # fmt: skip
            ax.plot([getattr(e, key) for e in f2], [e.accuracy for e in f2], "-", c="tab:red", lw=1.2,
                    label="front of these two")  # fmt: skip
            if self.best is not None and self.best.accuracy is not None:
                ax.scatter([getattr(self.best, key)], [self.best.accuracy], marker="*", s=180, c="tab:blue",
                           label="best", zorder=5)  # fmt: skip
            if self.baseline.accuracy is not None and getattr(self.baseline, key) is not None:
                ax.scatter([getattr(self.baseline, key)], [self.baseline.accuracy], marker="s", c="k", label="float")
            ax.set_xlabel(labels[key])
            ax.set_ylabel("accuracy metric" + ("" if self.config.higher_is_better else " (lower is better)"))
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"bit-width search ({self.config.agent}): {len(ok)} configurations")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        return buf.getvalue()

    def save(self, directory: str | os.PathLike) -> list[Path]:
        """``pareto.md``, ``pareto.png`` and ``bits.md`` (the chosen option per layer) in ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        out = [d / "pareto.md", d / "pareto.png", d / "bits.md"]
        write_file_atomic(out[0], self.to_markdown())
        write_file_atomic(out[1], self.png())
        write_file_atomic(out[2], self.bits_markdown())
        return out


# -- measurements -----------------------------------------------------------------------------------------------
def layer_macs(model: nn.Module, layers: Mapping[str, nn.Module], example: Any) -> dict[str, int]:
    """Multiply-accumulates of each Linear / Conv2d layer on one forward of ``example`` (forward hooks)."""
    macs: dict[str, int] = {}
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def fn(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if isinstance(m, nn.Conv2d):
                per = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
                macs[name] = macs.get(name, 0) + out.numel() * per
            else:
                macs[name] = macs.get(name, 0) + (out.numel() // out.shape[-1]) * m.in_features * m.out_features

        return fn

    try:
        handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
        with torch.no_grad():
            _call(model, example, is_causal_lm(model))
    finally:
        for h in handles:
            h.remove()
    return {n: macs.get(n, 0) for n in layers}


def measure_latency(model: nn.Module, example: Any, repeat: int = 3, decode_tokens: int = 8) -> tuple[float, float, float]:
    """(total, prefill, decode) milliseconds, medians of ``repeat`` runs after one warm-up: for causal LMs a
    prefill of ``example`` (its ``input_ids``) and ``decode_tokens`` greedy steps on the KV cache; otherwise one
    forward pass (decode 0). ``example`` is moved to the model's device; CUDA is synchronized around each timing."""
    lm = is_causal_lm(model) and isinstance(example, Mapping) and "input_ids" in example
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if lm:
        example = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in example.items()}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:  # transformers >= 5.2x names the KV cache argument ``cache``; earlier versions ``past_key_values``
        kv_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        kv_arg = "past_key_values"

    def _kv(out: Any) -> Any:
        kv = getattr(out, "cache", None)
        return kv if kv is not None else out.past_key_values

    def once() -> tuple[float, float]:
        with torch.inference_mode():
            sync()
            t0 = time.perf_counter()
            if not lm:
                _call(model, example, False)
                sync()
                return (time.perf_counter() - t0) * 1e3, 0.0
            out = model(**example, use_cache=True)
            sync()
            t1 = time.perf_counter()
            past, tok = _kv(out), out.logits[:, -1:].argmax(-1)
            for _ in range(decode_tokens):
                out = model(input_ids=tok, use_cache=True, **{kv_arg: past})
                past, tok = _kv(out), out.logits[:, -1:].argmax(-1)
            sync()
            t2 = time.perf_counter()
            return (t1 - t0) * 1e3, (t2 - t1) * 1e3

    once()
    runs = [once() for _ in range(repeat)]
    pre = statistics.median(r[0] for r in runs)
    dec = statistics.median(r[1] for r in runs)
    return statistics.median(r[0] + r[1] for r in runs), pre, dec


def _bits_of(option: Option) -> tuple[int, int]:
    w = 32 if option.weight is None else lookup_qtype(option.weight.qtype).bits
    a = 32 if option.input is None else lookup_qtype(option.input.qtype).bits
    return w, a


def _metric(value: Any) -> float:
    if isinstance(value, Mapping):  # {"accuracy": ...} or a one-entry dict
        if "accuracy" in value:
            value = value["accuracy"]
        elif len(value) == 1:
            value = next(iter(value.values()))
        else:
            raise SlimquantError(f"the eval function returned a dict with keys {sorted(map(str, value))}: return a number, "
                                 "or a dict with an 'accuracy' entry")  # fmt: skip
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SlimquantError(f"the eval function returned {type(value).__name__} {value!r}, not a number") from None
    if not math.isfinite(v):
        raise SlimquantError(f"the eval function returned {v}")
    return v


class _Scorer:
    """Reward and feasibility of an evaluation (see the module docstring)."""

    def __init__(self, config: SearchConfig, baseline: Evaluation) -> None:
        self.c, self.base = config, baseline
        acc = baseline.accuracy if baseline.accuracy is not None else 0.0
        self.scale = abs(acc) if abs(acc) > 1e-12 else 1.0
        self.sign = 1.0 if config.higher_is_better else -1.0

    def gain(self, e: Evaluation, key: str) -> float:
        if key == "compress_ratio":
            return e.compress_ratio / 100.0
        ref, v = getattr(self.base, key), getattr(e, key)
        if v is None or not ref:
            return 0.0
        return 1.0 - v / ref

    def violations(self, e: Evaluation) -> dict[str, float]:
        """Threshold -> relative amount it is missed by (only the missed ones)."""
        out: dict[str, float] = {}
        c = self.c
        if c.acc_threshold is not None and e.accuracy is not None:
            short = self.sign * (c.acc_threshold - e.accuracy)
            if short > 0:
                out["accuracy"] = short / self.scale
        if c.latency_threshold is not None and e.latency is not None and e.latency > c.latency_threshold:
            out["latency"] = e.latency / c.latency_threshold - 1.0
        if c.compress_threshold is not None and e.compress_ratio < c.compress_threshold - 1e-9:
            out["compress_ratio"] = (c.compress_threshold - e.compress_ratio) / 100.0
        return out

    def score(self, e: Evaluation) -> None:
        if e.accuracy is None:
            e.reward, e.feasible = None, False
            return
        viol = self.violations(e)
        e.feasible = not viol
        acc = self.sign * (e.accuracy - self.base.accuracy) / self.scale  # type: ignore[operator]
        c = self.c
        if c.custom_reward:
            e.reward = acc + c.metric_ratio * self.gain(e, c.metric_to_reward)
        elif c.reward_type == "acc_first":
            e.reward = acc - sum(v for k, v in viol.items() if k != "accuracy")
        else:
            e.reward = self.gain(e, c.metric_to_reward) - (1.0 + sum(viol.values()) if viol else 0.0)


def _neighbour(choice: Sequence[int], k: int, rng: random.Random, steps: int) -> list[int]:
    """``choice`` with ``steps`` random layers moved one option up or down."""
    out = list(choice)
    for _ in range(steps):
        i = rng.randrange(len(out))
        out[i] = min(k - 1, max(0, out[i] + rng.choice((-1, 1))))
    return out


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _fingerprint(model: nn.Module, space: Assembly, config: SearchConfig, calib: list[Any] | None) -> dict[str, str]:
    """What a resumed search must share with the first run, one digest per part (so a mismatch names the part)."""
    tensors: list[torch.Tensor] = []
    for item in calib or []:
        values = item.values() if isinstance(item, dict) else item if isinstance(item, (tuple, list)) else [item]
        tensors += [v for v in values if isinstance(v, torch.Tensor)]
    parts = {"format version": FORMAT_VERSION, "model class": type(model).__name__, "model weights": weights_digest(model),
             "options": {k: dataclasses.asdict(o) for k, o in space.options.items()}, "base recipe": space.base.to_dict(),
             "layers": [lp.name for lp in space.layers], "calibration data": tensor_digest(tensors)}  # fmt: skip
    fields = config.fingerprint_fields()
    out = {k: _digest(v) for k, v in parts.items()}
    out.update({f"search setting {k}": _digest(v) for k, v in fields.items()})
    return out


def _read_history(path: Path, fingerprint: dict[str, str]) -> tuple[dict[str, Any] | None, list[Evaluation]]:
    """The head and the complete evaluations of ``path``; a half-written last line (a killed write) is cut off the
    file so that the next evaluation is appended on a line of its own."""
    if not path.is_file():
        return None, []
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    try:
        head = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError as e:
        raise SlimquantError(f"{path}: line 1 is not JSON ({e}); remove it to start over") from None
    theirs = head.get("parts") if isinstance(head, dict) else None
    if not isinstance(theirs, dict) or theirs != fingerprint:
        if isinstance(theirs, dict):
            differ = sorted(k for k in set(theirs) | set(fingerprint) if theirs.get(k) != fingerprint.get(k))
            what = ", ".join(differ)
        else:
            what = "it was written by another version of slimquant"
        raise SlimquantError(f"{path} holds the history of another search ({what} differ); choose another task "
                             "directory, restore those settings, or remove the file to start over")  # fmt: skip
    out, good = [], len(lines[0])
    for i, ln in enumerate(lines[1:], 2):
        if not ln.strip():
            good += len(ln)
            continue
        try:
            if not ln.endswith("\n"):
                raise ValueError("no line end")
            out.append(Evaluation.from_dict(json.loads(ln)))
        except (json.JSONDecodeError, TypeError, ValueError):
            log.warning("%s: line %d is incomplete (a killed write); it is cut off and evaluated again", path, i)
            write_file_atomic(path, text[:good])
            break
        good += len(ln)
    return head, out


def _append(path: Path, record: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _problem(space: Assembly, order: list[str], model: nn.Module, calib: list[Any] | None, macs: dict[str, int],
             show_progress: bool, sensitivity: str = "fisher") -> Problem:  # fmt: skip
    """Bytes, predicted loss (``sensitivity``) and state features of every (layer, option)."""
    names = [lp.name for lp in space.layers]
    fisher = None
    kfac: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if calib is not None:
        if sensitivity == "kfac" or (sensitivity == "auto" and space.approximate):
            kfac = kfac_factors(model, space.floats, calib[:FISHER_ITEMS], show_progress=show_progress)
        rest = {n: m for n, m in space.floats.items() if n not in kfac}
        fisher = fisher_diagonal(model, rest, calib[:FISHER_ITEMS], show_progress=show_progress) if rest else {}
    else:
        log.info("no calibration data: layers are ranked by their relative weight error instead of the Fisher proxy")
    cost: list[list[float]] = []
    nbytes: list[list[float]] = []
    for n in names:
        w = space.floats[n].weight.detach().float()
        row_c, row_b = [], []
        for label in order:
            row_b.append(float(space.layer_bytes(n, label)))
            if space.options[label].is_float:
                row_c.append(0.0)
                continue
            d = space.modules[(n, label)].dequantized_weight(torch.float32).reshape(w.shape) - w
            if n in kfac:
                g, h = kfac[n]  # on the CPU
                dc = d.cpu()
                row_c.append(float((g[:, None] * (dc @ h) * dc).sum()))
            elif fisher is not None:
                row_c.append(float((fisher[n].double() * d.double().pow(2)).sum()))
            else:
                row_c.append(float(d.double().pow(2).sum() / w.double().pow(2).sum().clamp_min(1e-300)))
        cost.append(row_c)
        nbytes.append(row_b)
    raw: list[list[float]] = []
    for i, n in enumerate(names):
        m = space.floats[n]
        conv = isinstance(m, nn.Conv2d)
        fin = m.in_channels if conv else m.in_features
        fout = m.out_channels if conv else m.out_features
        kernel = m.kernel_size[0] * m.kernel_size[1] if conv else 1
        sens = max(cost[i][0], 0.0)
        raw.append([i / max(len(names) - 1, 1), 0.0 if conv else 1.0, math.log(fin), math.log(fout), float(kernel),
                    math.log(m.weight.numel()), math.log1p(macs.get(n, 0)), math.log1p(sens * 1e6)])  # fmt: skip
    assert len(raw[0]) == len(FEATURES)
    feats = [list(r) for r in raw]
    for j in range(len(FEATURES)):
        col = [r[j] for r in raw]
        lo, hi = min(col), max(col)
        for r, v in zip(feats, col):
            r[j] = (v - lo) / (hi - lo) if hi > lo else 0.0
    return Problem(names, order, nbytes, cost, feats)


def bit_search(
    model: nn.Module,
    eval_fn: Callable[[nn.Module], Any],
    options: Sequence[int] | Sequence[Option] = (4, 8, 16),
    calib_data: Any = None,
    config: SearchConfig | None = None,
    base: Recipe | None = None,
    layers: Sequence[str] | None = None,
    group_size: int | None = None,
    example_input: Any = None,
    work_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    on_evaluation: Callable[[Evaluation], None] | None = None,
    space: Assembly | None = None,
) -> SearchResult:
    """Search one option per layer of ``model`` (which stays float) for the best reward (see the module docstring).

    ``eval_fn(model) -> number``: the accuracy metric (``config.higher_is_better``); a call that raises, returns
    NaN or exceeds ``config.timeout`` is recorded as a failed evaluation and the search goes on.
    ``options``: the seed's ``bit_candidates`` (``[4, 8, 16]``; 16 / 32 = float, ``group_size`` for < 8 bits)
    or :class:`~slimquant.search.space.Option` objects (e.g. with input quantization). ``base``: the recipe whose
    plan and weight step apply (RTN by default; GPTQ solves each option over the whole model once).
    ``calib_data``: as for :func:`slimquant.quantize`; it also gives the Fisher sensitivity the agents' state and
    the size budget use, and (its first item, unless ``example_input``) the input FLOPs and latency are measured
    on. ``work_dir``: ``history.jsonl`` (every evaluation, appended as it finishes; a rerun resumes from it
    without repeating a successful evaluation: the agent is replayed on the recorded rewards, exactly when
    ``max_episode`` is unchanged (the rl agent's noise schedule depends on it); a failed evaluation stays on record
    and is tried again when its configuration is proposed again; a half-written last line is cut off). ``space``: an :class:`~slimquant.search.space.Assembly` of ``model`` built
    before (e.g. shared by several searches); ``options``, ``base``, ``layers`` and ``group_size`` are then its.
    """
    t_start = time.perf_counter()
    config = config or SearchConfig()
    if not isinstance(config, SearchConfig):
        raise SlimquantError(f"config must be a SearchConfig, got {type(config).__name__}")
    if not callable(eval_fn):
        raise SlimquantError("eval_fn must be a function of the model returning its accuracy metric")
    refuse_quantized(model, "the bit-width search needs the float model")
    if space is not None:
        if not isinstance(space, Assembly) or space.model is not model:
            raise SlimquantError("space must be an Assembly built on this model")
        option_list = list(space.options.values())
    else:
        opts = list(options)
        if not opts:
            raise SlimquantError("no options to search")
        if all(isinstance(o, Option) for o in opts):
            option_list = opts  # type: ignore[assignment]
        elif any(isinstance(o, Option) for o in opts):
            raise SlimquantError("options are either bit widths or Option objects, not both")
        else:
            option_list = bit_options(opts, group_size)  # type: ignore[arg-type]
    calib = model_inputs(calib_data) if calib_data is not None else None
    example = example_input if example_input is not None else (calib[0] if calib else None)
    wants_latency = config.measures_latency
    if example is None and (wants_latency or "flops" in config.objective_keys):
        raise SlimquantError("latency and flops are measured on an input: give calib_data or example_input")

    if space is None:
        space = Assembly(model, option_list, base=base, layers=layers, calib_data=calib_data, show_progress=show_progress)
    names = [lp.name for lp in space.layers]
    order = sorted(space.options, key=lambda k: (space.options[k].is_float,
                                                 sum(space.layer_bytes(n, k) for n in names)))  # fmt: skip
    macs = layer_macs(model, space.floats, example) if example is not None else {}
    problem = _problem(space, order, model, calib, macs, show_progress, config.sensitivity)
    wa = {k: _bits_of(space.options[k]) for k in order}
    float_bytes = space.float_bytes()
    searchable = {id(t): t for m in space.floats.values() for t in m.parameters()}
    float_actual = sum(t.numel() * t.element_size() for t in searchable.values())  # the model as it is (fp16: 2 B)
    rest_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()) if id(t) not in searchable)
    float_flops = sum(2 * macs.get(n, 0) for n in names) / 1e9
    smallest = problem.size([0] * problem.layers)
    if config.compress_threshold is not None and smallest > float_bytes * (1 - config.compress_threshold / 100.0):
        best_ratio = 100.0 * (1 - smallest / float_bytes)
        raise SlimquantError(f"compress_threshold {config.compress_threshold:g} is out of reach: the smallest "
                             f"configuration (every layer {order[0]}) saves {best_ratio:.1f}% of the float32 bytes")  # fmt: skip

    def describe(choice: list[int], index: int) -> Evaluation:
        labels = {n: order[c] for n, c in zip(names, choice)}
        size = int(problem.size(choice))
        flops = sum(2 * macs.get(n, 0) * wa[lab][0] * wa[lab][1] / 1024 for n, lab in labels.items()) / 1e9
        return Evaluation(index, config.agent, labels, None, 100.0 * (1 - size / float_bytes), size + rest_bytes, flops)

    def measure(e: Evaluation, m: nn.Module) -> None:
        t0 = time.perf_counter()
        what = "accuracy"
        try:
            with _time_limit(config.timeout):
                e.accuracy = _metric(eval_fn(m))
                if wants_latency:
                    what = "latency"
                    e.latency, e.prefill_ms, e.decode_ms = measure_latency(m, example, config.repeat_times,
                                                                           config.decode_tokens)  # fmt: skip
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as ex:  # noqa: BLE001 - a failed evaluation is recorded and the search goes on
            kept = f" (its accuracy was {e.accuracy:.6g})" if what == "latency" and e.accuracy is not None else ""
            where = "latency measurement: " if what == "latency" else ""
            e.accuracy, e.error = None, f"{where}{type(ex).__name__}: {ex}{kept}"
            log.warning("evaluation %d failed: %s", e.index + 1, e.error)
        e.seconds = time.perf_counter() - t0

    work = Path(work_dir) if work_dir is not None else None
    fingerprint = _fingerprint(model, space, config, calib)
    head, done = _read_history(work / HISTORY, fingerprint) if work is not None else (None, [])
    if head is None:
        baseline = Evaluation(-1, "float", {}, None, 100.0 * (1 - float_actual / float_bytes), float_actual + rest_bytes,
                              float_flops)  # fmt: skip
        measure(baseline, model)
        if baseline.accuracy is None:
            raise SlimquantError(f"the float model's evaluation failed: {baseline.error}")
        log.info("float model: accuracy %.6g%s", baseline.accuracy,
                 f", latency {baseline.latency:.1f} ms" if baseline.latency is not None else "")  # fmt: skip
        if work is not None:
            work.mkdir(parents=True, exist_ok=True)
            write_file_atomic(work / HISTORY, json.dumps({"parts": fingerprint, "layers": names,
                                                          "options": order, "baseline": baseline.to_dict()}) + "\n")  # fmt: skip
    else:
        baseline = Evaluation.from_dict(head["baseline"])
        log.info("resuming: %d evaluation(s) already in %s", len(done), work / HISTORY)  # type: ignore[operator]
    scorer = _Scorer(config, baseline)
    scorer.score(baseline)  # for the tables: whether the float model meets the thresholds
    budget = None
    if config.compress_threshold is not None and not config.custom_reward and config.reward_type == "acc_first":
        budget = float_bytes * (1 - config.compress_threshold / 100.0)
    if config.compress_threshold is None and config.latency_threshold is None and not config.custom_reward \
            and config.reward_type == "acc_first":  # fmt: skip
        log.warning("acc_first with no compress or latency threshold and no custom reward rewards accuracy alone: "
                    "the float configuration wins; set compress_threshold (or latency_threshold)")  # fmt: skip

    agent = make_agent(config.agent, problem, seed=config.seed, num_warmup=config.num_warmup,
                       max_episode=config.max_episode)  # fmt: skip
    index_of = {lab: k for k, lab in enumerate(order)}
    evaluated: dict[tuple[int, ...], Evaluation] = {}
    for e in done:
        scorer.score(e)
        if e.accuracy is not None:  # a failed evaluation is tried again when it is proposed again
            evaluated[tuple(index_of[e.choice[n]] for n in names)] = e
    history = list(done)
    next_index = [max((e.index for e in done), default=-1) + 1]
    replayed: set[tuple[int, ...]] = set()
    worst = [0.0]  # the lowest reward so far (a failed evaluation is told one less), replayed in order on resume

    def reward_of(e: Evaluation) -> float:
        return e.reward if e.reward is not None else worst[0] - 1.0

    stop = config.stop_early and bool(config.thresholds) and any(e.feasible for e in history)
    if config.stop_early and not config.thresholds:
        log.warning("stop_early without any threshold has nothing to stop on; the search runs max_episode")
    repeats = 0
    explore = random.Random(config.seed + 1)
    bar = tqdm(total=config.max_episode, initial=min(len(history), config.max_episode), desc=f"search ({config.agent})",
               disable=not show_progress, unit="config")  # fmt: skip
    try:
        while not stop and len(history) < config.max_episode:
            choice = agent.ask()
            if budget is not None:
                choice = problem.fit(choice, budget)
            key = tuple(choice)
            proposed = True  # the agent's own proposal (told its reward), not an exploring neighbour
            if key in replayed:
                # proposed before: the agent is told what it scored, and a random neighbour is explored instead
                agent.tell(choice, reward_of(evaluated[key]))
                repeats += 1
                if repeats > max(200, 5 * problem.layers):
                    log.warning("the %s agent and its random neighbours gave only evaluated configurations %d times "
                                "in a row; stopping after %d evaluations", config.agent, repeats, len(history))  # fmt: skip
                    break
                choice = _neighbour(choice, problem.k, explore, 1 + repeats // 10)
                if budget is not None:
                    choice = problem.fit(choice, budget)
                key, proposed = tuple(choice), False
                if key in replayed:
                    continue
            if key in evaluated:  # evaluated by the run this one resumes: replayed as it happened
                e = evaluated[key]
                replayed.add(key)
                repeats = 0
                if e.reward is not None:
                    worst[0] = min(worst[0], e.reward)
                if proposed:
                    agent.tell(choice, reward_of(e))
                continue
            repeats = 0
            e = describe(choice, next_index[0])
            next_index[0] += 1
            with space.configured(e.choice) as m:
                measure(e, m)
            scorer.score(e)
            if e.reward is not None:
                worst[0] = min(worst[0], e.reward)
            evaluated[key] = e
            replayed.add(key)
            history.append(e)
            if work is not None:
                _append(work / HISTORY, e.to_dict())
            if proposed:
                agent.tell(choice, reward_of(e))
            bar.update(1)
            if on_evaluation is not None:
                on_evaluation(e)
            log.debug("evaluation %d: accuracy %s, compress %.1f%%, reward %s", e.index + 1, e.accuracy,
                      e.compress_ratio, e.reward)  # fmt: skip
            if config.stop_early and config.thresholds and e.feasible:
                log.info("stop_early: evaluation %d meets every threshold", e.index + 1)
                stop = True
    finally:
        bar.close()
    ok = [e for e in history if e.reward is not None]
    feasible = [e for e in ok if e.feasible]
    best = max(feasible or ok, key=lambda e: e.reward, default=None)  # type: ignore[arg-type, return-value]
    unmet: list[str] = []
    if not feasible and config.thresholds and ok:
        for key_, thr in config.thresholds.items():
            if not any(key_ not in scorer.violations(e) for e in ok):
                vals = [getattr(e, key_) for e in ok if getattr(e, key_) is not None]
                up = MAXIMIZE[key_] if key_ != "accuracy" else config.higher_is_better
                closest = (max if up else min)(vals) if vals else None
                unmet.append(f"{key_} threshold {thr:g} (closest: {closest:.6g})" if closest is not None else
                             f"{key_} threshold {thr:g}")  # fmt: skip
        if not unmet:
            unmet.append("no single configuration met every threshold together (each was met by some)")
        log.warning("thresholds not met: %s; the best Pareto points are kept", "; ".join(unmet))
    return SearchResult(config, baseline, history, best, unmet, order, names, space.approximate,
                        time.perf_counter() - t_start, space)  # fmt: skip


__all__ = ["AGENTS", "OBJECTIVES", "Evaluation", "SearchConfig", "SearchResult", "bit_search", "layer_macs",
           "measure_latency"]
