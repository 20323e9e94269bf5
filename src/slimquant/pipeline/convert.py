"""The conversion loop: plan what every layer becomes, run the recipe's steps, swap in the quantized modules.

The recipe's steps run by stage, as their implementations (:mod:`slimquant.algorithms`) declare: ``model`` steps
on the float model first (:mod:`slimquant.pipeline.model_steps`), then the layers outside the repeated blocks with
the weight step's data-free form, then, when a step needs the blocks' inputs, the blocks one at a time
(:mod:`slimquant.pipeline.sequential`). Module choice lives in :mod:`slimquant.surgery`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from slimquant.adapters import block_list
from slimquant.algorithms import data_free_solver, implementation, method_record, outside_blocks, solve_weight
from slimquant.errors import NotSupportedYet, SlimquantError
from slimquant.math.metrics import sqnr_db
from slimquant.math.qparams import qparams_from_minmax
from slimquant.math.weights import QuantizedWeight, check_weight_shape, dequantize_weight
from slimquant.nn.modules import QConv2d, QEmbedding, QLinear, QModule, tied_linear
from slimquant.nn.fp8 import QLinearFP8
from slimquant.nn.w8a8 import QLinearW8A8
from slimquant.surgery import last_linear_name, select, set_module
from slimquant.types.qtype import qtype as lookup_qtype
from slimquant.types.report import ConversionReport, LayerRow, StepRow
from slimquant.types.result import QuantizationResult
from slimquant.types.spec import KV_INT8_STATIC, QuantSpec, Recipe
from slimquant.types.steps import BLOCKWISE_NEEDS, RTN, Step, parse_sparsity_pattern

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerPlan:
    """What one layer becomes: its weight spec, its input spec (None: weight-only) and the weight step that
    solves it. :func:`plan` makes the list from a recipe; :func:`convert` also takes one made or edited by hand
    (a search that quantizes some layers at a time)."""

    name: str
    kind: str  # linear | conv2d | embedding
    spec: QuantSpec | None  # None: the layer stays float and its (pruning) step only prunes it
    input: QuantSpec | None = None
    step: Step = field(default_factory=RTN)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "spec": None if self.spec is None else self.spec.to_dict(),
                "input": None if self.input is None else self.input.to_dict(), "step": self.step.to_dict()}  # fmt: skip


def plan(model: nn.Module, recipe: Recipe, conv_inputs: bool = False) -> tuple[list[LayerPlan], ConversionReport]:
    """Decide what every module becomes (weight spec, input spec, weight step), from the recipe and its overrides
    (the first matching pattern wins; overrides apply to Linear and Conv2d layers). Pure inspection: the model is
    not changed. ``conv_inputs``: Conv2d layers keep their input spec (quantization-aware training quantizes
    convolution inputs; post-training W8A8 leaves such a convolution float)."""
    names = [n for n, _ in model.named_modules() if n]
    sel = select(names, recipe.disable_names)
    report = ConversionReport(unmatched_patterns=sel.unmatched_patterns)
    for p in sel.unmatched_patterns:
        log.warning("disable_names pattern %r matched no layer", p)
    last = last_linear_name(model) if recipe.disable_last_linear else None
    override_hits = {p: select(names, (p,)).matched for p, _ in recipe.overrides}
    for p, hits in override_hits.items():
        if not hits:
            log.warning("overrides pattern %r matched no layer", p)
    own = (recipe.weight, recipe.input, recipe.weight_step)
    layers: list[LayerPlan] = []
    for name, m in model.named_modules():
        pattern = next((p for p, _ in recipe.overrides if name in override_hits[p]), None)
        if isinstance(m, (nn.Linear, nn.Conv2d)) and pattern is not None:
            weight, inp, step = dict(recipe.overrides)[pattern].resolve(recipe)
        else:
            weight, inp, step = own
        if isinstance(m, nn.Linear):
            kind, spec = "linear", weight
        elif isinstance(m, nn.Conv2d):
            kind, spec = "conv2d", weight if recipe.include_conv else None
            if spec is not None and inp is not None and not conv_inputs:
                report.skipped[name] = "W8A8 covers Linear layers; Conv2d stays float"
                continue
        elif isinstance(m, nn.Embedding):
            kind, spec, inp, step = "embedding", recipe.embedding, None, recipe.weight_step
        else:
            continue
        prune_only = spec is None and kind == "linear" and step.PRUNES and pattern is None
        if spec is None and not prune_only:
            if pattern is not None and kind != "embedding" and (kind == "linear" or recipe.include_conv):
                report.skipped[name] = f"override {pattern}: float"
            continue
        if name in sel.matched:
            report.skipped[name] = "disable_names"
        elif name == last:
            report.skipped[name] = "disable_last_linear"
        else:
            layers.append(LayerPlan(name, kind, spec, inp, step))
    return layers, report


def _checked_plan(model: nn.Module, recipe: Recipe, layers: list[LayerPlan]) -> list[LayerPlan]:
    """An explicit plan, checked against the model and the recipe's steps before anything changes."""
    kinds = {"linear": nn.Linear, "conv2d": nn.Conv2d, "embedding": nn.Embedding}
    seen: set[str] = set()
    for lp in layers:
        if not isinstance(lp, LayerPlan):
            raise SlimquantError(f"layers= holds LayerPlan entries, got {lp!r}")
        if lp.name in seen:
            raise SlimquantError(f"layer {lp.name} is planned twice")
        seen.add(lp.name)
        try:
            m = model.get_submodule(lp.name)
        except AttributeError:
            raise SlimquantError(f"layer {lp.name}: the model has no such module") from None
        if lp.kind not in kinds or not isinstance(m, kinds[lp.kind]):
            raise SlimquantError(f"layer {lp.name}: planned as {lp.kind!r}, but the module is a {type(m).__name__}")
        if not isinstance(lp.step, Step) or lp.step.STAGE != "weight":
            raise SlimquantError(f"layer {lp.name}: its step must be a weight step (rtn, gptq, ...), got {lp.step!r}")
        if lp.spec is None and not (lp.step.PRUNES and lp.kind == "linear"):
            raise SlimquantError(f"layer {lp.name}: a plan without a weight spec is for pruning steps (sparsegpt, "
                                 f"wanda) on Linear layers, not {lp.step.TYPE} on a {lp.kind}")  # fmt: skip
        if lp.input is not None:
            if lp.kind != "linear":
                raise SlimquantError(f"layer {lp.name}: input quantization (W8A8) covers Linear layers, not {lp.kind}")
            Recipe._check_layer_specs(lp.spec, lp.input, lp.name)
        for s in (*recipe.steps_of("block"), lp.step):
            try:
                s.check(lp.spec, lp.input)
            except SlimquantError as e:
                raise type(e)(f"layer {lp.name}: {e}") from None
    return list(layers)


