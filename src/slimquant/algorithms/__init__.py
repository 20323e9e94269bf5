"""Algorithms as registered steps: one implementation per recipe step type (:mod:`slimquant.types.steps`),
holding what the pipeline calls for that step's stage. The pipeline provides what a step declares it needs
(``step.NEEDS``) and never names an algorithm.

* :class:`WeightAlgorithm` (``weight`` stage) solves one ``[n, k]`` float32 weight:
  ``solve(layer, w, h, spec, step) -> (QuantizedWeight, report fields)``; ``h`` is the layer's input Hessian
  ``2/N X^T X`` ``[k, k]`` when the step needs ``hessian``, else None. The report fields name the algorithm
  that ran (``{"algorithm": ...}``, e.g. a fallback).
* :class:`BlockWeightAlgorithm` (``weight`` stage) solves all of one block's planned linears together:
  ``solve_block(block, layers, data, step, show_progress) -> {name: (QuantizedWeight, report fields)}``;
  ``layers`` maps each layer's name relative to the block to ``(nn.Linear, QuantSpec)``; ``data`` is a
  :class:`BlockData` (the block's calibration arguments as the quantized blocks before it produce them and,
  when the step needs ``block_targets``, the float block's outputs on the float model's inputs). The solver
  leaves the block's modules as it found them; the pipeline swaps the quantized modules in. A result may be a
  triple ``(QuantizedWeight, report fields, input range)``: the static input range (``{"rmin", "rmax",
  "rule"}``) the deployed W8A8 layer uses instead of the calibrated one. ``lookahead(step)`` > 0: the solver
  also sees that many following blocks, still float (``data.ahead``), to reconstruct across them (CBQ).
* :class:`ModelTransform` (``model`` stage) changes the float model before any layer is quantized:
  ``observe(model, step, recipe)`` names the layers whose inputs it wants observed on calibration data
  (an :class:`InputRequest`, or None), then ``apply(model, step, recipe, stats, show_progress)`` transforms the
  model and returns report rows (``stats``: layer name -> observed statistics, each with ``.observers`` and
  ``.sample()``; None when nothing was requested).
* :class:`BlockTransform` (``block`` stage) changes one repeated block, on the block's inputs as the quantized
  blocks before it produce them: ``collectors(model, step, recipe, prefix, plans)`` gives one collector
  (``.add(x)``) per layer whose inputs it wants; the pipeline runs the block with them, then
  ``apply(model, step, recipe, prefix, plans, collectors)`` returns report rows.

Each may check the model up front (``check_model``: an unknown architecture fails before any work) and add
fields to the quantized layers' method records (``record``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from slimquant.errors import SlimquantError
from slimquant.math.weights import QuantizedWeight
from slimquant.types.spec import QuantSpec, Recipe
from slimquant.types.steps import Step


class Collector(Protocol):
    def add(self, x: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class InputRequest:
    """Layers whose inputs a model transform wants observed: ``observers()`` makes a fresh dict of named
    observers per layer; ``sample_rows`` > 0 also keeps a uniform sample of that many input rows."""

    layers: tuple[str, ...]
    observers: Callable[[], dict[str, Any]]
    sample_rows: int = 0


def _no_check(model: Any, step: Step, recipe: Recipe) -> None:
    return None


def _no_record(step: Step, recipe: Recipe) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Algorithm:
    step_type: type[Step]
    check_model: Callable[[Any, Step, Recipe], None] = _no_check
    record: Callable[[Step, Recipe], dict[str, Any]] = _no_record

    STAGE = ""


@dataclass(frozen=True)
class WeightAlgorithm(Algorithm):
    """``solve(layer, W, H or None, spec, step) -> (QuantizedWeight, report fields)``; for steps that prune
    (``Step.PRUNES``) also ``prune(layer, W, H or None, step) -> (float weight, report fields)``, for the layers the
    recipe keeps float."""

    solve: Callable[[str, torch.Tensor, "torch.Tensor | None", QuantSpec, Step],
                    "tuple[QuantizedWeight, dict[str, Any]]"] | None = None  # fmt: skip
    prune: Callable[[str, torch.Tensor, "torch.Tensor | None", Step],
                    "tuple[torch.Tensor, dict[str, Any]]"] | None = None  # fmt: skip
    STAGE = "weight"


def block_output(out: Any) -> torch.Tensor:
    """A block's output hidden states (transformers blocks return a tuple whose first element they are)."""
    return out[0] if isinstance(out, (tuple, list)) else out


