"""Quantization specs per tensor role and the Recipe that groups them.

Both are frozen dataclasses validated at construction; a Recipe round-trips JSON and YAML exactly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any

from slimquant.errors import SlimquantError
from slimquant.types.gguf_types import gguf_type
from slimquant.types.qtype import QTYPES, qtype as _lookup_qtype
from slimquant.types.steps import (AWQ, BLOCKWISE_NEEDS, GPTQ, RTN, GammaMigration, SmoothQuant, SmoothQuantSearch, Step,
                                    check_steps, step_from_dict)

GROUP_SIZES = (32, 64, 128, 256)


class Granularity(str, Enum):
    """How quantization parameters are shared across a tensor."""

    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"  # one scale per output channel (row of a weight)
    PER_GROUP = "per_group"  # one scale per `group_size` consecutive input elements of a row
    PER_TOKEN = "per_token"  # activations: one scale per token (row of the input)

    @classmethod
    def parse(cls, value: "str | Granularity") -> "Granularity":
        if isinstance(value, Granularity):
            return value
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(g.value for g in cls)
            raise SlimquantError(f"unknown granularity {value!r}; valid: {valid}") from None


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor role (weight, input, output, kv) is quantized.

    Attributes:
        qtype: name of a qtype in :data:`slimquant.types.QTYPES` (``int4``, ``int8``, ...).
        granularity: per_tensor / per_channel / per_group / per_token.
        group_size: elements per group along the input dimension; only for per_group.
        symmetric: symmetric (no zero point) or asymmetric (zero point / offset).
        dynamic: activations only: compute the range at run time instead of calibrating.
        zero_point: ``int`` (seed 003: rounded to an integer) or ``float`` (unrounded, so the range
            ends land exactly on the grid; weight-only, asymmetric only).
        gguf: weights only: a GGUF block type (``Q4_0``, ``Q4_K``, ... :mod:`slimquant.types.gguf_types`) whose
            grid the solver keeps to (fp16 scales, 6-bit super-block scales for K-types), so the GGUF export is
            exact. The other fields must be that type's (:func:`gguf_spec` builds the spec).
        outlier_fraction: weights only, W8A8S (msModelSlim's sparse quantization, ``--co_sparse`` /
            ``--is_lowbit``): the int8 scale puts every weight of a channel (of the tensor, per_tensor) on the signed
            4-bit range ``[-8, 7]`` except at most this fraction, the largest in magnitude (the outliers), which keep
            int8 values on the same scale (up to +-127). 0: no outliers (4-bit values held in int8). The int8 values
            so concentrate on 16 levels, which W8A8SC compression (:mod:`slimquant.formats.w8a8sc`) exploits. Needs
            qtype int8, symmetric, per_channel or per_tensor, and static int8 inputs.
    """

    qtype: str = "int8"
    granularity: Granularity = Granularity.PER_CHANNEL
    group_size: int | None = None
    symmetric: bool = True
    dynamic: bool = False
    zero_point: str = "int"
    gguf: str | None = None
    outlier_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.zero_point not in ("int", "float"):
            raise SlimquantError(f"zero_point must be 'int' or 'float', got {self.zero_point!r}")
        if self.gguf is not None:
            t = gguf_type(self.gguf)
            object.__setattr__(self, "gguf", t.name)
            want = _gguf_grid_spec(t.name)
            got = (self.qtype, Granularity.parse(self.granularity), self.group_size, self.symmetric, self.dynamic,
                   self.zero_point)
            if got != (want.qtype, want.granularity, want.group_size, want.symmetric, False, want.zero_point):
                raise SlimquantError(f"gguf {t.name} is the grid {want.describe()} (qtype {want.qtype}, per_group, "
                                     f"group_size {want.group_size}, symmetric {want.symmetric}, zero_point "
                                     f"{want.zero_point!r}); this spec says {self.qtype} {self.granularity} "
                                     f"group_size {self.group_size} symmetric {self.symmetric} zero_point "
                                     f"{self.zero_point!r}")  # fmt: skip
        _lookup_qtype(self.qtype)
        object.__setattr__(self, "granularity", Granularity.parse(self.granularity))
        if self.granularity is Granularity.PER_GROUP:
            if not isinstance(self.group_size, int) or self.group_size <= 0 or self.group_size % 8:
                raise SlimquantError(
                    f"per_group needs a positive group_size that is a multiple of 8, got {self.group_size!r}"
                )
        elif self.group_size is not None:
            raise SlimquantError(f"group_size={self.group_size} is only valid with per_group granularity")
        if QTYPES[self.qtype].is_float and not self.symmetric:
            raise SlimquantError(f"{self.qtype} is a float type and can only be quantized symmetrically")
        f = self.outlier_fraction
        if f is not None:
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 0.5:
                raise SlimquantError(f"outlier_fraction must be a fraction in [0, 0.5] (W8A8S: 0.01-0.1), got {f!r}")
            object.__setattr__(self, "outlier_fraction", float(f))
            if (self.qtype != "int8" or not self.symmetric or self.gguf is not None
                    or self.granularity not in (Granularity.PER_CHANNEL, Granularity.PER_TENSOR)):  # fmt: skip
                raise SlimquantError(f"outlier_fraction (W8A8S: 4-bit values with int8 outliers) needs symmetric int8 "
                                     f"weights per channel or per tensor, got {self.qtype} {self.granularity.value} "
                                     f"{'sym' if self.symmetric else 'asym'}")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["granularity"] = self.granularity.value
        for optional in ("gguf", "outlier_fraction"):
            if d[optional] is None:
                del d[optional]  # specs without them keep the layout older checkpoints and recipes have
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantSpec":
        return cls(**_checked_keys(cls, data, "QuantSpec"))

    def describe(self) -> str:
        """Short human label, e.g. ``int4 g64 asym``."""
        gran = {
            Granularity.PER_TENSOR: "per-tensor",
            Granularity.PER_CHANNEL: "per-channel",
            Granularity.PER_TOKEN: "per-token",
            Granularity.PER_GROUP: f"g{self.group_size}",
        }[self.granularity]
        sym = "sym" if self.symmetric else ("asym" if self.zero_point == "int" else "asym-fzp")
        out = f"{self.qtype} {gran} {sym}" + (f" gguf:{self.gguf}" if self.gguf else "")
        if self.outlier_fraction is not None:
            out += f" w8a8s:{self.outlier_fraction:g}"  # 4-bit values, this fraction of int8 outliers
        return out

    @property
    def is_w8a8s(self) -> bool:
        """Whether this is a W8A8S weight spec (4-bit values with int8 outliers, :attr:`outlier_fraction`)."""
        return self.outlier_fraction is not None


