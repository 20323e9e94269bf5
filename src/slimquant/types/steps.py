"""The steps of a recipe: one frozen, self-validating, type-tagged dataclass per algorithm, holding only its own knobs.

A step says *what* runs and what it needs; its implementation is registered under the same type tag in
:mod:`slimquant.algorithms` (a step type without one is refused when a model is quantized, naming it).

Stages, in the order a recipe lists them:

* ``model``: transforms the float model before any layer is quantized (SmoothQuant, Outlier Suppression's
  gamma migration), optionally observing the layers' inputs on calibration data first;
* ``block``: transforms one repeated block at a time, on the block's inputs as the already quantized blocks
  before it produce them (AWQ scales and clipping);
* ``weight``: solves each layer's weight (RTN, GPTQ), or all of one block's layers together (AutoRound); a recipe
  has exactly one, last.

What a step needs (:data:`NEEDS`) decides how the pipeline runs it, and whether a run goes block by block:

* ``layer_inputs``: statistics of named layers' inputs on the float model (one pass over the calibration data);
* ``block_inputs``: each block's inputs, from the quantized blocks before it (the run goes block by block);
* ``hessian``: each layer's input Hessian ``2/N X^T X``, accumulated on those block inputs;
* ``block_targets``: each block's float outputs on the float model's own inputs to it (the pipeline carries the
  float model's hidden states beside the quantized ones), the targets a block-wise reconstruction fits.

New step types register with :func:`register_step_type`, so recipes holding them round-trip JSON and YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

from slimquant.errors import NotSupportedYet, SlimquantError
from slimquant.types.qtype import qtype as _lookup_qtype

if TYPE_CHECKING:
    from slimquant.types.spec import QuantSpec

STAGES = ("model", "block", "weight")
LAYER_INPUTS, BLOCK_INPUTS, HESSIAN, BLOCK_TARGETS = "layer_inputs", "block_inputs", "hessian", "block_targets"
NEEDS = (LAYER_INPUTS, BLOCK_INPUTS, HESSIAN, BLOCK_TARGETS)
# What makes a run go block by block (each block calibrated on the quantized blocks before it).
BLOCKWISE_NEEDS = frozenset({BLOCK_INPUTS, HESSIAN, BLOCK_TARGETS})


@dataclass(frozen=True)
class Step:
    """Base of every recipe step. Subclasses set ``TYPE`` (the tag in JSON), ``STAGE`` and ``NEEDS``, declare
    their knobs as dataclass fields (JSON-plain values: bool, int, float, str, tuples of those) and validate
    them in ``__post_init__``; :meth:`check` validates them against the rest of the recipe."""

    TYPE: ClassVar[str] = ""
    STAGE: ClassVar[str] = ""
    NEEDS: ClassVar[frozenset[str]] = frozenset()
    # weight steps that prune: they also run on layers the recipe keeps float (weight spec None), pruning them
    PRUNES: ClassVar[bool] = False

    def check(self, weight: "QuantSpec | None", input: "QuantSpec | None") -> None:  # noqa: A002
        """Raise :class:`SlimquantError` if this step cannot run on layers with these weight and input specs
        (weight / block steps: every layer combination the recipe plans; model steps: the recipe's own specs)."""

    @property
    def needs_calibration(self) -> bool:
        return bool(self.NEEDS)

    def outside_blocks(self) -> "Step":
        """Weight steps: the data-free step for the layers outside the repeated blocks, which have no calibrated
        inputs (this step itself when it needs nothing; a calibrated step overrides this)."""
        if self.NEEDS:
            raise SlimquantError(f"weight step {self.TYPE!r} needs calibrated inputs; it must name a data-free step "
                                 "for the layers outside the blocks (override outside_blocks)")  # fmt: skip
        return self

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "stage": self.STAGE}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def describe(self) -> str:
        """``gptq(act_order=False)``: the type and the knobs that differ from their defaults."""
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if getattr(self, f.name) != f.default]
        return f"{self.TYPE}({', '.join(changed)})" if changed else self.TYPE


_STEP_TYPES: dict[str, type[Step]] = {}


def register_step_type(cls: type[Step]) -> type[Step]:
    """Make ``cls`` known by its ``TYPE`` tag (usable as a class decorator); a tag registered twice is an error."""
    if not (isinstance(cls, type) and issubclass(cls, Step)):
        raise SlimquantError(f"{cls!r} is not a Step subclass")
    if not cls.TYPE or not isinstance(cls.TYPE, str):
        raise SlimquantError(f"step class {cls.__name__} needs a TYPE tag")
    if cls.STAGE not in STAGES:
        raise SlimquantError(f"step {cls.TYPE!r}: STAGE must be one of {', '.join(STAGES)}, got {cls.STAGE!r}")
    unknown = set(cls.NEEDS) - set(NEEDS)
    if unknown:
        raise SlimquantError(f"step {cls.TYPE!r}: unknown need(s) {sorted(unknown)}; valid: {', '.join(NEEDS)}")
    if _STEP_TYPES.get(cls.TYPE, cls) is not cls:
        raise SlimquantError(f"step type {cls.TYPE!r} is already registered ({_STEP_TYPES[cls.TYPE].__name__})")
    _STEP_TYPES[cls.TYPE] = cls
    return cls


