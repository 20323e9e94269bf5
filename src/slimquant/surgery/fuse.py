"""Swap modules for their fused inference versions (:mod:`slimquant.nn.fused`), by architecture: float ops that
feed W8A8 layers, norms that feed weight-only quantized layers, and gated MLPs whose gate and up are packed
4-bit layers."""

from __future__ import annotations

import logging

from torch import nn

from slimquant.adapters.architectures import Architecture, architecture_for, block_names
from slimquant.errors import SlimquantError
from slimquant.nn.fused import FusedGatedMLP, FusedRMSNorm, FusedW4A16GatedMLP, NativeRMSNorm, is_silu
from slimquant.nn.modules import QLinear
from slimquant.nn.w8a8 import QLinearW8A8
from slimquant.surgery.select import set_module

log = logging.getLogger(__name__)


def fuse_for_inference(model: nn.Module) -> int:
    """Replace, in every block, each RMSNorm whose readers are all W8A8 layers quantizing their input the same
    way by :class:`FusedRMSNorm`, each RMSNorm whose readers are all weight-only quantized layers by
    :class:`NativeRMSNorm`, each gated SiLU MLP whose ``down`` is W8A8 by :class:`FusedGatedMLP`, and each
    other gated SiLU MLP whose ``gate`` and ``up`` are packed 4-bit layers of one shape by
    :class:`FusedW4A16GatedMLP`.

    Returns how many modules were replaced (0 for an architecture without a description, or without such
    layers). State-dict keys and outputs up to float32 rounding are unchanged; running it twice is harmless.
    """
    try:
        arch = architecture_for(model)
        blocks = block_names(model, arch)
    except SlimquantError:
        return 0
    count = 0
    for block in blocks:
        count += _fuse_norms(model, arch, block) + _fuse_mlp(model, arch, block)
    if count:
        log.info("fused %d norm / MLP module(s) for inference (W8A8 int8 inputs, native norms, 4-bit gate / up)", count)
    return count


def _fuse_norms(model: nn.Module, arch: Architecture, block: str) -> int:
    count = 0
    for group in arch.smooth:
        name = f"{block}.{group.prev}"
        norm = model.get_submodule(name)
        if type(norm).__name__ not in arch.rms_norms or not _only_weight(norm):
            continue
        readers = [model.get_submodule(f"{block}.{n}") for n in group.linears]
        if all(type(r) is QLinear for r in readers):  # weight-only: no int8 rows to write, the norm alone
            set_module(model, name, NativeRMSNorm(norm, readers))  # type: ignore[arg-type]
            count += 1
            continue
        if not all(isinstance(r, QLinearW8A8) for r in readers):
            continue
        keys = {r.input_key() for r in readers}  # type: ignore[union-attr]
        if len(keys) != 1:  # e.g. static layers calibrated to different ranges: each quantizes its own
            continue
        key = keys.pop()
        parents = {id(m): m for n in group.linears for m in [model.get_submodule(f"{block}.{n}".rpartition(".")[0])]}
        fused = FusedRMSNorm(norm, readers, key, [*readers, *parents.values()])  # type: ignore[arg-type]
        set_module(model, name, fused)
        for r in readers:
            object.__setattr__(r, "rows_from", fused)  # unregistered: a sibling, not a child
        count += 1
    return count


def _only_weight(norm: nn.Module) -> bool:
    params = {n for n, _ in norm.named_parameters()} | {n for n, _ in norm.named_buffers()}
    return params == {"weight"} and hasattr(norm, "variance_epsilon")


def _fuse_mlp(model: nn.Module, arch: Architecture, block: str) -> int:
    spec = arch.gated_mlp
    if spec is None:
        return 0
    name = f"{block}.{spec.path}"
    mlp = model.get_submodule(name)
    if isinstance(mlp, (FusedGatedMLP, FusedW4A16GatedMLP)) or not is_silu(getattr(mlp, spec.act, None)):
        return 0
    if isinstance(getattr(mlp, spec.down, None), QLinearW8A8):
        set_module(model, name, FusedGatedMLP(mlp, spec.gate, spec.up, spec.down, spec.act))
        return 1
    gate, up = getattr(mlp, spec.gate, None), getattr(mlp, spec.up, None)
    if type(gate) is not QLinear or type(up) is not QLinear:  # weight-only: not a subclass that quantizes its input
        return 0
    if gate.packed4() is None or up.packed4() is None:
        return 0
    if (gate.weight_rows, gate.weight_cols) != (up.weight_rows, up.weight_cols):
        return 0
    set_module(model, name, FusedW4A16GatedMLP(mlp, spec.gate, spec.up, spec.down, spec.act))
    return 1
