"""The implementations of the built-in recipe steps, registered with :func:`slimquant.algorithms.register_algorithm`.

Each is glue between what the pipeline provides (observed inputs, collected statistics, Hessians) and a pure
solver: :mod:`slimquant.algorithms.rtn`, :mod:`~slimquant.algorithms.gptq`, :mod:`~slimquant.algorithms.awq`,
:mod:`~slimquant.algorithms.smoothquant` with :mod:`slimquant.math.smooth`. Which op feeds which linears comes
from :mod:`slimquant.adapters`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from slimquant.adapters import smooth_groups
from slimquant.algorithms import (
    BlockTransform,
    BlockWeightAlgorithm,
    InputRequest,
    ModelTransform,
    WeightAlgorithm,
    block_output,
    register_algorithm,
)
from slimquant.algorithms.awq import awq_clip, awq_search
from slimquant.algorithms.gptq import HessianAccumulator
from slimquant.algorithms.rtn import rtn
from slimquant.algorithms.smoothquant import (
    apply_smoothing,
    input_weight,
    smoothed_output_error,
    weight_absmax_per_input,
)
from slimquant.errors import SlimquantError
from slimquant.math.smooth import gamma_migration_scales, outlier_suppression_scales, smoothquant_scales
from slimquant.math.weights import QuantizedWeight, quantize_weight
from slimquant.observers import make_observer
from slimquant.types.spec import QuantSpec, Recipe
from slimquant.types.steps import (AWQ, CBQ, GPTQ, QAT, RTN, AutoRound, CBQPreprocess, GammaMigration, OutlierSuppression, SmoothQuant,
                                   SmoothQuantSearch, SparseGPT, Step, Wanda, parse_sparsity_pattern)  # fmt: skip

log = logging.getLogger("slimquant.algorithms")


# -- weight steps ---------------------------------------------------------------------------------------------
def _solve_rtn(layer: str, w: torch.Tensor, h: torch.Tensor | None, spec: QuantSpec,
               step: Step) -> tuple[QuantizedWeight, dict[str, Any]]:  # fmt: skip
    assert isinstance(step, RTN)
    return rtn(w, spec, step.clip_search), {}


def _solve_gptq(layer: str, w: torch.Tensor, h: torch.Tensor | None, spec: QuantSpec,
                step: Step) -> tuple[QuantizedWeight, dict[str, Any]]:  # fmt: skip
    from slimquant.algorithms.gptq import GPTQError, gptq

    assert isinstance(step, GPTQ) and h is not None
    try:
        res = gptq(w, h, spec, percdamp=step.percdamp, act_order=step.act_order, static_groups=step.static_groups,
                   clip_search=step.clip_search)  # fmt: skip
    except GPTQError as e:
        log.warning("%s: %s; falling back to RTN for this layer", layer, e)
        return quantize_weight(w, spec, clip_search=step.clip_search), {"algorithm": "rtn", "fallback": str(e)}
    return res.weight, {"damp": res.damp, "dead_columns": res.dead_columns}


def _clip_record(step: Step, recipe: Recipe) -> dict[str, Any]:
    return {"clip_search": step.clip_search}  # type: ignore[attr-defined]


def _gptq_record(step: Step, recipe: Recipe) -> dict[str, Any]:
    """What a GPTQ layer records: its clipping, and the column order (act_order with static groups keeps the
    stored columns in order, which the compressed-tensors export states as ``actorder: weight``)."""
    return {"clip_search": step.clip_search, "act_order": step.act_order, "static_groups": step.static_groups}  # type: ignore[attr-defined]


def _sparse_info(step: Step, pruned: int, w: torch.Tensor) -> dict[str, Any]:
    return {"sparsity": round(pruned / max(w.numel(), 1), 4), "pattern": step.pattern}  # type: ignore[attr-defined]


def _nm_for(layer: str, step: Step, w: torch.Tensor) -> tuple[int, int] | None:
    """The step's N:M pattern (None: unstructured), checked against the layer's input width."""
    nm = parse_sparsity_pattern(step.pattern)  # type: ignore[attr-defined]
    if nm is not None and w.shape[1] % nm[1]:
        raise SlimquantError(f"{layer}: {nm[0]}:{nm[1]} pruning needs an input width that is a multiple of {nm[1]}, "
                             f"got {w.shape[1]}; keep it float with disable_names")  # fmt: skip
    return nm


def _solve_sparsegpt(layer: str, w: torch.Tensor, h: torch.Tensor | None, spec: QuantSpec | None,
                     step: Step) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    from slimquant.algorithms.gptq import GPTQError
    from slimquant.algorithms.sparse import sparsegpt

    assert isinstance(step, SparseGPT) and h is not None
    nm = _nm_for(layer, step, w)
    try:
        res = sparsegpt(w, h, spec, step.sparsity, nm, step.percdamp, step.block_size)
    except GPTQError as e:  # no usable Hessian: prune by magnitude x input norm (Wanda) instead, and say so
        from slimquant.algorithms.sparse import wanda

        log.warning("%s: %s; pruning with Wanda's mask instead", layer, e)
        out, count = wanda(w, h, spec, step.sparsity, nm)
        return out, {"fallback": f"wanda ({e})", **_sparse_info(step, count, w)}
    out = res.pruned if spec is None else res.weight
    return out, {"damp": res.damp, "dead_columns": res.dead_columns, **_sparse_info(step, res.pruned_count, w)}


def _solve_wanda(layer: str, w: torch.Tensor, h: torch.Tensor | None, spec: QuantSpec | None,
                 step: Step) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    from slimquant.algorithms.sparse import wanda

    assert isinstance(step, Wanda) and h is not None
    nm = _nm_for(layer, step, w)
    out, count = wanda(w, h, spec, step.sparsity, nm)
    return out, _sparse_info(step, count, w)


def _sparse_record(step: Step, recipe: Recipe) -> dict[str, Any]:
    return {"sparsity": step.sparsity, "pattern": step.pattern}  # type: ignore[attr-defined]


register_algorithm(WeightAlgorithm(SparseGPT, solve=_solve_sparsegpt, record=_sparse_record,
                                   prune=lambda layer, w, h, step: _solve_sparsegpt(layer, w, h, None, step)))  # fmt: skip
register_algorithm(WeightAlgorithm(Wanda, solve=_solve_wanda, record=_sparse_record,
                                   prune=lambda layer, w, h, step: _solve_wanda(layer, w, h, None, step)))  # fmt: skip
register_algorithm(WeightAlgorithm(RTN, solve=_solve_rtn, record=_clip_record))
register_algorithm(WeightAlgorithm(GPTQ, solve=_solve_gptq, record=_gptq_record))


def _solve_autoround(block: nn.Module, layers: dict[str, tuple[nn.Module, QuantSpec]], data: Any, step: Step,
                     show_progress: bool = False) -> dict[str, tuple[QuantizedWeight, dict[str, Any]]]:  # fmt: skip
    """AutoRound on one block: each layer's weight fake-quantized through a parametrization (removed afterwards,
    leaving the float weights untouched), all tuned together."""
    from torch.nn.utils import parametrize

    from slimquant.algorithms.autoround import SignRoundWeight, tune_block

    assert isinstance(step, AutoRound)
    for name, (module, _) in layers.items():
        if not isinstance(module, nn.Linear) or parametrize.is_parametrized(module):
            raise SlimquantError(f"{name}: autoround tunes plain nn.Linear layers, got {type(module).__name__}")
    wrapped = {name: SignRoundWeight(module.weight, spec, step.minmax) for name, (module, spec) in layers.items()}
    try:
        for name, (module, _) in layers.items():
            parametrize.register_parametrization(module, "weight", wrapped[name])
        tuning = tune_block(block, wrapped, data, step.iters, step.step_size, step.batch_size, step.seed,
                            show_progress)  # fmt: skip
    finally:
        for module, _ in layers.values():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    info = tuning.to_dict()
    if tuning.stopped:
        log.warning("autoround stopped early: %s", tuning.stopped)
    return {name: (wrapped[name].result(module.weight), {"autoround": info}) for name, (module, _) in layers.items()}


def _autoround_record(step: Step, recipe: Recipe) -> dict[str, Any]:
    return {"iters": step.iters, "lr": step.step_size, "batch_size": step.batch_size, "minmax": step.minmax,  # type: ignore[attr-defined]
            "seed": step.seed}  # type: ignore[attr-defined]


register_algorithm(BlockWeightAlgorithm(AutoRound, solve_block=_solve_autoround, record=_autoround_record))


def _solve_cbq(block: nn.Module, layers: dict[str, tuple[nn.Module, QuantSpec]], data: Any, step: Step,
               show_progress: bool = False) -> dict[str, tuple[QuantizedWeight, dict[str, Any], Any]]:  # fmt: skip
    """CBQ on the window that starts at this block: the block's planned linears and those of the next
    ``window - 1`` blocks (``data.ahead``, still float) fake-quantized through parametrizations and input hooks
    (all removed afterwards, leaving the float modules untouched) and trained together; this block's results
    (weights and, for static W8A8 inputs, the tuned input range) are returned."""
    from torch.nn.utils import parametrize

    from slimquant.algorithms.cbq import InputFakeQuant, LoRARoundingWeight, tune_window

    assert isinstance(step, CBQ)
    window = [(data.prefix, block, layers), *data.ahead]
    everything = {prefix + name: (module, spec) for prefix, _, lays in window for name, (module, spec) in lays.items()}
    for name, (module, _) in everything.items():
        if not isinstance(module, nn.Linear) or parametrize.is_parametrized(module):
            raise SlimquantError(f"{name}: cbq tunes plain nn.Linear layers, got {type(module).__name__}")
    blocks = [b for _, b, _ in window]
    with torch.no_grad():  # the float window's output on the float model's inputs (later blocks still float)
        targets = []
        for j in range(len(data)):
            t = data.target(j)
            for b in blocks[1:]:
                a, k = data.with_hidden(j, t)
                t = block_output(b(*a, **k))
            targets.append(t)

    def run(j: int, float_input: bool) -> torch.Tensor:
        a, k = data.float_item(j) if float_input else data.item(j)
        h = block_output(blocks[0](*a, **k))
        for b in blocks[1:]:
            a, k = data.with_hidden(j, h)
            h = block_output(b(*a, **k))
        return h

    gen = torch.Generator().manual_seed(step.seed)
    wrapped = {name: LoRARoundingWeight(module.weight, spec, step.rank, gen) for name, (module, spec) in everything.items()}
    # one input quantizer per tensor: layers fed the very same tensor (q/k/v, gate/up) keep one shared input
    # range, as their deployed modules must for a producer to quantize that input once (fused W8A8 norms)
    quant_in: dict[str, InputFakeQuant] = {}
    for group in _shared_inputs(run, {n: m for n, (m, _) in everything.items() if data.input_quant(n) is not None}):
        specs = {data.input_quant(n)[0] for n in group}  # type: ignore[index]
        for spec in specs:
            names = [n for n in group if data.input_quant(n)[0] == spec]  # type: ignore[index]
            lows = [data.input_quant(n)[1] for n in names]  # type: ignore[index]
            highs = [data.input_quant(n)[2] for n in names]  # type: ignore[index]
            shared = InputFakeQuant(spec, None if lows[0] is None else min(lows), None if highs[0] is None else max(highs),
                                    step.learn_input_ranges)  # fmt: skip
            quant_in.update({n: shared for n in names})
    # overlapping windows: a layer tuned as part of the previous window starts from where that window left it
    # (data.carry: "<layer>::<tensor>" -> tensor)
    warm = []
    for name in everything:
        state = {k.split("::", 1)[1]: v for k, v in data.carry.items() if k.split("::", 1)[0] == name}
        module = everything[name][0]
        # only when the layer is what that window tuned (a block step, e.g. AWQ, may have rescaled it since)
        if "float_weight" in state and torch.equal(state.pop("float_weight"), module.weight.detach()):
            wrapped[name].load_state_dict({k[2:]: v for k, v in state.items() if k.startswith("w.")})
            if name in quant_in:
                quant_in[name].load_state_dict({k[3:]: v for k, v in state.items() if k.startswith("in.")})
            warm.append(name)
    unique_in = list({id(q): q for q in quant_in.values()}.values())
    params = [p for m in (*wrapped.values(), *unique_in) for p in m.tuned()]
    frozen = [p for b in blocks for p in b.parameters() if p.requires_grad]
    handles = []

    def project() -> None:
        for m in (*wrapped.values(), *unique_in):
            m.project()

    try:
        for p in frozen:
            p.requires_grad_(False)
        for name, (module, _) in everything.items():
            parametrize.register_parametrization(module, "weight", wrapped[name])
            if name in quant_in:
                handles.append(module.register_forward_pre_hook(lambda _m, args, q=quant_in[name]: (q(args[0]), *args[1:])))
        span = f"{data.prefix.rstrip('.')}" + (f" (+{len(window) - 1} ahead)" if len(window) > 1 else "")
        info = tune_window(run, targets, params, project, step.iters, step.lr, step.batch_size, step.kl_weight,
                           step.homologous, step.seed, show_progress, desc=f"cbq {span}")  # fmt: skip
    finally:
        for h in handles:
            h.remove()
        for module, _ in everything.values():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        for p in frozen:
            p.requires_grad_(True)
    data.carry.clear()  # only the next window's layers are worth keeping
    for prefix, _, lays in window[1:]:
        for name in lays:
            full = prefix + name
            data.carry[f"{full}::float_weight"] = everything[full][0].weight.detach().clone()
            for k, v in wrapped[full].state_dict().items():
                data.carry[f"{full}::w.{k}"] = v.detach().clone()
            for k, v in (quant_in[full].state_dict().items() if full in quant_in else ()):
                data.carry[f"{full}::in.{k}"] = v.detach().clone()
    info["window"] = [prefix.rstrip(".") for prefix, _, _ in window]
    info["warm_start"] = bool(warm)
    if "stopped" in info:
        log.warning("cbq stopped early: %s", info["stopped"])
    out = {}
    for name, (module, _) in layers.items():
        full = data.prefix + name
        rng = quant_in[full].range() if full in quant_in else None
        out[name] = (wrapped[full].result(module.weight), {"cbq": info}, rng)
    return out


def _shared_inputs(run: Any, modules: dict[str, nn.Module]) -> list[list[str]]:
    """``modules``' names grouped by the input tensor they are fed (one forward of the first calibration item:
    layers fed the very same tensor, as q/k/v are, form one group), in order."""
    if not modules:
        return []
    seen: dict[tuple, tuple[list[str], torch.Tensor]] = {}  # holding the tensor keeps its memory from reuse
    handles = []
    for name, module in modules.items():

        def hook(_m: nn.Module, args: tuple, name: str = name) -> None:
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            if all(name not in names for names, _ in seen.values()):
                seen.setdefault(key, ([], x))[0].append(name)

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run(0, False)
    finally:
        for h in handles:
            h.remove()
    groups = [names for names, _ in seen.values()]
    missing = [n for n in modules if all(n not in g for g in groups)]  # never ran on this item: on its own
    return groups + [[n] for n in missing]


def _cbq_record(step: Step, recipe: Recipe) -> dict[str, Any]:
    return {k: getattr(step, k) for k in ("window", "rank", "iters", "lr", "batch_size", "kl_weight", "homologous",
                                          "learn_input_ranges", "seed")}  # fmt: skip


register_algorithm(BlockWeightAlgorithm(CBQ, solve_block=_solve_cbq, record=_cbq_record,
                                        lookahead=lambda step: step.window - 1))  # type: ignore[attr-defined]


def _solve_qat(layer: str, w: torch.Tensor, h: torch.Tensor | None, spec: QuantSpec,
               step: Step) -> tuple[QuantizedWeight, dict[str, Any]]:  # fmt: skip
    # QAT layers are trained, not solved: slimquant.convert refuses a qat recipe before any layer gets here
    raise SlimquantError(f"{layer}: the qat step trains the layer (slimquant.prepare_qat -> train -> "
                         "slimquant.convert); post-training quantization runs rtn or gptq")  # fmt: skip


register_algorithm(WeightAlgorithm(QAT, solve=_solve_qat))


# -- smoothing of the float model (msModelSlim m1 / m4 / m2) ------------------------------------------------
def _check_groups(model: nn.Module, step: Step, recipe: Recipe) -> None:
    smooth_groups(model)  # an unknown architecture fails here, before any work


def _observe_group_inputs(model: nn.Module, step: Step, recipe: Recipe) -> InputRequest:
    """Each smoothing group's input (the first linear's) per-channel absmax, and with the alpha search a sample
    of its rows."""
    firsts = tuple(lins[0] for _, lins in smooth_groups(model))
    rows = step.sample_rows if isinstance(step, (SmoothQuantSearch, OutlierSuppression, CBQPreprocess)) else 0
    return InputRequest(firsts, lambda: {"absmax": make_observer("minmax", axis=-1)}, rows)


def _absmax(st: Any) -> torch.Tensor:
    """A smoothing group's per-channel max |input| (float32) from its observed statistics."""
    lo, hi = st.observers["absmax"].range()
    return torch.maximum(lo.abs(), hi.abs()).float()


