"""Quantization-aware training: :func:`prepare_qat` swaps a model's layers for fake-quantized ones
(:mod:`slimquant.nn.qat`), any training loop trains them, :func:`convert_qat` swaps them for the same real
quantized modules post-training quantization makes (:mod:`slimquant.nn`), which save, load and export as those.

Which layers and to what: the recipe's plan (:func:`slimquant.pipeline.convert.plan`: weight / input specs,
overrides, ``disable_names``, ``disable_last_linear``, ``include_conv``), with Conv2d inputs quantized too. The
recipe's weight step is a :class:`slimquant.types.steps.QAT` (a recipe solved by ``rtn`` -- what
``Recipe.from_flags`` builds by default -- gets ``QAT()``'s defaults).

Conv2d -> BatchNorm2d pairs (``QAT.fold_bn``) are found in the model's graph (``torch.fx`` symbolic tracing,
used only to read which module feeds which; a convolution whose output only the BN reads), or, where the model
does not trace, as neighbours in an ``nn.Sequential``; the BN becomes ``nn.Identity`` and trains inside the
convolution's :class:`QATConvBn2d`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any

import torch
from torch import nn

from slimquant.errors import NotSupportedYet, SlimquantError
from slimquant.math.metrics import sqnr_db
from slimquant.math.weights import QuantizedWeight, dequantize_weight
from slimquant.nn.input_quant import QConv2dInputQuant, QLinearInputQuant
from slimquant.nn.modules import QConv2d, QLinear, QModule
from slimquant.nn.qat import QAT_LAYERS, QATConv2d, QATConvBn2d, QATLinear, _runs_w8a8, describe_state
from slimquant.nn.w8a8 import QLinearW8A8
from slimquant.pipeline.calibrate import model_inputs, forward_item
from slimquant.pipeline.convert import plan
from slimquant.surgery.select import set_module
from slimquant.types.report import ConversionReport, LayerRow
from slimquant.types.result import QuantizationResult
from slimquant.types.spec import Granularity, QuantSpec, Recipe
from slimquant.types.steps import QAT, RTN

log = logging.getLogger(__name__)


def qat_recipe(recipe: Recipe | None) -> Recipe:
    """``recipe`` with a :class:`QAT` weight step (``QAT()`` in place of a plain ``rtn``); the default recipe is
    W8A8 (int8 per-channel symmetric weights, int8 per-tensor asymmetric static inputs)."""
    if recipe is None:
        return Recipe(weight=QuantSpec("int8", Granularity.PER_CHANNEL), steps=(QAT(),),
                      input=QuantSpec("int8", Granularity.PER_TENSOR, symmetric=False))  # fmt: skip
    if not isinstance(recipe, Recipe):
        raise SlimquantError(f"prepare_qat takes a slimquant.Recipe, got {type(recipe).__name__}")
    others = [s for s in recipe.steps if s.STAGE != "weight"]
    if others:
        raise NotSupportedYet(f"QAT with the {others[0].TYPE} step is not supported yet: training replaces the "
                              "post-training transforms; use a recipe with only its weight / input specs")  # fmt: skip
    step = recipe.weight_step
    if isinstance(step, QAT):
        return recipe
    if isinstance(step, RTN) and not step.clip_search:
        return dataclasses.replace(recipe, steps=(QAT(),))
    raise SlimquantError(f"prepare_qat trains the layers; the recipe's weight step {step.describe()} solves them "
                         "after training. Use steps=(QAT(...),) (or the default rtn)")  # fmt: skip


def prepare_qat(model: nn.Module, recipe: Recipe | None = None, calib_data: Any = None,
                show_progress: bool = True) -> nn.Module:  # fmt: skip
    """Swap ``model``'s planned Linear / Conv2d layers (in place) for fake-quantized ones and return ``model``.

    ``calib_data`` (any item :func:`slimquant.pipeline.calibrate.run_batches` takes) runs once, in eval mode, to
    start the static input ranges at their min / max over it (without it, the first training batch starts them).
    Train with any optimizer and loop; :func:`slimquant.convert` then makes the real quantized model."""
    if not isinstance(model, nn.Module):
        raise SlimquantError(f"prepare_qat takes an nn.Module, got {type(model).__name__}")
    recipe = qat_recipe(recipe)
    step = recipe.weight_step
    assert isinstance(step, QAT)
    for name, m in model.named_modules():
        if isinstance(m, (QModule, *QAT_LAYERS)):
            raise SlimquantError(f"layer {name} is already a {type(m).__name__}: prepare_qat starts from the float model")
    if recipe.embedding is not None:
        raise NotSupportedYet("QAT of embeddings is not supported yet; leave the recipe's embedding spec None")
    layers, report = plan(model, recipe, conv_inputs=True)
    layers = [lp for lp in layers if lp.kind in ("linear", "conv2d")]
    if not layers:
        raise SlimquantError("prepare_qat: the model has no Linear / Conv2d layer the recipe quantizes"
                             + (f" (skipped: {', '.join(f'{k} ({v})' for k, v in report.skipped.items())})"
                                if report.skipped else ""))  # fmt: skip
    planned = {lp.name for lp in layers}
    pairs = conv_bn_pairs(model, planned) if step.fold_bn else {}
    kw: dict[str, Any] = dict(ranges=step.ranges, momentum=step.momentum,
                              freeze_observers_after=step.freeze_observers_after or None)  # fmt: skip
    if step.ranges == "slb":
        kw["slb"] = dict(binary=step.slb_binary, temperature=step.slb_temperature, anneal_steps=step.slb_anneal_steps)
    swaps: list[tuple[str, nn.Module]] = []  # built first, swapped in only when every layer built: a refused
    for lp in layers:                        # layer leaves the model untouched
        module = model.get_submodule(lp.name)
        try:
            if lp.kind == "linear":
                new: nn.Module = QATLinear(module, lp.spec, lp.input, **kw)  # type: ignore[arg-type]
            elif lp.name in pairs:
                bn_name = pairs[lp.name]
                new = QATConvBn2d(module, model.get_submodule(bn_name), lp.spec, lp.input,  # type: ignore[arg-type]
                                  freeze_bn_after=step.freeze_bn_after or None, bn_name=bn_name, **kw)  # fmt: skip
                swaps.append((bn_name, nn.Identity()))
            else:
                new = QATConv2d(module, lp.spec, lp.input, **kw)  # type: ignore[arg-type]
        except SlimquantError as e:
            raise type(e)(f"layer {lp.name}: {e}") from None
        except ValueError as e:
            raise SlimquantError(f"layer {lp.name}: {e}") from None
        for q in (new.weight_quant, new.input_quant):
            if q is not None:
                q.where = f" (layer {lp.name})"
        swaps.append((lp.name, new))
    for name, new in swaps:
        set_module(model, name, new)
    state = describe_state(model)
    log.info("prepare_qat: %d layer(s) fake-quantized (%d with BN folded, %d with quantized inputs), ranges %s",
             state["layers"], state["bn_folded"], state["input_quantized"], step.ranges)
    if calib_data is not None:
        calibrate_qat(model, calib_data, show_progress)
    return model


def calibrate_qat(model: nn.Module, calib_data: Any, show_progress: bool = True) -> int:
    """Run ``calib_data`` through a prepared model (eval mode, no gradients) with every static input quantizer
    taking the min / max of what it sees as its range; returns how many batches ran."""
    from tqdm.auto import tqdm

    from slimquant.nn.qat import FakeQuantizer

    quantizers = [m for m in model.modules() if isinstance(m, FakeQuantizer) and m.role == "input"]
    was_training = model.training
    model.eval()
    for q in quantizers:
        q.calibrating, q._calib_range = True, None
    try:
        items = model_inputs(calib_data)
        with torch.no_grad():
            for item in tqdm(items, desc="QAT calibration", disable=not show_progress, unit="batch"):
                forward_item(model, item)
    finally:
        for q in quantizers:
            q.calibrating, q._calib_range = False, None
        model.train(was_training)
    return len(items)


def conv_bn_pairs(model: nn.Module, convs: set[str]) -> dict[str, str]:
    """``{conv name: bn name}`` for each Conv2d in ``convs`` whose output is read only by a BatchNorm2d of its
    channels (from the traced graph; else neighbours in an ``nn.Sequential``)."""
    try:
        import torch.fx

        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:  # noqa: BLE001 -- any model code may fail to trace; the Sequential rule still applies
        log.info("prepare_qat: the model does not trace with torch.fx (%s: %s); folding BN only where it follows "
                 "its convolution in an nn.Sequential", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return _sequential_pairs(model, convs)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    out: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in convs or calls[node.target] != 1:
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or calls[users[0].target] != 1:
            continue
        bn_name = str(users[0].target)
        if _bn_of(model, str(node.target), bn_name):
            out[str(node.target)] = bn_name
    return out


def _sequential_pairs(model: nn.Module, convs: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Sequential):
            continue
        kids = list(m.named_children())
        for (a, _), (b, _) in zip(kids, kids[1:]):
            conv, bn = f"{name}.{a}" if name else a, f"{name}.{b}" if name else b
            if conv in convs and _bn_of(model, conv, bn):
                out[conv] = bn
    return out


def _bn_of(model: nn.Module, conv: str, bn: str) -> bool:
    c, b = model.get_submodule(conv), model.get_submodule(bn)
    return (type(b) is nn.BatchNorm2d and isinstance(c, nn.Conv2d) and b.num_features == c.out_channels
            and b.affine and b.track_running_stats)  # fmt: skip


def convert_qat(model: nn.Module, recipe: Recipe | None = None) -> QuantizationResult:
    """Swap every fake-quantized layer of ``model`` (in place) for its real quantized module: the weight on the
    quantizer's grid (folded with its BN), the input's scale / zero point; returns the
    :class:`QuantizationResult` (``recipe``: what to record; default: one rebuilt from the layers' specs)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, QAT_LAYERS)]
    if not found:
        raise SlimquantError("convert: the model has no fake-quantized layer; call slimquant.prepare_qat first")
    report = ConversionReport()
    specs: Counter = Counter()
    for name, m in found:
        try:
            new, row = _deploy(name, m)
        except SlimquantError as e:
            raise SlimquantError(f"layer {name}: {e}") from None
        set_module(model, name, new)
        report.layers.append(row)
        specs[(m.weight_quant.spec, None if m.input_quant is None else m.input_quant.spec)] += 1
    model.eval()
    if recipe is None:
        (weight, inp), _ = specs.most_common(1)[0]
        ranges = found[0][1].weight_quant.ranges
        step = QAT(ranges=ranges, fold_bn=ranges != "slb")
        overrides = tuple((n, _override(m)) for n, m in found
                          if (m.weight_quant.spec, None if m.input_quant is None else m.input_quant.spec) != (weight, inp))  # fmt: skip
        recipe = Recipe(weight=weight, input=inp, steps=(step,), overrides=overrides, disable_last_linear=False)
    log.info("convert: %d fake-quantized layer(s) became quantized modules", len(found))
    return QuantizationResult(model, recipe, report)


def _override(m: nn.Module) -> Any:
    from slimquant.types.spec import LayerOverride

    return LayerOverride(weight=m.weight_quant.spec, input=None if m.input_quant is None else m.input_quant.spec)  # type: ignore[union-attr]


def _deploy(name: str, m: nn.Module) -> tuple[QModule, LayerRow]:
    wq, iq = m.weight_quant, m.input_quant  # type: ignore[union-attr]
    if isinstance(m, QATConv2d):
        weight, bias = m.folded()
    else:
        weight, bias = m.weight.detach(), None if m.bias is None else m.bias.detach()
    qw = wq.quantized_weight(weight.reshape(weight.shape[0], -1))
    method = {"algorithm": "qat", "ranges": wq.ranges}
    if isinstance(m, QATConvBn2d):
        method["bn_folded"] = m.bn_name  # the loader swaps it for nn.Identity in the skeleton
    spec, ispec = wq.spec, None if iq is None else iq.spec
    if isinstance(m, QATLinear):
        shim = nn.Linear(m.in_features, m.out_features, bias=bias is not None, device="meta", dtype=weight.dtype)
        shim.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            shim.bias = nn.Parameter(bias, requires_grad=False)
        if iq is None:
            new: QModule = QLinear.from_float(shim, qw, spec, method)
        elif _runs_w8a8(spec, ispec):
            new = _w8a8(shim, qw, spec, iq, method)
        else:
            new = QLinearInputQuant(m.in_features, m.out_features, spec, ispec, bias is not None, weight.dtype,  # type: ignore[arg-type]
                                    weight.device)  # fmt: skip
            _fill(new, qw, bias, method)
            if not ispec.dynamic:  # type: ignore[union-attr]
                new.set_input_params(*iq.input_params())
    else:
        assert isinstance(m, QATConv2d)
        args = (m.in_channels, m.out_channels, m.kernel_size)
        rest = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups, bias=bias is not None,
                    padding_mode=m.padding_mode, dtype=weight.dtype, device=weight.device)  # fmt: skip
        if iq is None:
            new = QConv2d(*args, spec, **rest)
        else:
            new = QConv2dInputQuant(*args, spec, ispec, **rest)  # type: ignore[arg-type]
            new.set_input_params(*iq.input_params())
        _fill(new, qw, bias, method)
    w2d = weight.reshape(weight.shape[0], -1).float()
    details: dict[str, Any] = {"ranges": wq.ranges}
    if ispec is not None:
        details["input"] = ispec.describe()
        if not ispec.dynamic:
            s_in, zp_in = iq.input_params()  # type: ignore[union-attr]
            details.update(input_scale=float(s_in), input_zero_point=0.0 if zp_in is None else float(zp_in))
    if isinstance(m, QATConvBn2d):
        details["bn_folded"] = m.bn_name
    row = LayerRow(name, "linear" if isinstance(m, QATLinear) else "conv2d", spec.describe(), "qat",
                   sqnr_db(w2d, dequantize_weight(qw, spec)), details=details)  # fmt: skip
    return new, row


def _fill(new: QModule, qw: QuantizedWeight, bias: torch.Tensor | None, method: dict[str, Any]) -> None:
    new._set_weight(qw)  # type: ignore[attr-defined]
    if bias is not None:
        new.bias.data.copy_(bias)  # type: ignore[union-attr]
    new.method = dict(method)


def _w8a8(shim: nn.Linear, qw: QuantizedWeight, spec: QuantSpec, iq: Any, method: dict[str, Any]) -> QLinearW8A8:
    ispec = iq.spec
    if ispec.dynamic:
        return QLinearW8A8.from_float(shim, qw.q, qw.scale.reshape(-1), spec, ispec, method=method)
    scale, zp = iq.input_params()
    return QLinearW8A8.from_float(shim, qw.q, qw.scale.reshape(-1), spec, ispec, float(scale),
                                  0.0 if zp is None else float(zp), method=method)  # fmt: skip
