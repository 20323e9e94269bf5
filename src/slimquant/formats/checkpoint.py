"""What every checkpoint codec shares: the model's logical tensors, the manifest, rebuilding and checking.

Save (in a codec, given the :class:`slimquant.types.result.QuantizationResult` to write): :func:`logical_state`
gives the model's tensors by state-dict name (each distinct tensor once,
the other names as aliases; tensors a streaming run already wrote are meta placeholders read from
``LogicalState.source``), :func:`manifest_for` the JSON manifest (recipe, one entry per quantized module:
class, spec, constructor arguments, method record), :func:`write_tensor_files` the safetensors files.

Load: :func:`read_manifest` checks the manifest and names the codec, :func:`rebuild` swaps empty (meta)
quantized modules into a skeleton of the float model, the codec turns its file tensors into logical ones
(checking them with :func:`check_tensors` against :func:`expected_tensors`), and :func:`finish_load` loads them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from slimquant.errors import SlimquantError
from slimquant.formats.atomic import OWNED_MARKER
from slimquant.formats.codec import codec_of_tag, format_tag
from slimquant.formats.safetensors_io import Entry, read_header, write_safetensors
from slimquant.nn import QMODULES, QModule, fa_quant, kv_cache
from slimquant.types.qtype import qtype as lookup_qtype
from slimquant.types.report import ConversionReport
from slimquant.types.result import LazyTensors, QuantizationResult
from slimquant.types.spec import KV_INT8_STATIC, QuantSpec, Recipe

log = logging.getLogger(__name__)

MANIFEST = OWNED_MARKER  # "slimquant_manifest.json": --overwrite replaces only directories holding it
FORMAT_VERSION = 1
REPORT_JSON = "quantize_report.json"
REPORT_MD = "quantize_report.md"


# -- save -----------------------------------------------------------------------------------------


@dataclass
class LogicalState:
    """A quantized model's tensors by state-dict name.

    ``tensors`` holds each distinct tensor once (meta placeholders for those whose data is in ``source``),
    ``aliases`` the other names of a shared tensor (tied weights), ``layers`` the quantized modules by name,
    ``recipe`` the one the model was quantized with, ``report`` the conversion's (None for a loaded checkpoint).
    """

    tensors: dict[str, torch.Tensor]
    aliases: dict[str, str]
    layers: dict[str, QModule]
    recipe: Recipe
    source: LazyTensors | None = None
    report: ConversionReport | None = None

    def data(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (or the one it aliases) with its data (read from ``source`` when on meta)."""
        name = self.aliases.get(name, name)
        t = self.tensors[name]
        return self.source.get(name) if t.is_meta else t  # type: ignore[union-attr]

    def canonical(self, name: str) -> str:
        return self.aliases.get(name, name)


def logical_state(result: QuantizationResult) -> LogicalState:
    """The logical tensors of a model quantized by slimquant (see :class:`LogicalState`)."""
    if not isinstance(result, QuantizationResult):
        raise SlimquantError("saving needs the QuantizationResult that slimquant.quantize (or slimquant.load) "
                             f"returned, got {type(result).__name__}")  # fmt: skip
    model, lazy = result.model, result.tensor_source
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        if t.device.type == "meta":
            if lazy is None or name not in lazy:
                raise SlimquantError(f"tensor {name} is on the meta device; the model is not fully loaded")
            tensors[name] = t  # a placeholder: its data is read from the source while writing
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QModule)}
    return LogicalState(tensors, aliases, layers, result.recipe, lazy, result.report)