def _smooth(model: nn.Module, step: Step, recipe: Recipe, stats: dict[str, Any],
            show_progress: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """SmoothQuant with a fixed alpha, or (search) the alpha with the lowest quantized output error per group."""
    rows = []
    groups = smooth_groups(model)
    for prev_name, lin_names in tqdm(groups, desc=step.TYPE, disable=not show_progress, unit="group"):
        st = stats[lin_names[0]]
        act_absmax = _absmax(st)
        linears = [model.get_submodule(n) for n in lin_names]
        w_absmax = weight_absmax_per_input(linears)
        if isinstance(step, SmoothQuantSearch):
            alpha, errors = _search_alpha(st.sample(), linears, act_absmax, w_absmax, recipe, step.alphas)
        else:
            alpha, errors = step.alpha, {}  # type: ignore[attr-defined]
        if alpha is not None:
            s = smoothquant_scales(act_absmax, w_absmax, alpha)
            apply_smoothing(model.get_submodule(prev_name), linears, s)
        rows.append({"prev": prev_name, "linears": list(lin_names), "alpha": alpha,
                     "act_absmax_before": round(float(act_absmax.max()), 4),
                     "act_absmax_after": round(float((act_absmax / s).max()) if alpha is not None else float(act_absmax.max()), 4),
                     "errors": errors})  # fmt: skip
    log.info("%s applied to %d group(s)", step.TYPE, sum(r["alpha"] is not None for r in rows))
    return rows


def _search_alpha(x: torch.Tensor, linears: list[nn.Module], act_absmax: torch.Tensor, w_absmax: torch.Tensor,
                  recipe: Recipe, alphas: tuple[float, ...]) -> tuple[float | None, dict[str, float]]:  # fmt: skip
    """The alpha (None = leave unsmoothed) with the lowest quantized output error on ``x``."""
    weights = [input_weight(m).detach() for m in linears]
    ones = torch.ones_like(act_absmax)
    errors = {"none": smoothed_output_error(x, weights, ones, recipe.weight, recipe.input)}
    for a in alphas:
        s = smoothquant_scales(act_absmax, w_absmax, a)
        errors[str(a)] = smoothed_output_error(x, weights, s, recipe.weight, recipe.input)
    best = min(errors, key=lambda k: errors[k])
    return (None if best == "none" else float(best)), errors


def _gamma_migration(model: nn.Module, step: Step, recipe: Recipe, stats: Any,
                     show_progress: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """m2: move every norm's weight into the linears it feeds (groups fed by a linear are left alone)."""
    rows = []
    for prev_name, lin_names in smooth_groups(model):
        prev = model.get_submodule(prev_name)
        if isinstance(prev, nn.Linear) or not isinstance(getattr(prev, "weight", None), torch.Tensor):
            continue
        s = gamma_migration_scales(prev.weight)
        apply_smoothing(prev, [model.get_submodule(n) for n in lin_names], s)
        rows.append({"prev": prev_name, "linears": list(lin_names), "alpha": "gamma",
                     "gamma_absmax": round(float(s.abs().max()), 4)})  # fmt: skip
    log.info("gamma migration applied to %d norm(s)", len(rows))
    return rows


def _outlier_suppression(model: nn.Module, step: Step, recipe: Recipe, stats: dict[str, Any],
                         show_progress: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """m2 (OS+): gamma migration, then per group the scaling threshold with the lowest quantized output error."""
    assert isinstance(step, OutlierSuppression)
    rows = []
    for prev_name, lin_names in tqdm(smooth_groups(model), desc=step.TYPE, disable=not show_progress, unit="group"):
        st = stats[lin_names[0]]
        act_absmax = _absmax(st)
        prev = model.get_submodule(prev_name)
        linears = [model.get_submodule(n) for n in lin_names]
        is_norm = not isinstance(prev, nn.Linear) and isinstance(getattr(prev, "weight", None), torch.Tensor)
        gamma = (gamma_migration_scales(prev.weight) if step.gamma_migration and is_norm
                 else torch.ones_like(act_absmax))  # fmt: skip
        # after migration the group's input is x / gamma and its weights W * gamma
        x = st.sample().float() / gamma
        weights = [input_weight(m).detach().float() * gamma for m in linears]
        ranges = act_absmax / gamma.abs()
        t, errors = _search_threshold(x, weights, ranges, recipe, step.thresholds)
        s = outlier_suppression_scales(ranges, t) if t is not None else torch.ones_like(ranges)
        total = gamma * s
        if not bool((total == 1).all()):
            apply_smoothing(prev, linears, total)
        rows.append({"prev": prev_name, "linears": list(lin_names), "gamma": bool(step.gamma_migration and is_norm),
                     "threshold": t, "act_absmax_before": round(float(act_absmax.max()), 4),
                     "act_absmax_after": round(float((act_absmax / total.abs()).max()), 4),
                     "scaled_channels": int((s > 1).sum()), "errors": errors})  # fmt: skip
    log.info("outlier suppression (OS+) applied to %d group(s), %d with scaling", len(rows),
             sum(r["threshold"] is not None for r in rows))  # fmt: skip
    return rows


def _search_threshold(x: torch.Tensor, weights: list[torch.Tensor], ranges: torch.Tensor, recipe: Recipe,
                      n: int) -> tuple[float | None, dict[str, float]]:  # fmt: skip
    """The OS+ threshold (None = no scaling) with the lowest quantized output error on ``x``: candidates are the
    quantiles 0.5 .. 1 of the channels' ranges."""
    ones = torch.ones_like(ranges)
    errors = {"none": smoothed_output_error(x, weights, ones, recipe.weight, recipe.input)}
    live = ranges[ranges > 0]
    if live.numel() == 0:
        return None, errors
    qs = torch.linspace(0.5, 1.0, n + 1)[:-1] if n > 1 else torch.tensor([0.5])
    candidates: dict[str, float] = {}
    for t in torch.quantile(live, qs).tolist():
        candidates[f"{t:.6g}"] = t  # the report's key; the threshold applied is the one evaluated
        errors[f"{t:.6g}"] = smoothed_output_error(x, weights, outlier_suppression_scales(ranges, t), recipe.weight,
                                                   recipe.input)  # fmt: skip
    best = min(errors, key=lambda k: errors[k])
    return (None if best == "none" else candidates[best]), errors


register_algorithm(ModelTransform(SmoothQuant, check_model=_check_groups, observe=_observe_group_inputs, apply=_smooth))
register_algorithm(ModelTransform(SmoothQuantSearch, check_model=_check_groups, observe=_observe_group_inputs,
                                  apply=_smooth))  # fmt: skip
register_algorithm(ModelTransform(GammaMigration, check_model=_check_groups, observe=lambda m, s, r: None,
                                  apply=_gamma_migration))  # fmt: skip
register_algorithm(ModelTransform(OutlierSuppression, check_model=_check_groups, observe=_observe_group_inputs,
                                  apply=_outlier_suppression))  # fmt: skip


def _cbq_preprocess(model: nn.Module, step: Step, recipe: Recipe, stats: dict[str, Any],
                    show_progress: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """CBQ's coarse-to-fine pre-processing (m5): per smoothing group, the outlier input channels scaled down with
    the strength (or none) of the lowest quantized output error, then each linear's outlier weights truncated
    where that lowers the error too."""
    from slimquant.math.outliers import coarse_outliers, coarse_to_fine_outliers

    assert isinstance(step, CBQPreprocess)
    rows = []
    for prev_name, lin_names in tqdm(smooth_groups(model), desc=step.TYPE, disable=not show_progress, unit="group"):
        st = stats[lin_names[0]]
        act_absmax = _absmax(st)
        linears = [model.get_submodule(n) for n in lin_names]
        x = st.sample().float()
        weights = [input_weight(m).detach().float() for m in linears]
        ones = torch.ones_like(act_absmax)
        errors = {"none": smoothed_output_error(x, weights, ones, recipe.weight, recipe.input)}
        best, s, n_scaled = "none", ones, 0
        # the fine set (the extreme channels) or every coarse candidate, scaled towards the largest channel left
        for level, outliers in (("fine", coarse_to_fine_outliers(act_absmax, step.iqr_factor, step.fine_lambda)),
                                ("coarse", coarse_outliers(act_absmax, step.iqr_factor))):  # fmt: skip
            if not bool(outliers.any()) or not bool((~outliers).any()):
                continue
            t = float(act_absmax[~outliers].max())
            for a in step.alphas:
                cand = torch.where(outliers, (act_absmax / max(t, 1e-12)).clamp(min=1.0) ** a, ones)
                key = f"{level} {a}"
                errors[key] = smoothed_output_error(x, weights, cand, recipe.weight, recipe.input)
                if errors[key] < errors[best]:
                    best, s, n_scaled = key, cand, int(outliers.sum())
        if best != "none":
            apply_smoothing(model.get_submodule(prev_name), linears, s)
        truncated = {}
        if step.truncate_weights:
            xs = x / s
            for name, m in zip(lin_names, linears):
                w = input_weight(m).detach().float()
                mask = coarse_to_fine_outliers(w.abs(), step.iqr_factor, step.fine_lambda)
                if not bool(mask.any()) or bool(mask.all()):
                    continue
                bound = float(w.abs()[~mask].max())
                wt = w.clamp(-bound, bound)
                before = smoothed_output_error(xs, [w], torch.ones_like(s), recipe.weight, recipe.input)
                after = smoothed_output_error(xs, [wt], torch.ones_like(s), recipe.weight, recipe.input, reference=[w])
                if after < before:
                    with torch.no_grad():
                        m.weight.copy_(wt.reshape(m.weight.shape).to(m.weight.dtype))
                    truncated[name] = {"weights": int(mask.sum()), "bound": round(bound, 6),
                                       "error_before": before, "error_after": after}  # fmt: skip
        rows.append({"prev": prev_name, "linears": list(lin_names), "outlier_channels": n_scaled,
                     "outliers": None if best == "none" else best.split()[0],
                     "alpha": None if best == "none" else float(best.split()[1]),
                     "act_absmax_before": round(float(act_absmax.max()), 4),
                     "act_absmax_after": round(float((act_absmax / s).max()), 4), "errors": errors,
                     "truncated": truncated})  # fmt: skip
    log.info("cbq pre-processing: %d group(s) scaled, %d linear(s) truncated", sum(r["alpha"] is not None for r in rows),
             sum(len(r["truncated"]) for r in rows))  # fmt: skip
    return rows


register_algorithm(ModelTransform(CBQPreprocess, check_model=_check_groups, observe=_observe_group_inputs,
                                  apply=_cbq_preprocess))  # fmt: skip


# -- AWQ, block by block (msModelSlim m3) -----------------------------------------------------------------------
class _AWQStats:
    """One smoothing group's input on the block's calibration inputs: ``2/N X^T X`` and mean ``|x|``."""

    def __init__(self, k: int) -> None:
        self.acc = HessianAccumulator(k)
        self.absum: Any = 0.0
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.acc.add(x)
        self.absum = self.absum + x.abs().sum(0)
        self.count += x.shape[0]


def _block_groups(model: nn.Module, prefix: str, plans: dict[str, Any]) -> list[tuple[str, tuple[str, ...]]]:
    """The smoothing groups inside the block at ``prefix`` with a planned (quantized) linear."""
    return [(p, lins) for p, lins in smooth_groups(model) if p.startswith(prefix) and any(n in plans for n in lins)]


def _awq_collectors(model: nn.Module, step: Step, recipe: Recipe, prefix: str, plans: dict[str, Any]) -> dict[str, Any]:
    return {lins[0]: _AWQStats(input_weight(model.get_submodule(lins[0])).shape[1])
            for _, lins in _block_groups(model, prefix, plans)}  # fmt: skip


def _awq_clips(step: Step, recipe: Recipe) -> bool:
    """AWQ's clipping search runs before a data-free weight step; a calibrated one (GPTQ, AutoRound's range
    tuning) solves on the unclipped (scaled) weights."""
    return step.clip and not recipe.weight_step.needs_calibration  # type: ignore[attr-defined]


def _awq_apply(model: nn.Module, step: Step, recipe: Recipe, prefix: str, plans: dict[str, Any],
               collected: dict[str, Any]) -> list[dict[str, Any]]:  # fmt: skip
    """Per group (in order): search the scales, apply them to the op before and the linears, and (before a
    data-free weight step) clip the planned linears."""
    assert isinstance(step, AWQ)
    out = []
    for prev_name, lin_names in _block_groups(model, prefix, plans):
        st = collected.pop(lin_names[0])
        h, mean_abs, count = st.acc.hessian(), st.absum / max(st.count, 1), st.count
        linears = [model.get_submodule(n) for n in lin_names]
        specs = [plans[n].spec if n in plans else None for n in lin_names]
        with torch.no_grad():
            res = awq_search(mean_abs, h, [input_weight(m).detach() for m in linears], specs, step.grid)
            apply_smoothing(model.get_submodule(prev_name), linears, res.scales)
            row: dict[str, Any] = {"prev": prev_name, "linears": list(lin_names), "ratio": res.ratio,
                                   "output_error": res.errors[res.ratio], "output_error_unscaled": res.errors[0.0],
                                   "tokens": count}  # fmt: skip
            if _awq_clips(step, recipe):
                hs = h / res.scales[:, None] / res.scales[None, :]  # the linears now see x / s
                shrink = {}
                for n, m, spec in zip(lin_names, linears, specs):
                    if spec is None or not isinstance(m, nn.Linear):
                        continue
                    clipped, mean_shrink = awq_clip(hs, m.weight.detach().float(), spec, step.grid)
                    m.weight.copy_(clipped.to(m.weight.dtype))
                    shrink[n] = round(mean_shrink, 4)
                row["clip_mean_shrink"] = shrink
        out.append(row)
        log.debug("awq %s -> %s: ratio %.2f, output error %.3g (unscaled %.3g)", prev_name, lin_names, res.ratio,
                  res.errors[res.ratio], res.errors[0.0])  # fmt: skip
    return out


register_algorithm(BlockTransform(AWQ, check_model=_check_groups, collectors=_awq_collectors, apply=_awq_apply,
                                  record=lambda step, recipe: {"awq": {"clip": _awq_clips(step, recipe)}}))  # fmt: skip
