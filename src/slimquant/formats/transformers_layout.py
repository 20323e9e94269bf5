"""The transformers layout: slimquant's logical tensors under their state-dict names, loadable by
``transformers.AutoModel*.from_pretrained`` once :func:`slimquant.register_transformers` has run.

Directory written by :func:`save` (``slimquant.save(result, d, format="transformers")``,
``slimquant export --format transformers``)::

    config.json                 model config + ``quantization_config``: ``quant_method: slimquant`` and what rebuilds
                                the quantized modules (``layers``: class, spec, constructor arguments per layer;
                                attention / KV-cache quantizers; the recipe)
    model.safetensors           every tensor of ``model.state_dict()`` as the modules hold it (``weight`` packed for
                                2/3/4-bit, ``weight_scale``, ``weight_zero_point``, ``input_scale`` ...; tied weights
                                once), or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
    slimquant_manifest.json     the same rebuild information, so :func:`slimquant.load` reads the directory too
    quantize_report.json / .md, tokenizer files

``model.save_pretrained(d)`` of a model that ``from_pretrained`` loaded this way writes the same layout (its
state dict and config), which loads again both ways. Nothing is re-expressed, so the round trip is exact.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

from torch import nn

from slimquant.errors import SlimquantError
from slimquant.formats import checkpoint as ck
from slimquant.formats.codec import Codec, format_tag, register_codec
from slimquant.formats.safetensors_io import Entry, read_header
from slimquant.types.result import QuantizationResult

log = logging.getLogger(__name__)

NAME = "transformers"
QUANT_METHOD = "slimquant"
WEIGHTS = "model.safetensors"
# manifest keys that rebuild the modules; config.json's quantization_config carries them
REBUILD_KEYS = ("format_version", "quant_type", "recipe", "layers", "attention", "kv_cache")


def quantization_config(manifest: dict[str, Any]) -> dict[str, Any]:
    """config.json's ``quantization_config`` for a checkpoint with this ``manifest``."""
    return {"quant_method": QUANT_METHOD, **{k: manifest[k] for k in REBUILD_KEYS if k in manifest}}


def manifest_of_config(qconfig: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The part of a manifest that :func:`slimquant.formats.checkpoint.rebuild` reads, from a
    ``quantization_config`` this layout wrote (``model``: the skeleton, for the manifest's model entry)."""
    manifest = {k: qconfig[k] for k in REBUILD_KEYS if k in qconfig}
    manifest.setdefault("layers", {})
    manifest["format"] = format_tag(NAME)
    manifest["model"] = ck.model_entry(model)
    return manifest


def export_state(result: QuantizationResult) -> tuple[list[Entry], dict[str, Any]]:
    """(file tensors: every distinct logical tensor under its state-dict name, manifest)."""
    state = ck.logical_state(result)
    entries: list[Entry] = [(name, tuple(t.shape), t.dtype, (lambda n=name: state.data(n)))
                            for name, t in state.tensors.items()]  # fmt: skip
    manifest = ck.manifest_for(result.model, NAME, state, dict(state.aliases))
    return entries, manifest


class TransformersCodec(Codec):
    """Logical tensors with config.json's ``quantization_config`` (see module doc)."""

    name = NAME
    description = "logical tensors + config.json quantization_config (quant_method slimquant) for from_pretrained"

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
        entries, manifest = export_state(result)
        config = {**ck.config_dict(result.model), "quantization_config": quantization_config(manifest)}
        files = ck.write_checkpoint(result, directory, WEIGHTS, entries, manifest, {"config.json": config},
                                    tokenizer=tokenizer, overwrite=overwrite, force_overwrite=force_overwrite,
                                    protect=protect, part_file_size=part_file_size)  # fmt: skip
        log.info("saved %s checkpoint (transformers layout) to %s (%d file(s))", manifest["quant_type"], directory,
                 len(files))  # fmt: skip
        return Path(directory)

    def load_into(self, model: nn.Module, directory: Path, manifest: dict[str, Any]) -> nn.Module:
        return ck.load_logical(model, directory, manifest)


CODEC = register_codec(TransformersCodec)


def is_layout(directory: str | os.PathLike) -> bool:
    """Whether ``directory``'s config.json says ``quant_method: slimquant`` (this layout, with or without
    slimquant's manifest: ``save_pretrained`` writes none)."""
    cfg = Path(directory) / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    q = data.get("quantization_config") if isinstance(data, dict) else None
    return isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD


def manifest_from_directory(directory: Path, config: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The manifest of a directory in this layout that has none (``save_pretrained``'s output): rebuild
    information from config.json's ``quantization_config``, files from ``model.safetensors`` or its index, and
    tied tensors the files hold once (transformers' tied-weights record, or one object under two names in the
    rebuilt ``model``) as aliases."""
    qconfig = config.get("quantization_config")
    if not isinstance(qconfig, dict) or not isinstance(qconfig.get("layers"), dict):
        raise SlimquantError(f"{directory / 'config.json'}: quantization_config.layers is missing or not an object")
    manifest = manifest_of_config(qconfig, model)
    manifest.setdefault("recipe", {})
    files = manifest["files"] = weight_files(directory)
    from slimquant.formats.checkpoint import rebuild

    rebuild(model, manifest)
    stored: set[str] = set()
    for f in files:
        stored.update(read_header(directory / f))
    state = model.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    for name, t in state.items():
        if name in stored:
            first.setdefault(id(t), name)
    # tied tensors: the model's own record (transformers: {target: source}), else one object under two names
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        if name in stored:
            continue
        if isinstance(tied, dict) and tied.get(name) in stored:
            aliases[name] = tied[name]
        elif id(t) in first:
            aliases[name] = first[id(t)]
    manifest["aliases"] = aliases
    return manifest


def weight_files(directory: Path) -> list[str]:
    """The safetensors files of a directory in this layout: those ``model.safetensors.index.json`` maps to, or
    ``model.safetensors``."""
    index = directory / f"{WEIGHTS}.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return sorted(set(weight_map.values()))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise SlimquantError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    if (directory / WEIGHTS).is_file():
        return [WEIGHTS]
    raise SlimquantError(f"{directory} has no {WEIGHTS} (nor {WEIGHTS}.index.json)")


def header_manifest(directory: Path) -> dict[str, Any]:
    """What :func:`slimquant.formats.checkpoint.describe_checkpoint` reads, for a directory in this layout without
    slimquant's manifest (``save_pretrained``'s output): from config.json and the file list, no model needed
    (tied tensors are not resolved: the files hold them once)."""
    cfg = directory / "config.json"
    try:
        qconfig = json.loads(cfg.read_text(encoding="utf-8"))["quantization_config"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise SlimquantError(f"{cfg}: no readable quantization_config ({type(e).__name__}: {e})") from None
    layers = qconfig.get("layers") if isinstance(qconfig, dict) else None
    if not isinstance(layers, dict):
        raise SlimquantError(f"{cfg}: quantization_config.layers is missing or not an object")
    return {"format": format_tag(NAME), "quant_type": qconfig.get("quant_type") or ck.dominant_quant_type(layers, "?"),
            "recipe": qconfig.get("recipe", {}), "layers": layers, "files": weight_files(directory), "aliases": {}}