def _tied_output(model: nn.Module, embedding_name: str) -> str | None:
    """Name of the Linear whose weight *is* the embedding's weight (tied lm_head), if any."""
    emb = model.get_submodule(embedding_name)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.weight is emb.weight:
            return name
    return None


def _check_finite(model: nn.Module, kept: set[str]) -> None:
    """Every float parameter finite (not only the layers being quantized: a NaN norm or embedding weight would be
    copied into the checkpoint, or show up only as GPTQ fallbacks); names the tensor. Layers the user keeps float
    by name (``kept``) are left as they are; streamed blocks on meta are checked as they are read."""
    for name, p in model.named_parameters():
        if any(name.startswith(k + ".") for k in kept):
            continue
        if p.device.type != "meta" and p.is_floating_point() and not torch.isfinite(p).all():
            owner, _, leaf = name.rpartition(".")
            raise SlimquantError(f"layer {owner or name}: {leaf} has {int((~torch.isfinite(p)).sum())} NaN/Inf value(s) "
                                 f"(tensor {name}); cannot quantize")  # fmt: skip


def _weight_2d(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach()
    return w.reshape(w.shape[0], -1)


def convert(
    model: nn.Module, recipe: Recipe, show_progress: bool = True, calib_data: Any = None, stream: Any = None,
    work_dir: str | os.PathLike | None = None, max_activation_gb: float | None = None,
    layers: list[LayerPlan] | None = None, input_ranges: dict[str, dict[str, Any]] | None = None,
    fallback: Callable[[nn.Module, list[LayerPlan], Any], dict[str, str]] | None = None,
) -> QuantizationResult:  # fmt: skip
    """Quantize ``model`` in place according to ``recipe``; returns the :class:`QuantizationResult` (the model,
    the recipe, the report and, for streamed blocks, where their tensors are until saved).

    ``layers``: an explicit plan (e.g. :func:`plan`'s, filtered or edited) instead of the one the recipe gives;
    the recipe then supplies the steps of the other stages, the KV-cache and attention specs and the
    calibration settings. See :func:`quantized` to quantize some layers and put the float ones back.

    ``calib_data`` (see :func:`slimquant.pipeline.calibrate.run_batches`) is needed by recipes with
    static input quantization; the float model runs it once before any layer is swapped.
    ``stream`` (:class:`slimquant.models.streaming.StreamingModel` of ``model``): its blocks stay on disk and
    are quantized one at a time (weight-only recipes); ``work_dir``: where the block-by-block pipeline
    persists each finished block and resumes from (needed with ``stream``). ``max_activation_gb``: past this many
    GB (1e9 bytes) the hidden states between blocks are kept in files (in ``work_dir``, else a temporary directory).
    ``input_ranges``: static input ranges already calibrated by :func:`calibrate_input_ranges` (a search that
    converts one layer at a time calibrates them once); every static W8A8 layer of the plan must have one.
    ``fallback``: with ``recipe.disable_level`` > 0, ``fallback(model, linear_layers, calib_data)`` is called after the
    model steps (smoothing) with the planned Linear layers and returns ``{layer: reason}`` of those to keep float
    (:func:`slimquant.quantize` passes :func:`slimquant.search.fallback.fallback_chooser`'s).
    """
    if recipe.weight_step.TYPE == "qat":
        raise SlimquantError("the recipe's weight step is qat (quantization-aware training): run "
                             "slimquant.prepare_qat(model, recipe), train the model, then slimquant.convert(model); "
                             "post-training quantization runs rtn or gptq")  # fmt: skip
    if recipe.disable_level:
        if fallback is None:
            raise SlimquantError(f"disable_level {recipe.disable_level} needs a fallback chooser (fallback=); "
                                 "slimquant.quantize gives one")  # fmt: skip
        if calib_data is None:
            raise SlimquantError(f"disable_level L{recipe.disable_level} ranks the layers on calibration data (calib_data)")
        if stream is not None:
            raise NotSupportedYet("disable_level with streaming from disk is not supported yet: ranking the layers "
                                  "runs the whole model")  # fmt: skip
    if max_activation_gb is not None and not max_activation_gb > 0:
        raise SlimquantError(f"max_activation_gb must be positive, got {max_activation_gb}")
    if stream is not None:
        if stream.model is not model:
            raise SlimquantError("stream= must be the StreamingModel of the model being quantized")
        if work_dir is None:
            raise SlimquantError("streaming blocks from disk needs work_dir= (where finished blocks are written)")
        model_steps = recipe.steps_of("model")
        if recipe.has_activation_quantization or recipe.fa is not None or recipe.kv is not None or model_steps:
            what = f" (step {model_steps[0].TYPE} transforms the whole model)" if model_steps else ""
            raise NotSupportedYet("streaming from disk supports weight-only recipes with block or weight steps (rtn, "
                                  "gptq, autoround, cbq, awq); activation, attention and KV-cache quantization and smoothing of the "
                                  f"whole model run in memory{what}")  # fmt: skip
    if recipe.fa is not None:
        from slimquant.nn.fa_quant import attention_modules

        if calib_data is None:
            raise SlimquantError("attention quantization (fa) needs calibration data (calib_data)")
        attention_modules(model)  # a model without transformers attention fails here, before any work
    if recipe.kv == KV_INT8_STATIC:
        from slimquant.nn.kv_cache import kv_projections

        if calib_data is None:
            raise SlimquantError("a static KV cache (per-channel scales) needs calibration data (calib_data)")
        kv_projections(model)  # fails before any work where the scales cannot be stored
    if layers is None:
        layers, report = plan(model, recipe)
    else:
        layers, report = _checked_plan(model, recipe, layers), ConversionReport()
    if calib_data is None and input_ranges is None:
        static_in = next((lp.name for lp in layers if lp.kind == "linear" and lp.input is not None
                          and not lp.input.dynamic), None)  # fmt: skip
        if static_in is not None:
            raise SlimquantError(f"static activation quantization (W8A8; layer {static_in}) needs calibration data "
                                 "(calib_data)")  # fmt: skip
    for step in (*recipe.steps_of("model"), *recipe.steps_of("block"), *{lp.step for lp in layers}):
        implementation(step)  # a step without an implementation fails before any work
        if step.needs_calibration and calib_data is None:
            raise SlimquantError(f"{step.TYPE} needs calibration data (calib_data)")
    _check_finite(model, {n for n, why in report.skipped.items() if why == "disable_names"})
    blocks_prefix = block_list(model) + "." if stream is not None else None
    # Validate everything first so a bad layer fails before any module is swapped (streamed blocks are on meta
    # until read: their shapes are checked now, their values when each block is read).
    for lp in layers:
        w = _weight_2d(model.get_submodule(lp.name))
        nm = parse_sparsity_pattern(lp.step.pattern) if lp.step.PRUNES else None  # type: ignore[attr-defined]
        if nm is not None and w.shape[1] % nm[1]:
            raise SlimquantError(f"layer {lp.name}: {nm[0]}:{nm[1]} pruning needs an input width that is a multiple of "
                                 f"{nm[1]}, got {w.shape[1]}; keep it float with disable_names")  # fmt: skip
        if lp.spec is None:  # pruned, kept float: no grid to check
            continue
        if blocks_prefix and lp.name.startswith(blocks_prefix):
            try:
                check_weight_shape(tuple(w.shape), lp.spec)  # type: ignore[arg-type]
            except ValueError as e:
                raise SlimquantError(f"layer {lp.name}: {e}; choose another group size or add it to disable_names") from None
            continue
        if w.device.type == "meta":
            raise SlimquantError(f"layer {lp.name}: weight is on the meta device (model not loaded)")
        try:
            check_weight_shape(tuple(w.shape), lp.spec)  # type: ignore[arg-type]
        except ValueError as e:
            raise SlimquantError(f"layer {lp.name}: {e}; choose another group size or add it to disable_names") from None
    # A tied output layer must follow its quantized embedding: resolve ties before swapping.
    ties: dict[str, str] = {}
    for lp in layers:
        if lp.kind == "embedding":
            out = _tied_output(model, lp.name)
            if out is not None:
                ties[out] = lp.name
    for out, emb in ties.items():
        report.skipped.pop(out, None)
    layers = [lp for lp in layers if lp.name not in ties]

    for step in recipe.steps:
        implementation(step).check_model(model, step, recipe)  # e.g. an unknown architecture fails here
    if recipe.steps_of("model"):
        from slimquant.pipeline.model_steps import run_model_steps

        report.steps = run_model_steps(model, recipe, calib_data, show_progress)
    if recipe.disable_level:
        assert fallback is not None
        chosen = fallback(model, [lp for lp in layers if lp.kind == "linear"], calib_data)
        for name, why in chosen.items():
            report.skipped[name] = why
            log.info("kept float: %s (%s)", name, why)
        layers = [lp for lp in layers if lp.name not in chosen]
    static = [lp for lp in layers if lp.kind == "linear" and lp.input is not None and not lp.input.dynamic]
    if input_ranges is not None:
        missing = [lp.name for lp in static if lp.name not in input_ranges]
        if missing:
            raise SlimquantError(f"input_ranges has no static input range for layer {missing[0]}")
        ranges = {lp.name: input_ranges[lp.name] for lp in static}
    else:
        ranges = calibrate_input_ranges(model, recipe, static, calib_data, show_progress) if static else {}

    sequential: list[LayerPlan] = []
    blockwise = any(s.NEEDS & BLOCKWISE_NEEDS for s in (*recipe.steps_of("block"), *{lp.step for lp in layers}))
    if blockwise or stream is not None:  # block by block, last
        path = block_list(model)
        sequential = [lp for lp in layers if lp.kind == "linear" and lp.name.startswith(path + ".")]
        layers = [lp for lp in layers if lp not in sequential]
        if stream is not None:
            others = [lp.name for lp in layers if lp.name.startswith(path + ".")]
            if others:
                raise NotSupportedYet(f"streaming quantizes the blocks' linear layers only; {others[0]} is a "
                                      f"{next(lp.kind for lp in layers if lp.name == others[0])}")  # fmt: skip
    # a calibrated weight step solves the layers inside the repeated blocks; the rest (and anything outside
    # the blocks) gets its data-free form (GPTQ: round to nearest)
    for lp in [lp for lp in layers if lp.spec is None]:  # pruning needs the blocks' calibrated inputs
        report.skipped[lp.name] = f"{lp.step.TYPE}: outside the repeated blocks, not pruned"
        layers.remove(lp)
    frees = {lp.step: outside_blocks(lp.step) for lp in layers}
    desc = "/".join(sorted({f.TYPE for f in frees.values()})) + f" {recipe.quant_type}"
    for lp in tqdm(layers, desc=desc, disable=not show_progress, unit="layer"):
        module = model.get_submodule(lp.name)
        w = _weight_2d(module)
        free = frees[lp.step]
        qw, info = solve_weight(lp.name, w, None, lp.spec, free)
        row: dict[str, Any] = {"name": lp.name, "kind": lp.kind, "spec": lp.spec.describe(), **info}
        qmod = _qmodule(lp, module, qw, ranges, row, method_record(recipe, info, free, block_steps=False))
        err = sqnr_db(w, qmod.dequantized_weight(torch.float32))
        set_module(model, lp.name, qmod)
        row["sqnr_db"] = round(err, 2)
        report.layers.append(LayerRow.from_dict(row))
        log.debug("quantized %s (%s): SQNR %.2f dB", lp.name, lp.spec.describe(), err)
    source = None
    if sequential:
        rows, step_rows, source = _run_sequential(model, recipe, sequential, calib_data, show_progress, stream,
                                                  work_dir, max_activation_gb, ranges)  # fmt: skip
        report.layers.extend(rows)
        report.steps.extend(step_rows)
    for out, emb in ties.items():
        qemb = model.get_submodule(emb)
        old = model.get_submodule(out)
        lin = tied_linear(qemb, bias=old.bias is not None, tied_to=emb)
        if old.bias is not None:
            lin.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=False)
        set_module(model, out, lin)
        report.tied[out] = emb
        log.info("%s is tied to %s: it now shares the quantized embedding (%s)", out, emb, qemb.spec.describe())
    if recipe.kv == KV_INT8_STATIC:
        from slimquant.pipeline.kv_calib import calibrate_kv

        report.kv_cache = calibrate_kv(model, calib_data, show_progress)
    if recipe.fa is not None:
        from slimquant.pipeline.fa_quant import calibrate_attention

        report.attention = calibrate_attention(model, recipe, calib_data, show_progress)
    return QuantizationResult(model, recipe, report, source)