class BlockData(Protocol):
    """What a block solver gets: ``len(data)`` calibration items; ``data.item(j)`` the ``(args, kwargs)`` of the
    block's forward for item ``j``; ``data.target(j)`` the float block's output hidden states for item ``j``
    (``block_targets``; else an error) and ``data.float_item(j)`` the float model's arguments to the block (the
    inputs those targets come from); ``data.with_hidden(j, h)`` item ``j``'s arguments with the hidden states
    replaced by ``h`` (to run the next block on a block's output); ``data.input_quant(name)`` how the layer
    ``name`` (full name) quantizes its input once deployed: ``(input QuantSpec, rmin, rmax)`` (``rmin`` /
    ``rmax`` the calibrated static range, None for dynamic inputs) or None (weight-only); ``data.prefix`` the
    block's full name with a trailing dot; ``data.ahead`` the following blocks the algorithm's ``lookahead``
    asked for, as ``(prefix, block, {name: (nn.Linear, QuantSpec)})`` (the layers planned with the same step);
    ``data.carry`` a dict of name -> tensor the pipeline keeps from one block to the next (a windowed solver's
    state for the blocks ahead, to start their own window from; persisted in the work directory with each block,
    so a resumed run continues exactly);
    ``data.tokens`` the calibration rows (tokens) in all items."""

    tokens: int
    prefix: str
    ahead: list[tuple[str, Any, dict[str, tuple[Any, QuantSpec]]]]
    carry: dict[str, torch.Tensor]

    def __len__(self) -> int: ...

    def item(self, j: int) -> tuple[tuple, dict]: ...

    def target(self, j: int) -> torch.Tensor: ...

    def float_item(self, j: int) -> tuple[tuple, dict]: ...

    def with_hidden(self, j: int, hidden: torch.Tensor) -> tuple[tuple, dict]: ...

    def input_quant(self, name: str) -> "tuple[QuantSpec, float | None, float | None] | None": ...


@dataclass(frozen=True)
class BlockWeightAlgorithm(Algorithm):
    solve_block: Callable[[Any, dict[str, tuple[Any, QuantSpec]], BlockData, Step, bool],
                          "dict[str, tuple[QuantizedWeight, dict[str, Any]] | tuple[QuantizedWeight, dict[str, Any], dict[str, Any] | None]]"] | None = None  # fmt: skip
    lookahead: Callable[[Step], int] = lambda step: 0
    STAGE = "weight"


@dataclass(frozen=True)
class ModelTransform(Algorithm):
    observe: Callable[[Any, Step, Recipe], "InputRequest | None"] | None = None
    apply: Callable[[Any, Step, Recipe, Any, bool], list[dict]] | None = None
    STAGE = "model"


@dataclass(frozen=True)
class BlockTransform(Algorithm):
    collectors: Callable[[Any, Step, Recipe, str, dict], "dict[str, Collector]"] | None = None
    apply: Callable[[Any, Step, Recipe, str, dict, dict], list[dict]] | None = None
    STAGE = "block"


_REGISTRY: dict[str, Algorithm] = {}


def register_algorithm(impl: Algorithm) -> Algorithm:
    """Register the implementation of ``impl.step_type`` (a step type implemented twice is an error)."""
    st = impl.step_type
    if not (isinstance(st, type) and issubclass(st, Step)) or not st.TYPE:
        raise SlimquantError(f"{impl!r}: step_type must be a registered Step subclass")
    from slimquant.types.steps import step_types

    if step_types().get(st.TYPE) is not st:
        raise SlimquantError(f"step type {st.TYPE!r} is not registered; decorate {st.__name__} with "
                             "slimquant.types.register_step_type")  # fmt: skip
    if st.STAGE != impl.STAGE:
        raise SlimquantError(f"step {st.TYPE!r} is a {st.STAGE} step; its implementation must be a "
                             f"{ {'weight': 'WeightAlgorithm or BlockWeightAlgorithm', 'model': 'ModelTransform', 'block': 'BlockTransform'}[st.STAGE]}, "
                             f"not {type(impl).__name__}")  # fmt: skip
    missing = [f for f in ("solve", "solve_block", "observe", "apply", "collectors") if hasattr(impl, f) and getattr(impl, f) is None]
    if missing:
        raise SlimquantError(f"implementation of {st.TYPE!r} lacks {', '.join(missing)}")
    if st.TYPE in _REGISTRY:
        raise SlimquantError(f"step type {st.TYPE!r} already has an implementation")
    _REGISTRY[st.TYPE] = impl
    return impl


