"""The msModelSlim / MindIE checkpoint layout: a codec over the modules' logical tensors, plus the manifest.

Directory written by :func:`save`::

    config.json                                   model config + "quantize": "w4a16"
    quant_model_weight_w4a16.safetensors          all tensors (or -0000i-of-0000n shards + .index.json)
    quant_model_description_w4a16.json            "model_quant_type" + one type label per tensor
    slimquant_manifest.json                       recipe, per-layer module/spec/args, tensor aliases
    quantize_report.json / .md                    the per-layer report (for people; not loaded)
    tokenizer files                               when a tokenizer is given

What this codec changes on the way to the file (and undoes on load, exactly):

    weight-only int layers   weight_zero_point zp  ->  weight_offset = -zp (zeros for symmetric specs)
    W8A8 dynamic             (no zero point)       ->  weight_offset zeros [n, 1]
    W8A8 static              input_zero_point      ->  input_offset (the same value)
                             acc_bias (int32)      ->  quant_bias = acc_bias - input_offset * weight.sum(1)
                             acc_scale (float32)   ->  deq_scale: int64 holding the float32 bits for float16
                                                       models, float32 otherwise

Every other tensor is written as the module holds it. The description file labels each tensor with its layer's
type (:func:`slimquant.formats.checkpoint.layer_type`; ``FLOAT`` for float tensors, ``C8`` for KV-cache scales,
``FAQuant`` for attention quantizers). See docs/format.md for the tensor layout of each layer type.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from slimquant.errors import SlimquantError
from slimquant.formats import checkpoint as ck
from slimquant.formats.codec import Codec, register_codec
from slimquant.formats.safetensors_io import Entry
from slimquant.kernels import int8 as k8
from slimquant.nn import QModule, fa_quant, kv_cache
from slimquant.types.qtype import qtype as lookup_qtype
from slimquant.types.result import QuantizationResult

# re-exported: what every slimquant checkpoint shares (this codec's callers used them from here)
from slimquant.formats.checkpoint import (  # noqa: F401
    MANIFEST,
    REPORT_JSON,
    REPORT_MD,
    build_qmodule,
    check_part_file_size,
    describe_checkpoint,
    dominant_quant_type,
    is_checkpoint,
    model_sources,
    read_manifest,
    read_tensors,
)

log = logging.getLogger(__name__)

NAME = "msmodelslim"
FORMAT = f"slimquant/{NAME}"
FORMAT_VERSION = ck.FORMAT_VERSION


def weight_file(quant_type: str) -> str:
    return f"quant_model_weight_{quant_type}.safetensors"


def description_file(quant_type: str) -> str:
    return f"quant_model_description_{quant_type}.json"


def deq_scale_to_int64(deq_scale: torch.Tensor) -> torch.Tensor:
    """float32 ``[n]`` -> int64 ``[n]`` holding the float32 bit pattern zero-extended (the seed's
    ``deq_scale`` dtype for float16 models)."""
    bits = deq_scale.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    return bits & 0xFFFFFFFF


def deq_scale_from_int64(deq_scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`deq_scale_to_int64`: int64 ``[n]`` -> float32 ``[n]`` from the low 32 bits
    (so a sign-extended table reads back the same)."""
    # int64 -> int32 keeps the low 32 bits (two's complement wrap), whatever the high bits hold
    return deq_scale.to(torch.int64).to(torch.int32).view(torch.float32)


# -- the per-layer layout ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Derived:
    """A file tensor computed from logical tensors of its layer (``inputs``: their leaf names); its shape is
    ``inputs[0]``'s and its dtype ``dtype``."""

    fn: Callable[..., torch.Tensor]
    inputs: tuple[str, ...]
    dtype: torch.dtype


def _offset_of_zero_point(zp: torch.Tensor) -> torch.Tensor:
    return 0.0 - zp  # -zp without negative zeros


