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
import math
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from slimquant.errors import SlimquantError
from slimquant.formats.atomic import OWNED_MARKER, atomic_directory
from slimquant.formats.safetensors_io import read_header, write_safetensors
from slimquant.nn import QMODULES, QModule, fa_quant, kv_cache
from slimquant.types.qtype import qtype as lookup_qtype
from slimquant.types.spec import KV_INT8_STATIC, QuantSpec, Recipe

log = logging.getLogger(__name__)

MANIFEST = OWNED_MARKER  # "slimquant_manifest.json": --overwrite replaces only directories holding it
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
    quant_type = dominant_quant_type(qlayers, recipe.quant_type)
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
    report = getattr(model, "slimquant_report", None)
    skipped = getattr(report, "skipped", None)
    if skipped:  # for inspect: the layers kept float, and why (loading does not read it)
        manifest["float_layers"] = dict(skipped)
    if fa_modules:
        manifest["attention"] = {"modules": fa_modules, "implementation": fa_quant.ATTENTION}
    if kv_entries:
        manifest["kv_cache"] = {"layers": [list(e) for e in kv_entries]}
    return tensors, description, manifest


def dominant_quant_type(qlayers: dict[str, QModule], default: str) -> str:
    """The checkpoint's ``model_quant_type``: the layer type (W4A16, W8A8_DYNAMIC, ...) of the Linear / Conv2d
    layers holding the most weight elements (a mixed checkpoint labels each tensor with its own layer's type);
    ``default`` (the recipe's label) when there is none, or when it ties for the most."""
    counts: dict[str, int] = {}
    for m in qlayers.values():
        if type(m).__name__ == "QEmbedding" or (getattr(m, "method", None) or {}).get("tied_to"):
            continue  # embeddings (and lm_heads sharing them) do not set the model's type, as the recipe's label
        rows = getattr(m, "weight_rows", None) or getattr(m, "out_features", 0)
        cols = getattr(m, "weight_cols", None) or getattr(m, "in_features", 0)
        label = m.tensor_label().lower()
        counts[label] = counts.get(label, 0) + int(rows) * int(cols)
    if not counts:
        return default
    top = max(counts.values())
    best = sorted(k for k, v in counts.items() if v == top)
    return default if default in best else best[0]


def check_part_file_size(part_file_size: float | None) -> None:
    if part_file_size is not None and not (math.isfinite(part_file_size) and part_file_size > 0):
        raise SlimquantError(f"part_file_size (--part_file_size) must be a positive number of GB, got {part_file_size}")