def step_types() -> dict[str, type[Step]]:
    return dict(_STEP_TYPES)


def step_from_dict(data: Any, where: str = "step", unregistered: bool = False) -> Step:
    """The step a ``{"type": ..., "stage": ..., knobs...}`` mapping describes; unknown types and knobs are errors
    listing the valid ones. ``unregistered=True`` (reading a checkpoint's record of how it was made): a type this
    process does not know becomes an :class:`UnregisteredStep` that keeps its knobs, so a checkpoint made with
    someone's own algorithm loads without it."""
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise SlimquantError(f"{where}: a step is an object with a 'type' string, got {data!r}")
    data = dict(data)
    tag = data.pop("type")
    stage = data.pop("stage", None)
    cls = _STEP_TYPES.get(tag)
    if cls is None:
        if unregistered and stage in STAGES:
            return UnregisteredStep.of(tag, stage, data)
        raise SlimquantError(f"{where}: unknown step type {tag!r}; valid: {', '.join(sorted(_STEP_TYPES))}")
    if stage is not None and stage != cls.STAGE:
        raise SlimquantError(f"{where}: step {tag!r} is a {cls.STAGE} step, not {stage!r}")
    valid = {f.name for f in fields(cls)}
    unknown = set(data) - valid
    if unknown:
        raise SlimquantError(f"{where} ({tag}): unknown field(s) {sorted(unknown)}; valid: {sorted(valid)}")
    for f in fields(cls):
        if isinstance(data.get(f.name), list):
            data[f.name] = tuple(data[f.name])
    try:
        return cls(**data)
    except TypeError as e:
        raise SlimquantError(f"{where} ({tag}): {e}") from None


@dataclass(frozen=True)
class UnregisteredStep(Step):
    """A step whose type this process has no class for, read from a checkpoint: it keeps the tag, stage and
    knobs (``to_dict`` writes them back unchanged) and cannot run."""

    type_tag: str = ""
    stage: str = ""
    knobs: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, tag: str, stage: str, knobs: dict[str, Any]) -> "UnregisteredStep":
        return cls(tag, stage, tuple(sorted(knobs.items())))

    @property
    def TYPE(self) -> str:  # type: ignore[override]  # noqa: N802
        return self.type_tag

    @property
    def STAGE(self) -> str:  # type: ignore[override]  # noqa: N802
        return self.stage

    @property
    def needs_calibration(self) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type_tag, "stage": self.stage, **dict(self.knobs)}

    def describe(self) -> str:
        return f"{self.type_tag} (unregistered)"


def _check_bool(step: Step, *names: str) -> None:
    for n in names:
        if not isinstance(getattr(step, n), bool):
            raise SlimquantError(f"{step.TYPE}: {n} must be true or false, got {getattr(step, n)!r}")


def _check_positive_ints(step: Step, *names: str) -> None:
    for n in names:
        v = getattr(step, n)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise SlimquantError(f"{step.TYPE}: {n} must be a positive integer, got {v!r}")


def _needs_weight(step: Step, weight: "QuantSpec | None") -> None:
    if weight is None:
        raise SlimquantError(f"{step.TYPE} quantizes weights; the recipe has no weight spec")


def _no_w8a8s_clip(step: Step, weight: "QuantSpec | None") -> None:
    if getattr(step, "clip_search", False) and weight is not None and weight.outlier_fraction is not None:
        raise SlimquantError(f"{step.TYPE}: clip_search (--w_clip_search) does not apply to W8A8S weights: their scale "
                             "is set by the outlier fraction (--fraction)")  # fmt: skip


def _needs_input(step: Step, input: "QuantSpec | None", what: str) -> None:  # noqa: A002
    if input is None:
        raise SlimquantError(f"{step.TYPE} ({what}) prepares activations for quantization; it needs an input spec")


# -- weight algorithms ---------------------------------------------------------------------------------------
@register_step_type
@dataclass(frozen=True)
class RTN(Step):
    """Round to nearest, data-free. ``clip_search``: search per channel/group for the clipping ratio with the
    lowest weight MSE."""

    TYPE: ClassVar[str] = "rtn"
    STAGE: ClassVar[str] = "weight"
    clip_search: bool = False

    def __post_init__(self) -> None:
        _check_bool(self, "clip_search")

    def check(self, weight: "QuantSpec | None", input: "QuantSpec | None") -> None:  # noqa: A002
        _no_w8a8s_clip(self, weight)