def model_entry(model: nn.Module) -> dict[str, Any]:
    """The manifest's ``model`` entry: a transformers architecture name, or a plain module's class path."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and type(model).__module__.startswith("transformers."):
        return {"kind": "transformers", "architecture": type(model).__name__}
    return {"kind": "module", "class": f"{type(model).__module__}.{type(model).__qualname__}"}


def manifest_for(model: nn.Module, codec_name: str, state: LogicalState, aliases: dict[str, str]) -> dict[str, Any]:
    """The manifest of ``model`` saved by the codec ``codec_name`` (``aliases``: the codec's, by file tensor name).

    The codec adds ``"files"`` (its weight files) before writing it.
    """
    entries = {n: m.manifest_entry() for n, m in state.layers.items()}
    manifest: dict[str, Any] = {
        "format": format_tag(codec_name),
        "format_version": FORMAT_VERSION,
        "quant_type": dominant_quant_type(entries, state.recipe.quant_type),
        "recipe": state.recipe.to_dict(),
        "model": model_entry(model),
        "layers": entries,
        "aliases": aliases,
    }
    skipped = state.report.skipped if state.report is not None else None
    if skipped:  # for inspect: the layers kept float, and why (loading does not read it)
        manifest["float_layers"] = dict(skipped)
    fa_modules = fa_quant.quantized_attention(model)
    if fa_modules:
        manifest["attention"] = {"modules": fa_modules, "implementation": fa_quant.ATTENTION}
    kv_entries = kv_cache.kv_projections(model) if state.recipe.kv == KV_INT8_STATIC else []
    if kv_entries:
        manifest["kv_cache"] = {"layers": [list(e) for e in kv_entries]}
    return manifest


def layer_type(entry: dict[str, Any]) -> str:
    """A quantized layer's type from its manifest entry: ``W4A16`` (weight-only int4), ``WFP8A16``, ``W8A8``
    (static int8 inputs), ``W8A8S`` (W8A8 with 4-bit-valued weights and int8 outliers), ``W8A8_DYNAMIC``, ``WFP8AFP8`` / ``WFP8AFP8_DYNAMIC``: msModelSlim's names."""
    spec = QuantSpec.from_dict(entry["spec"])
    args = entry.get("args") if isinstance(entry.get("args"), dict) else {}
    inp = args.get("input_spec")
    if isinstance(inp, dict):
        input_spec = QuantSpec.from_dict(inp)
        iq = lookup_qtype(input_spec.qtype)
        if entry.get("module") in ("QLinearInputQuant", "QConv2dInputQuant"):  # any int pair: W4A8, W4A4, ...
            base = f"W{lookup_qtype(spec.qtype).bits}A{iq.bits}"
        elif spec.is_w8a8s:
            return "W8A8S"  # static int8 inputs (the recipe refuses others)
        else:
            base = "WFP8AFP8" if iq.is_float else "W8A8"
        return base + ("_DYNAMIC" if input_spec.dynamic else "")
    qt = lookup_qtype(spec.qtype)
    return "WFP8A16" if qt.is_float else f"W{qt.bits}A16"


def _weight_elements(entry: dict[str, Any]) -> int:
    a = entry.get("args") if isinstance(entry.get("args"), dict) else {}
    if "in_features" in a:
        return int(a["in_features"]) * int(a["out_features"])
    if "in_channels" in a:
        kh, kw = a["kernel_size"]
        return int(a["out_channels"]) * int(a["in_channels"]) // int(a["groups"]) * int(kh) * int(kw)
    return 0


def dominant_quant_type(entries: dict[str, dict[str, Any]], default: str) -> str:
    """The checkpoint's quant type (lower case): the layer type (:func:`layer_type`) of the Linear / Conv2d layers
    holding the most weight elements (a mixed checkpoint labels each layer with its own type); ``default`` (the
    recipe's) when there is none, or when it ties for the most."""
    counts: dict[str, int] = {}
    for entry in entries.values():
        if entry.get("module") == "QEmbedding" or (entry.get("method") or {}).get("tied_to"):
            continue  # embeddings (and lm_heads sharing them) do not set the model's type, as the recipe's label
        label = layer_type(entry).lower()
        counts[label] = counts.get(label, 0) + _weight_elements(entry)
    if not counts:
        return default
    top = max(counts.values())
    best = sorted(k for k, v in counts.items() if v == top)
    return default if default in best else best[0]


def check_part_file_size(part_file_size: float | None) -> None:
    if part_file_size is not None and not (math.isfinite(part_file_size) and part_file_size > 0):
        raise SlimquantError(f"part_file_size (--part_file_size) must be a positive number of GB, got {part_file_size}")


def model_sources(model: nn.Module, lazy: LazyTensors | None = None) -> list[Path]:
    """Where ``model``'s weights are read from, which an output must never replace: the files of its lazily read
    tensors (``lazy``: streamed blocks) and its Hugging Face source directory (``config._name_or_path``, when it
    is one)."""
    out: list[Path] = []
    if lazy is not None:
        out += sorted(set(lazy.files.values()))
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if isinstance(name, str) and name and (Path(name) / "config.json").is_file():
        out.append(Path(name))
    return out


def write_tensor_files(directory: Path, base: str, entries: list[Entry], part_file_size: float | None) -> list[str]:
    """Write ``entries`` (name, shape, dtype, producer; each produced once, while written) to ``base`` or, past
    ``part_file_size`` GB, to numbered shards plus ``<base>.index.json``; returns the file names."""
    max_bytes = int(part_file_size * 1e9) if part_file_size else None
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        nbytes = int(torch.Size(e[1]).numel()) * torch.empty((), dtype=e[2]).element_size()
        if max_bytes and shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    if len(shards) == 1:
        write_safetensors(directory / base, shards[0], metadata={"format": "pt"})
        return [base]
    files: list[str] = []
    weight_map: dict[str, str] = {}
    stem = base.removesuffix(".safetensors")
    for i, part in enumerate(shards, 1):
        fname = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(directory / fname, part, metadata={"format": "pt"})
        files.append(fname)
        weight_map.update({e[0]: fname for e in part})
    total = sum(int(torch.Size(e[1]).numel()) * torch.empty((), dtype=e[2]).element_size() for e in entries)
    write_json(directory / f"{base}.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return files


def check_save_options(codec: str, options: dict[str, Any], part_file_size: float | None) -> None:
    """Refuse options a codec's ``save`` does not know, and a bad ``part_file_size``."""
    if options:
        raise SlimquantError(f"the {codec} format has no option {', '.join(sorted(options))}")
    check_part_file_size(part_file_size)


def write_checkpoint(result: QuantizationResult, directory: str | os.PathLike, weights: str, entries: list[Entry],
                     manifest: dict[str, Any], json_files: dict[str, Any], *, tokenizer: Any, overwrite: bool,
                     force_overwrite: bool, protect: Any, part_file_size: float | None) -> list[str]:  # fmt: skip
    """What every codec's ``save`` writes, atomically: the tensor files (``weights``, sharded past
    ``part_file_size``), the codec's JSON files (``json_files``: name -> data, e.g. config.json), the manifest
    (its ``files`` filled in), the report and the tokenizer. The model's sources are always protected."""
    from slimquant.formats.atomic import atomic_directory

    protect = list(protect) + model_sources(result.model, result.tensor_source)
    with atomic_directory(directory, overwrite, protect, force_overwrite) as tmp:
        files = write_tensor_files(tmp, weights, entries, part_file_size)
        manifest["files"] = files
        for name, data in json_files.items():
            write_json(tmp / name, data)
        write_json(tmp / MANIFEST, manifest)
        write_report(tmp, result.report, manifest["quant_type"])
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return files


def write_report(directory: Path, report: ConversionReport | None, quant_type: str) -> None:
    """The per-layer quantization report (none for a loaded checkpoint), for people (loading does not read it)."""
    if report is not None:
        write_json(directory / REPORT_JSON, report.to_dict())
        (directory / REPORT_MD).write_text(f"# slimquant {quant_type} per-layer report\n\n{report.table()}\n", encoding="utf-8")


def read_report(directory: Path) -> ConversionReport | None:
    """The report a checkpoint carries (``quantize_report.json``), so a loaded checkpoint saves again as it was;
    None when there is none. It is for people: one that does not parse is ignored with a warning, never an error."""
    path = Path(directory) / REPORT_JSON
    if not path.is_file():
        return None
    try:
        return ConversionReport.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:
        log.warning("%s: not read (%s: %s); the checkpoint loads without its report", path, type(e).__name__, e)
        return None


def write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")


def config_dict(model: nn.Module) -> dict[str, Any]:
    """The model's Hugging Face config (without the float source's quantization config), or ``{}``."""
    config = getattr(model, "config", None)
    out: dict[str, Any] = {}
    if config is not None and hasattr(config, "to_dict"):
        out = config.to_dict()
        # The float source may have been a GGUF / other quantized file: that is not what we hold now.
        out.pop("quantization_config", None)
        out.pop("quantize", None)  # msModelSlim's type key of a loaded checkpoint: the codec writes its own
        out.pop("_name_or_path", None)
        # As save_pretrained does: a model built from a config has no architectures yet, and
        # runtimes reading config.json need it to pick the model class.
        if not out.get("architectures") and model_entry(model)["kind"] == "transformers":
            out["architectures"] = [type(model).__name__]
    return out


# -- load -----------------------------------------------------------------------------------------


def is_checkpoint(directory: str | os.PathLike) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's manifest, checked: its format (a registered codec), structure, recipe, file names (plain
    names inside the directory) and, for transformers models, that its architecture is the one config.json names."""
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
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SlimquantError(
            f"{mpath}: unsupported format {manifest.get('format')!r} version {manifest.get('format_version')!r}"
        )
    codec_of_tag(manifest.get("format"), str(mpath))
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


def resolve_aliases(tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
    """Add each alias of the manifest to ``tensors`` (in place), naming an alias whose source is missing."""
    for alias, source in aliases.items():
        if source not in tensors:
            raise SlimquantError(f"manifest alias {alias} -> {source}: {source} is not in the checkpoint")
        tensors[alias] = tensors[source]


def build_qmodule(name: str, entry: dict[str, Any]) -> QModule:
    """An empty (meta) quantized module from its manifest entry."""
    try:
        cls = QMODULES[entry["module"]]
        return cls.from_entry(entry)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, SlimquantError) as e:
        raise SlimquantError(f"manifest entry for layer {name} is invalid: {type(e).__name__} {e}") from None


def rebuild(model: nn.Module, manifest: dict[str, Any]) -> None:
    """Swap the manifest's empty (meta) quantized modules into ``model`` and attach its attention / KV-cache
    quantizers (on meta): the module structure whose state dict the checkpoint's tensors fill."""
    from slimquant.surgery import set_module

    names = {n for n, _ in model.named_modules()}
    for name, entry in manifest["layers"].items():
        if name not in names:
            raise SlimquantError(f"checkpoint layer {name} does not exist in the model skeleton")
        set_module(model, name, build_qmodule(name, entry))
        folded = (entry.get("method") or {}).get("bn_folded")  # a BatchNorm2d trained into this layer (QAT)
        if folded is not None:
            if not isinstance(folded, str) or folded not in names:
                raise SlimquantError(f"manifest entry for layer {name}: its folded BatchNorm {folded!r} does not exist "
                                     "in the model skeleton")  # fmt: skip
            set_module(model, folded, nn.Identity())
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


def strict_dtype_prefixes(model: nn.Module, manifest: dict[str, Any]) -> set[str]:
    """Module names whose tensors must have exactly the dtype the codec expects (quantized layers, attention and
    KV-cache quantizers); other float tensors may come in any float dtype."""
    fa_modules = manifest.get("attention", {}).get("modules", [])
    strict = set(manifest["layers"]) | {f"{n}.{role}" for n in fa_modules for role in fa_quant.ROLES}
    strict |= {n for n, m in model.named_modules() if n.rpartition(".")[0] in strict}
    strict |= {n for n, m in model.named_modules() if any(b in (kv_cache.KV_SCALE, kv_cache.KV_OFFSET)
                                                            for b, _ in m.named_buffers(recurse=False))}  # fmt: skip
    return strict


def check_tensors(directory: Path, expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                  strict_dtype: set[str]) -> None:  # fmt: skip
    """Every checkpoint tensor against what the rebuilt model expects (``expected``: name -> a tensor of the
    shape and dtype the codec stores there, e.g. on meta): present, expected, same shape; the exact dtype under
    the ``strict_dtype`` prefixes and for integer tensors, a float for float tensors; finite floats."""
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
        check_finite(directory, name, t)


def check_finite(directory: Path, name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and t.numel() and not torch.isfinite(t.float() if t.element_size() == 1 else t).all():
        raise SlimquantError(f"checkpoint {directory}: tensor {name} has NaN/Inf value(s)")


def finish_load(model: nn.Module, directory: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Load the logical ``tensors`` (state-dict names, every one) into the rebuilt ``model``, freeze it and put it
    in eval mode (the recipe is the manifest's: :func:`manifest_recipe`)."""
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise SlimquantError(f"checkpoint {directory} does not match the model: {e}") from None
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise SlimquantError(f"after loading {directory}, {name} is still uninitialised (meta)")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model


def manifest_recipe(manifest: dict[str, Any]) -> Recipe:
    """The recipe a checkpoint's (checked) manifest records; steps whose types this process has not registered
    load as generic records."""
    return Recipe.from_dict(manifest["recipe"], unregistered_steps=True)


def load_logical(model: nn.Module, directory: Path, manifest: dict[str, Any],
                 decode: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
                 expected: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None) -> nn.Module:  # fmt: skip
    """The whole load of a codec whose files hold safetensors: rebuild, read ``manifest["files"]``, resolve
    aliases, check against ``expected`` (default: the rebuilt model's own state dict, i.e. files holding the
    logical tensors as they are), ``decode`` file tensors to logical ones (default: as they are), load."""
    rebuild(model, manifest)
    tensors = read_tensors(directory, manifest["files"])
    resolve_aliases(tensors, manifest.get("aliases", {}))
    want = expected(model) if expected is not None else dict(model.state_dict(keep_vars=True))
    check_tensors(directory, want, tensors, strict_dtype_prefixes(model, manifest))
    logical = decode(tensors) if decode is not None else tensors
    return finish_load(model, directory, manifest, logical)


def describe_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint holds, read from its manifest and safetensors headers (no tensor data).

    Returns ``{"format", "quant_type", "recipe", "layers": [{name, type, module, qtype, input, granularity, bits,
    bytes}], "float_layers": {name: why}, "float_bytes", "quantized_bytes", "total_bytes", "files"}``.
    """
    directory = Path(directory)
    from slimquant.formats import transformers_layout as tl  # imports this module: here, not at the top

    if not is_checkpoint(directory) and tl.is_layout(directory):
        manifest = tl.header_manifest(directory)  # save_pretrained's output: no slimquant manifest
    else:
        manifest = read_manifest(directory)
    sizes: dict[str, int] = {}
    files = (codec_of_tag(manifest["format"], str(directory)).weight_files(directory, manifest)
             if is_checkpoint(directory) else [directory / f for f in manifest["files"]])  # fmt: skip
    for fpath in files:  # a tensor held by several files (tensor-parallel parts) counts each copy
        for name, v in read_header(fpath).items():
            sizes[name] = sizes.get(name, 0) + v["data_offsets"][1] - v["data_offsets"][0]
    rows = []
    claimed: set[str] = set()
    for lname, entry in manifest["layers"].items():
        spec = QuantSpec.from_dict(entry["spec"])
        names = [t for t in sizes if t.rpartition(".")[0] == lname]
        claimed.update(names)
        inp = entry.get("args", {}).get("input_spec") if isinstance(entry.get("args"), dict) else None
        rows.append({
            "name": lname, "type": layer_type(entry), "module": entry["module"], "qtype": spec.qtype,
            "input": None if not isinstance(inp, dict) else QuantSpec.from_dict(inp).describe()
            + (" dynamic" if inp.get("dynamic") else " static"),
            "granularity": spec.granularity.value,
            "group_size": spec.group_size, "symmetric": spec.symmetric, "bits": lookup_qtype(spec.qtype).bits,
            "bytes": sum(sizes[t] for t in names), "tied_to": entry.get("method", {}).get("tied_to"),
        })  # fmt: skip
    float_bytes = sum(v for k, v in sizes.items() if k not in claimed)
    return {
        "format": str(manifest["format"]).removeprefix("slimquant/"),
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