@contextlib.contextmanager
def quantized(model: nn.Module, recipe: Recipe, layers: list[LayerPlan] | None = None, calib_data: Any = None,
              show_progress: bool = False,
              input_ranges: dict[str, dict[str, Any]] | None = None) -> Iterator[QuantizationResult]:  # fmt: skip
    """Quantize ``layers`` of the float ``model`` (default: the recipe's whole plan) for the duration of the
    ``with`` block, then put the float modules back: a search can quantize the same model many times, one layer
    or block at a time, without copying it. Yields the :class:`QuantizationResult` (its report is the conversion's).

    The float modules are swapped out, never changed, so only steps that leave the float model as it is run
    here: no model or block transforms (smoothing, AWQ), no KV-cache or attention quantization (those change
    modules in place); anything else is refused before any work. ``input_ranges``: as for :func:`convert`.
    """
    if recipe.disable_level:
        raise SlimquantError("quantized() takes the layers to quantize as given; disable_level chooses layers to "
                             "leave float: leave them out of layers= instead")  # fmt: skip
    changing = [s.TYPE for s in (*recipe.steps_of("model"), *recipe.steps_of("block"))]
    if changing or recipe.kv is not None or recipe.fa is not None:
        what = ", ".join(changing + (["kv"] if recipe.kv is not None else []) + (["fa"] if recipe.fa is not None else []))
        raise SlimquantError(f"quantized() puts the float layers back afterwards; {what} change(s) the float model in "
                             "place: quantize a copy instead")  # fmt: skip
    refuse_quantized(model, "quantized() needs the float model")
    if layers is None:
        layers = plan(model, recipe)[0]
    names = [lp.name for lp in layers]
    names += [out for lp in layers if lp.kind == "embedding" for out in [_tied_output(model, lp.name)] if out]
    originals = {n: model.get_submodule(n) for n in names}
    try:
        yield convert(model, recipe, show_progress=show_progress, calib_data=calib_data, layers=layers,
                      input_ranges=input_ranges)
    finally:
        for n, m in originals.items():
            set_module(model, n, m)


