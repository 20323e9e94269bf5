"""Structured pruning surgery: which output channels of a model can be removed, and removing them physically.

:func:`channel_groups` traces the model (``torch.fx``, with shapes from one example input) and, for every
``nn.Conv2d`` (``groups == 1``, called once), follows its output through operations that keep channels apart
(BatchNorm2d, element-wise activations, pooling, dropout, identity, ``flatten(1)``) to the layers that read it:
the input channels of other convolutions, or, after ``flatten``, the input features of an ``nn.Linear`` (each
channel owning ``H * W`` consecutive features). A convolution whose output reaches anything else (a residual
``+``, a concatenation, the model's output, a second call of a module) is not prunable, and the reason says why.

:func:`shrink_channels` removes channels: the convolution's output channels (and bias), every BatchNorm2d on the
way (affine parameters and running statistics), and the consumers' matching inputs. The modules keep their
classes with smaller tensors (new Parameters: build optimizers afterwards). :func:`shrink_mlp` does the same for
the intermediate channels of a transformer's gated MLP (gate / up rows, down columns).

A plan (``{"conv": {name: [kept channels]}, "mlp": {prefix: [kept channels]}}``, JSON) recorded by the pruning
step re-applies to a fresh instance of the original architecture (:func:`apply_plan`), which is how a pruned
model is reloaded.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimquant.adapters import GatedMLP, gated_mlps
from slimquant.errors import SlimquantError

log = logging.getLogger(__name__)

_PASS_MODULES = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU,
                 nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d, nn.Identity)  # fmt: skip
# element-wise: also fine after flatten (pooling and BatchNorm2d are not)
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.Hardswish,
                        nn.Hardsigmoid, nn.Mish, nn.Dropout, nn.Identity)  # fmt: skip
_ELEMENTWISE_FUNCTIONS = {"relu", "relu6", "leaky_relu", "gelu", "silu", "sigmoid", "tanh", "elu", "hardswish", "mish",
                          "dropout", "contiguous"}  # fmt: skip
_PASS_FUNCTIONS = {"relu", "relu6", "leaky_relu", "gelu", "silu", "sigmoid", "tanh", "elu", "hardswish", "mish",
                   "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "dropout", "dropout2d",
                   "contiguous"}  # fmt: skip


@dataclass
class ChannelGroup:
    """One prunable convolution: ``conv`` its name, ``norms`` the BatchNorm2d layers its channels pass through (the
    first one right after it is ``bn``, which SCOP scores with), ``convs`` the convolutions reading it,
    ``linears`` ``{name: H * W}`` the Linears reading it after ``flatten``."""

    conv: str
    channels: int
    norms: list[str] = field(default_factory=list)
    convs: list[str] = field(default_factory=list)
    linears: dict[str, int] = field(default_factory=dict)
    bn: str | None = None


def _fn_name(target: Any) -> str:
    return getattr(target, "__name__", str(target))


def channel_groups(model: nn.Module, example: Any) -> tuple[dict[str, ChannelGroup], dict[str, str]]:
    """``(prunable {conv name: ChannelGroup}, not prunable {conv name: why})`` for every Conv2d of ``model``.
    ``example``: one input batch (a tensor, or a tuple of positional inputs) to propagate shapes with."""
    import torch.fx
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 -- any model code may fail to trace
        raise SlimquantError(f"structured pruning follows channels through the model's graph, and "
                             f"{type(model).__name__} does not trace with torch.fx ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None  # fmt: skip
    args = example if isinstance(example, tuple) else (example,)
    modes = {m: m.training for m in model.modules()}  # restored one by one (mixed modes, e.g. frozen BNs, stay)
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    finally:
        for m, mode in modes.items():
            m.training = mode
    modules = dict(model.named_modules())
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    groups: dict[str, ChannelGroup] = {}
    refused: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), nn.Conv2d):
            continue
        name = str(node.target)
        conv = modules[name]
        if calls[name] != 1:
            refused[name] = "called more than once"
            continue
        if conv.groups != 1:
            refused[name] = f"grouped convolution (groups={conv.groups})"
            continue
        group = ChannelGroup(name, conv.out_channels)
        why = _follow(node, group, modules, calls, 0)
        if why is None and not (group.convs or group.linears):
            why = "its output reaches no layer"
        if why is not None:
            refused[name] = why
        else:
            groups[name] = group
    return groups, refused


def _per_channel(node: Any, start: Any, end: Any) -> int | None:
    """Features per channel when ``node``'s ``[N, C, *spatial]`` output is flattened from ``start`` to ``end``
    (only ``flatten(1)`` / ``flatten(1, -1)`` keep each channel's features together), else None."""
    meta = node.meta.get("tensor_meta")
    shape = tuple(getattr(meta, "shape", ()) or ())
    if len(shape) < 2 or start != 1 or end not in (-1, len(shape) - 1):
        return None
    per = 1
    for d in shape[2:]:
        per *= int(d)
    return per


def _follow(node: Any, group: ChannelGroup, modules: dict[str, nn.Module], calls: Counter, flattened: int) -> str | None:
    """Walk ``node``'s users, filling ``group``; the reason it is not prunable, or None. ``flattened``: 0 before a
    ``flatten``, after it the features each channel owns."""
    for user in node.users:
        if user.op == "call_module":
            m = modules.get(str(user.target))
            tname = str(user.target)
            if calls[tname] != 1:
                return f"its output reaches {tname}, which is called more than once"
            if isinstance(m, nn.Conv2d) and not flattened:
                if m.groups != 1 or m.in_channels != group.channels or user.args[0] is not node:
                    return f"its output reaches {tname}, which does not read its channels one to one"
                group.convs.append(tname)
                continue
            if isinstance(m, nn.Linear) and flattened:
                if m.in_features != group.channels * flattened:
                    return f"its output reaches {tname} through a reshape slimquant cannot map to channels"
                group.linears[tname] = flattened
                continue
            if isinstance(m, nn.Flatten) and not flattened:
                per = _per_channel(node, m.start_dim, m.end_dim)
                if per is None:
                    return f"its output is flattened by {tname} other than from dimension 1 to the end"
                why = _follow(user, group, modules, calls, per)
                if why:
                    return why
                continue
            if isinstance(m, _ELEMENTWISE_MODULES if flattened else _PASS_MODULES):
                if isinstance(m, nn.BatchNorm2d):
                    if m.num_features != group.channels:
                        return f"{tname} has {m.num_features} features, not {group.channels}"
                    if group.bn is None and node.op == "call_module" and str(node.target) == group.conv:
                        group.bn = tname
                    group.norms.append(tname)
                why = _follow(user, group, modules, calls, flattened)
                if why:
                    return why
                continue
            return f"its output reaches {tname} ({type(m).__name__})"
        if user.op in ("call_function", "call_method"):
            fname = _fn_name(user.target)
            if user.args and user.args[0] is not node:
                return f"its output is an argument of {fname} other than the first"
            if any(a is node for a in list(user.args[1:]) + list(user.kwargs.values())):
                return f"its output is used twice by {fname}"
            if fname in (_ELEMENTWISE_FUNCTIONS if flattened else _PASS_FUNCTIONS):
                why = _follow(user, group, modules, calls, flattened)
            elif fname == "flatten" and not flattened:
                start = user.args[1] if len(user.args) > 1 else user.kwargs.get("start_dim", 0)
                end = user.args[2] if len(user.args) > 2 else user.kwargs.get("end_dim", -1)
                per = _per_channel(node, start, end)
                if per is None:
                    return f"its output is flattened other than from dimension 1 to the end ({fname}({start}, {end}))"
                why = _follow(user, group, modules, calls, per)
            else:
                return f"its output reaches {fname}"
            if why:
                return why
            continue
        return f"its output reaches the model's {user.op}"
    return None


def _checked_keep(keep: Any, width: int, layer: str) -> torch.Tensor:
    """``keep`` as sorted CPU indices (they index tensors on any device), checked against ``width``."""
    keep = torch.as_tensor(keep).detach().to("cpu", torch.long).sort().values
    if keep.numel() == 0 or int(keep.max()) >= width or int(keep.min()) < 0 or keep.unique().numel() != keep.numel():
        raise SlimquantError(f"{layer}: channels to keep must be distinct indices in [0, {width}), at least one")
    return keep


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=like.requires_grad)


