"""The msModelSlim / MindIE weight layout as a state-dict codec plus a JSON manifest.

Directory written by :func:`save`::

    config.json                                   model config + "quantize": "w4a16"
    quant_model_weight_w4a16.safetensors          all tensors (or -0000i-of-0000n shards + .index.json)
    quant_model_description_w4a16.json            "model_quant_type" + one type label per tensor
    slimquant_manifest.json                       recipe, per-layer module/spec/args, tensor aliases
    tokenizer files                               when a tokenizer is given

See docs/format.md for the tensor layout of each layer type.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimquant.errors import SlimquantError
from slimquant.formats.atomic import atomic_directory
from slimquant.formats.safetensors_io import write_safetensors
from slimquant.nn import QMODULES, QModule, fa_quant, kv_cache
from slimquant.types.qtype import qtype as lookup_qtype
from slimquant.types.spec import KV_INT8_STATIC, QuantSpec, Recipe

log = logging.getLogger(__name__)

MANIFEST = "slimquant_manifest.json"
FORMAT = "slimquant/msmodelslim"
FORMAT_VERSION = 1



REPORT_JSON = "quantize_report.json"
REPORT_MD = "quantize_report.md"


def weight_file(quant_type: str) -> str:
    return f"quant_model_weight_{quant_type}.safetensors"


def description_file(quant_type: str) -> str:
    return f"quant_model_description_{quant_type}.json"


def _model_entry(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and type(model).__module__.startswith("transformers."):
        return {"kind": "transformers", "architecture": type(model).__name__}
    return {"kind": "module", "class": f"{type(model).__module__}.{type(model).__qualname__}"}


def export_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Split a quantized model into (tensors to write, description, manifest).

    Tensors shared by several names (tied weights) are written once; the manifest records the
    other names as aliases.
    """
    recipe: Recipe | None = getattr(model, "slimquant_recipe", None)
    if recipe is None:
        raise SlimquantError("model has not been quantized by slimquant (no recipe attached); call slimquant.quantize first")
    qlayers = {n: m for n, m in model.named_modules() if isinstance(m, QModule)}
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    # tensors a streaming run already wrote to disk are on meta in the model; their data comes from here
    lazy = getattr(model, "slimquant_tensor_source", None)
    for name, t in state.items():
        if t.device.type == "meta":
            if lazy is None or name not in lazy:
                raise SlimquantError(f"tensor {name} is on the meta device; the model is not fully loaded")
            tensors[name] = t  # a placeholder: save() reads the data from the source while writing
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous()
    fa_modules = fa_quant.quantized_attention(model)
    fa_prefixes = {f"{n}.{role}" for n in fa_modules for role in fa_quant.ROLES}
    quant_type = recipe.quant_type
    description: dict[str, Any] = {"model_quant_type": quant_type.upper()}
    if fa_modules:
        description["fa_quant_type"] = "FAQuant"  # msModelSlim's top-level key for attention quantization
    kv_entries = kv_cache.kv_projections(model) if recipe.kv == KV_INT8_STATIC else []
    if kv_entries:
        description["kv_quant_type"] = "C8"
    for name in tensors:
        prefix, _, leaf = name.rpartition(".")
        if leaf in (kv_cache.KV_SCALE, kv_cache.KV_OFFSET):
            description[name] = "C8"
        elif prefix in qlayers:
            description[name] = qlayers[prefix].tensor_label()
        else:
            description[name] = "FAQuant" if prefix in fa_prefixes else "FLOAT"
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "quant_type": quant_type,
        "recipe": recipe.to_dict(),
        "model": _model_entry(model),
        "layers": {n: m.manifest_entry() for n, m in qlayers.items()},
        "aliases": aliases,
    }
    if fa_modules:
        manifest["attention"] = {"modules": fa_modules, "implementation": fa_quant.ATTENTION}
    if kv_entries:
        manifest["kv_cache"] = {"layers": [list(e) for e in kv_entries]}
    return tensors, description, manifest


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[list[str]]:
    if not max_bytes:
        return [list(tensors)]
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save(
    model: nn.Module,
    directory: str | os.PathLike,
    tokenizer: Any = None,
    part_file_size: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a quantized model to ``directory`` atomically.

    Args:
        part_file_size: shard the weights into files of at most this many GB (1e9 bytes).
        overwrite: replace an existing non-empty directory.
    Returns:
        The directory path.
    """
    if part_file_size is not None and part_file_size <= 0:
        raise SlimquantError(f"part_file_size must be positive, got {part_file_size}")
    tensors, description, manifest = export_state(model)
    quant_type = manifest["quant_type"]
    max_bytes = int(part_file_size * 1e9) if part_file_size else None
    shards = _shards(tensors, max_bytes)
    lazy = getattr(model, "slimquant_tensor_source", None)

    def entries(names: list[str]) -> list:
        # one tensor at a time: the file is never assembled in memory, and on-disk (meta) tensors are read
        # from their source just before they are written
        return [(n, tuple(tensors[n].shape), tensors[n].dtype,
                 (lambda n=n: lazy.get(n)) if tensors[n].is_meta else (lambda n=n: tensors[n]))  # type: ignore[union-attr]
                for n in names]  # fmt: skip

    with atomic_directory(directory, overwrite) as tmp:
        base = weight_file(quant_type)
        files: list[str] = []
        if len(shards) == 1:
            write_safetensors(tmp / base, entries(shards[0]), metadata={"format": "pt"})
            files.append(base)
        else:
            weight_map: dict[str, str] = {}
            stem = base.removesuffix(".safetensors")
            for i, names in enumerate(shards, 1):
                fname = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(tmp / fname, entries(names), metadata={"format": "pt"})
                files.append(fname)
                weight_map.update({n: fname for n in names})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            _write_json(tmp / f"{base}.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
        manifest["files"] = files
        _write_json(tmp / description_file(quant_type), description)
        _write_json(tmp / "config.json", _config_dict(model, quant_type))
        _write_json(tmp / MANIFEST, manifest)
        report = getattr(model, "slimquant_report", None)
        if report is not None and hasattr(report, "to_dict"):  # the per-layer report, for people (not loaded)
            _write_json(tmp / REPORT_JSON, report.to_dict())
            (tmp / REPORT_MD).write_text(f"# slimquant {quant_type} per-layer report\n\n{report.table()}\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    log.info("saved %s checkpoint to %s (%d file(s))", quant_type, directory, len(files))
    return Path(directory)


def _config_dict(model: nn.Module, quant_type: str) -> dict[str, Any]:
    config = getattr(model, "config", None)
    out: dict[str, Any] = {}
    if config is not None and hasattr(config, "to_dict"):
        out = config.to_dict()
        # The float source may have been a GGUF / other quantized file: that is not what we hold now.
        out.pop("quantization_config", None)
        out.pop("_name_or_path", None)
        # As save_pretrained does: a model built from a config has no architectures yet, and
        # runtimes reading config.json need it to pick the model class.
        if not out.get("architectures") and _model_entry(model)["kind"] == "transformers":
            out["architectures"] = [type(model).__name__]
    out["quantize"] = quant_type
    return out


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")


# -- import ------------------------------------------------------------------------------------


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory)
    if not path.is_dir():
        raise SlimquantError(f"{path} is not a directory")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise SlimquantError(f"{path} is not a slimquant checkpoint: {MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlimquantError(f"{mpath} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise SlimquantError(
            f"{mpath}: unsupported format {manifest.get('format')!r} version {manifest.get('format_version')!r}"
        )
    return manifest


def is_checkpoint(directory: str | os.PathLike) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def read_tensors(directory: Path, files: list[str]) -> dict[str, torch.Tensor]:
    """Load every tensor of the checkpoint's safetensors files (no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for fname in files:
        fpath = directory / fname
        if not fpath.is_file():
            raise SlimquantError(f"checkpoint file {fpath} is missing")
        try:
            out.update(load_file(str(fpath)))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise SlimquantError(f"cannot read {fpath}: {e} (truncated or corrupt file?)") from None
    return out


def build_qmodule(name: str, entry: dict[str, Any]) -> QModule:
    """An empty (meta) quantized module from its manifest entry."""
    try:
        cls = QMODULES[entry["module"]]
        return cls.from_manifest(entry)
    except (KeyError, TypeError, SlimquantError) as e:
        raise SlimquantError(f"manifest entry for layer {name} is invalid: missing/unknown {e}") from None


def load_into(model: nn.Module, directory: str | os.PathLike, manifest: dict[str, Any]) -> nn.Module:
    """Swap in the manifest's quantized modules and load the checkpoint tensors into ``model``.

    ``model`` is a skeleton of the float architecture, typically with parameters on the meta device.
    """
    from slimquant.surgery import set_module

    directory = Path(directory)
    names = {n for n, _ in model.named_modules()}
    for name, entry in manifest["layers"].items():
        if name not in names:
            raise SlimquantError(f"checkpoint layer {name} does not exist in the model skeleton")
        qmod = build_qmodule(name, entry)
        qmod.method = entry.get("method", {})
        set_module(model, name, qmod)
    fa_modules = manifest.get("attention", {}).get("modules", [])
    if fa_modules:
        missing = [n for n in fa_modules if n not in names]
        if missing:
            raise SlimquantError(f"checkpoint attention layer {missing[0]} does not exist in the model skeleton")
        fa_quant.attach(model, fa_modules, "meta")
    kv_entries = manifest.get("kv_cache", {}).get("layers", [])
    if kv_entries:
        try:
            kv_cache.attach_kv_scales(model, [(int(i), str(k), str(v)) for i, k, v in kv_entries], device="meta")
        except (AttributeError, ValueError, TypeError) as e:
            raise SlimquantError(f"manifest kv_cache entry does not fit the model: {e}") from None
    tensors = read_tensors(directory, manifest["files"])
    for alias, source in manifest.get("aliases", {}).items():
        if source not in tensors:
            raise SlimquantError(f"manifest alias {alias} -> {source}: {source} is not in the checkpoint")
        tensors[alias] = tensors[source]
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise SlimquantError(f"checkpoint {directory} does not match the model: {e}") from None
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise SlimquantError(f"after loading {directory}, {name} is still uninitialised (meta)")
    for p in model.parameters():
        p.requires_grad_(False)
    model.slimquant_recipe = Recipe.from_dict(manifest["recipe"])
    model.eval()
    return model


def describe_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint holds, read from its manifest and safetensors headers (no tensor data).

    Returns ``{"quant_type", "recipe", "layers": [{name, module, qtype, granularity, bits, bytes}],
    "float_bytes", "quantized_bytes", "total_bytes", "files"}``.
    """
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    manifest = read_manifest(directory)
    sizes: dict[str, int] = {}
    for fname in manifest["files"]:
        fpath = directory / fname
        try:
            with safe_open(str(fpath), framework="pt") as fh:
                for name in fh.keys():
                    sl = fh.get_slice(name)
                    numel = 1
                    for d in sl.get_shape():
                        numel *= d
                    sizes[name] = numel * _DTYPE_BYTES[sl.get_dtype()]
        except (SafetensorError, OSError) as e:
            raise SlimquantError(f"cannot read {fpath}: {e}") from None
    rows = []
    claimed: set[str] = set()
    for lname, entry in manifest["layers"].items():
        spec = QuantSpec.from_dict(entry["spec"])
        names = [t for t in sizes if t.rpartition(".")[0] == lname]
        claimed.update(names)
        rows.append({
            "name": lname, "module": entry["module"], "qtype": spec.qtype, "granularity": spec.granularity.value,
            "group_size": spec.group_size, "symmetric": spec.symmetric, "bits": lookup_qtype(spec.qtype).bits,
            "bytes": sum(sizes[t] for t in names), "tied_to": entry.get("method", {}).get("tied_to"),
        })  # fmt: skip
    float_bytes = sum(v for k, v in sizes.items() if k not in claimed)
    return {
        "quant_type": manifest["quant_type"],
        "recipe": manifest["recipe"],
        "layers": rows,
        "float_bytes": float_bytes,
        "quantized_bytes": sum(r["bytes"] for r in rows),
        "total_bytes": sum(sizes.values()),
        "files": manifest["files"],
        "aliases": manifest.get("aliases", {}),
    }


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
