"""GGUF export for llama.cpp: a Llama-architecture model (float or quantized by slimquant) as one ``model.gguf``.

Directory written by :func:`export_gguf` (atomically, as every slimquant output)::

    model.gguf          llama.cpp's file: metadata from the model's config, its tokenizer, the tensors
    gguf_export.json    per tensor: GGUF type, how it was produced (exact / quantized at export / re-quantized)
                        and the largest difference between the file's dequantized values and slimquant's

Tensor types follow llama.cpp's ``llama-quantize`` for the requested file type (:func:`tensor_types`): norms
F32; the output tensor (the token embedding when tied) Q6_K, or Q8_0 when its rows are not a multiple of
256; for ``Q4_K_M`` attn_v and ffn_down of the "more bits" layers Q6_K; K-types fall back to Q5_0 / Q8_0 for
rows that are not a multiple of 256. A quantized layer is written from its own integer values when its spec
is the target type's grid (:func:`slimquant.types.spec.gguf_spec`, set by ``slimquant quantize --gguf_type``)
and its scales are on that grid (:func:`slimquant.math.gguf_grid.block_params`): then the file holds exactly
slimquant's weights. Any other quantized layer is refused, naming it, unless ``requantize`` (then it is
dequantized and rounded onto the target grid, and the error added is reported). Float tensors (embeddings,
layers left float) are quantized at export with slimquant's round-to-nearest + clipping search.

Every packed tensor is read back with the ``gguf`` package's own dequantization and compared bit for bit with
the values the block parameters define before the file is renamed into place.

llama.cpp's Llama layout differs from transformers' in one place: the rows of ``attn_q`` / ``attn_k`` are
permuted per head (llama.cpp's convert script does the same; transformers undoes it when it reads a GGUF).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from slimquant.errors import NotSupportedYet, SlimquantError
from slimquant.formats import gguf_blocks as gb
from slimquant.formats.atomic import atomic_directory
from slimquant.formats.codec import Codec, register_codec
from slimquant.math.gguf_grid import OffGrid, block_params
from slimquant.math.weights import QuantizedWeight, quantize_weight
from slimquant.nn import QModule
from slimquant.types.gguf_types import FLOAT_TYPES, GGUF_TYPES, GGUFType, gguf_type
from slimquant.types.result import QuantizationResult
from slimquant.types.spec import gguf_spec

log = logging.getLogger(__name__)

GGUF_FILE = "model.gguf"
EXPORT_REPORT = "gguf_export.json"
# llama.cpp's LLAMA_FTYPE_* of the file types slimquant writes; the first tensor type is the mixture's base
FILE_TYPES: dict[str, tuple[int, str]] = {
    "F32": (0, "F32"),
    "F16": (1, "F16"),
    "Q4_0": (2, "Q4_0"),
    "Q4_1": (3, "Q4_1"),
    "Q8_0": (7, "Q8_0"),
    "Q5_0": (8, "Q5_0"),
    "Q4_K_M": (15, "Q4_K"),
    "Q6_K": (18, "Q6_K"),
}
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def check_file_type(name: str, flag: str = "--gguf_type") -> str:
    """The canonical file type name (``Q4_K_M``...), or an error naming ``flag`` and the valid ones."""
    up = str(name).upper()
    if up not in FILE_TYPES:
        raise SlimquantError(f"{flag} {name}: unknown GGUF file type; valid: {', '.join(FILE_TYPES)}")
    return up


# -- which type each tensor gets ------------------------------------------------------------------


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _block(type_name: str) -> int:
    return GGUF_TYPES[type_name].block if type_name in GGUF_TYPES else 1


def _fallback(type_name: str, ncols: int) -> str:
    if ncols % _block(type_name) == 0:
        return type_name
    t = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}.get(type_name, type_name)
    return t if ncols % _block(t) == 0 else "F16"


def tensor_type(gguf_name: str, ncols: int, ndim: int, file_type: str, n_layers: int, tied: bool) -> str:
    """The GGUF type llama.cpp's ``llama-quantize`` gives tensor ``gguf_name`` (row length ``ncols``) in a file of
    ``file_type``, for the types slimquant writes."""
    if ndim < 2 or gguf_name.endswith("_norm.weight"):
        return "F32"
    base = FILE_TYPES[file_type][1]
    if base in FLOAT_TYPES:
        return base
    kind = gguf_name.split(".")[-2] if gguf_name.startswith("blk.") else gguf_name.split(".")[0]
    layer = int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else -1
    t = base
    if kind == "output" or (tied and kind == "token_embd"):
        t = "Q8_0" if ncols % _block(base) else ("Q6_K" if base != "Q8_0" else "Q8_0")
    elif file_type == "Q4_K_M" and kind in ("attn_v", "ffn_down") and _use_more_bits(layer, n_layers):
        t = "Q6_K"
    return _fallback(t, ncols)


# -- the model's tensors in llama.cpp's names and layout -----------------------------------------


@dataclass
class _Tensor:
    name: str  # GGUF name
    source: str  # the model's module or parameter name
    shape: tuple[int, ...]  # torch shape
    module: QModule | None = None  # quantized layer, or None: a float tensor
    data: torch.Tensor | None = None  # float tensors
    permute_heads: int = 0  # attn_q / attn_k: heads to permute rows over


def gguf_name(hf_name: str) -> str | None:
    """The GGUF tensor name of a Llama parameter / module (``model.layers.3.mlp.up_proj.weight`` ->
    ``blk.3.ffn_up.weight``), or None when it has none."""
    base, _, leaf = hf_name.rpartition(".")
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{leaf}"
    parts = base.split(".")
    if len(parts) >= 4 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        sub = ".".join(parts[3:])
        if sub in _LAYER_NAMES:
            return f"blk.{parts[2]}.{_LAYER_NAMES[sub]}.{leaf}"
    return None


def _check_architecture(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "llama":
        arch = type(model).__name__ if config is None else getattr(config, "model_type", "?")
        raise NotSupportedYet(f"GGUF export is built for Llama-architecture causal LMs (model_type 'llama'); this "
                              f"model is {arch!r}")  # fmt: skip
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise NotSupportedYet(f"GGUF export: rope_type {rope_type!r} (rope scaling) is not written yet; only default "
                              "RoPE")  # fmt: skip
    return config


def _collect(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[_Tensor], bool]:
    config = model.config  # type: ignore[attr-defined]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QModule)}
    heads, kv_heads = int(config.num_attention_heads), int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    out: list[_Tensor] = []
    done: set[str] = set()
    for name, m in qmods.items():
        if tied and name == "lm_head":
            continue
        if type(m).__name__ not in ("QLinear", "QEmbedding"):
            raise NotSupportedYet(f"GGUF export: layer {name} is a {type(m).__name__}: GGUF files hold weight-only "
                                  "quantized layers; activation quantization is not expressible")  # fmt: skip
        gname = gguf_name(f"{name}.weight")
        if gname is None:
            raise SlimquantError(f"GGUF export: quantized layer {name} has no llama.cpp tensor name")
        perm = heads if name.endswith("self_attn.q_proj") else kv_heads if name.endswith("self_attn.k_proj") else 0
        out.append(_Tensor(gname, name, (m.weight_rows, m.weight_cols), module=m, permute_heads=perm))  # type: ignore[attr-defined]
        done.update(f"{name}.{k}" for k in ("weight", "weight_scale", "weight_zero_point"))
    for name, t in state.items():
        if name in done or (tied and name.startswith("lm_head.")):
            continue
        owner = name.rpartition(".")[0]
        if owner in qmods and not name.endswith(".bias"):
            raise NotSupportedYet(f"GGUF export: layer {owner} holds {name} ({type(qmods[owner]).__name__}): GGUF files "
                                  "hold weight-only quantized layers; activation quantization is not expressible")  # fmt: skip
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if t.is_meta:
            raise SlimquantError(f"GGUF export: tensor {name} is not loaded (meta device; a --stream run): save the "
                                 "checkpoint first, then `slimquant export --format gguf` it")  # fmt: skip
        gname = gguf_name(name)
        if gname is None:
            raise SlimquantError(f"GGUF export: tensor {name} has no llama.cpp name (Llama layout expected)")
        base = name.rpartition(".")[0]
        perm = heads if base.endswith("self_attn.q_proj") else kv_heads if base.endswith("self_attn.k_proj") else 0
        out.append(_Tensor(gname, name, tuple(t.shape), data=t, permute_heads=perm))
    return out, tied


def _head_rows(n: int, heads: int) -> torch.Tensor:
    """Row order llama.cpp's Llama layout uses for a q/k projection of ``heads`` heads (convert_hf_to_gguf's
    ``permute``): within each head, the two rotary halves are interleaved."""
    return torch.arange(n).reshape(heads, 2, n // heads // 2).transpose(1, 2).reshape(n)


# -- encoding ---------------------------------------------------------------------------------------


@dataclass
class TensorRecord:
    name: str
    source: str
    type: str
    how: str  # exact | float | quantized_at_export | requantized
    max_abs_diff: float = 0.0  # file's dequantized values vs slimquant's weight (float32)
    added_rel_rmse: float | None = None  # requantized / quantized at export: RMS error added / RMS of the weight


@dataclass
class GGUFExport:
    path: Path
    file_type: str
    tensors: list[TensorRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"file": GGUF_FILE, "file_type": self.file_type, "tensors": [r.__dict__ for r in self.tensors]}


def _grid_matches(module: QModule, t: GGUFType) -> bool:
    s = module.spec
    want = gguf_spec(t.name)
    return (s.qtype, s.granularity, s.group_size, s.symmetric, s.zero_point) == (
        want.qtype, want.granularity, want.group_size, want.symmetric, want.zero_point)  # fmt: skip


def _encode(tt: _Tensor, type_name: str, requantize: bool) -> tuple[np.ndarray, TensorRecord, torch.Tensor]:
    """``(array for the writer, record, the float32 weight the file must dequantize to)``."""
    rows = _head_rows(tt.shape[0], tt.permute_heads) if tt.permute_heads else None
    if tt.module is not None:
        ref = tt.module.dequantized_weight(torch.float32)  # type: ignore[attr-defined]
    else:
        assert tt.data is not None
        ref = tt.data.detach().float()
    if rows is not None:
        ref = ref[rows]
    if type_name in FLOAT_TYPES:
        if tt.module is not None and type_name == "F16" and not requantize:
            raise SlimquantError(f"GGUF export: layer {tt.source} is quantized ({tt.module.spec.describe()}); F16 would round "
                                 "its dequantized values: export F32, or pass --requantize (requantize=True)")  # fmt: skip
        arr = ref.numpy().astype(np.float16 if type_name == "F16" else np.float32)
        how = "float" if tt.module is None else ("dequantized" if type_name == "F32" else "requantized")
        diff = float(np.abs(arr.astype(np.float32) - ref.numpy()).max()) if ref.numel() else 0.0
        return arr, TensorRecord(tt.name, tt.source, type_name, how, diff), ref
    t = gguf_type(type_name)
    k = tt.shape[-1]
    if len(tt.shape) != 2 or k % t.block:
        raise SlimquantError(f"GGUF export: {tt.source} {list(tt.shape)} cannot be stored as {type_name} (rows of "
                             f"{t.block})")  # fmt: skip
    qw: QuantizedWeight | None = None
    how = "exact"
    added = None
    if tt.module is not None and _grid_matches(tt.module, t):
        mq = tt.module.quantized_weight()  # type: ignore[attr-defined]
        try:
            params = block_params(mq.scale, mq.zero_point, t)
            qw = mq
        except OffGrid as e:
            if not requantize:
                raise SlimquantError(f"GGUF export: layer {tt.source} ({tt.module.spec.describe()}) is not on the {type_name} "
                                     f"grid: {e}; quantize with --gguf_type, or pass --requantize") from None  # fmt: skip
    elif tt.module is not None and not requantize:
        raise SlimquantError(f"GGUF export: layer {tt.source} is {tt.module.spec.describe()}, but {tt.name} is {type_name} "
                             f"({gguf_spec(type_name).describe()}) in this file type: quantize with `slimquant quantize "
                             f"--gguf_type ...` so the solver uses that grid, or pass --requantize (the error it adds "
                             "is reported)")  # fmt: skip
    if qw is None:
        base = tt.module.dequantized_weight(torch.float32) if tt.module is not None else ref  # type: ignore[union-attr]
        if rows is not None and tt.module is not None:
            base = base[rows]
        qw = quantize_weight(base, gguf_spec(type_name), clip_search=True)
        params = block_params(qw.scale, qw.zero_point, t)
        how = "requantized" if tt.module is not None else "quantized_at_export"
        new = gb.dequantize(gb.pack(qw.q, params, t), t, k)
        added = float(np.sqrt(((new - base.numpy()) ** 2).mean()) / max(float(base.pow(2).mean().sqrt()), 1e-30))
        rows = None  # already in llama.cpp's row order
    else:
        params = block_params(qw.scale, qw.zero_point, t)
    q = qw.q
    if rows is not None:
        q = q[rows]
        params = _permute_params(params, rows)
    data = gb.pack(q, params, t)
    expect = gb.dequantize(data, t, k)
    diff = float(np.abs(expect - ref.numpy()).max()) if ref.numel() else 0.0
    return data, TensorRecord(tt.name, tt.source, type_name, how, diff, added), torch.from_numpy(expect)


def _permute_params(p: Any, rows: torch.Tensor) -> Any:
    from slimquant.math.gguf_grid import BlockParams

    return BlockParams(*(None if v is None else v[rows] for v in (p.d, p.m, p.sc, p.mn)))


# -- metadata -------------------------------------------------------------------------------------


_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER, _TOKEN_UNUSED = 1, 2, 3, 4, 5


def _pre_tokenizer(pre: Any) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json ``pre_tokenizer`` (byte-level BPE)."""
    if isinstance(pre, dict) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        items = pre.get("pretokenizers", [])
        kinds = [p.get("type") for p in items]
        if kinds == ["Digits", "ByteLevel"] and items[0].get("individual_digits") and items[1].get("use_regex", True):
            return "smollm"
    return "default"


