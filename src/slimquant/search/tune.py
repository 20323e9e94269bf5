"""Accuracy-aware tuning (Neural Compressor's autotune): walk candidate recipes, cheapest first, then fallback
levels, and stop at the first quantized model within the tolerable loss of the float model's metric.

The float model is evaluated once; every trial quantizes a fresh copy of it. Each finished trial is appended to
``history.jsonl`` in ``work_dir`` (when given), so a run killed half-way resumes after its last finished trial
with the same baseline; a trial whose eval function raises, times out or returns NaN is recorded as failed and
the walk goes on.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from slimquant.errors import SlimquantError
from slimquant.formats.atomic import write_file_atomic
from slimquant.pipeline.workdir import weights_digest
from slimquant.search.sensitivity import candidate_label
from slimquant.types.result import QuantizationResult
from slimquant.types.spec import Recipe

log = logging.getLogger(__name__)

HISTORY = "history.jsonl"


@dataclass(frozen=True)
class TuningConfig:
    """What :func:`autotune` walks and when it stops.

    ``config_set``: candidate recipes, each a :class:`Recipe` or an msModelSlim flag string
    (``"--w_bit 8 --a_bit 8 --anti_method m1"``). They are tried cheapest first (data-free weight-only, then
    dynamic activations, then calibrated ones, then block-by-block solvers such as GPTQ / AWQ; the given order
    within a cost), then with each of ``fallback_levels`` (``disable_level``: that many of the most sensitive
    Linear layers stay float), best candidate first. ``tolerable_loss``: relative; a trial passes when its
    metric is at least ``baseline * (1 - tolerable_loss)`` (``higher_is_better``) or at most
    ``baseline * (1 + tolerable_loss)`` (lower is better, e.g. perplexity). ``max_trials``: at most this many
    quantized models are evaluated. ``timeout``: seconds one trial may take (quantize + evaluate), None: no limit.
    """

    config_set: Sequence[Recipe | str]
    tolerable_loss: float = 0.01
    max_trials: int = 100
    higher_is_better: bool = True
    fallback_levels: Sequence[int] = (1, 2, 3, 4, 5)
    timeout: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.config_set, (str, Recipe)) or not isinstance(self.config_set, Sequence):
            raise SlimquantError("config_set is a list of recipes or msModelSlim flag strings")
        object.__setattr__(self, "config_set", tuple(self.config_set))
        object.__setattr__(self, "fallback_levels", tuple(self.fallback_levels))
        if not self.config_set:
            raise SlimquantError("config_set is empty: give at least one recipe or flag string")
        if not (isinstance(self.tolerable_loss, (int, float)) and math.isfinite(self.tolerable_loss)
                and self.tolerable_loss >= 0):  # fmt: skip
            raise SlimquantError(f"tolerable_loss must be a finite number >= 0 (relative), got {self.tolerable_loss!r}")
        if isinstance(self.max_trials, bool) or not isinstance(self.max_trials, int) or self.max_trials < 1:
            raise SlimquantError(f"max_trials must be a positive integer, got {self.max_trials!r}")
        if not isinstance(self.higher_is_better, bool):
            raise SlimquantError(f"higher_is_better must be true or false, got {self.higher_is_better!r}")
        for n in self.fallback_levels:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise SlimquantError(f"fallback_levels are positive integers (layers kept float), got {n!r}")
        if self.timeout is not None and not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise SlimquantError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        self.candidates()  # every entry parses now, not after the float model was evaluated

    def candidates(self) -> list[tuple[str, Recipe]]:
        """``(label, recipe)`` of ``config_set`` in the given order (flag strings are their own label)."""
        from slimquant.types.flags import recipe_from_flags

        out: list[tuple[str, Recipe]] = []
        for i, c in enumerate(self.config_set):
            if isinstance(c, Recipe):
                label = candidate_label(c)
            elif isinstance(c, str):
                try:
                    c_recipe = recipe_from_flags(c)
                except SlimquantError as e:
                    raise type(e)(f"config_set[{i}] {c!r}: {e}") from None
                label, c = " ".join(c.split()) or "(defaults)", c_recipe
            else:
                raise SlimquantError(f"config_set[{i}]: expected a Recipe or an msModelSlim flag string, got "
                                     f"{type(c).__name__}")  # fmt: skip
            if any(label == other for other, _ in out):
                label = f"{label} #{i}"
            out.append((label, c))
        return out


def recipe_cost(recipe: Recipe) -> int:
    """0 data-free weight-only, 1 dynamic activations only, 2 calibrated (static inputs, smoothing, KV/attention),
    3 block-by-block solvers (GPTQ, AWQ)."""
    if recipe.block_by_block:
        return 3
    if recipe.needs_calibration:
        return 2
    return 1 if recipe.has_activation_quantization else 0


@dataclass
class Trial:
    """One evaluated configuration (``metric`` None when it failed; ``error`` then says why)."""

    index: int
    label: str
    level: int
    recipe: dict[str, Any]
    metric: float | None
    passed: bool
    seconds: float
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Trial":
        return cls(int(d["index"]), str(d["label"]), int(d["level"]), dict(d["recipe"]),
                   None if d.get("metric") is None else float(d["metric"]), bool(d["passed"]), float(d["seconds"]),
                   d.get("error"))  # fmt: skip

    @property
    def name(self) -> str:
        return self.label + (f" --disable_level L{self.level}" if self.level and "--disable_level" not in self.label else "")


@dataclass
class TuningResult:
    """What :func:`autotune` found: the best quantized model (``result``; None if every trial failed), whether it
    met the target, and every trial."""

    result: QuantizationResult | None
    best: Trial | None
    baseline: float
    target: float
    passed: bool
    history: list[Trial] = field(default_factory=list)

    @property
    def model(self) -> nn.Module | None:
        return self.result.model if self.result is not None else None

    @property
    def recipe(self) -> Recipe | None:
        return self.result.recipe if self.result is not None else None


def trial_order(config: TuningConfig, first_metrics: dict[str, float] | None = None) -> list[tuple[str, Recipe, int]]:
    """The walk: every candidate at its own level (cheapest first), then fallback levels ascending, the candidates
    ordered by their first-phase metric (best first; ``first_metrics``: label -> metric, failed ones last)."""
    cands = sorted(config.candidates(), key=lambda c: recipe_cost(c[1]))
    out = [(label, r, r.disable_level) for label, r in cands]
    metrics = first_metrics or {}

    def rank(c: tuple[str, Recipe]) -> float:
        v = metrics.get(c[0])
        if v is None:
            return math.inf
        return -v if config.higher_is_better else v

    ordered = sorted(cands, key=rank)
    for level in sorted(set(config.fallback_levels)):
        out += [(label, dataclasses.replace(r, disable_level=level), level) for label, r in ordered
                if level > r.disable_level]  # fmt: skip
    return out


class TrialTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`TrialTimeout` in the main thread after ``seconds`` (no limit elsewhere or when None)."""
    import threading

    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum: int, frame: Any) -> None:
        raise TrialTimeout(f"the trial took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _metric(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SlimquantError(f"the eval function returned {type(value).__name__} {value!r}, not a number") from None
    if not math.isfinite(v):
        raise SlimquantError(f"the eval function returned {v}")
    return v


def format_trial(trial: Trial, baseline: float, target: float, best: Trial | None) -> str:
    """Neural Compressor's per-trial table: baseline, target, this trial, the best so far."""
    cur = "failed: " + (trial.error or "") if trial.metric is None else f"{trial.metric:.6g}"
    rows = [("Tune trial", f"{trial.index + 1}: {trial.name}"), ("Baseline (float)", f"{baseline:.6g}"),
            ("Target", f"{target:.6g}"), ("Current", cur + (" (passes)" if trial.passed else "")),
            ("Best", "-" if best is None or best.metric is None else f"{best.metric:.6g} ({best.name})"),
            ("Duration (s)", f"{trial.seconds:.1f}")]  # fmt: skip
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k:<{w}} | {v} |" for k, v in rows)