def implementation(step: Step) -> Algorithm:
    """The registered implementation of ``step``'s type."""
    try:
        return _REGISTRY[step.TYPE]
    except KeyError:
        raise SlimquantError(f"step type {step.TYPE!r} has no registered implementation (register one with "
                             f"slimquant.algorithms.register_algorithm); implemented: {', '.join(sorted(_REGISTRY))}") from None  # fmt: skip


def outside_blocks(step: Step) -> Step:
    """The data-free weight step for layers outside the repeated blocks, which have no calibrated inputs:
    ``step`` itself when it needs nothing, else what it names (:meth:`slimquant.types.steps.Step.outside_blocks`)."""
    free = step.outside_blocks()
    if free.NEEDS:
        raise SlimquantError(f"step {step.TYPE!r}: its step for layers outside the blocks ({free.TYPE}) needs data too")
    return free


def solve_weight(layer: str, w: torch.Tensor, h: torch.Tensor | None, spec: QuantSpec,
                 step: Step) -> tuple[QuantizedWeight, dict[str, Any]]:  # fmt: skip
    """Solve ``layer``'s ``[n, k]`` weight with the weight ``step``'s implementation; the report fields always
    say which algorithm ran."""
    impl = implementation(step)
    if not isinstance(impl, WeightAlgorithm):
        raise SlimquantError(f"step {step.TYPE!r} does not solve weights")
    qw, info = impl.solve(layer, w, h, spec, step)  # type: ignore[misc]
    return qw, {"algorithm": step.TYPE, **info}


def prune_weight(layer: str, w: torch.Tensor, h: torch.Tensor | None, step: Step) -> tuple[torch.Tensor, dict[str, Any]]:
    """Prune ``layer``'s float ``[n, k]`` weight (kept float) with the pruning weight ``step``."""
    impl = implementation(step)
    if not isinstance(impl, WeightAlgorithm) or impl.prune is None:
        raise SlimquantError(f"step {step.TYPE!r} does not prune float weights")
    pruned, info = impl.prune(layer, w, h, step)
    return pruned, {"algorithm": step.TYPE, **info}


def data_free_solver(step: Step) -> Callable[[torch.Tensor, QuantSpec], QuantizedWeight]:
    """``(w, spec) -> QuantizedWeight`` of the data-free step :func:`outside_blocks` gives for ``step``."""
    free = outside_blocks(step)
    return lambda w, spec: solve_weight("", w, None, spec, free)[0]


def method_record(recipe: Recipe, info: dict[str, Any], weight_step: Step, block_steps: bool = True) -> dict[str, Any]:
    """The method record a quantized layer keeps (in the checkpoint manifest): the algorithm that ran, what its
    ``weight_step`` adds and (``block_steps``: the layer went through them) what the recipe's block steps add."""
    out: dict[str, Any] = {"algorithm": info["algorithm"], **implementation(weight_step).record(weight_step, recipe)}
    if block_steps:
        for s in recipe.steps_of("block"):
            out.update(implementation(s).record(s, recipe))
    return out


from slimquant.algorithms import builtin as _builtin  # noqa: E402,F401  (registers rtn, gptq, smoothing, awq, autoround)
from slimquant.algorithms.rtn import rtn  # noqa: E402

__all__ = ["Algorithm", "WeightAlgorithm", "BlockWeightAlgorithm", "BlockData", "ModelTransform", "BlockTransform", "InputRequest", "Collector",
           "register_algorithm", "block_output", "implementation", "outside_blocks", "solve_weight", "prune_weight", "data_free_solver",
           "method_record", "rtn"]