def tokenizer_metadata(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """GGUF ``tokenizer.*`` keys of a byte-level BPE tokenizer (a transformers fast tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise NotSupportedYet("GGUF export needs a transformers fast tokenizer (tokenizer.json); this model has none")
    tj = json.loads(backend.to_str())
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise NotSupportedYet(f"GGUF export: tokenizer model {model.get('type')!r} is not written yet (byte-level BPE only)")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        vocab[a["content"]] = i
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [_TOKEN_UNUSED] * n
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = _TOKEN_NORMAL
    for i, a in added.items():
        types[i] = _TOKEN_CONTROL if a.get("special") else _TOKEN_USER
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": _pre_tokenizer(tj.get("pre_tokenizer")),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"), ("padding", "pad_token_id")):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int) and v >= 0:
            meta[f"tokenizer.ggml.{key}_token_id"] = v
    meta["tokenizer.ggml.add_bos_token"] = bool(getattr(tokenizer, "add_bos_token", False))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        meta["tokenizer.chat_template"] = template
    return meta


def model_metadata(config: Any, file_type: str) -> dict[str, Any]:
    """``general.*`` and ``llama.*`` keys from a transformers Llama config."""
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)) if isinstance(rope, dict) else getattr(config, "rope_theta", 10000.0)
    name = getattr(config, "_model_name_or_path", None) or getattr(config, "name_or_path", None) or "model"
    meta: dict[str, Any] = {
        "general.architecture": "llama",
        "general.type": "model",
        "general.name": str(name),
        "general.file_type": FILE_TYPES[file_type][0],
        "general.quantization_version": 2,
        "llama.block_count": int(config.num_hidden_layers),
        "llama.context_length": int(config.max_position_embeddings),
        "llama.embedding_length": int(config.hidden_size),
        "llama.feed_forward_length": int(config.intermediate_size),
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": int(getattr(config, "num_key_value_heads", None) or heads),
        "llama.rope.freq_base": float(theta),
        "llama.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "llama.vocab_size": int(config.vocab_size),
        "llama.rope.dimension_count": head_dim,
    }
    if head_dim * heads != int(config.hidden_size):
        meta["llama.attention.key_length"] = head_dim
        meta["llama.attention.value_length"] = head_dim
    return meta


# -- the export -----------------------------------------------------------------------------------


def plan_types(model: nn.Module, file_type: str | None) -> dict[str, str]:
    """GGUF type per tensor of ``model`` (by GGUF name): llama.cpp's for ``file_type``; with ``file_type`` None,
    each quantized layer's own GGUF grid (its spec's ``gguf``), F32 for everything else."""
    _check_architecture(model)
    tensors, tied = _collect(model, model.state_dict())
    return _types(tensors, tied, file_type, int(model.config.num_hidden_layers))  # type: ignore[attr-defined]


def _types(tensors: list[_Tensor], tied: bool, file_type: str | None, n_layers: int) -> dict[str, str]:
    out = {}
    for tt in tensors:
        if file_type is not None:
            out[tt.name] = tensor_type(tt.name, tt.shape[-1], len(tt.shape), file_type, n_layers, tied)
        elif tt.module is not None:
            g = tt.module.spec.gguf
            if g is None:
                raise SlimquantError(f"GGUF export: layer {tt.source} is {tt.module.spec.describe()}, not a GGUF grid; "
                                     "name the file type (--gguf_type), or quantize with --gguf_type")  # fmt: skip
            out[tt.name] = g
        else:
            out[tt.name] = "F32"
    return out


def export_gguf(
    model: nn.Module,
    directory: str | os.PathLike,
    tokenizer: Any,
    file_type: str | None = None,
    *,
    requantize: bool = False,
    overwrite: bool = False,
    force_overwrite: bool = False,
    protect: Iterable[str | os.PathLike] = (),
) -> GGUFExport:
    """Write ``model`` (a transformers Llama, float or with slimquant quantized layers) as ``directory/model.gguf``.

    ``file_type``: a key of :data:`FILE_TYPES` (llama.cpp's per-tensor types for it), or None to write each
    quantized layer on its own GGUF grid (a checkpoint made with ``--gguf_type``). See the module doc for what is
    exact, refused and re-quantized."""
    import gguf

    config = _check_architecture(model)
    if file_type is not None:
        file_type = check_file_type(file_type)
    state = model.state_dict()
    tensors, tied = _collect(model, state)
    types = _types(tensors, tied, file_type, int(config.num_hidden_layers))
    ft = file_type or _file_type_of(tensors, tied, int(config.num_hidden_layers), types)
    meta = {**model_metadata(config, ft), **tokenizer_metadata(tokenizer, int(config.vocab_size))}
    encoded = []
    from tqdm.auto import tqdm

    for tt in tqdm(tensors, desc="GGUF tensors", unit="tensor", leave=False):
        encoded.append((tt, *_encode(tt, types[tt.name], requantize)))
    export = GGUFExport(Path(directory) / GGUF_FILE, ft)
    with atomic_directory(directory, overwrite, protect, force_overwrite) as tmp:
        writer = gguf.GGUFWriter(str(tmp / GGUF_FILE), "llama")
        for key, value in meta.items():
            if key == "general.architecture":
                continue  # the writer adds it
            _add_kv(writer, key, value)
        for tt, data, rec, _ in encoded:
            if rec.type in FLOAT_TYPES:
                writer.add_tensor(rec.name, data)
            else:
                writer.add_tensor(rec.name, data, raw_dtype=getattr(gguf.GGMLQuantizationType, rec.type))
            export.tensors.append(rec)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        _verify(tmp / GGUF_FILE, {tt.name: (rec.type, expect) for tt, _, rec, expect in encoded})
        (tmp / EXPORT_REPORT).write_text(json.dumps(export.to_dict(), indent=1) + "\n")
    return export


class GGUFCodec(Codec):
    """llama.cpp's GGUF (see module doc): ``slimquant.save(result, dir, format="gguf", gguf_type=None,
    requantize=False)``. Write-only: a GGUF file loads as a float model (:func:`slimquant.load_model`), not as a
    slimquant checkpoint."""

    name = "gguf"
    description = "llama.cpp GGUF (model.gguf), weights on the GGUF types' grids"

    def save(
        self,
        result: QuantizationResult,
        directory: str | os.PathLike,
        *,
        tokenizer: Any = None,
        overwrite: bool = False,
        force_overwrite: bool = False,
        protect: Iterable[str | os.PathLike] = (),
        gguf_type: str | None = None,
        requantize: bool = False,
        **options: Any,
    ) -> Path:
        if options:
            raise SlimquantError(f"the gguf format takes no option(s) {sorted(options)} (it writes one file; valid: "
                                 "gguf_type, requantize)")  # fmt: skip
        if tokenizer is None:
            raise SlimquantError("the gguf format stores the tokenizer: pass tokenizer= (the model's)")
        export_gguf(result.model, directory, tokenizer, gguf_type, requantize=requantize, overwrite=overwrite,
                    force_overwrite=force_overwrite, protect=protect)  # fmt: skip
        return Path(directory)

    def load_into(self, model: nn.Module, directory: Path, manifest: dict[str, Any]) -> nn.Module:
        raise SlimquantError(f"{directory}: GGUF exports are not slimquant checkpoints; load {GGUF_FILE} with "
                             "slimquant.load_model (as a float model)")  # fmt: skip


register_codec(GGUFCodec)


def _file_type_of(tensors: list[_Tensor], tied: bool, n_layers: int, types: dict[str, str]) -> str:
    """The llama.cpp file type whose per-tensor types are exactly ``types`` on the quantized layers (a checkpoint
    made with ``--gguf_type T`` gives T), else the most common quantized type's."""
    quantized = {tt.name for tt in tensors if tt.module is not None}
    for ft in FILE_TYPES:
        planned = _types(tensors, tied, ft, n_layers)
        if quantized and all(planned[n] == types[n] for n in quantized):
            return ft
    quant = [t for t in types.values() if t in GGUF_TYPES]
    best = max(set(quant), key=quant.count) if quant else "F32"
    return "Q4_K_M" if best == "Q4_K" else best