def shrink_channels(model: nn.Module, group: ChannelGroup, keep: torch.Tensor) -> None:
    """Keep only the output channels ``keep`` (sorted indices) of ``group.conv``, in place."""
    keep = _checked_keep(keep, group.channels, group.conv)
    conv = model.get_submodule(group.conv)
    conv.weight = _param(conv.weight[keep], conv.weight)
    if conv.bias is not None:
        conv.bias = _param(conv.bias[keep], conv.bias)
    conv.out_channels = int(keep.numel())
    for name in group.norms:
        bn = model.get_submodule(name)
        if bn.affine:
            bn.weight = _param(bn.weight[keep], bn.weight)
            bn.bias = _param(bn.bias[keep], bn.bias)
        if bn.track_running_stats and bn.running_mean is not None:
            bn.running_mean = bn.running_mean[keep].clone()
            bn.running_var = bn.running_var[keep].clone()
        bn.num_features = int(keep.numel())
    for name in group.convs:
        c = model.get_submodule(name)
        c.weight = _param(c.weight[:, keep], c.weight)
        c.in_channels = int(keep.numel())
    for name, hw in group.linears.items():
        lin = model.get_submodule(name)
        cols = (keep[:, None] * hw + torch.arange(hw)[None, :]).reshape(-1)
        lin.weight = _param(lin.weight[:, cols], lin.weight)
        lin.in_features = int(cols.numel())
    group.channels = int(keep.numel())