def refuse_quantized(model: nn.Module, what: str = "start from the float model") -> None:
    """Refuse a model that already holds slimquant quantized modules (naming the first), before any work."""
    first = next((n for n, m in model.named_modules() if isinstance(m, QModule)), None)
    if first is not None:
        raise SlimquantError(f"model is already quantized by slimquant (layer {first or '<root>'} is a "
                             f"{type(model.get_submodule(first)).__name__}); {what}")  # fmt: skip


def _run_sequential(model: nn.Module, recipe: Recipe, sequential: list[LayerPlan], calib_data: Any, show_progress: bool,
                    stream: Any, work_dir: str | os.PathLike | None, max_activation_gb: float | None,
                    ranges: dict[str, dict[str, Any]]) -> tuple[list[LayerRow], list[StepRow], Any]:  # fmt: skip
    """The block-by-block part of :func:`convert`: (report rows, block steps' rows, the tensor source of streamed
    blocks or None). With ``work_dir`` its lock is
    held while the blocks run (a second run on it is refused at once), and a run that fails before finishing its
    first block leaves no work directory behind. ``ranges``: the W8A8 static input ranges by layer."""
    import contextlib
    import tempfile
    from pathlib import Path

    from slimquant.formats.atomic import target_lock
    from slimquant.pipeline.sequential import quantize_sequential

    def make(lp: LayerPlan, module: nn.Module, qw: QuantizedWeight, row: dict, method: dict,
             input_range: dict[str, Any] | None) -> Any:  # fmt: skip
        return _qmodule(lp, module, qw, ranges if input_range is None else {**ranges, lp.name: input_range}, row, method)

    budget = None if max_activation_gb is None else int(max_activation_gb * 1e9)
    with contextlib.ExitStack() as stack:
        work = None
        if work_dir is not None:
            from slimquant.pipeline.workdir import WorkDir

            stack.enter_context(target_lock(work_dir))
            work = WorkDir(work_dir, _fingerprint(model, recipe, sequential, calib_data, stream))
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="slimquant-activations-"))
        spill = Path(work_dir) / "activations" if work_dir is not None else Path(tmp)
        try:
            rows, _, step_rows, source = quantize_sequential(model, recipe, sequential, calib_data, show_progress,
                                                            stream, work, make, budget, spill, ranges)  # fmt: skip
        except BaseException:
            if work is not None and work.done == 0:
                work.remove()  # nothing finished: nothing to resume from
            raise
        finally:  # spilled activations are scratch: a resume reads the work directory's inputs files
            if work_dir is not None:
                import shutil

                shutil.rmtree(spill, ignore_errors=True)
    return rows, step_rows, source


