"""Run calibration data through a model and collect the input statistics of chosen layers.

Hooks are owned by :func:`observe_inputs` (a context manager) and always removed. Which range a
layer finally gets is decided by :func:`input_ranges` from the observers and, for the ``auto``
rule, by :func:`slimquant.algorithms.activation.choose_input_range` on a sample of the inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from slimquant.errors import SlimquantError
from slimquant.observers import make_observer

log = logging.getLogger(__name__)

# Recipe.act_observer -> the observers it needs (auto tries them all).
OBSERVER_KWARGS: dict[str, tuple[str, dict[str, Any]]] = {
    "minmax": ("minmax", {}),
    "moving_average": ("moving_average", {}),
    "histogram": ("histogram_percentile", {}),
    "histogram_mse": ("histogram_mse", {}),
    "histogram_kl": ("histogram_kl", {}),
}
AUTO_CANDIDATES = ("minmax", "histogram", "histogram_mse")
TOKEN_QUANTILES = (1.0, 0.9999, 0.999, 0.99, 0.98, 0.95)


@dataclass
class InputStats:
    """Statistics of one layer's input: named observers and a uniform sample of its rows."""

    observers: dict[str, Any]
    sample_rows: int = 0
    _rows: torch.Tensor | None = None
    _keys: torch.Tensor | None = None

    def update(self, x: torch.Tensor, generator: torch.Generator) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        for obs in self.observers.values():
            obs.update(x)
        if self.sample_rows:
            # Uniform sample without replacement over all rows seen: every row draws a random key and
            # the rows with the smallest keys are kept.
            keys = torch.rand(len(x), generator=generator)
            rows = x.float().cpu()
            if self._rows is not None and self._keys is not None:
                keys, rows = torch.cat([self._keys, keys]), torch.cat([self._rows, rows])
            keep = torch.argsort(keys)[: self.sample_rows]
            self._keys, self._rows = keys[keep], rows[keep]

    def sample(self) -> torch.Tensor:
        return self._rows if self._rows is not None else torch.empty(0)


def range_observers(act_observer: str, sigma_factor: float | None = None) -> Callable[[], dict[str, Any]]:
    """A factory of the observers a static-range rule needs (``auto``: all its candidates; plus
    ``sigma`` when ``sigma_factor`` is set)."""
    rules = AUTO_CANDIDATES if act_observer == "auto" else (act_observer,)

    def make() -> dict[str, Any]:
        if act_observer == "token_clip":
            out = {"token_clip": make_observer("token_quantile")}
        else:
            out = {rule: make_observer(OBSERVER_KWARGS[rule][0], **OBSERVER_KWARGS[rule][1]) for rule in rules}
        if sigma_factor:
            out["sigma"] = make_observer("sigma", k=sigma_factor)
        return out

    return make


