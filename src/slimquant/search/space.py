"""A per-layer search space whose configurations are assembled, not re-quantized (the bit-width search's base).

Every searchable layer's quantized module is computed once per option (:class:`Assembly`); a configuration (one
option per layer) is then put together by swapping those modules into the float model for the duration of a
``with`` block, so evaluating it costs one evaluation, not one quantization. Options solved with round to
nearest are exactly what quantizing that configuration would give; options solved with a calibrated step
(GPTQ) take each layer from a run of that option over the whole model (its Hessians saw that option's
quantized earlier layers, not the configuration's): a standard approximation, reported as such.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from slimquant.errors import SlimquantError
from slimquant.pipeline.convert import LayerPlan, calibrate_input_ranges, convert, plan, quantized, refuse_quantized
from slimquant.surgery import set_module
from slimquant.types.qtype import int_qtype_for_bits
from slimquant.types.spec import Granularity, LayerOverride, QuantSpec, Recipe

log = logging.getLogger(__name__)

FLOAT = "float"


@dataclass(frozen=True)
class Option:
    """One choice for a layer: a label, its weight spec (None: float) and input spec (None: weight-only)."""

    label: str
    weight: QuantSpec | None
    input: QuantSpec | None = None

    @property
    def is_float(self) -> bool:
        return self.weight is None


def bit_options(bits: Sequence[int], group_size: int | None = None, symmetric: bool = True) -> list[Option]:
    """Options from the seed's ``network.bit_candidates`` (e.g. ``[4, 8, 16]``): 16 / 32 keep the layer float,
    8 is int8 per channel (symmetric), lower widths (2-6) int<b> per group of ``group_size`` (per channel when None)."""
    out: list[Option] = []
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, int):
            raise SlimquantError(f"bit candidate {b!r} is not an integer")
        if b in (16, 32):
            opt = Option(FLOAT, None)
        elif b == 8:
            opt = Option("w8", QuantSpec("int8", Granularity.PER_CHANNEL, None, True))
        elif b in (2, 3, 4, 5, 6):
            gran = Granularity.PER_GROUP if group_size else Granularity.PER_CHANNEL
            opt = Option(f"w{b}" + (f"g{group_size}" if group_size else ""),
                         QuantSpec(int_qtype_for_bits(b).name, gran, group_size or None, symmetric))  # fmt: skip
        else:
            raise SlimquantError(f"bit candidate {b}: valid are 2, 3, 4, 5, 6, 8 and 16 / 32 (float)")
        if any(o.label == opt.label for o in out):
            raise SlimquantError(f"bit candidate {b} is given twice")
        out.append(opt)
    if not out:
        raise SlimquantError("no bit candidates")
    return out


class Assembly:
    """The quantized module of every (layer, option), computed once; see the module docstring.

    ``layers``: the searchable layer names (default: every Linear / Conv2d layer ``base``'s plan quantizes);
    ``base``: the recipe whose plan and knobs apply (``disable_names``, ``disable_last_linear``, act_observer);
    its weight step solves the options (RTN: exact per layer; a calibrated step: per option over the whole model,
    on a copy). ``calib_data`` is needed by calibrated steps and static input options.
    """

    def __init__(self, model: nn.Module, options: Sequence[Option], base: Recipe | None = None,
                 layers: Sequence[str] | None = None, calib_data: Any = None, show_progress: bool = True) -> None:  # fmt: skip
        refuse_quantized(model, "a search space is built on the float model")
        base = base or Recipe()
        if base.steps_of("model") or base.steps_of("block") or base.kv is not None or base.fa is not None:
            raise SlimquantError("the search space assembles layers of the float model: its base recipe may hold a weight "
                                 "step only (smoothing, AWQ, KV and attention quantization change the whole model)")  # fmt: skip
        labels = [o.label for o in options]
        if len(set(labels)) != len(labels):
            raise SlimquantError(f"option labels must be unique, got {labels}")
        self.model, self.options, self.base = model, {o.label: o for o in options}, base
        planned = {lp.name: lp for lp in plan(model, base)[0] if lp.kind in ("linear", "conv2d")}
        if layers is None:
            names = list(planned)
        else:
            names = list(layers)
            missing = [n for n in names if n not in planned]
            if missing:
                raise SlimquantError(f"layer {missing[0]} is not a Linear / Conv2d layer the base recipe quantizes")
        if not names:
            raise SlimquantError("the search space has no layer")
        self.layers: list[LayerPlan] = [planned[n] for n in names]
        self.floats: dict[str, nn.Module] = {n: model.get_submodule(n) for n in names}
        self.modules: dict[tuple[str, str], nn.Module] = {}
        self.specs: dict[tuple[str, str], QuantSpec] = {}  # the weight spec each (layer, option) was solved with
        self.approximate = bool(base.weight_step.NEEDS)
        step = base.weight_step
        for opt in options:
            if opt.is_float:
                continue
            lps = [dataclasses.replace(lp, spec=self._spec(lp.name, opt), input=opt.input if lp.kind == "linear" else None,
                                       step=step) for lp in self.layers]  # fmt: skip
            for lp in lps:
                if opt.input is not None and lp.kind != "linear":
                    raise SlimquantError(f"option {opt.label}: input quantization covers Linear layers, not {lp.name}")
            recipe = dataclasses.replace(base, weight=opt.weight, input=opt.input, overrides=())
            if step.NEEDS:
                self._solve_whole(recipe, lps, opt, calib_data, show_progress)
            else:
                self._solve_each(recipe, lps, opt, calib_data, show_progress)

    def _spec(self, name: str, opt: Option) -> QuantSpec:
        """``opt``'s weight spec for layer ``name``: per channel where its group size does not divide the layer's
        input width (``k``; a Conv2d's in_channels x kernel area)."""
        spec = opt.weight
        assert spec is not None
        w = self.floats[name].weight
        k = w[0].numel()
        if spec.granularity is Granularity.PER_GROUP and k % int(spec.group_size or 1):
            log.info("search space: layer %s (k = %d) takes option %s per channel: group size %s does not divide k",
                     name, k, opt.label, spec.group_size)  # fmt: skip
            spec = dataclasses.replace(spec, granularity=Granularity.PER_CHANNEL, group_size=None)
        self.specs[(name, opt.label)] = spec
        return spec

    def _solve_each(self, recipe: Recipe, lps: list[LayerPlan], opt: Option, calib_data: Any, show_progress: bool) -> None:
        static = [lp for lp in lps if lp.input is not None and not lp.input.dynamic]
        ranges = calibrate_input_ranges(self.model, recipe, static, calib_data, show_progress) if static else None
        for lp in tqdm(lps, desc=f"search space {opt.label}", disable=not show_progress, unit="layer"):
            with quantized(self.model, recipe, layers=[lp], input_ranges=ranges) as _:
                self.modules[(lp.name, opt.label)] = self.model.get_submodule(lp.name)

    def _solve_whole(self, recipe: Recipe, lps: list[LayerPlan], opt: Option, calib_data: Any, show_progress: bool) -> None:
        if calib_data is None:
            raise SlimquantError(f"the base recipe's {recipe.weight_step.TYPE} step needs calib_data")
        work = copy.deepcopy(self.model)
        convert(work, recipe, show_progress=show_progress, calib_data=calib_data, layers=lps)
        for lp in lps:
            self.modules[(lp.name, opt.label)] = work.get_submodule(lp.name)

    # -- a configuration: {layer: option label} ----------------------------------------------------------------
    def check(self, choice: Mapping[str, str]) -> dict[str, str]:
        """``choice`` complete and valid (every searchable layer, a known option each), as a plain dict."""
        names = [lp.name for lp in self.layers]
        unknown = [n for n in choice if n not in self.floats]
        if unknown:
            raise SlimquantError(f"layer {unknown[0]} is not in the search space")
        missing = [n for n in names if n not in choice]
        if missing:
            raise SlimquantError(f"the configuration gives no option for layer {missing[0]}")
        bad = [(n, o) for n, o in choice.items() if o not in self.options]
        if bad:
            raise SlimquantError(f"layer {bad[0][0]}: unknown option {bad[0][1]!r}; valid: {', '.join(self.options)}")
        return {n: choice[n] for n in names}

    def uniform(self, label: str) -> dict[str, str]:
        return self.check({lp.name: label for lp in self.layers})

    @contextlib.contextmanager
    def configured(self, choice: Mapping[str, str]) -> Iterator[nn.Module]:
        """The model with ``choice``'s modules swapped in for the ``with`` block; the float modules afterwards."""
        choice = self.check(choice)
        try:
            for name, label in choice.items():
                if not self.options[label].is_float:
                    set_module(self.model, name, self.modules[(name, label)])
            yield self.model
        finally:
            for name, m in self.floats.items():
                set_module(self.model, name, m)

    def layer_bytes(self, name: str, label: str) -> int:
        """Bytes the layer takes stored under ``label``: a float layer's parameters in their dtype; a quantized
        one's tensors as the module holds them (weights packed at their bit width, as the checkpoint stores them)."""
        if self.options[label].is_float:
            return sum(t.numel() * t.element_size() for t in self.floats[name].parameters())
        mod = self.modules[(name, label)]
        return sum(t.numel() * t.element_size() for t in (*mod.parameters(recurse=False), *mod.buffers(recurse=False)))

    def bytes(self, choice: Mapping[str, str]) -> int:
        """The searchable layers' bytes under ``choice`` (the rest of the model is the same in every configuration)."""
        choice = self.check(choice)
        return sum(self.layer_bytes(n, label) for n, label in choice.items())

    def float_bytes(self) -> int:
        """The searchable layers' parameters counted as float32 (the reference compress ratios are relative to)."""
        return sum(t.numel() * 4 for m in self.floats.values() for t in m.parameters())

    def compress_ratio(self, choice: Mapping[str, str]) -> float:
        """The searchable layers' float32 bytes over their bytes under ``choice`` (> 1: smaller)."""
        return self.float_bytes() / max(self.bytes(choice), 1)

    def recipe(self, choice: Mapping[str, str]) -> Recipe:
        """A recipe that quantizes the searchable layers as ``choice`` says (one override per layer; layers outside
        the search space as the base recipe plans them), loadable by ``slimquant quantize --recipe``."""
        choice = self.check(choice)
        overrides = tuple((name, LayerOverride(weight=self.specs.get((name, label)), input=self.options[label].input))
                          for name, label in choice.items())  # fmt: skip
        return dataclasses.replace(self.base, overrides=overrides)