def model_sources(model: nn.Module) -> list[Path]:
    """Where ``model``'s weights are read from, which an output must never replace: the files of its lazily read
    tensors (streamed blocks) and its Hugging Face source directory (``config._name_or_path``, when it is one)."""
    out: list[Path] = []
    lazy = getattr(model, "slimquant_tensor_source", None)
    if lazy is not None:
        out += sorted(set(lazy.files.values()))
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if isinstance(name, str) and name and (Path(name) / "config.json").is_file():
        out.append(Path(name))
    return out


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
    force_overwrite: bool = False,
    protect: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write a quantized model to ``directory`` atomically (missing parent directories are created).

    Args:
        part_file_size: shard the weights into files of at most this many GB (1e9 bytes).
        overwrite: replace an existing slimquant checkpoint there.
        force_overwrite: replace whatever non-empty directory is there (everything in it is deleted).
        protect: paths the output must not be, contain or lie inside (the inputs). The files a streamed model's
            tensors are still read from and the model's own source directory are always protected.
    Returns:
        The directory path.
    """
    check_part_file_size(part_file_size)
    protect = list(protect) + model_sources(model)
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

    with atomic_directory(directory, overwrite, protect, force_overwrite) as tmp:
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
    """The checkpoint's manifest, checked: its structure, recipe, file names (plain names inside the directory)
    and, for transformers models, that its architecture is the one config.json names."""
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
    if not isinstance(manifest, dict):
        raise SlimquantError(f"{mpath}: the manifest must be a JSON object, not a {type(manifest).__name__}")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise SlimquantError(
            f"{mpath}: unsupported format {manifest.get('format')!r} version {manifest.get('format_version')!r}"
        )
    _check_manifest(path, mpath, manifest)
    return manifest


def _check_manifest(directory: Path, mpath: Path, m: dict[str, Any]) -> None:
    def need(key: str, kind: type, what: str) -> Any:
        if key not in m:
            raise SlimquantError(f"{mpath}: key {key!r} is missing")
        if not isinstance(m[key], kind):
            raise SlimquantError(f"{mpath}: {key!r} must be {what}, not {type(m[key]).__name__}")
        return m[key]

    need("quant_type", str, "a string")
    try:
        Recipe.from_dict(need("recipe", dict, "an object"), unregistered_steps=True)
    except (SlimquantError, TypeError, ValueError, KeyError, AttributeError) as e:
        raise SlimquantError(f"{mpath}: 'recipe' is invalid: {e}") from None
    layers = need("layers", dict, "an object of layer entries")
    for name, entry in layers.items():
        if not isinstance(entry, dict):
            raise SlimquantError(f"{mpath}: layer {name}: its entry must be an object")
        if entry.get("module") not in QMODULES:
            raise SlimquantError(f"{mpath}: layer {name}: unknown module {entry.get('module')!r} (valid: "
                                 f"{', '.join(sorted(QMODULES))})")  # fmt: skip
        try:
            QuantSpec.from_dict(entry["spec"])
        except (SlimquantError, TypeError, ValueError, KeyError, AttributeError) as e:
            raise SlimquantError(f"{mpath}: layer {name}: invalid or missing spec ({e})") from None
        if not isinstance(entry.get("method", {}), dict):
            raise SlimquantError(f"{mpath}: layer {name}: 'method' must be an object")
    files = need("files", list, "a list of file names")
    if not files:
        raise SlimquantError(f"{mpath}: 'files' is empty")
    for f in files:
        if (not isinstance(f, str) or not f or f in (".", "..") or "/" in f or "\\" in f or "\0" in f
                or os.path.isabs(f) or Path(f).name != f):  # fmt: skip
            raise SlimquantError(f"{mpath}: files entry {f!r} is not a plain file name inside the checkpoint")
    aliases = m.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise SlimquantError(f"{mpath}: 'aliases' must map tensor names to tensor names")
    entry = need("model", dict, "an object")
    kind = entry.get("kind")
    if kind not in ("transformers", "module"):
        raise SlimquantError(f"{mpath}: model kind {kind!r} is not 'transformers' or 'module'")
    if kind == "transformers":
        arch = entry.get("architecture")
        if not isinstance(arch, str) or not arch:
            raise SlimquantError(f"{mpath}: model 'architecture' is missing")
        cfg = directory / "config.json"
        try:
            config = json.loads(cfg.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SlimquantError(f"checkpoint {directory} has no config.json") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SlimquantError(f"{cfg} is not valid JSON: {e}") from None
        archs = config.get("architectures") if isinstance(config, dict) else None
        if not isinstance(config, dict):
            raise SlimquantError(f"{cfg} must hold a JSON object")
        if archs and arch not in archs:
            raise SlimquantError(f"{mpath}: architecture {arch!r} does not match {cfg} ({', '.join(map(str, archs))})")
    for key in ("attention", "kv_cache"):
        if key in m and not isinstance(m[key], dict):
            raise SlimquantError(f"{mpath}: {key!r} must be an object")


def is_checkpoint(directory: str | os.PathLike) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def read_tensors(directory: Path, files: list[str]) -> dict[str, torch.Tensor]:
    """Load every tensor of the checkpoint's safetensors files (no pickle); a tensor in two files is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for fname in files:
        fpath = directory / fname
        if not fpath.is_file():
            raise SlimquantError(f"checkpoint file {fpath} is missing")
        read_header(fpath)  # a truncated or inconsistent file is named before safetensors reads it
        try:
            part = load_file(str(fpath))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise SlimquantError(f"cannot read {fpath}: {e} (truncated or corrupt file?)") from None
        for name in part:
            if name in where:
                raise SlimquantError(f"tensor {name} is in both {where[name]} and {fname} of {directory}")
            where[name] = fname
        out.update(part)
    return out