@register_step_type
@dataclass(frozen=True)
class GPTQ(Step):
    """GPTQ (Frantar et al. 2022), block by block on the quantized blocks' outputs.

    ``percdamp``: dampening, a fraction of the mean Hessian diagonal (raised x10 on failure); ``act_order``:
    columns by decreasing Hessian diagonal (desc_act), with static groups so the layout is unchanged;
    ``static_groups``: every group's parameters up front from the float weight; ``clip_search``: the MSE
    clipping search for each group's range (and for the layers outside the blocks, which are rounded to nearest).

    The defaults are the robust choice, act-order with static groups (as llm-compressor's default): with groups
    computed from the error-updated weight (``act_order=False, static_groups=False``, the paper's reference
    variant) the accuracy got worse, not better, with more calibration data on smollm2-135m (BENCHMARKS.md,
    "Bare commands").
    """

    TYPE: ClassVar[str] = "gptq"
    STAGE: ClassVar[str] = "weight"
    NEEDS: ClassVar[frozenset[str]] = frozenset({BLOCK_INPUTS, HESSIAN})
    percdamp: float = 0.01
    act_order: bool = True
    static_groups: bool = True
    clip_search: bool = False

    def __post_init__(self) -> None:
        _check_bool(self, "act_order", "static_groups", "clip_search")
        if not isinstance(self.percdamp, (int, float)) or isinstance(self.percdamp, bool) or not 0.0 < self.percdamp <= 1.0:
            raise SlimquantError(f"gptq: percdamp must be in (0, 1], got {self.percdamp!r}")

    def check(self, weight: "QuantSpec | None", input: "QuantSpec | None") -> None:  # noqa: A002
        _needs_weight(self, weight)
        _no_w8a8s_clip(self, weight)
        if input is not None and _lookup_qtype(input.qtype).is_float:
            raise NotSupportedYet("gptq with fp8 W8A8 is not supported yet; use rtn (int8 W8A8 works with gptq)")

    def outside_blocks(self) -> RTN:
        """The data-free step for layers outside the repeated blocks (no calibrated inputs there)."""
        return RTN(clip_search=self.clip_search)


@register_step_type
@dataclass(frozen=True)
class AutoRound(Step):
    """AutoRound (SignRound, Cheng et al. 2023), block by block: every planned linear of a block gets a rounding
    offset per weight (``v`` in [-0.5, 0.5], added before rounding) and, with ``minmax``, a factor in [0, 1] on
    each group's minimum and maximum (the range the scale and zero point come from), all trained together by
    signed gradient descent to minimise the MSE between the quantized block's output on the quantized model's
    inputs and the float block's output on the float model's inputs; the iteration with the lowest loss is kept.

    ``iters``: steps per block (the paper's 200; :meth:`light`: 50); ``lr``: step size of the signed updates,
    decayed linearly to 0 (None: ``1 / iters``, so the offsets can travel at most half a level: the paper's
    default); ``batch_size``: calibration items per step (their gradients summed); ``seed``: which items each
    step draws. The calibration set itself (the paper's ``nsamples`` x ``seqlen``) is the quantize call's.
    Layers outside the blocks are rounded to nearest."""

    TYPE: ClassVar[str] = "autoround"
    STAGE: ClassVar[str] = "weight"
    NEEDS: ClassVar[frozenset[str]] = frozenset({BLOCK_INPUTS, BLOCK_TARGETS})
    iters: int = 200
    lr: float | None = None
    batch_size: int = 4
    minmax: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _check_bool(self, "minmax")
        _check_positive_ints(self, "iters", "batch_size")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise SlimquantError(f"autoround: seed must be an integer, got {self.seed!r}")
        if self.lr is not None and (not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool)
                                    or not 0.0 < self.lr <= 1.0):  # fmt: skip
            raise SlimquantError(f"autoround: lr must be in (0, 1] (or None: 1 / iters), got {self.lr!r}")

    @classmethod
    def light(cls, **knobs: Any) -> "AutoRound":
        """AutoRound's light recipe: 50 steps per block at lr 5e-3 (about 4x faster, a little less accurate)."""
        return cls(**{"iters": 50, "lr": 5e-3, **knobs})

    @property
    def step_size(self) -> float:
        """The initial step size (``lr``, or ``1 / iters``)."""
        return float(self.lr) if self.lr is not None else 1.0 / self.iters

    def check(self, weight: "QuantSpec | None", input: "QuantSpec | None") -> None:  # noqa: A002
        _needs_weight(self, weight)
        assert weight is not None
        if _lookup_qtype(weight.qtype).is_float:
            raise NotSupportedYet(f"autoround with {weight.qtype} weights is not supported yet; it tunes integer grids")
        if input is not None:
            raise NotSupportedYet("autoround with activation quantization (W8A8) is not supported yet; it tunes "
                                  "weight-only recipes (--a_bit 16)")  # fmt: skip

    def outside_blocks(self) -> RTN:
        """The data-free step for layers outside the repeated blocks (no calibrated inputs there)."""
        return RTN()