def _fingerprint(model: nn.Module, config: TuningConfig) -> str:
    data = {"model": type(model).__name__, "weights": weights_digest(model),
            "candidates": [[label, r.to_dict()] for label, r in config.candidates()],
            "tolerable_loss": config.tolerable_loss, "higher_is_better": config.higher_is_better,
            "fallback_levels": list(config.fallback_levels)}  # fmt: skip
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:20]


def _read_history(path: Path, fingerprint: str) -> tuple[float | None, list[Trial]]:
    """(baseline, trials) of an earlier run with the same fingerprint; another setup is refused."""
    if not path.is_file():
        return None, []
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    try:
        head = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError as e:
        raise SlimquantError(f"{path}: line 1 is not JSON ({e}); remove it to start over") from None
    if head.get("fingerprint") != fingerprint:
        raise SlimquantError(f"{path} holds the history of another tuning setup (model, candidates, tolerance or "
                             "levels differ); choose another task directory or remove it")  # fmt: skip
    trials = []
    for i, ln in enumerate(lines[1:], 2):
        try:
            trials.append(Trial.from_dict(json.loads(ln)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("%s: line %d is incomplete (a killed write); it is measured again", path, i)
            break
    return float(head["baseline"]), trials


def autotune(
    model: nn.Module,
    config: TuningConfig,
    eval_fn: Callable[[nn.Module], Any],
    calib_data: Any = None,
    work_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    on_trial: Callable[[Trial, str], None] | None = None,
) -> TuningResult:
    """Find the first candidate (see :class:`TuningConfig`) whose quantized model's ``eval_fn`` is within the
    tolerable loss of the float ``model``'s; ``model`` itself stays float (each trial quantizes a copy).

    ``eval_fn(model) -> number``; ``calib_data``: as for :func:`slimquant.quantize` (needed by calibrated
    candidates and fallback levels). ``work_dir``: ``history.jsonl`` (every trial, appended as it finishes; a
    rerun resumes from it) and ``sensitivity/`` (the fallback ranking, measured once per candidate).
    ``on_trial(trial, table)``: called after each trial with Neural Compressor's table (default: logged).
    Returns the best trial's quantized model (re-quantized if it came from an earlier, killed run).
    """
    from slimquant.pipeline.convert import refuse_quantized

    if not isinstance(config, TuningConfig):
        raise SlimquantError(f"config must be a TuningConfig, got {type(config).__name__}")
    if not callable(eval_fn):
        raise SlimquantError("eval_fn must be a function of the model returning its metric")
    refuse_quantized(model, "autotune needs the float model")
    cands = config.candidates()
    if calib_data is None:
        needs = next((label for label, r in cands if r.needs_calibration), None)
        if needs is not None or config.fallback_levels:
            why = f"candidate {needs!r} needs it" if needs else "fallback levels rank layers on it"
            raise SlimquantError(f"autotune needs calib_data: {why} (or set fallback_levels=() with data-free candidates)")
    work = Path(work_dir) if work_dir is not None else None
    fingerprint = _fingerprint(model, config)
    baseline, done = _read_history(work / HISTORY, fingerprint) if work is not None else (None, [])
    if baseline is None:
        t0 = time.perf_counter()
        baseline = _metric(eval_fn(model))
        log.info("baseline (float) metric %.6g in %.1f s", baseline, time.perf_counter() - t0)
        if work is not None:
            work.mkdir(parents=True, exist_ok=True)
            write_file_atomic(work / HISTORY, json.dumps({"fingerprint": fingerprint, "baseline": baseline}) + "\n")
    elif done:
        log.info("resuming: %d trial(s) already in %s (baseline %.6g)", len(done), work / HISTORY, baseline)  # type: ignore[operator]
    sign = -1.0 if config.higher_is_better else 1.0
    target = baseline * (1 + sign * config.tolerable_loss) if baseline >= 0 else baseline * (1 - sign * config.tolerable_loss)
    report = on_trial or (lambda trial, table: log.info("\n%s", table))

    def passes(v: float) -> bool:
        return v >= target if config.higher_is_better else v <= target

    def better(a: Trial, b: Trial | None) -> bool:
        if a.metric is None:
            return False
        if b is None or b.metric is None:
            return True
        return a.metric > b.metric if config.higher_is_better else a.metric < b.metric

    scratch = contextlib.ExitStack()
    # the fallback ranking is measured once per candidate and reused by its other levels
    sens_cache = work / "sensitivity" if work is not None else Path(scratch.enter_context(tempfile.TemporaryDirectory()))
    with scratch:
        return _walk(model, config, eval_fn, calib_data, work, show_progress, report, done, baseline, target,
                     passes, better, cands, sens_cache)


def _walk(model: nn.Module, config: TuningConfig, eval_fn: Callable[[nn.Module], Any], calib_data: Any,
          work: Path | None, show_progress: bool, report: Callable[[Trial, str], None], done: list[Trial],
          baseline: float, target: float, passes: Callable[[float], bool], better: Callable[[Trial, Trial | None], bool],
          cands: list[tuple[str, Recipe]], sens_cache: Path) -> TuningResult:  # fmt: skip
    from slimquant.search.fallback import quantize_model as quantize

    history: list[Trial] = []
    best: Trial | None = None
    best_result: QuantizationResult | None = None
    first_metrics: dict[str, float] = {}
    phase1 = len(cands)
    index = 0
    order = trial_order(config)
    while index < len(order) and index < config.max_trials:
        if index == phase1:  # the fallback levels, best first-phase candidate first
            order = order[:phase1] + trial_order(config, first_metrics)[phase1:]
        label, recipe, level = order[index]
        earlier = next((t for t in done if t.index == index and t.label == label and t.level == level), None)
        result = None
        if earlier is not None:
            trial = earlier
        else:
            t0 = time.perf_counter()
            metric, error = None, None
            try:
                with _time_limit(config.timeout):
                    result = quantize(copy.deepcopy(model), recipe, calib_data=calib_data if recipe.needs_calibration
                                      else None, show_progress=show_progress, sensitivity_cache=sens_cache)  # fmt: skip
                    metric = _metric(eval_fn(result.model))
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001 - a failed trial is recorded and the walk goes on
                error = f"{type(e).__name__}: {e}"
                result = None
                log.warning("trial %d (%s, L%d) failed: %s", index + 1, label, level, error)
            trial = Trial(index, label, level, recipe.to_dict(), metric, metric is not None and passes(metric),
                          time.perf_counter() - t0, error)  # fmt: skip
            if work is not None:
                with open(work / HISTORY, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(trial.to_dict()) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
        history.append(trial)
        if index < phase1 and trial.metric is not None:
            first_metrics[label] = trial.metric
        if better(trial, best):
            best, best_result = trial, result
        report(trial, format_trial(trial, baseline, target, best))
        index += 1
        if trial.passed:
            break
        result = None
    if best is not None and best_result is None:  # the best trial ran before a restart: quantize it again
        recipe = Recipe.from_dict(best.recipe)
        best_result = quantize(copy.deepcopy(model), recipe, calib_data=calib_data if recipe.needs_calibration else None,
                               show_progress=show_progress, sensitivity_cache=sens_cache)  # fmt: skip
    passed = best is not None and best.passed
    if not passed:
        log.warning("no trial met the target %.6g (baseline %.6g, tolerable loss %g); %s", target, baseline,
                    config.tolerable_loss, f"best: {best.name} {best.metric:.6g}" if best else "every trial failed")  # fmt: skip
    return TuningResult(best_result, best, baseline, target, passed, history)