def gguf_spec(name: str) -> QuantSpec:
    """The weight spec of a GGUF block type (``Q4_0``, ``Q4_K``, ...) with ``gguf`` set: its solver keeps to the
    type's exact grid."""
    base = _gguf_grid_spec(name)
    return QuantSpec(base.qtype, base.granularity, base.group_size, base.symmetric, zero_point=base.zero_point,
                     gguf=gguf_type(name).name)  # fmt: skip


def _gguf_grid_spec(name: str) -> QuantSpec:
    t = gguf_type(name)
    return QuantSpec(t.qtype, Granularity.PER_GROUP, t.group_size, t.symmetric,
                     zero_point="int" if t.symmetric else "float")  # fmt: skip


# How a static activation range is chosen from calibration data (msModelSlim act_method 1/2/3 =
# minmax / histogram / auto). "auto" keeps, per layer, the candidate with the lowest output error.
KV_INT8_DYNAMIC = QuantSpec("int8", Granularity.PER_TOKEN, None, True, dynamic=True)
# msModelSlim C8: int8 symmetric, one static scale per (head, channel), calibrated.
KV_INT8_STATIC = QuantSpec("int8", Granularity.PER_CHANNEL, None, True)
# Attention inputs (msModelSlim use_fa_quant): int8 symmetric, one static scale per head (the head is the channel).
FA_INT8_PER_HEAD = QuantSpec("int8", Granularity.PER_CHANNEL, None, True)
ACT_OBSERVERS = ("minmax", "moving_average", "histogram", "histogram_mse", "histogram_kl", "token_clip", "auto")
RECIPE_VERSION = 2