def _zeros(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(like.shape, dtype=torch.float32, device=like.device)


def _fold(acc_bias: torch.Tensor, input_zero_point: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return k8.fold_input_zero_point(acc_bias, int(input_zero_point.float()), weight)


def _deq_int64(acc_scale: torch.Tensor) -> torch.Tensor:
    return deq_scale_to_int64(acc_scale)


def _deq_float(acc_scale: torch.Tensor) -> torch.Tensor:
    return acc_scale.float().contiguous()


def layout(module: QModule) -> dict[str, str | Derived]:
    """The file tensors of a quantized module, in file order: leaf name -> the logical leaf written as it is, or
    a :class:`Derived` tensor."""
    cls = type(module).__name__
    out: dict[str, str | Derived] = {}
    if getattr(module, "bias", None) is not None:
        out["bias"] = "bias"
    if cls == "QLinearW8A8" and not module.input_spec.dynamic:  # type: ignore[attr-defined]
        deq = (Derived(_deq_int64, ("acc_scale",), torch.int64) if module.compute_dtype == torch.float16
               else Derived(_deq_float, ("acc_scale",), torch.float32))  # fmt: skip
        out.update(weight="weight", input_scale="input_scale", input_offset="input_zero_point",
                   quant_bias=Derived(_fold, ("acc_bias", "input_zero_point", "weight"), torch.int32),
                   deq_scale=deq)  # fmt: skip
        return out
    out.update(weight="weight", weight_scale="weight_scale")
    if cls == "QLinearW8A8":  # dynamic
        out["weight_offset"] = Derived(_zeros, ("weight_scale",), torch.float32)
    elif cls == "QLinearFP8":
        if not module.input_spec.dynamic:  # type: ignore[attr-defined]
            out["input_scale"] = "input_scale"
    elif not lookup_qtype(module.spec.qtype).is_float:  # weight-only integer layers (and their input-quantized kin)
        zp = getattr(module, "weight_zero_point", None) is not None
        out["weight_offset"] = (Derived(_offset_of_zero_point, ("weight_zero_point",), torch.float32) if zp
                                else Derived(_zeros, ("weight_scale",), torch.float32))  # fmt: skip
    if cls in ("QLinearInputQuant", "QConv2dInputQuant") and not module.input_spec.dynamic:  # type: ignore[attr-defined]
        out.update(input_scale="input_scale", input_offset="input_zero_point")  # W8A8's names for the same values
    return out


def _layout_inputs(lay: dict[str, str | Derived]) -> set[str]:
    return {i for v in lay.values() for i in ((v,) if isinstance(v, str) else v.inputs)}


def encode_layer(module: QModule) -> dict[str, torch.Tensor]:
    """The file tensors of one quantized module (leaf names, file order), computed from its logical tensors."""
    return {leaf: getattr(module, v) if isinstance(v, str) else v.fn(*(getattr(module, i) for i in v.inputs))
            for leaf, v in layout(module).items()}  # fmt: skip


def decode_layer(directory: Path, name: str, module: QModule, file: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The logical tensors (leaf names) of the quantized module ``name`` from its file tensors (leaf names)."""
    cls = type(module).__name__
    out: dict[str, torch.Tensor] = {}
    for leaf, v in layout(module).items():
        if isinstance(v, str):
            out[v] = file[leaf]

    def zeros(leaf: str, why: str) -> None:
        if bool((file[leaf] != 0).any()):
            raise SlimquantError(f"checkpoint {directory}: tensor {name}.{leaf} is not all zeros, but {why}")

    if cls == "QLinearW8A8" and not module.input_spec.dynamic:  # type: ignore[attr-defined]
        zp = file["input_offset"]
        out["acc_bias"] = k8.unfold_input_zero_point(file["quant_bias"], int(zp.float()), file["weight"])
        deq = file["deq_scale"]
        out["acc_scale"] = deq_scale_from_int64(deq) if deq.dtype == torch.int64 else deq.float()
        ck.check_finite(directory, f"{name}.deq_scale", out["acc_scale"])
    elif cls == "QLinearW8A8":
        zeros("weight_offset", "a W8A8 dynamic layer's weights are symmetric")
    elif "weight_offset" in file:
        if getattr(module, "weight_zero_point", None) is not None:
            out["weight_zero_point"] = 0.0 - file["weight_offset"]
        else:
            zeros("weight_offset", f"the layer's weights ({module.spec.describe()}) are symmetric")
    return out


# -- save -------------------------------------------------------------------------------------------


def export_state(result: QuantizationResult) -> tuple[list[Entry], dict[str, Any], dict[str, Any]]:
    """Split a quantized model (the result of quantizing or loading it) into (file tensors to write, description,
    manifest).

    File tensors are ``(name, shape, dtype, producer)``: each is computed (or read, for a streamed model's tensors
    already on disk) only when it is written. Tensors shared by several names (tied weights) are written once;
    the manifest records the other names as aliases.
    """
    state = ck.logical_state(result)
    model = result.model
    logical = {n: state.tensors[state.canonical(n)] for n in list(state.tensors) + list(state.aliases)}
    order = list(model.state_dict().keys())
    entries: list[Entry] = []
    aliases: dict[str, str] = {}
    written: dict[tuple, str] = {}
    done: set[str] = set()
    layouts = {n: layout(m) for n, m in state.layers.items()}

    def add(fname: str, key: tuple, shape: tuple[int, ...], dtype: torch.dtype, produce: Callable[[], torch.Tensor]) -> None:
        if key in written:
            aliases[fname] = written[key]
            return
        written[key] = fname
        entries.append((fname, shape, dtype, produce))

    for name in order:
        prefix, _, leaf = name.rpartition(".")
        lay = layouts.get(prefix)
        if lay is None or leaf not in _layout_inputs(lay):
            t = logical[name]
            canon = state.canonical(name)
            add(name, ("tensor", canon) if canon != name or not t.is_meta else ("meta", name), tuple(t.shape), t.dtype,
                lambda n=canon: state.data(n))  # fmt: skip
            continue
        if prefix in done:
            continue
        done.add(prefix)
        for fleaf, v in lay.items():
            fname = f"{prefix}.{fleaf}"
            if isinstance(v, str):
                src = f"{prefix}.{v}"
                t = logical[src]
                canon = state.canonical(src)
                add(fname, ("tensor", canon) if canon != src or not t.is_meta else ("meta", src), tuple(t.shape),
                    t.dtype, lambda n=canon: state.data(n))  # fmt: skip
                continue
            srcs = tuple(state.canonical(f"{prefix}.{i}") for i in v.inputs)
            meta = any(state.tensors[s].is_meta for s in srcs)
            key = ("meta", fname) if meta else ("derived", v.fn, v.dtype, srcs)
            add(fname, key, tuple(state.tensors[srcs[0]].shape), v.dtype,
                lambda v=v, srcs=srcs: v.fn(*(state.data(s) for s in srcs)))  # fmt: skip
    manifest = ck.manifest_for(model, NAME, state, aliases)
    quant_type = manifest["quant_type"]
    fa_modules = set(manifest.get("attention", {}).get("modules", []))
    fa_prefixes = {f"{n}.{role}" for n in fa_modules for role in fa_quant.ROLES}
    description: dict[str, Any] = {"model_quant_type": quant_type.upper()}
    if fa_modules:
        description["fa_quant_type"] = "FAQuant"  # msModelSlim's top-level key for attention quantization
    if "kv_cache" in manifest:
        description["kv_quant_type"] = "C8"
    types = {n: ck.layer_type(e) for n, e in manifest["layers"].items()}
    for fname, *_ in entries:
        prefix, _, leaf = fname.rpartition(".")
        if leaf in (kv_cache.KV_SCALE, kv_cache.KV_OFFSET):
            description[fname] = "C8"
        elif prefix in types:
            description[fname] = types[prefix]
        else:
            description[fname] = "FAQuant" if prefix in fa_prefixes else "FLOAT"
    return entries, description, manifest


class MsModelSlimCodec(Codec):
    """msModelSlim's W8A8 / W8A16 / W4A16 / ... layout, as MindIE loads it (see module doc)."""

    name = NAME
    description = "msModelSlim / MindIE safetensors layout (offsets, folded bias, deq_scale) with slimquant's manifest"

    def save(
        self,
        result: QuantizationResult,
        directory: str | os.PathLike,
        *,
        tokenizer: Any = None,
        overwrite: bool = False,
        force_overwrite: bool = False,
        protect: Iterable[str | os.PathLike] = (),
        part_file_size: float | None = None,
        **options: Any,
    ) -> Path:
        ck.check_save_options(NAME, options, part_file_size)
        entries, description, manifest = export_state(result)
        quant_type = manifest["quant_type"]
        json_files = {description_file(quant_type): description,
                      "config.json": {**ck.config_dict(result.model), "quantize": quant_type}}  # fmt: skip
        files = ck.write_checkpoint(result, directory, weight_file(quant_type), entries, manifest, json_files,
                                    tokenizer=tokenizer, overwrite=overwrite, force_overwrite=force_overwrite,
                                    protect=protect, part_file_size=part_file_size)  # fmt: skip
        log.info("saved %s checkpoint to %s (%d file(s))", quant_type, directory, len(files))
        return Path(directory)

    def load_into(self, model: nn.Module, directory: Path, manifest: dict[str, Any]) -> nn.Module:
        return ck.load_logical(model, directory, manifest, decode=lambda t: _decode(model, directory, t),
                               expected=_expected)  # fmt: skip


def _file_names(model: nn.Module) -> list[tuple[str, str | None, str | Derived | None]]:
    """Every file tensor of a (rebuilt) model: (file name, layer prefix or None, its layout entry or None)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QModule)}
    out: list[tuple[str, str | None, str | Derived | None]] = []
    done: set[str] = set()
    for name in model.state_dict(keep_vars=True):
        prefix, _, leaf = name.rpartition(".")
        if prefix in layers:
            lay = layout(layers[prefix])
            if leaf in _layout_inputs(lay):
                if prefix not in done:
                    done.add(prefix)
                    out += [(f"{prefix}.{f}", prefix, v) for f, v in lay.items()]
                continue
        out.append((name, None, None))
    return out


def _expected(model: nn.Module) -> dict[str, torch.Tensor]:
    """The file tensors the rebuilt ``model`` needs, as meta tensors of the stored shape and dtype."""
    state = model.state_dict(keep_vars=True)
    out: dict[str, torch.Tensor] = {}
    for fname, prefix, v in _file_names(model):
        if v is None:
            out[fname] = state[fname]
        elif isinstance(v, str):
            out[fname] = state[f"{prefix}.{v}"]
        else:
            out[fname] = torch.empty(state[f"{prefix}.{v.inputs[0]}"].shape, dtype=v.dtype, device="meta")
    return out


def _decode(model: nn.Module, directory: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QModule)}
    out: dict[str, torch.Tensor] = {}
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for fname, prefix, v in _file_names(model):
        if prefix is None:
            out[fname] = tensors[fname]
        else:
            by_layer.setdefault(prefix, {})[fname.rpartition(".")[2]] = tensors[fname]
    for prefix, file in by_layer.items():
        out.update({f"{prefix}.{leaf}": t for leaf, t in decode_layer(directory, prefix, layers[prefix], file).items()})
    return out


CODEC = register_codec(MsModelSlimCodec)


def save(result: QuantizationResult, directory: str | os.PathLike, tokenizer: Any = None,
         part_file_size: float | None = None, overwrite: bool = False, force_overwrite: bool = False,
         protect: Iterable[str | os.PathLike] = ()) -> Path:  # fmt: skip
    """Write a quantized model (``result``: what :func:`slimquant.quantize` or :func:`slimquant.load` returned) to
    ``directory`` atomically in this layout (missing parent directories are created).

    Args:
        part_file_size: shard the weights into files of at most this many GB (1e9 bytes).
        overwrite: replace an existing slimquant checkpoint there.
        force_overwrite: replace whatever non-empty directory is there (everything in it is deleted).
        protect: paths the output must not be, contain or lie inside (the inputs). The files a streamed model's
            tensors are still read from and the model's own source directory are always protected.
    Returns:
        The directory path.
    """
    return CODEC.save(result, directory, tokenizer=tokenizer, part_file_size=part_file_size, overwrite=overwrite,
                      force_overwrite=force_overwrite, protect=protect)  # fmt: skip


def load_into(model: nn.Module, directory: str | os.PathLike, manifest: dict[str, Any]) -> nn.Module:
    """Load a checkpoint of this layout into ``model``, a skeleton of the float architecture (parameters typically
    on meta): swaps in the manifest's quantized modules and fills them."""
    return CODEC.load_into(model, Path(directory), manifest)