def calibrate_input_ranges(model: nn.Module, recipe: Recipe, layers: list[LayerPlan], calib_data: Any,
                           show_progress: bool = True) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Static input ranges of the linear ``layers`` (``{layer: {"rmin", "rmax", "rule", "errors"}}``), observed on
    the float model in one pass.

    Rules that compare output errors (auto, token_clip) measure them with the quantized weights the layers will
    get (each layer's data-free weight step, solved here once more, one layer at a time) and the layer's own
    input qtype.
    """
    from slimquant.pipeline.calibrate import input_ranges, observe_inputs, range_observers, run_batches

    names = [lp.name for lp in layers]
    searched = recipe.act_observer in ("auto", "token_clip")  # rules that compare output errors on samples
    sample_rows = 512 if searched else 0
    make = range_observers(recipe.act_observer, recipe.sigma_factor)
    with observe_inputs(model, names, make, sample_rows) as stats:
        n = run_batches(model, calib_data, show_progress)
    log.info("calibrated %d layer input(s) on %d batch(es) with %s", len(names), n, recipe.act_observer)

    def deq(lp: LayerPlan) -> torch.Tensor:
        solver = data_free_solver(lp.step)
        return dequantize_weight(solver(_weight_2d(model.get_submodule(lp.name)), lp.spec), lp.spec)

    out: dict[str, dict[str, Any]] = {}
    by_input: dict[QuantSpec, list[LayerPlan]] = {}
    for lp in layers:
        by_input.setdefault(lp.input, []).append(lp)  # type: ignore[arg-type]
    for spec, group in by_input.items():
        mine = {lp.name: stats[lp.name] for lp in group}
        out.update(input_ranges(model, mine, recipe.act_observer, {lp.name: lp for lp in group} if searched else {},
                                lookup_qtype(spec.qtype), spec.symmetric, deq))  # fmt: skip
    return {lp.name: out[lp.name] for lp in layers}


def _qmodule(lp: LayerPlan, module: nn.Module, qw: QuantizedWeight, ranges: dict[str, dict[str, Any]],
             row: dict[str, Any], method: dict[str, Any]) -> nn.Module:  # fmt: skip
    """The quantized module ``lp`` asks for (weight-only, or with int8 / fp8 inputs), with the ``method`` record;
    records the static input range it uses in ``row``."""
    if lp.input is not None and lp.kind == "linear":
        if lp.name in ranges:
            r = ranges[lp.name]
            row.update(input_rule=r["rule"], input_range=[round(r["rmin"], 6), round(r["rmax"], 6)])
        return _w8a8_module(module, qw, lp.spec, lp.input, ranges.get(lp.name), method)
    cls = {"linear": QLinear, "conv2d": QConv2d, "embedding": QEmbedding}[lp.kind]
    return cls.from_float(module, qw, lp.spec, method=method)  # type: ignore[attr-defined]


def _w8a8_module(
    module: nn.Module, qw: QuantizedWeight, spec: QuantSpec, input_spec: QuantSpec, rng: dict[str, Any] | None,
    method: dict[str, Any],
) -> QLinearW8A8 | QLinearFP8:
    if lookup_qtype(input_spec.qtype).is_float:  # fp8 weights and inputs
        if input_spec.dynamic:
            return QLinearFP8.from_float(module, qw.q, qw.scale.reshape(-1), spec, input_spec,  # type: ignore[arg-type]
                                         method=method)
        assert rng is not None
        scale, _ = qparams_from_minmax(torch.tensor(rng["rmin"]), torch.tensor(rng["rmax"]), lookup_qtype(input_spec.qtype), True)
        return QLinearFP8.from_float(module, qw.q, qw.scale.reshape(-1), spec, input_spec, float(scale),
                                     method=method)  # type: ignore[arg-type]
    if input_spec.dynamic:
        return QLinearW8A8.from_float(module, qw.q, qw.scale.reshape(-1), spec, input_spec,  # type: ignore[arg-type]
                                      method=method)
    assert rng is not None
    qt = lookup_qtype(input_spec.qtype)
    scale, zp = qparams_from_minmax(torch.tensor(rng["rmin"]), torch.tensor(rng["rmax"]), qt, input_spec.symmetric)
    offset = 0.0 if zp is None else float(zp)
    return QLinearW8A8.from_float(module, qw.q, qw.scale.reshape(-1), spec, input_spec, float(scale), offset,
                                  method=method)  # type: ignore[arg-type]


MODULE_TENSORS = 2


def _fingerprint(model: nn.Module, recipe: Recipe, plans: list[LayerPlan], calib_data: Any,
                 stream: Any = None) -> dict[str, Any]:  # fmt: skip
    """What must match for a work directory to be resumed: recipe, model (config and weights), layer plan,
    calibration data. Spellings that do not change the result (the path the model was loaded from) are left out."""
    import json

    from slimquant.pipeline.calibrate import model_inputs
    from slimquant.pipeline.workdir import tensor_digest, weights_digest

    config = getattr(model, "config", None)
    model_entry: dict[str, Any] = {"class": type(model).__name__}
    if config is not None and hasattr(config, "to_json_string"):
        model_entry["config"] = json.loads(config.to_json_string(use_diff=False))
        model_entry["config"].pop("_name_or_path", None)
    files = sorted(set(stream.source.files.values())) if stream is not None else []
    model_entry["weights"] = weights_digest(model, files)
    calib = "none"
    if calib_data is not None:
        tensors: list[torch.Tensor] = []
        for item in model_inputs(calib_data):
            values = item.values() if isinstance(item, dict) else item if isinstance(item, (tuple, list)) else [item]
            tensors += [v for v in values if isinstance(v, torch.Tensor)]
        calib = tensor_digest(tensors)
    return {"recipe": recipe.to_dict(), "model": model_entry, "calibration": calib,
            "layers": {lp.name: lp.to_dict() for lp in plans},
            # the quantized modules' tensors the finished blocks are saved as (2: logical tensors, issue 12)
            "module_tensors": MODULE_TENSORS}  # fmt: skip