def shrink_mlp(model: nn.Module, prefix: str, layout: GatedMLP, keep: torch.Tensor) -> None:
    """Keep only the intermediate channels ``keep`` of the gated MLP at ``prefix`` (its ``layout``'s gate / up
    rows, down columns), in place."""
    mlp = model.get_submodule(prefix)
    gate, up, down = (getattr(mlp, n, None) for n in (layout.gate, layout.up, layout.down))
    if not all(type(m) is nn.Linear for m in (gate, up, down)):
        raise SlimquantError(f"{prefix}: MLP pruning needs float nn.Linear {layout.gate} / {layout.up} / {layout.down} "
                             "(prune before quantizing)")  # fmt: skip
    keep = _checked_keep(keep, gate.out_features, prefix)  # type: ignore[union-attr]
    for lin in (gate, up):
        lin.weight = _param(lin.weight[keep], lin.weight)  # type: ignore[union-attr]
        if lin.bias is not None:  # type: ignore[union-attr]
            lin.bias = _param(lin.bias[keep], lin.bias)  # type: ignore[union-attr]
        lin.out_features = int(keep.numel())  # type: ignore[union-attr]
    down.weight = _param(down.weight[:, keep], down.weight)  # type: ignore[union-attr]
    down.in_features = int(keep.numel())  # type: ignore[union-attr]
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = int(keep.numel())


def apply_plan(model: nn.Module, plan: dict[str, Any], example: Any = None) -> nn.Module:
    """Re-apply a pruning ``plan`` (:attr:`slimquant.pipeline.prune.PruneResult.plan`) to a fresh instance of the
    original architecture, in place (returned). Convolution plans need ``example`` (an input batch, for the
    channel tracing); the MLP plan updates a transformers config's ``intermediate_size``."""
    if not isinstance(plan, dict) or set(plan) - {"conv", "mlp", "version"}:
        raise SlimquantError(f"not a pruning plan (keys conv / mlp): {sorted(plan) if isinstance(plan, dict) else plan!r}")
    convs = plan.get("conv") or {}
    if convs:
        if example is None:
            raise SlimquantError("re-applying a convolution pruning plan needs an example input (example=...)")
        groups, refused = channel_groups(model, example)
        for name, kept in convs.items():
            if name not in groups:
                raise SlimquantError(f"pruning plan names {name}, which this model "
                                     f"{'cannot prune: ' + refused[name] if name in refused else 'does not have'}")  # fmt: skip
            shrink_channels(model, groups[name], torch.tensor(kept))
    mlps = plan.get("mlp") or {}
    layouts = dict(gated_mlps(model)) if mlps else {}
    for prefix, kept in mlps.items():
        if prefix not in layouts:
            raise SlimquantError(f"pruning plan names the MLP {prefix}, which this model does not have")
        shrink_mlp(model, prefix, layouts[prefix], torch.tensor(kept))
    if mlps:
        widths = {len(k) for k in mlps.values()}
        cfg = getattr(model, "config", None)
        if cfg is not None and len(widths) == 1 and hasattr(cfg, "intermediate_size"):
            cfg.intermediate_size = widths.pop()
    return model