def parse_sparsity_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` (at most N nonzero weights in every M consecutive inputs of a row,
    ``0 < N < M``) -> ``(N, M)``."""
    if pattern == "unstructured":
        return None
    parts = pattern.split(":") if isinstance(pattern, str) else []
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        n, m = int(parts[0]), int(parts[1])
        if 0 < n < m <= 64:
            return n, m
    raise SlimquantError(f"sparsity pattern {pattern!r}: expected 'unstructured' or 'N:M' (0 < N < M <= 64, e.g. 2:4)")


def _check_sparsity(step: Step) -> None:
    sp, pattern = step.sparsity, step.pattern  # type: ignore[attr-defined]
    if isinstance(sp, bool) or not isinstance(sp, (int, float)) or not 0.0 < sp < 1.0:
        raise SlimquantError(f"{step.TYPE}: sparsity must be a fraction in (0, 1), got {sp!r}")
    nm = parse_sparsity_pattern(pattern)
    if nm is not None and abs(sp - (1.0 - nm[0] / nm[1])) > 1e-9:
        raise SlimquantError(f"{step.TYPE}: pattern {pattern} keeps {nm[0]} of every {nm[1]} weights, sparsity "
                             f"{1 - nm[0] / nm[1]:g}; got sparsity {sp:g}")  # fmt: skip


def _check_sparse_grid(step: Step, weight: "QuantSpec | None") -> None:
    if weight is None:
        return
    if _lookup_qtype(weight.qtype).is_float:
        raise NotSupportedYet(f"{step.TYPE} with {weight.qtype} weights is not supported yet; it prunes float or integer "
                              "weights")  # fmt: skip
    if not weight.symmetric and weight.zero_point == "float":
        raise SlimquantError(f"{step.TYPE}: pruned weights must dequantize to exactly 0, which a float zero point does "
                             "not give; use an integer zero point (--w_zero_point int) or symmetric weights")  # fmt: skip
    if weight.gguf is not None or weight.outlier_fraction is not None:
        raise NotSupportedYet(f"{step.TYPE} with {weight.describe()} weights is not supported yet")


@register_step_type
@dataclass(frozen=True)
class SparseGPT(Step):
    """SparseGPT (Frantar & Alistarh 2023), block by block: GPTQ's column sweep with the inverse-Hessian error
    compensation, where each block of columns (``block_size``) first chooses its pruned weights by the OBS
    saliency ``w^2 / [H^-1]_jj^2`` (unstructured: the lowest ``sparsity`` of the block; ``N:M``: the lowest
    ``M - N`` of every ``M`` inputs of a row) and the kept ones are quantized to the layer's spec (jointly, as the
    paper's joint mode), the errors of both spread over the columns not yet visited. On layers the recipe keeps
    float it prunes without quantizing. Natural column order (no act-order)."""

    TYPE: ClassVar[str] = "sparsegpt"
    STAGE: ClassVar[str] = "weight"
    NEEDS: ClassVar[frozenset[str]] = frozenset({BLOCK_INPUTS, HESSIAN})
    PRUNES: ClassVar[bool] = True
    sparsity: float = 0.5
    pattern: str = "unstructured"
    percdamp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        _check_sparsity(self)
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float)) or not 0.0 < self.percdamp <= 1.0:
            raise SlimquantError(f"sparsegpt: percdamp must be in (0, 1], got {self.percdamp!r}")
        nm = parse_sparsity_pattern(self.pattern)
        if (not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1
                or (nm is not None and self.block_size % nm[1])):  # fmt: skip
            raise SlimquantError(f"sparsegpt: block_size must be a positive integer (a multiple of M for N:M), got "
                                 f"{self.block_size!r}")  # fmt: skip

    def check(self, weight: "QuantSpec | None", input: "QuantSpec | None") -> None:  # noqa: A002
        _check_sparse_grid(self, weight)
        if input is not None and weight is not None and _lookup_qtype(input.qtype).is_float:
            raise NotSupportedYet("sparsegpt with fp8 W8A8 is not supported yet")

    def outside_blocks(self) -> "RTN":
        """Layers outside the repeated blocks have no calibrated inputs: rounded to nearest, not pruned."""
        return RTN()


@register_step_type
@dataclass(frozen=True)
class Wanda(Step):
    """Wanda (Sun et al. 2023), block by block: each weight's score is ``|W_ij| * ||x_j||`` (its magnitude times
    the norm of its input channel over the calibration tokens, from the Hessian's diagonal), compared within each
    output row (unstructured: the row's lowest ``sparsity``; ``N:M``: the lowest ``M - N`` of every ``M`` inputs);
    the pruned weights are set to 0 with no update of the others, then the layer is rounded to nearest on its
    spec (float layers are only pruned)."""

    TYPE: ClassVar[str] = "wanda"
    STAGE: ClassVar[str] = "weight"
    NEEDS: ClassVar[frozenset[str]] = frozenset({BLOCK_INPUTS, HESSIAN})
    PRUNES: ClassVar[bool] = True
    sparsity: float = 0.5
    pattern: str = "unstructured"

    def __post_init__(self) -> None:
        _check_sparsity(self)

    def check(self, weight: "QuantSpec | None", input: "QuantSpec | None") -> None:  # noqa: A002
        _check_sparse_grid(self, weight)

    def outside_blocks(self) -> "RTN":
        """Layers outside the repeated blocks have no calibrated inputs: rounded to nearest, not pruned."""
        return RTN()


@register_step_type
@dataclass(frozen=True)
class QAT(Step):
    """Quantization-aware training: the layers are trained through fake quantization
    (:func:`slimquant.prepare_qat` -> any training loop -> :func:`slimquant.convert`), not solved here; a recipe
    holding it is refused by :func:`slimquant.quantize`. With it the recipe also admits the weight / input pairs
    only training produces (int2-8 weights of any granularity with int2-8 inputs: W4A8, W4A4; convolutions with
    quantized inputs).

    ``ranges``: ``"observer"`` (SimQAT: weight ranges from the current weights, input ranges an exponential
    moving average of the training batches' min / max with ``momentum``), ``"lsq"`` (learned step sizes) or
    ``"lsq+"`` (learned step sizes and zero points; asymmetric specs) or ``"slb"`` (SLB: each weight a learned
    distribution over the levels of an int2-int4 symmetric grid, or over ``{-1, +1}`` with ``slb_binary``,
    annealed from temperature ``slb_temperature[0]`` to ``[1]`` over ``slb_anneal_steps`` training steps; inputs
    observed; trains with ``fold_bn=False``) (:mod:`slimquant.nn.qat`); ``fold_bn``:
    train each Conv2d -> BatchNorm2d pair with the BN folded into the quantized weight (Krishnamoorthi 2018);
    ``freeze_bn_after`` / ``freeze_observers_after``: training steps after which the BN statistics / the observed
    input ranges stop moving (0: never)."""

    TYPE: ClassVar[str] = "qat"
    STAGE: ClassVar[str] = "weight"
    ranges: str = "observer"
    fold_bn: bool = True
    freeze_bn_after: int = 0
    freeze_observers_after: int = 0
    momentum: float = 0.9
    slb_binary: bool = False
    slb_temperature: tuple[float, float] = (1.0, 0.01)
    slb_anneal_steps: int = 1000

    def __post_init__(self) -> None:
        _check_bool(self, "fold_bn", "slb_binary")
        if self.ranges not in ("observer", "lsq", "lsq+", "slb"):
            raise SlimquantError(f"qat: unknown ranges {self.ranges!r}; valid: observer, lsq, lsq+, slb")
        if isinstance(self.slb_temperature, list):
            object.__setattr__(self, "slb_temperature", tuple(self.slb_temperature))
        t = self.slb_temperature
        if not (isinstance(t, tuple) and len(t) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                              and v > 0 for v in t)):  # fmt: skip
            raise SlimquantError(f"qat: slb_temperature must be two positive numbers (start, end), got {t!r}")
        if not isinstance(self.slb_anneal_steps, int) or isinstance(self.slb_anneal_steps, bool) or self.slb_anneal_steps < 1:
            raise SlimquantError(f"qat: slb_anneal_steps must be a positive number of training steps, got {self.slb_anneal_steps!r}")
        if self.ranges != "slb" and (self.slb_binary or t != (1.0, 0.01) or self.slb_anneal_steps != 1000):
            raise SlimquantError("qat: the slb_* knobs tune ranges='slb'")
        if self.ranges == "slb" and self.fold_bn:
            raise SlimquantError("qat ranges 'slb' learn the weights' levels directly and train with the BatchNorm "
                                 "after the convolution: set fold_bn=False")  # fmt: skip
        for knob in ("freeze_bn_after", "freeze_observers_after"):
            v = getattr(self, knob)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise SlimquantError(f"qat: {knob} must be a non-negative number of training steps (0: never), got {v!r}")
        if not isinstance(self.momentum, (int, float)) or isinstance(self.momentum, bool) or not 0.0 <= self.momentum < 1.0:
            raise SlimquantError(f"qat: momentum must be in [0, 1), got {self.momentum!r}")

    def check(self, weight: "QuantSpec | None", input: "QuantSpec | None") -> None:  # noqa: A002
        _needs_weight(self, weight)
        for role, spec in (("weight", weight), ("input", input)):
            if spec is not None and _lookup_qtype(spec.qtype).is_float:
                raise NotSupportedYet(f"qat with {spec.qtype} {role}s is not supported yet; QAT trains integer grids")
        if self.ranges == "slb" and weight is not None:
            wq = _lookup_qtype(weight.qtype)
            if not (wq.signed and weight.symmetric and 2 <= wq.bits <= 4) or (self.slb_binary and wq.bits != 2):
                raise SlimquantError(f"qat ranges 'slb' search signed symmetric int2-int4 weights (binary: int2), got "
                                     f"{weight.describe()}")  # fmt: skip
        if self.ranges == "lsq+":
            for role, spec in (("weight", weight), ("input", input)):
                if spec is not None and spec.symmetric and not spec.dynamic:
                    raise SlimquantError(f"qat ranges 'lsq+' learn zero points: the {role} spec must be asymmetric, "
                                         f"got {spec.describe()}")  # fmt: skip


# -- transforms of the float model (msModelSlim anti_method m1 / m2 / m4) -------------------------------------
@register_step_type
@dataclass(frozen=True)
class SmoothQuant(Step):
    """SmoothQuant (Xiao et al. 2022): per input channel ``s = max|x|^alpha / max|w|^(1-alpha)`` moves activation
    outliers into the weights (msModelSlim m1)."""

    TYPE: ClassVar[str] = "smoothquant"
    STAGE: ClassVar[str] = "model"
    NEEDS: ClassVar[frozenset[str]] = frozenset({LAYER_INPUTS})
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not 0.0 <= self.alpha <= 1.0:
            raise SlimquantError(f"smoothquant: alpha must be in [0, 1], got {self.alpha!r}")

    def check(self, weight: "QuantSpec | None", input: "QuantSpec | None") -> None:  # noqa: A002
        _needs_input(self, input, "SmoothQuant")


@register_step_type
@dataclass(frozen=True)
class SmoothQuantSearch(Step):
    """SmoothQuant with alpha searched per smoothing group, by quantized output error on sampled calibration
    inputs, "no smoothing" included (msModelSlim m4)."""

    TYPE: ClassVar[str] = "smoothquant_search"
    STAGE: ClassVar[str] = "model"
    NEEDS: ClassVar[frozenset[str]] = frozenset({LAYER_INPUTS})
    alphas: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    sample_rows: int = 512

    def __post_init__(self) -> None:
        object.__setattr__(self, "alphas", tuple(self.alphas))
        if not self.alphas or any(isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0
                                  for a in self.alphas):  # fmt: skip
            raise SlimquantError(f"smoothquant_search: alphas must be a non-empty list of values in [0, 1], got {self.alphas!r}")
        _check_positive_ints(self, "sample_rows")

    def check(self, weight: "QuantSpec | None", input: "QuantSpec | None") -> None:  # noqa: A002
        _needs_input(self, input, "SmoothQuant search")


@register_step_type
@dataclass(frozen=True)
class GammaMigration(Step):
    """Outlier Suppression's gamma migration (Wei et al. 2022): each norm's weight moves into the linears it
    feeds, data-free (msModelSlim m2; pair it with ``act_observer="token_clip"``, its token-wise clipping)."""

    TYPE: ClassVar[str] = "gamma_migration"
    STAGE: ClassVar[str] = "model"

    def check(self, weight: "QuantSpec | None", input: "QuantSpec | None") -> None:  # noqa: A002
        _needs_input(self, input, "Outlier Suppression")


@register_step_type
@dataclass(frozen=True)
class OutlierSuppression(Step):
    """Outlier Suppression (msModelSlim m2) in its OS+ form (Wei et al. 2022; 2023): per smoothing group, the
    norm's weight first moves into the linears it feeds (gamma migration, ``gamma_migration``), then the input
    channels whose calibration range exceeds a threshold ``t`` are scaled down to it (``s_j = max(1, max|x_j| /
    t)``, the linears' input columns multiplied back: OS+'s channel-wise scaling), ``t`` searched among
    ``thresholds`` quantiles of the channels' ranges (0.5 .. 1) by the quantized output error on ``sample_rows``
    sampled calibration rows, "no scaling" included. Pair it with ``act_observer="token_clip"`` (token-wise
    clipping; the flags do). OS+'s channel-wise shifting needs a bias after the norm to absorb it; RMSNorm models
    (Llama) have none, so it is not applied."""

    TYPE: ClassVar[str] = "outlier_suppression"
    STAGE: ClassVar[str] = "model"
    NEEDS: ClassVar[frozenset[str]] = frozenset({LAYER_INPUTS})
    thresholds: int = 20
    sample_rows: int = 512
    gamma_migration: bool = True

    def __post_init__(self) -> None:
        _check_bool(self, "gamma_migration")
        _check_positive_ints(self, "thresholds", "sample_rows")

    def check(self, weight: "QuantSpec | None", input: "QuantSpec | None") -> None:  # noqa: A002
        _needs_input(self, input, "Outlier Suppression")


@register_step_type
@dataclass(frozen=True)
class CBQPreprocess(Step):
    """CBQ's coarse-to-fine pre-processing (Ding et al., "CBQ: Cross-Block Quantization for Large Language Models",
    ICLR 2025; msModelSlim m5's first half), on the float model before any layer is quantized.

    Activations, per smoothing group: the input channels' calibration ranges ``a_j`` are split coarsely at
    ``Q3 + iqr_factor * IQR`` (the quartiles of all channels), then finely: among the coarse candidates (sorted)
    the split maximising the squared gap between the two sets' means minus ``fine_lambda`` times their variances
    marks the upper set as the extreme outliers. Either set (the extreme outliers, or every coarse candidate) is
    scaled down towards the largest channel left outside it, ``t`` (``s_j = (a_j / t) ** alpha``, the linears'
    input columns multiplied back); which set and ``alpha`` among ``alphas`` ("none" included) are chosen by the
    quantized output error on ``sample_rows`` sampled calibration rows (the extreme set alone leaves the range at
    the next-largest channel, which on smollm2's MLP inputs is still 100x the bulk).

    Weights, per linear of a group (after that scaling): the same detection on the ``|w|`` values of the matrix;
    the detected outliers are truncated to the largest ordinary magnitude when that lowers the quantized output
    error on the same rows (``truncate_weights``)."""

    TYPE: ClassVar[str] = "cbq_preprocess"
    STAGE: ClassVar[str] = "model"
    NEEDS: ClassVar[frozenset[str]] = frozenset({LAYER_INPUTS})
    iqr_factor: float = 1.5
    fine_lambda: float = 1.0
    alphas: tuple[float, ...] = (0.5, 0.75, 1.0)
    truncate_weights: bool = True
    sample_rows: int = 512

    def __post_init__(self) -> None:
        _check_bool(self, "truncate_weights")
        for name in ("iqr_factor", "fine_lambda"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise SlimquantError(f"cbq_preprocess: {name} must be a number >= 0, got {v!r}")
        if (not isinstance(self.alphas, tuple) or not self.alphas
                or any(isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 < a <= 1.0 for a in self.alphas)):  # fmt: skip
            raise SlimquantError(f"cbq_preprocess: alphas must be a non-empty tuple of numbers in (0, 1], got {self.alphas!r}")
        _check_positive_ints(self, "sample_rows")

    def check(self, weight: "QuantSpec | None", input: "QuantSpec | None") -> None:  # noqa: A002
        _needs_weight(self, weight)
        if input is not None and _lookup_qtype(input.qtype).is_float:
            raise NotSupportedYet("cbq_preprocess with fp8 inputs is not supported yet; it measures int8 inputs")


@register_step_type
@dataclass(frozen=True)
class CBQ(Step):
    """CBQ's cross-block reconstruction (Ding et al., ICLR 2025; msModelSlim m5), on the block-by-block pipeline.

    For block ``i`` the planned linears of the window of blocks ``i .. i + window - 1`` are fake-quantized
    together (the blocks after ``i`` are still float at that point), and trained so the window reproduces the
    float model: each weight's rounding offset is LoRA-Rounding, the rectified sigmoid of a low-rank matrix
    ``A1 @ A2`` (rank ``rank``; ``A1`` starts at 0, so training starts at round-to-nearest), each group's range
    has learnable factors (as AutoRound's), and each statically quantized input (W8A8) has learnable factors on
    its calibrated range, which the deployed layer then uses. Loss (CBQ's homologous reconstruction): MSE plus
    ``kl_weight`` times the KL divergence between the softmax over the hidden dimension of the float window's
    output and the quantized window's, on the quantized model's inputs and, with ``homologous`` (off by default:
    twice the cost, and no gain measured on smollm2-135m), on the float model's inputs too. Adam at ``lr`` for ``iters`` steps of ``batch_size`` calibration items; the parameters
    of the step with the lowest loss relative to round-to-nearest on its items are kept. Block ``i``'s result
    is kept; the later blocks of the window are solved again in their own windows (windows of ``window`` blocks
    overlapping by ``window - 1``). Layers outside the blocks are rounded to nearest."""

    TYPE: ClassVar[str] = "cbq"
    STAGE: ClassVar[str] = "weight"
    NEEDS: ClassVar[frozenset[str]] = frozenset({BLOCK_INPUTS, BLOCK_TARGETS})
    window: int = 2
    rank: int = 8
    iters: int = 100
    lr: float = 5e-3
    batch_size: int = 4
    kl_weight: float = 1.0
    homologous: bool = False
    learn_input_ranges: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _check_bool(self, "homologous", "learn_input_ranges")
        _check_positive_ints(self, "window", "rank", "iters", "batch_size")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise SlimquantError(f"cbq: seed must be an integer, got {self.seed!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0.0 < self.lr <= 1.0:
            raise SlimquantError(f"cbq: lr must be in (0, 1], got {self.lr!r}")
        if isinstance(self.kl_weight, bool) or not isinstance(self.kl_weight, (int, float)) or not self.kl_weight >= 0:
            raise SlimquantError(f"cbq: kl_weight must be a number >= 0, got {self.kl_weight!r}")

    def check(self, weight: "QuantSpec | None", input: "QuantSpec | None") -> None:  # noqa: A002
        _needs_weight(self, weight)
        assert weight is not None
        if _lookup_qtype(weight.qtype).is_float:
            raise NotSupportedYet(f"cbq with {weight.qtype} weights is not supported yet; it tunes integer grids")
        if weight.outlier_fraction is not None:
            raise NotSupportedYet("cbq with W8A8S weights (--co_sparse / --is_lowbit) is not supported yet")
        if input is not None and _lookup_qtype(input.qtype).is_float:
            raise NotSupportedYet("cbq with fp8 inputs is not supported yet; it tunes int8 input ranges")

    def outside_blocks(self) -> RTN:
        """The data-free step for layers outside the repeated blocks (no calibrated inputs there)."""
        return RTN()


# -- per-block transforms (msModelSlim anti_method m3) -------------------------------------------------------
@register_step_type
@dataclass(frozen=True)
class AWQ(Step):
    """AWQ (Lin et al. 2023) for weight-only recipes: per block, activation-aware scales searched on the block's
    calibration inputs over ``grid`` ratios; with a data-free weight step then AWQ's output-error clipping
    search (``clip``; a calibrated weight step such as GPTQ solves on the unclipped, scaled weights)."""

    TYPE: ClassVar[str] = "awq"
    STAGE: ClassVar[str] = "block"
    NEEDS: ClassVar[frozenset[str]] = frozenset({BLOCK_INPUTS})
    grid: int = 20
    clip: bool = True

    def __post_init__(self) -> None:
        _check_bool(self, "clip")
        _check_positive_ints(self, "grid")

    def check(self, weight: "QuantSpec | None", input: "QuantSpec | None") -> None:  # noqa: A002
        if weight is None:
            raise SlimquantError("awq scales weights for quantization; the recipe has no weight spec")
        if input is not None:
            raise NotSupportedYet("awq with activation quantization (W8A8) is not supported yet; "
                                  "use smoothquant, smoothquant_search or gamma_migration there")  # fmt: skip


def check_steps(steps: tuple[Step, ...]) -> None:
    """Steps in stage order (model, block, weight), each type once, exactly one weight step, last."""
    for i, s in enumerate(steps):
        if not isinstance(s, Step):
            raise SlimquantError(f"steps[{i}] must be a Step (e.g. slimquant.types.steps.GPTQ()), got {s!r}")
    order = [STAGES.index(s.STAGE) for s in steps]
    weights = [s for s in steps if s.STAGE == "weight"]
    if len(weights) != 1 or steps[-1].STAGE != "weight":
        raise SlimquantError(f"a recipe's steps end with exactly one weight step (rtn, gptq, ...), got "
                             f"[{', '.join(s.TYPE for s in steps)}]")  # fmt: skip
    if order != sorted(order):
        raise SlimquantError(f"steps run in stage order model -> block -> weight, got "
                             f"[{', '.join(f'{s.TYPE} ({s.STAGE})' for s in steps)}]")  # fmt: skip
    seen: set[str] = set()
    for s in steps:
        if s.TYPE in seen:
            raise SlimquantError(f"step {s.TYPE!r} is listed twice")
        seen.add(s.TYPE)


__all__ = ["Step", "RTN", "GPTQ", "AutoRound", "QAT", "SmoothQuant", "SmoothQuantSearch", "GammaMigration", "AWQ", "CBQ", "CBQPreprocess", "register_step_type",
           "step_types", "step_from_dict", "check_steps", "STAGES", "NEEDS", "LAYER_INPUTS", "BLOCK_INPUTS", "HESSIAN",
           "BLOCK_TARGETS", "BLOCKWISE_NEEDS"]