class _Inherit:
    """The value of a :class:`LayerOverride` field that is not overridden (the recipe's own applies)."""

    _instance: "_Inherit | None" = None

    def __new__(cls) -> "_Inherit":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "INHERIT"

    def __reduce__(self) -> str:
        return "INHERIT"


INHERIT = _Inherit()


@dataclass(frozen=True)
class LayerOverride:
    """What the layers a pattern matches do differently from the recipe; a field left at ``INHERIT`` keeps the
    recipe's.

    Attributes:
        weight: their weight spec; ``None`` keeps them float.
        input: their input spec (W8A8, static or dynamic); ``None`` makes them weight-only.
        weight_step: the weight step that solves them (e.g. ``RTN()`` where the recipe runs ``GPTQ()``).
    """

    weight: "QuantSpec | None | _Inherit" = INHERIT
    input: "QuantSpec | None | _Inherit" = INHERIT
    weight_step: "Step | _Inherit" = INHERIT

    def __post_init__(self) -> None:
        for role in ("weight", "input"):
            v = getattr(self, role)
            if isinstance(v, dict):
                object.__setattr__(self, role, QuantSpec.from_dict(v))
            elif not (v is INHERIT or v is None or isinstance(v, QuantSpec)):
                raise SlimquantError(f"LayerOverride {role} must be a QuantSpec, None or INHERIT, got {v!r}")
        ws = self.weight_step
        if isinstance(ws, dict):
            object.__setattr__(self, "weight_step", step_from_dict(ws, "override weight_step"))
            ws = self.weight_step
        if not (ws is INHERIT or (isinstance(ws, Step) and ws.STAGE == "weight")):
            raise SlimquantError(f"LayerOverride weight_step must be a weight step (rtn, gptq, ...), got {ws!r}")

    def resolve(self, recipe: "Recipe") -> tuple["QuantSpec | None", "QuantSpec | None", Step]:
        """``(weight, input, weight step)`` of the layers this override applies to."""
        return (recipe.weight if self.weight is INHERIT else self.weight,  # type: ignore[return-value]
                recipe.input if self.input is INHERIT else self.input,
                recipe.weight_step if self.weight_step is INHERIT else self.weight_step)  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for role in ("weight", "input"):
            v = getattr(self, role)
            if v is not INHERIT:
                out[role] = None if v is None else v.to_dict()  # type: ignore[union-attr]
        if self.weight_step is not INHERIT:
            out["weight_step"] = self.weight_step.to_dict()  # type: ignore[union-attr]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], unregistered_steps: bool = False) -> "LayerOverride":
        """From :meth:`to_dict`'s form, or a bare QuantSpec mapping (version 1: a weight spec)."""
        if not isinstance(data, dict):
            raise SlimquantError(f"an override is an object, got {data!r}")
        if "qtype" in data:
            return cls(weight=QuantSpec.from_dict(data))
        unknown = set(data) - {"weight", "input", "weight_step"}
        if unknown:
            raise SlimquantError(f"unknown override field(s) {sorted(unknown)}; valid: ['input', 'weight', 'weight_step']")
        kw: dict[str, Any] = {}
        for role in ("weight", "input"):
            if role in data:
                kw[role] = None if data[role] is None else QuantSpec.from_dict(data[role])
        if "weight_step" in data:
            kw["weight_step"] = step_from_dict(data["weight_step"], "override weight_step", unregistered_steps)
        return cls(**kw)


_SPEC_ROLES = ("weight", "input", "output", "kv", "embedding", "fa")