def _add_kv(writer: Any, key: str, value: Any) -> None:
    import gguf

    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif key == "tokenizer.ggml.token_type":  # llama.cpp reads token types as int32
        writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
    else:
        writer.add_array(key, value)


def _verify(path: Path, expected: dict[str, tuple[str, torch.Tensor]]) -> None:
    """Read the written file back with the ``gguf`` package: every tensor present with its type, and every
    quantized one dequantizing (gguf's numpy reference) to exactly the values its block parameters define."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    seen = set()
    for t in reader.tensors:
        if t.name not in expected:
            raise SlimquantError(f"GGUF export: {path} holds an unexpected tensor {t.name}")
        type_name, expect = expected[t.name]
        if t.tensor_type.name != type_name:
            raise SlimquantError(f"GGUF export: {path}: {t.name} was written as {t.tensor_type.name}, not {type_name}")
        if type_name not in FLOAT_TYPES:
            got = dequantize(np.asarray(t.data), t.tensor_type).reshape(expect.shape)
            if not np.array_equal(got, expect.numpy()):
                bad = float(np.abs(got - expect.numpy()).max())
                raise SlimquantError(f"GGUF export: {t.name} ({type_name}) does not read back as packed (max diff {bad})")
        seen.add(t.name)
    missing = set(expected) - seen
    if missing:
        raise SlimquantError(f"GGUF export: {path} lacks tensors {sorted(missing)[:5]}")


# -- quantizing for a GGUF file type ----------------------------------------------------------------


def gguf_recipe(recipe: Any, model: nn.Module, file_type: str) -> Any:
    """``recipe`` (weight-only; its steps: RTN, GPTQ, AWQ...) with every tensor's weight spec set to the GGUF grid
    llama.cpp gives it in a ``file_type`` file (:func:`tensor_type`): the recipe's weight spec is the base type's,
    layers of another type (Q4_K_M's Q6_K layers, fallbacks) get overrides, the token embedding its type's spec
    (Q8_0 when tied to the output and its rows are not a multiple of 256). The export of the result is exact."""
    from dataclasses import replace

    from slimquant.types.spec import LayerOverride

    file_type = check_file_type(file_type)
    if file_type in FLOAT_TYPES:
        raise SlimquantError(f"--gguf_type {file_type} is a float type: export the float model with `slimquant export "
                             f"--format gguf --gguf_type {file_type}` instead of quantizing")  # fmt: skip
    if recipe.input is not None or recipe.kv is not None or recipe.fa is not None:
        raise SlimquantError("--gguf_type: GGUF files hold weight-only layers; remove the activation / KV-cache / "
                             "attention quantization flags")  # fmt: skip
    config = _check_architecture(model)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    n_layers = int(config.num_hidden_layers)
    base = FILE_TYPES[file_type][1]
    overrides: list[tuple[str, LayerOverride]] = []
    embedding = None
    out_override = False
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Embedding)):
            continue
        gname = gguf_name(f"{name}.weight")
        if gname is None or (tied and name == "lm_head"):
            continue
        w = m.weight
        t = tensor_type(gname, int(w.shape[-1]), w.dim(), file_type, n_layers, tied)
        spec = gguf_spec(t) if t in GGUF_TYPES else None
        if isinstance(m, nn.Embedding):
            embedding = spec
        elif t != base:
            overrides.append((name, LayerOverride(weight=spec)))
            out_override |= name == "lm_head"
        elif name == "lm_head":
            overrides.append((name, LayerOverride(weight=spec)))
            out_override = True
    return replace(recipe, weight=gguf_spec(base), embedding=embedding, overrides=tuple(overrides) + tuple(recipe.overrides),
                   disable_last_linear=recipe.disable_last_linear and not out_override)  # fmt: skip