@contextmanager
def observe_inputs(
    model: nn.Module, names: Iterable[str], observers: Callable[[], dict[str, Any]], sample_rows: int = 0
) -> Iterator[dict[str, InputStats]]:
    """Attach input observers (a fresh ``observers()`` dict per module) to the named modules for the
    duration of the ``with`` block; ``sample_rows`` > 0 also keeps a uniform sample of input rows."""
    stats: dict[str, InputStats] = {}
    handles = []
    generator = torch.Generator().manual_seed(0)
    try:
        for name in names:
            st = stats[name] = InputStats(observers(), sample_rows)

            def hook(_m: nn.Module, args: tuple, kwargs: dict, st: InputStats = st, name: str = name) -> None:
                x = args[0] if args else kwargs.get("input")
                if not isinstance(x, torch.Tensor):
                    raise SlimquantError(f"layer {name}: cannot observe a non-tensor input")
                try:
                    st.update(x, generator)
                except ValueError as e:
                    raise SlimquantError(f"layer {name}: {e}") from None

            handles.append(model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
        yield stats
    finally:
        for h in handles:
            h.remove()


def model_inputs(batches: Any) -> list[Any]:
    """The calibration items :func:`run_batches` accepts, as a list (token windows become ``{"input_ids"}`` dicts)."""
    if isinstance(batches, torch.Tensor) and batches.dtype in (torch.int32, torch.int64) and batches.dim() == 2:
        items: list[Any] = [{"input_ids": row[None]} for row in batches]
    else:
        items = list(batches)
    if not items:
        raise SlimquantError("calibration data is empty")
    return items


def run_batches(model: nn.Module, batches: Any, show_progress: bool = True, desc: str = "calibration") -> int:
    """Forward every calibration batch through ``model`` without gradients; returns how many ran.

    ``batches``: a ``[N, L]`` integer tensor of token windows (each row runs as ``input_ids``), or an
    iterable of model inputs (a tensor: ``model(t)``; a dict: ``model(**d)``; a tuple: ``model(*t)``).
    """
    items = model_inputs(batches)
    with torch.no_grad():
        for item in tqdm(items, desc=desc, disable=not show_progress, unit="batch"):
            forward_item(model, item)
    return len(items)


def forward_item(model: nn.Module, item: Any, **extra: Any) -> Any:
    """``model`` on one calibration item, moved to the model's device: a dict is keyword arguments (``extra``
    added where absent), a tuple / list positional arguments, a tensor the one argument. A tuple the model does
    not take (a DataLoader's ``(input, label)`` pairs) is refused with what to pass instead."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if isinstance(item, dict):
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in item.items()}
        for k, v in extra.items():
            kwargs.setdefault(k, v)
        return model(**kwargs)
    if isinstance(item, (tuple, list)):
        args = [v.to(device) if isinstance(v, torch.Tensor) else v for v in item]
        try:
            return model(*args)
        except TypeError as e:
            if len(args) > 1 and "positional argument" in str(e):
                raise SlimquantError(
                    f"a calibration item is a {type(item).__name__} of {len(args)} values, passed as positional "
                    f"arguments, and {type(model).__name__}.forward does not take them ({e}); a DataLoader of "
                    "(input, label) pairs: pass [x for x, _ in loader]") from None  # fmt: skip
            raise
    if not isinstance(item, torch.Tensor):
        raise SlimquantError(f"a calibration item is a {type(item).__name__}; give tensors, dicts of keyword "
                             "arguments or tuples of positional arguments")  # fmt: skip
    return model(item.to(device))


def _candidate_ranges(name: str, st: InputStats) -> list[tuple[str, float, float]]:
    out = []
    try:
        for rule, obs in st.observers.items():
            if rule == "sigma":
                continue
            if rule == "token_clip":
                out += [(f"token_clip {q}", *(float(v) for v in obs.range_at(q))) for q in TOKEN_QUANTILES]
            else:
                lo, hi = obs.range()
                out.append((rule, float(lo), float(hi)))
    except (ValueError, RuntimeError) as e:
        raise SlimquantError(f"layer {name}: no calibration statistics ({e}); did the calibration data reach it?") from None
    return out


def input_ranges(
    model: nn.Module,
    stats: dict[str, InputStats],
    act_observer: str,
    plans: dict[str, Any],
    qt: Any,
    symmetric: bool,
    dequantized_weight: Callable[[Any], torch.Tensor] | None = None,
) -> dict[str, dict[str, Any]]:
    """Final ``{layer: {"rmin", "rmax", "rule", "errors"}}`` from collected statistics.

    The ``auto`` and ``token_clip`` rules measure output errors with the layer's quantized weight:
    ``dequantized_weight(plans[layer])`` gives it, one layer at a time (the float weight comes from
    the model).
    """
    from slimquant.algorithms.activation import choose_input_range

    out: dict[str, dict[str, Any]] = {}
    for name, st in stats.items():
        cands: dict[str, tuple[float, float]] = {}
        sigma = st.observers.get("sigma")
        for rule, lo, hi in _candidate_ranges(name, st):
            if sigma is not None:
                s_lo, s_hi = sigma.range()
                lo, hi = max(lo, float(s_lo)), min(hi, float(s_hi))
            cands[rule] = (min(lo, 0.0), max(hi, 0.0))
        if act_observer in ("auto", "token_clip"):
            assert dequantized_weight is not None
            w = model.get_submodule(name).weight.detach()
            w_deq = dequantized_weight(plans[name])
            rule, lo, hi, errors = choose_input_range(st.sample(), w, w_deq, cands, qt, symmetric)
        else:
            rule = act_observer
            (lo, hi), errors = cands[rule], {}
        out[name] = {"rmin": lo, "rmax": hi, "rule": rule, "errors": errors}
    return out