def check_tensors(directory: Path, model: nn.Module, tensors: dict[str, torch.Tensor], strict_dtype: set[str]) -> None:
    """Every checkpoint tensor against the rebuilt model: present, expected, same shape; the dtype the codec
    stores for quantized layers (``strict_dtype``: their prefixes), a float for float tensors; finite floats."""
    expected = model.state_dict(keep_vars=True)
    bad = f"checkpoint {directory} does not match the model: tensor"
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SlimquantError(f"{bad} {missing[0]} is missing{more}")
    extra = [n for n in tensors if n not in expected]
    if extra:
        raise SlimquantError(f"{bad} {extra[0]} is not part of the model the manifest describes")

    def dt(t: torch.Tensor) -> str:
        return str(t.dtype).removeprefix("torch.")

    for name, t in tensors.items():
        want = expected[name]
        if tuple(t.shape) != tuple(want.shape):
            raise SlimquantError(f"{bad} {name} has shape {tuple(t.shape)}, the model needs {tuple(want.shape)}")
        quantized = name.rpartition(".")[0] in strict_dtype
        if (quantized or not want.is_floating_point()) and t.dtype != want.dtype:
            raise SlimquantError(f"{bad} {name} is stored as {dt(t)}, its layer (manifest) stores {dt(want)}")
        if want.is_floating_point() and not t.is_floating_point():
            raise SlimquantError(f"{bad} {name} is stored as {dt(t)}, a float tensor is expected")
        if t.is_floating_point() and t.numel() and not torch.isfinite(t.float() if t.element_size() == 1 else t).all():
            raise SlimquantError(f"checkpoint {directory}: tensor {name} has NaN/Inf value(s)")


def build_qmodule(name: str, entry: dict[str, Any]) -> QModule:
    """An empty (meta) quantized module from its manifest entry."""
    try:
        cls = QMODULES[entry["module"]]
        return cls.from_manifest(entry)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, SlimquantError) as e:
        raise SlimquantError(f"manifest entry for layer {name} is invalid: {type(e).__name__} {e}") from None


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
    strict = set(manifest["layers"]) | {f"{n}.{role}" for n in fa_modules for role in fa_quant.ROLES}
    strict |= {n for n, m in model.named_modules() if n.rpartition(".")[0] in strict}
    check_tensors(directory, model, tensors, strict | _kv_modules(model))
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise SlimquantError(f"checkpoint {directory} does not match the model: {e}") from None
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise SlimquantError(f"after loading {directory}, {name} is still uninitialised (meta)")
    for p in model.parameters():
        p.requires_grad_(False)
    model.slimquant_recipe = Recipe.from_dict(manifest["recipe"], unregistered_steps=True)
    model.eval()
    return model


def _kv_modules(model: nn.Module) -> set[str]:
    """Modules holding KV-cache scales (their scale dtypes are the codec's)."""
    return {n for n, m in model.named_modules() if any(b in (kv_cache.KV_SCALE, kv_cache.KV_OFFSET)
                                                       for b, _ in m.named_buffers(recurse=False))}  # fmt: skip


def describe_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint holds, read from its manifest and safetensors headers (no tensor data).

    Returns ``{"quant_type", "recipe", "layers": [{name, type, module, qtype, input, granularity, bits, bytes}],
    "float_layers": {name: why}, "float_bytes", "quantized_bytes", "total_bytes", "files"}``.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    sizes: dict[str, int] = {}
    for fname in manifest["files"]:
        for name, v in read_header(directory / fname).items():
            sizes[name] = v["data_offsets"][1] - v["data_offsets"][0]
    labels: dict[str, Any] = {}
    desc = directory / description_file(manifest["quant_type"])
    try:
        labels = json.loads(desc.read_text(encoding="utf-8")) if desc.is_file() else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        log.warning("%s cannot be read (%s): layer types are not shown", desc, e)
    rows = []
    claimed: set[str] = set()
    for lname, entry in manifest["layers"].items():
        spec = QuantSpec.from_dict(entry["spec"])
        names = [t for t in sizes if t.rpartition(".")[0] == lname]
        claimed.update(names)
        label = next((labels[t] for t in (f"{lname}.weight", *names) if isinstance(labels.get(t), str)), "?")
        inp = entry.get("args", {}).get("input_spec") if isinstance(entry.get("args"), dict) else None
        rows.append({
            "name": lname, "type": label, "module": entry["module"], "qtype": spec.qtype,
            "input": None if not isinstance(inp, dict) else QuantSpec.from_dict(inp).describe()
            + (" dynamic" if inp.get("dynamic") else " static"),
            "granularity": spec.granularity.value,
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
        "float_layers": manifest.get("float_layers", {}),
    }