@dataclass(frozen=True)
class Recipe:
    """Everything a quantization run needs to know, independent of the model: the tensor specs, which layers
    they apply to, and the steps (:mod:`slimquant.types.steps`) that produce the quantized weights.

    Attributes:
        weight: spec for the weights of Linear/Conv2d layers (None: weights stay float).
        input: spec for the inputs of quantized Linear layers (W8A8): int8 ``per_tensor``
            (static, calibrated; asymmetric as msModelSlim) or ``per_token`` with ``dynamic=True``
            (symmetric, computed at run time); fp8 types alike. Needs 8-bit symmetric
            per-channel/per-tensor weights.
        kv: KV-cache spec (:class:`slimquant.nn.kv_cache.Int8KVCache`): ``KV_INT8_DYNAMIC``, int8
            ``per_token`` ``dynamic`` symmetric (one scale per token and head, computed as tokens arrive),
            or ``KV_INT8_STATIC``, int8 ``per_channel`` symmetric with static scales per (head, channel)
            calibrated on data (msModelSlim C8).
        output: not built yet: must be None.
        fa: attention-input spec (msModelSlim ``use_fa_quant``): ``FA_INT8_PER_HEAD``, static int8
            symmetric scales per head for Q, K and V calibrated on data (:mod:`slimquant.nn.fa_quant`).
        fa_amp: with ``fa``, how many attention layers fall back to float: those whose quantized
            attention output has the largest relative error on the calibration data (msModelSlim ``fa_amp``).
        disable_level: automatic fallback (msModelSlim ``--disable_level L<n>``): the ``n`` planned Linear layers
            whose quantization alone costs the model the most on the calibration data (exact ablation, KL vs
            the float model; :mod:`slimquant.search.sensitivity`) stay float. Applied after ``disable_names``
            and ``disable_last_linear``; needs calibration data.
        steps: the algorithms, in stage order: transforms of the float model (``SmoothQuant``,
            ``SmoothQuantSearch``, ``OutlierSuppression``, ``GammaMigration``), per-block transforms (``AWQ``), then
            exactly one weight step (``RTN``, ``GPTQ``, ``AutoRound``, or a pruning step, ``SparseGPT`` /
            ``Wanda``, which with ``weight=None`` prunes the float model), each with its own knobs. Default:
            ``(RTN(),)``.
        disable_names: layer names, globs or ``re:`` regexes to keep in float.
        disable_last_linear: keep the model's output projection (lm_head) in float.
        embedding: spec for nn.Embedding weights (None: embeddings stay float).
        include_conv: quantize Conv2d layers too (for vision models).
        act_observer: how static input ranges are chosen from calibration data (ACT_OBSERVERS);
            ``token_clip`` picks, per layer, the quantile of per-token minima/maxima (1 .. 0.95) with
            the lowest output error.
        sigma_factor: clip static input ranges at mean +- sigma_factor * std (msModelSlim use_sigma).
        overrides: ``(pattern, LayerOverride)`` pairs: the first pattern (name, glob or ``re:``) matching a
            layer sets what it does differently: its weight spec (or float), its input spec (W8A8 or weight-only),
            its weight step. One checkpoint can so mix W4A16, W8A16, W8A8 and float layers. A bare QuantSpec in
            place of the LayerOverride sets the weight spec.
    """

    weight: QuantSpec | None = field(default_factory=lambda: QuantSpec("int8", Granularity.PER_CHANNEL))
    input: QuantSpec | None = None
    output: QuantSpec | None = None
    kv: QuantSpec | None = None
    steps: tuple[Step, ...] = (RTN(),)
    disable_names: tuple[str, ...] = ()
    disable_last_linear: bool = True
    embedding: QuantSpec | None = None
    include_conv: bool = True
    overrides: tuple[tuple[str, LayerOverride], ...] = ()
    act_observer: str = "minmax"
    sigma_factor: float | None = None
    fa: QuantSpec | None = None
    fa_amp: int = 0
    disable_level: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "disable_names", tuple(self.disable_names))
        steps = self.steps
        if isinstance(steps, Step):
            steps = (steps,)
        if not isinstance(steps, (tuple, list)):
            raise SlimquantError(f"steps must be a list of steps, got {steps!r}")
        object.__setattr__(self, "steps", tuple(steps))
        check_steps(self.steps)
        pairs = []
        for item in self.overrides:
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
                raise SlimquantError(f"overrides entries must be (pattern, LayerOverride) pairs, got {item!r}")
            ov = item[1]
            if isinstance(ov, QuantSpec):
                ov = LayerOverride(weight=ov)
            elif isinstance(ov, dict):
                ov = LayerOverride.from_dict(ov)
            elif not isinstance(ov, LayerOverride):
                raise SlimquantError(f"override {item[0]!r}: expected a LayerOverride or QuantSpec, got {ov!r}")
            pairs.append((item[0], ov))
        object.__setattr__(self, "overrides", tuple(pairs))
        from slimquant.errors import NotSupportedYet

        if self.output is not None:
            raise NotSupportedYet("output quantization is not supported yet")
        if self.kv is not None and self.kv not in (KV_INT8_DYNAMIC, KV_INT8_STATIC):
            raise NotSupportedYet(
                f"kv {self.kv.describe()}{' dynamic' if self.kv.dynamic else ''} is not supported yet; the KV cache is "
                "quantized int8 per token (QuantSpec('int8', 'per_token', dynamic=True)) or per channel with static "
                "scales (QuantSpec('int8', 'per_channel'))"
            )
        if self.input is not None:
            self._check_layer_specs(self.weight, self.input, "", self.weight_step)
        if self.fa is not None and self.fa != FA_INT8_PER_HEAD:
            raise NotSupportedYet(f"fa {self.fa.describe()} is not supported yet; attention inputs are quantized int8 "
                                  "symmetric per head (QuantSpec('int8', 'per_channel'))")  # fmt: skip
        for s in self.steps_of("model"):
            s.check(self.weight, self.input)
        for where, weight, inp, ws in self.layer_combinations():
            if weight is not None and weight.is_w8a8s and inp is None:
                raise SlimquantError(f"{f'override {where}: ' if where else ''}W8A8S weights ({weight.describe()}) go "
                                     "with static int8 inputs (--a_bit 8)")  # fmt: skip
            if where and weight is not None:
                if weight.granularity is Granularity.PER_TOKEN:
                    raise SlimquantError(f"override {where}: per_token granularity applies to activations, not weights")
                if inp is not None:
                    self._check_layer_specs(weight, inp, where, ws)
            overridden = any(w is not None for p, w, _, _ in self.layer_combinations() if p)
            if weight is None and (where or overridden):
                continue  # float layers run no weight step
            try:
                for s in (*self.steps_of("block"), ws):
                    s.check(weight, inp)
            except SlimquantError as e:
                raise type(e)(f"override {where}: {e}" if where else str(e)) from None
        if isinstance(self.disable_level, bool) or not isinstance(self.disable_level, int) or self.disable_level < 0:
            raise SlimquantError(f"disable_level must be a non-negative integer (layers left float), got "
                                 f"{self.disable_level!r}")  # fmt: skip
        if not isinstance(self.fa_amp, int) or self.fa_amp < 0:
            raise SlimquantError(f"fa_amp must be a non-negative integer (layers left float), got {self.fa_amp!r}")
        if self.fa_amp and self.fa is None:
            raise SlimquantError(f"fa_amp {self.fa_amp} chooses attention layers to leave float; it needs fa (use_fa_quant)")
        if self.act_observer not in ACT_OBSERVERS:
            raise SlimquantError(f"unknown act_observer {self.act_observer!r}; valid: {', '.join(ACT_OBSERVERS)}")
        if self.sigma_factor is not None and not self.sigma_factor > 0:
            raise SlimquantError(f"sigma_factor must be positive, got {self.sigma_factor}")
        if self.weight is not None and self.weight.granularity in (Granularity.PER_TOKEN,):
            raise SlimquantError("per_token granularity applies to activations, not weights")
        if self.embedding is not None and self.embedding.granularity not in (
            Granularity.PER_CHANNEL,
            Granularity.PER_GROUP,
        ):
            raise SlimquantError("embedding quantization must be per_channel (per row) or per_group")
        if self.embedding is not None and self.embedding.is_w8a8s:
            raise SlimquantError("embedding: outlier_fraction (W8A8S) applies to Linear weights with int8 inputs")

    @staticmethod
    def _check_layer_specs(w: QuantSpec | None, inp: QuantSpec, where: str, step: Step | None = None) -> None:
        """A (weight, input) pair W8A8 layers can run (under a QAT weight step: any integer pair the fake-quantized
        layers train, int2-8 weights with int2-8 inputs); ``where``: the override it comes from ('' = the
        recipe)."""
        at = f"override {where}: " if where else ""
        qt = _lookup_qtype(inp.qtype)
        if step is not None and step.TYPE == "qat":
            if qt.is_float or not 2 <= qt.bits <= 8:
                raise SlimquantError(f"{at}input qtype {inp.qtype}: QAT quantizes inputs to 2-8 bit integers")
            if inp.dynamic and (inp.granularity is not Granularity.PER_TOKEN or not inp.symmetric or qt.bits != 8):
                raise SlimquantError(f"{at}dynamic inputs are quantized int8 per_token and symmetric")
            if not inp.dynamic and inp.granularity is not Granularity.PER_TENSOR:
                raise SlimquantError(f"{at}static inputs are quantized per_tensor, not {inp.granularity.value}")
            if w is None:
                raise SlimquantError(f"{at}activation quantization needs quantized weights (weight spec is None)")
            return
        if qt.bits != 8 or not qt.signed:
            raise SlimquantError(f"{at}input qtype {inp.qtype}: activations are quantized to int8 or fp8 only")
        if inp.dynamic:
            if inp.granularity is not Granularity.PER_TOKEN or not inp.symmetric:
                raise SlimquantError(f"{at}dynamic inputs are quantized per_token and symmetric")
        elif inp.granularity is not Granularity.PER_TENSOR:
            raise SlimquantError(f"{at}static inputs are quantized per_tensor, not {inp.granularity.value} "
                                 "(per_token needs dynamic=True)")  # fmt: skip
        if qt.is_float and not inp.symmetric:
            raise SlimquantError(f"{at}{inp.qtype} inputs can only be quantized symmetrically")
        if w is None:
            raise SlimquantError(f"{at}activation quantization needs quantized weights (weight spec is None)")
        if w.is_w8a8s and (inp.dynamic or qt.is_float):
            raise SlimquantError(f"{at}W8A8S weights ({w.describe()}) go with static int8 inputs (input_scale / "
                                 f"input_offset), not {inp.describe()}{' dynamic' if inp.dynamic else ''}")  # fmt: skip
        wq = _lookup_qtype(w.qtype)
        if wq.bits != 8 or wq.is_float != qt.is_float or not w.symmetric or w.granularity not in (
            Granularity.PER_CHANNEL, Granularity.PER_TENSOR
        ):
            raise SlimquantError(
                f"{at}W8A8 needs symmetric 8-bit {'fp8' if qt.is_float else 'int8'} weights per channel or per tensor, "
                f"got {w.describe()} (per-group and low-bit weights go with a_bit 16)"
            )

    def layer_combinations(self) -> list[tuple[str, QuantSpec | None, QuantSpec | None, Step]]:
        """``(pattern, weight, input, weight step)`` of the recipe's own layers (pattern ``''``) and of each
        override's."""
        out: list[tuple[str, QuantSpec | None, QuantSpec | None, Step]] = [("", self.weight, self.input, self.weight_step)]
        out += [(p, *ov.resolve(self)) for p, ov in self.overrides]
        return out

    # -- what the steps declare --------------------------------------------------------------------------
    @property
    def weight_step(self) -> Step:
        """The step that solves the weights (the last one)."""
        return self.steps[-1]

    @property
    def algorithm(self) -> str:
        """The weight step's type (``rtn``, ``gptq``, ...), for labels and logs."""
        return self.weight_step.TYPE

    def all_steps(self) -> tuple[Step, ...]:
        """The recipe's steps and the weight steps its overrides name."""
        extra = tuple(ov.weight_step for _, ov in self.overrides if isinstance(ov.weight_step, Step))
        return self.steps + extra

    @property
    def has_activation_quantization(self) -> bool:
        """Whether any layer (the recipe's or an override's) quantizes its inputs (W8A8)."""
        return any(w is not None and i is not None for _, w, i, _ in self.layer_combinations())

    def steps_of(self, stage: str) -> tuple[Step, ...]:
        """The steps of one stage (``model``, ``block``, ``weight``), in recipe order."""
        return tuple(s for s in self.steps if s.STAGE == stage)

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing needs calibration data (static inputs, attention or static KV quantization, or a step
        that needs data)."""
        combos = self.layer_combinations()
        static = any(w is not None and i is not None and not i.dynamic for _, w, i, _ in combos)
        return (static or self.fa is not None or self.kv == KV_INT8_STATIC or self.disable_level > 0
                or any(s.needs_calibration for s in self.all_steps()))  # fmt: skip

    @property
    def block_by_block(self) -> bool:
        """Whether a step needs each block's inputs from the quantized blocks before it (GPTQ, AWQ): the
        sequential pipeline then runs, with a resumable work directory. The one place this is decided, from the
        steps' needs (streaming from disk is block by block too, whatever the recipe)."""
        return any(s.NEEDS & BLOCKWISE_NEEDS for s in self.all_steps())

    @property
    def quant_type(self) -> str:
        """msModelSlim-style label: w8a16, w4a16, ..., w8a8, w8a8_dynamic, wfp8afp8(_dynamic)."""
        if self.weight is None:
            return "float"
        qt = _lookup_qtype(self.weight.qtype)
        if self.input is not None:
            if self.weight.is_w8a8s:
                return "w8a8s"
            base = "wfp8afp8" if qt.is_float else "w8a8"
            return base + ("_dynamic" if self.input.dynamic else "")
        return "wfp8a16" if qt.is_float else f"w{qt.bits}a16"

    # -- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "slimquant.Recipe", "version": RECIPE_VERSION}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, QuantSpec):
                v = v.to_dict()
            elif f.name == "overrides":
                v = [[pattern, ov.to_dict()] for pattern, ov in v]
            elif f.name == "steps":
                v = [s.to_dict() for s in v]
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], unregistered_steps: bool = False) -> "Recipe":
        """A recipe from :meth:`to_dict`'s form; version 1 (one flat namespace: ``algorithm``, ``smooth``,
        ``gptq_*``, ``awq_*``, written before steps existed) is read into the same steps.
        ``unregistered_steps=True`` (a checkpoint's record): step types this process does not know are kept as
        :class:`slimquant.types.steps.UnregisteredStep` instead of refused."""
        if not isinstance(data, dict):
            raise SlimquantError(f"a recipe is a mapping, got {type(data).__name__}")
        data = dict(data)
        tag = data.pop("type", "slimquant.Recipe")
        version = data.pop("version", 1)
        if tag != "slimquant.Recipe" or version not in (1, RECIPE_VERSION):
            raise SlimquantError(f"not a slimquant recipe this version reads (type={tag!r}, version={version!r}; "
                                 f"versions 1 and {RECIPE_VERSION} are read)")  # fmt: skip
        if version == 1:
            data = _v1_to_v2(data)
        data = _checked_keys(cls, data, "Recipe")
        for role in _SPEC_ROLES:
            if data.get(role) is not None:
                data[role] = QuantSpec.from_dict(data[role])
        if "disable_names" in data:
            data["disable_names"] = tuple(data["disable_names"])
        if isinstance(data.get("overrides"), list):
            ovs = []
            for i, item in enumerate(data["overrides"]):
                if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
                    raise SlimquantError(f"overrides[{i}] must be a [pattern, override] pair, got {item!r}")
                ovs.append((item[0], LayerOverride.from_dict(item[1], unregistered_steps)))
            data["overrides"] = tuple(ovs)
        if "steps" in data:
            if not isinstance(data["steps"], list):
                raise SlimquantError(f"recipe steps must be a list, got {data['steps']!r}")
            data["steps"] = tuple(step_from_dict(s, f"steps[{i}]", unregistered_steps) for i, s in enumerate(data["steps"]))
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise SlimquantError(f"recipe is not valid JSON: {e}") from None

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=True)

    @classmethod
    def from_yaml(cls, text: str) -> "Recipe":
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SlimquantError(f"recipe is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise SlimquantError("recipe YAML must be a mapping")
        return cls.from_dict(data)

    @classmethod
    def from_flags(cls, flags: "str | list[str] | dict[str, Any]") -> "Recipe":
        """The recipe ``slimquant quantize`` builds from the same msModelSlim flags, e.g.
        ``Recipe.from_flags("--w_bit 4 --group_size 64 --w_method gptq")`` (see :mod:`slimquant.types.flags`)."""
        from slimquant.types.flags import recipe_from_flags

        return recipe_from_flags(flags)

    @classmethod
    def from_file(cls, path: str) -> "Recipe":
        """Read a recipe from a .json, .yaml or .yml file."""
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as e:
            raise SlimquantError(f"cannot read recipe {path}: {e.strerror}") from None
        try:
            return cls.from_yaml(text) if path.endswith((".yaml", ".yml")) else cls.from_json(text)
        except SlimquantError as e:
            raise type(e)(f"{path}: {e}") from None  # NotSupportedYet stays NotSupportedYet


# Version 1 recipes: the algorithm knobs of every step shared one namespace.
_V1_STEP_FIELDS = ("algorithm", "clip_search", "smooth", "smooth_alpha", "gptq_percdamp", "gptq_act_order",
                   "gptq_static_groups", "awq_grid", "awq_clip")  # fmt: skip


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 recipe mapping in version 2's form: its flat algorithm fields become steps."""
    data = dict(data)
    if "steps" in data:
        raise SlimquantError("a version 1 recipe has no 'steps' (they came with version 2)")
    v1 = {k: data.pop(k) for k in _V1_STEP_FIELDS if k in data}
    algorithm = v1.get("algorithm", "rtn")
    smooth = v1.get("smooth")
    steps: list[Step] = []
    if smooth is not None:
        if smooth == "m1":
            steps.append(SmoothQuant(alpha=v1.get("smooth_alpha", 0.5)))
        elif smooth == "m2":
            steps.append(GammaMigration())
        elif smooth == "m4":
            steps.append(SmoothQuantSearch())
        elif smooth == "m3":
            steps.append(AWQ(grid=v1.get("awq_grid", 20), clip=v1.get("awq_clip", True)))
        else:
            raise SlimquantError(f"unknown smooth method {smooth!r}; valid: m1, m2, m3, m4")
    clip = v1.get("clip_search", False)
    if algorithm == "rtn":
        steps.append(RTN(clip_search=clip))
    elif algorithm == "gptq":
        steps.append(GPTQ(percdamp=v1.get("gptq_percdamp", 0.01), act_order=v1.get("gptq_act_order", False),
                          static_groups=v1.get("gptq_static_groups", False), clip_search=clip))  # fmt: skip
    else:
        raise SlimquantError(f"unknown algorithm {algorithm!r}; valid: rtn, gptq")
    data["steps"] = [s.to_dict() for s in steps]
    return data


def _checked_keys(cls: type, data: dict[str, Any], what: str) -> dict[str, Any]:
    valid = {f.name for f in fields(cls)}
    unknown = set(data) - valid
    if unknown:
        raise SlimquantError(f"unknown {what} field(s) {sorted(unknown)}; valid: {sorted(valid)}")
    return data
