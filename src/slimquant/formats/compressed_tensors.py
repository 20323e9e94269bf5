"""The compressed-tensors layout (vLLM, transformers with the ``compressed-tensors`` package): a codec over the
modules' logical tensors.

Directory written by :func:`save` (``slimquant.save(result, dir, format="compressed-tensors")``)::

    config.json                   model config + ``quantization_config`` (``quant_method: compressed-tensors``)
    model.safetensors             every tensor (or model-0000i-of-0000n shards + model.safetensors.index.json)
    slimquant_manifest.json       recipe, per-layer module/spec/args (slimquant reloads through it)
    quantize_report.json / .md    the per-layer report (for people; not loaded)
    tokenizer files               when a tokenizer is given

What each quantized Linear becomes (``b`` bits, ``O x I`` weight, ``G`` groups):

    weight-only int (W4A16, W8A16, ...)  format ``pack-quantized``
        weight_packed      int32 [O, ceil(I*b/32)]  u = q + 2**(b-1) (q the signed grid value), each row an
                                                    LSB-first bit stream: value i at bits [i*b, i*b + b)
        weight_scale       float32 [O, G] (group) / [O, 1] (channel) / [1] (tensor)
        weight_shape       int64 [2] = [O, I]
        weight_zero_point  int32 [ceil(O*b/32), G]: asymmetric only; zp + 2**(b-1) packed the same way along
                           the output dimension (each column a bit stream)
    weight-only fp8 (WFP8A16)            format ``float-quantized``: weight float8_e4m3fn [O, I], weight_scale
    W8A8 int8 (static / dynamic)         format ``int-quantized``: weight int8 [O, I], weight_scale [O, 1] (or
                                         [1]), static inputs: input_scale [1], input_zero_point int8 [1] when
                                         asymmetric; dynamic per-token inputs store nothing
    W8A8 fp8                             format ``float-quantized``: weight float8_e4m3fn, weight_scale,
                                         input_scale [1] when static

with ``W = (q - zero_point) * weight_scale``. Unsigned qtypes (uint4 / uint8 with a zero point) are shifted by
``2**(b-1)`` into the signed grid (values and zero point alike: exact). Scales stay float32 (the loaders cast
them to the model's dtype). A static W8A8 layer's ``weight_scale`` is ``acc_scale / input_scale`` and its bias
``acc_bias * acc_scale`` (the bias our integer kernel adds). GPTQ's act-order with static groups keeps the
columns in order, so ``actorder: weight`` is recorded and no ``weight_g_idx`` is written (compressed-tensors
0.20 refuses group act-order). The ``config_groups`` hold one group per distinct scheme: ``targets: [Linear]``
when every quantized layer shares one, else the layer names; ``ignore`` lists the Linear layers kept float.

What the format cannot hold is refused before anything is written, naming the layer: Conv2d and embedding
layers, float (non-integer) zero points, fp8 e5m2 weights, quantized attention and an int8 KV cache (vLLM reads
only fp8 KV-cache scales).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from slimquant.errors import SlimquantError
from slimquant.formats import checkpoint as ck
from slimquant.formats.codec import Codec, register_codec
from slimquant.formats.safetensors_io import Entry
from slimquant.kernels.weight_only import unpacked
from slimquant.math.packing import pack
from slimquant.nn import QModule, fa_quant
from slimquant.types.qtype import qtype as lookup_qtype
from slimquant.types.result import QuantizationResult
from slimquant.types.spec import Granularity

log = logging.getLogger(__name__)

NAME = "compressed-tensors"
WEIGHTS = "model.safetensors"
CT_VERSION = "0.20.1"  # the compressed-tensors release whose format this writes (informational in config.json)
STRATEGY = {Granularity.PER_TENSOR: "tensor", Granularity.PER_CHANNEL: "channel", Granularity.PER_GROUP: "group"}


# -- int32 bit streams ------------------------------------------------------------------------------------------
def pack_int32(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned values ``u`` ``[R, C]`` (each below ``2**bits``) as int32 words ``[R, ceil(C*bits/32)]``: every
    row an LSB-first bit stream (value ``i`` at bits ``[i*bits, (i+1)*bits)``), the last word zero-padded."""
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_int32 packs 1..8 bits, got {bits}")
    u = u.to(torch.int64)
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 2**bits):
        raise ValueError(f"values out of range for {bits}-bit packing")
    rows, cols = u.shape
    words = -(-cols * bits // 32)
    out = torch.empty(rows, words, dtype=torch.int32)
    shifts = torch.arange(bits, dtype=torch.int64)
    weights = torch.arange(32, dtype=torch.int64)
    step = max(1, (1 << 22) // max(cols * bits, 1))  # rows per chunk: about 4M bits at a time
    for r0 in range(0, rows, step):
        chunk = u[r0 : r0 + step]
        stream = ((chunk[..., None] >> shifts) & 1).reshape(len(chunk), cols * bits)
        stream = torch.nn.functional.pad(stream, (0, words * 32 - cols * bits))
        w = (stream.reshape(len(chunk), words, 32) << weights).sum(-1)  # in [0, 2**32)
        out[r0 : r0 + step] = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
    return out


def unpack_int32(p: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 words ``[R, W]`` -> unsigned values ``[R, cols]`` (int64)."""
    rows, words = p.shape
    if words * 32 < cols * bits:
        raise ValueError(f"{words} words hold fewer than {cols} values of {bits} bits")
    out = torch.empty(rows, cols, dtype=torch.int64)
    shifts = torch.arange(32, dtype=torch.int64)
    weights = torch.arange(bits, dtype=torch.int64)
    step = max(1, (1 << 22) // max(words * 32, 1))
    for r0 in range(0, rows, step):
        w = p[r0 : r0 + step].to(torch.int64) & 0xFFFFFFFF
        stream = ((w[..., None] >> shifts) & 1).reshape(len(w), words * 32)[:, : cols * bits]
        out[r0 : r0 + step] = (stream.reshape(len(w), cols, bits) << weights).sum(-1)
    return out


# -- schemes ------------------------------------------------------------------------------------------------------
def _args(bits: int, kind: str, symmetric: bool, strategy: str, group_size: int | None, dynamic: bool,
          actorder: str | None = None) -> dict[str, Any]:  # fmt: skip
    """One ``QuantizationArgs`` (only the fields every compressed-tensors release since 0.9 knows)."""
    return {"num_bits": bits, "type": kind, "symmetric": symmetric, "group_size": group_size, "strategy": strategy,
            "block_structure": None, "dynamic": dynamic, "actorder": actorder, "observer": None,
            "observer_kwargs": {}}  # fmt: skip


def _refuse(name: str, what: str) -> SlimquantError:
    return SlimquantError(f"the {NAME} format cannot hold layer {name}: {what}")


def _weight_args(name: str, module: QModule) -> dict[str, Any]:
    spec = module.spec
    qt = lookup_qtype(spec.qtype)
    if qt.is_float and qt.name != "fp8_e4m3":
        raise _refuse(name, f"its weights are {qt.name}; compressed-tensors stores fp8 as e4m3 only")
    group = int(spec.group_size) if spec.granularity is Granularity.PER_GROUP else None
    method = getattr(module, "method", {}) or {}
    actorder = "weight" if method.get("algorithm") == "gptq" and method.get("act_order") else None
    return _args(qt.bits, "float" if qt.is_float else "int", bool(spec.symmetric or qt.is_float),
                 STRATEGY[spec.granularity], group, False, actorder)  # fmt: skip


def layer_scheme(name: str, module: QModule) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """(format, weights args, input_activations args) of a quantized layer; what the format cannot hold is
    refused naming the layer."""
    cls = type(module).__name__
    if cls == "QLinear":
        qt = lookup_qtype(module.spec.qtype)
        if not qt.is_float and not module.spec.symmetric and module.spec.zero_point == "float":
            zp = getattr(module, "weight_zero_point", None)
            if zp is not None and not zp.is_meta and bool((zp != torch.round(zp)).any()):
                raise _refuse(name, "its zero points are floats (zero_point=float) and compressed-tensors stores "
                                    "integer zero points; quantize with integer zero points")  # fmt: skip
        return ("float-quantized" if qt.is_float else "pack-quantized"), _weight_args(name, module), None
    if cls in ("QLinearW8A8", "QLinearFP8"):
        inp = module.input_spec  # type: ignore[attr-defined]
        iqt = lookup_qtype(inp.qtype)
        if iqt.is_float and iqt.name != "fp8_e4m3":
            raise _refuse(name, f"its inputs are {iqt.name}; compressed-tensors stores fp8 as e4m3 only")
        if inp.dynamic:
            iargs = _args(8, "float" if iqt.is_float else "int", True, "token", None, True)
        else:
            iargs = _args(8, "float" if iqt.is_float else "int", bool(inp.symmetric or iqt.is_float), "tensor",
                          None, False)  # fmt: skip
        return ("float-quantized" if cls == "QLinearFP8" else "int-quantized"), _weight_args(name, module), iargs
    inp = getattr(module, "input_spec", None)
    what = {"QConv2d": "a quantized Conv2d (compressed-tensors quantizes Linear layers)",
            "QConv2dInputQuant": "a quantized Conv2d (compressed-tensors quantizes Linear layers)",
            "QEmbedding": "a quantized embedding (compressed-tensors quantizes Linear layers)",
            "QLinearInputQuant": f"a {module.spec.describe()} layer with {inp.describe() if inp else '?'} inputs "
                                 "(a pair only training produces; here compressed-tensors holds weight-only layers "
                                 "and int8 / fp8 W8A8)"}.get(cls, f"a {cls}")  # fmt: skip
    raise _refuse(name, what)


def _shift(module: QModule) -> int:
    """What moves the module's integer grid onto the signed one compressed-tensors stores (uint -> int)."""
    qt = lookup_qtype(module.spec.qtype)
    return 0 if qt.signed or qt.is_float else 2 ** (qt.bits - 1)


def _per_row(scale: torch.Tensor, gran: Granularity, n: int) -> torch.Tensor:
    """A per-channel / per-tensor weight scale as the file holds it: ``[n, 1]`` or ``[1]``."""
    s = scale.float().reshape(-1)
    return s[:1].clone() if gran is Granularity.PER_TENSOR else s.expand(n).reshape(n, 1).clone()


def _static_weight_scale(acc_scale: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """``acc_scale / input_scale`` in float32, nudged by an ulp where needed so that ``input_scale * it``
    rounds back to ``acc_scale`` exactly (the loader rebuilds acc_scale that way)."""
    acc = acc_scale.float().reshape(-1)
    inp = input_scale.float().reshape(1)
    w = (acc.double() / inp.double()).float()
    for _ in range(4):
        back = (inp.double() * w.double()).float()  # as kernels.int8.quantize_bias computes acc_scale
        if torch.equal(back, acc):
            break
        w = torch.where(back < acc, torch.nextafter(w, torch.full_like(w, math.inf)),
                        torch.where(back > acc, torch.nextafter(w, torch.zeros_like(w)), w))  # fmt: skip
    return w


Producer = tuple[tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]


def _stored_format(module: QModule, fmt: str) -> str:
    """The format a layer's tensors are stored in: what another tool wrote for an imported layer (e.g. weight-only
    int8 as ``int-quantized``, not packed), else what this codec writes."""
    method = getattr(module, "method", {}) or {}
    if method.get("source") == NAME and method.get("format") in ("int-quantized", "naive-quantized") and fmt == "pack-quantized":
        return "naive-quantized"
    return fmt


def encode_layer(name: str, module: QModule) -> dict[str, Producer]:
    """The file tensors of one quantized Linear: leaf -> (shape, dtype, producer)."""
    fmt, wargs, iargs = layer_scheme(name, module)
    fmt = _stored_format(module, fmt)
    m: Any = module
    cls = type(module).__name__
    n, k = int(m.out_features), int(m.in_features)
    gran = module.spec.granularity
    static_w8a8 = cls == "QLinearW8A8" and not m.input_spec.dynamic
    out: dict[str, Producer] = {}
    if fmt == "pack-quantized":
        bits = int(wargs["num_bits"])
        half, shift = 2 ** (bits - 1), _shift(module)
        g_shape: tuple[int, ...] = (1,) if gran is Granularity.PER_TENSOR else tuple(m.weight_scale.shape)

        def packed() -> torch.Tensor:
            q = unpacked(m.weight, m.spec, k).to(torch.int64) - shift
            return pack_int32(q + half, bits)

        out["weight_packed"] = ((n, -(-k * bits // 32)), torch.int32, packed)
        out["weight_scale"] = (g_shape, torch.float32, lambda: m.weight_scale.float().reshape(g_shape).clone())
        out["weight_shape"] = ((2,), torch.int64, lambda: torch.tensor([n, k], dtype=torch.int64))
        if not wargs["symmetric"]:
            groups = g_shape[-1] if len(g_shape) == 2 else 1

            def zero_point() -> torch.Tensor:
                zi = torch.round(m.weight_zero_point.double()).to(torch.int64).reshape(n, groups) - shift
                return pack_int32((zi + half).T.contiguous(), bits).T.contiguous()

            out["weight_zero_point"] = ((-(-n * bits // 32), groups), torch.int32, zero_point)
    elif fmt == "naive-quantized":  # weight-only integers one per int8 (imported)
        shift = _shift(module)
        g_shape = (1,) if gran is Granularity.PER_TENSOR else tuple(m.weight_scale.shape)
        out["weight"] = ((n, k), torch.int8, lambda: (unpacked(m.weight, m.spec, k).to(torch.int64) - shift).to(torch.int8))
        out["weight_scale"] = (g_shape, torch.float32, lambda: m.weight_scale.float().reshape(g_shape).clone())
        if not wargs["symmetric"]:
            out["weight_zero_point"] = (g_shape, torch.int8,
                                        lambda: (torch.round(m.weight_zero_point.double()).to(torch.int64) - shift)
                                        .to(torch.int8).reshape(g_shape))  # fmt: skip
    elif cls == "QLinear":  # fp8 weight-only
        g_shape = (1,) if gran is Granularity.PER_TENSOR else tuple(m.weight_scale.shape)
        out["weight"] = ((n, k), m.weight.dtype, lambda: m.weight)
        out["weight_scale"] = (g_shape, torch.float32, lambda: m.weight_scale.float().reshape(g_shape).clone())
    else:  # W8A8: int8 or fp8 weights, per channel or per tensor
        w_shape = (1,) if gran is Granularity.PER_TENSOR else (n, 1)
        out["weight"] = ((n, k), m.weight.dtype, lambda: m.weight)
        if static_w8a8:
            out["weight_scale"] = (w_shape, torch.float32,
                                   lambda: _per_row(_static_weight_scale(m.acc_scale, m.input_scale), gran, n))
        else:
            out["weight_scale"] = (w_shape, torch.float32, lambda: _per_row(m.weight_scale, gran, n))
        if not m.input_spec.dynamic:
            out["input_scale"] = ((1,), torch.float32, lambda: m.input_scale.float().reshape(1).clone())
            if static_w8a8 and not iargs["symmetric"]:  # type: ignore[index]
                out["input_zero_point"] = ((1,), torch.int8,
                                           lambda: torch.round(m.input_zero_point.float()).to(torch.int8).reshape(1))
    if static_w8a8:
        if m.has_bias:  # the bias the integer kernel adds: acc_bias accumulator units
            out["bias"] = ((n,), torch.float32, lambda: (m.acc_bias.double() * m.acc_scale.double()).float())
    elif m.bias is not None:
        out["bias"] = ((n,), m.bias.dtype, lambda: m.bias.detach())
    return out


def _check_model(model: nn.Module, layers: dict[str, QModule]) -> None:
    if fa_quant.quantized_attention(model):
        raise SlimquantError(f"the {NAME} format cannot hold quantized attention (--fa_quant): it has no such "
                             "scheme; export without it")  # fmt: skip
    from slimquant.nn import kv_cache

    if any(b in (kv_cache.KV_SCALE, kv_cache.KV_OFFSET) for _, m in model.named_modules()
           for b, _ in m.named_buffers(recurse=False)):  # fmt: skip
        raise SlimquantError(f"the {NAME} format cannot hold the int8 KV cache (--use_kvcache_quant): vLLM reads "
                             "only fp8 per-tensor KV-cache scales; export without it")  # fmt: skip
    for name, m in layers.items():
        layer_scheme(name, m)  # refuses what the format lacks, naming the layer


def check_recipe(recipe: Any) -> None:
    """Refuse, before any work, a recipe whose checkpoint this format cannot hold (what only the model shows,
    such as a Conv2d layer, is refused when saving)."""
    from slimquant.types.spec import Recipe

    if not isinstance(recipe, Recipe):
        return
    if recipe.kv is not None:
        raise SlimquantError(f"the {NAME} format cannot hold the int8 KV cache (--use_kvcache_quant): vLLM reads only "
                             "fp8 per-tensor KV-cache scales")  # fmt: skip
    if recipe.fa is not None:
        raise SlimquantError(f"the {NAME} format cannot hold quantized attention (--use_fa_quant)")
    if recipe.embedding is not None:
        raise SlimquantError(f"the {NAME} format cannot hold a quantized embedding (--embedding_bit 8): it quantizes "
                             "Linear layers")  # fmt: skip
    for where, weight, _inp, _ in recipe.layer_combinations():
        if weight is None:
            continue
        label = f"override {where}" if where else "the recipe's weights"
        qt = lookup_qtype(weight.qtype)
        if qt.is_float and qt.name != "fp8_e4m3":
            raise SlimquantError(f"the {NAME} format stores fp8 as e4m3 only: {label} are {qt.name}")
        if not qt.is_float and not weight.symmetric and weight.zero_point == "float":
            raise SlimquantError(f"the {NAME} format stores integer zero points: {label} use --w_zero_point float; "
                                 "use int")  # fmt: skip


def quantization_config(model: nn.Module, layers: dict[str, QModule]) -> dict[str, Any]:
    """config.json's ``quantization_config`` for the quantized ``layers`` of ``model``."""
    groups: dict[str, dict[str, Any]] = {}
    members: dict[str, list[str]] = {}
    for name, m in layers.items():
        fmt, wargs, iargs = layer_scheme(name, m)
        key = json.dumps([fmt, wargs, iargs], sort_keys=True)
        if key not in groups:
            groups[key] = {"targets": [], "weights": wargs, "input_activations": iargs, "output_activations": None,
                           "format": fmt}  # fmt: skip
            members[key] = []
        members[key].append(name)
    config_groups = {}
    for i, (key, g) in enumerate(groups.items()):
        g["targets"] = ["Linear"] if len(groups) == 1 else members[key]
        config_groups[f"group_{i}"] = g
    formats = {g["format"] for g in groups.values()}
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers]
    return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": config_groups, "ignore": ignore,
            "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": sparsity_config(layers),
            "transform_config": {}, "version": CT_VERSION}  # fmt: skip


def sparsity_config(layers: dict[str, QModule]) -> dict[str, Any]:
    """``quantization_config.sparsity_config`` of layers pruned by SparseGPT / Wanda (their method records a
    ``pattern``): compressed-tensors' ``dense`` sparsity format (the zeros are stored in the quantized weights;
    the bitmask formats are legacy there), with the structure (``2:4``, ``unstructured``, ...), the targets and
    the measured share of zero weights. ``{}`` when no layer is pruned."""
    sparse = {n: m for n, m in layers.items() if "pattern" in m.method}
    if not sparse:
        return {}
    patterns = sorted({m.method["pattern"] for m in sparse.values()})
    zeros = total = 0
    for m in sparse.values():
        w = m.dequantized_weight(torch.float32)
        zeros += int((w == 0).sum())
        total += w.numel()
    return {"format": "dense", "sparsity_structure": patterns[0] if len(patterns) == 1 else "unstructured",
            "global_sparsity": round(zeros / max(total, 1), 4),
            "targets": ["Linear"] if len(sparse) == len(layers) else sorted(sparse),
            "ignore": sorted(set(layers) - set(sparse))}  # fmt: skip


def export_state(result: QuantizationResult) -> tuple[list[Entry], dict[str, Any], dict[str, Any]]:
    """(file tensors to write, quantization_config, manifest) of a quantized model; what the format cannot hold
    is refused before anything is computed."""
    state = ck.logical_state(result)
    model = result.model
    _check_model(model, state.layers)
    entries: list[Entry] = []
    aliases: dict[str, str] = {}
    done: set[str] = set()
    for name in model.state_dict().keys():
        prefix, _, leaf = name.rpartition(".")
        if prefix in state.layers:
            if prefix in done:
                continue
            done.add(prefix)
            for fleaf, (shape, dtype, produce) in encode_layer(prefix, state.layers[prefix]).items():
                entries.append((f"{prefix}.{fleaf}", shape, dtype, produce))
            continue
        canon = state.canonical(name)
        if canon != name:  # a tied weight: written once, the runtime ties it again (tie_word_embeddings)
            aliases[name] = canon
            continue
        t = state.tensors[name]
        entries.append((name, tuple(t.shape), t.dtype, lambda n=name: state.data(n)))
    manifest = ck.manifest_for(model, NAME, state, aliases)
    return entries, quantization_config(model, state.layers), manifest


class CompressedTensorsCodec(Codec):
    """compressed-tensors ``pack-quantized`` / ``int-quantized`` / ``float-quantized`` (see module doc)."""

    name = NAME
    description = "compressed-tensors (vLLM, transformers + compressed-tensors) with slimquant's manifest"

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
        config = ck.config_dict(result.model)
        if not config:
            raise SlimquantError(f"the {NAME} format is a Hugging Face layout: {type(result.model).__name__} has no "
                                 "transformers config (save a plain nn.Module in the msmodelslim format)")  # fmt: skip
        entries, qconfig, manifest = export_state(result)
        files = ck.write_checkpoint(result, directory, WEIGHTS, entries, manifest,
                                    {"config.json": {**config, "quantization_config": qconfig}}, tokenizer=tokenizer,
                                    overwrite=overwrite, force_overwrite=force_overwrite, protect=protect,
                                    part_file_size=part_file_size)  # fmt: skip
        log.info("saved %s %s checkpoint to %s (%d file(s))", NAME, qconfig["format"], directory, len(files))
        return Path(directory)

    def load_into(self, model: nn.Module, directory: Path, manifest: dict[str, Any]) -> nn.Module:
        stored: dict[str, str] | None = None
        if manifest.get("imported"):  # another tool's floats may be bfloat16 / float16 (scales, biases)
            from slimquant.formats.safetensors_io import read_header

            stored = {n: v["dtype"] for f in manifest["files"] for n, v in read_header(directory / f).items()}
        return ck.load_logical(model, directory, manifest, decode=lambda t: decode_state(model, directory, t),
                               expected=lambda m: expected_state(m, stored))  # fmt: skip


# -- load ---------------------------------------------------------------------------------------------------------
def _layers(model: nn.Module) -> dict[str, QModule]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QModule)}


_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def expected_state(model: nn.Module, stored: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The file tensors a rebuilt ``model`` needs (meta tensors of the stored shape and dtype); ``stored`` (file
    name -> safetensors dtype of an imported checkpoint): a float32 scale or bias may come as bf16 / f16."""
    layers = _layers(model)
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        prefix = name.rpartition(".")[0]
        if prefix in layers:
            continue
        out[name] = t
    for prefix, m in layers.items():
        for leaf, (shape, dtype, _) in encode_layer(prefix, m).items():
            fname = f"{prefix}.{leaf}"
            if stored is not None and dtype == torch.float32 and stored.get(fname) in _FLOATS:
                dtype = _FLOATS[stored[fname]]
            out[fname] = torch.empty(shape, dtype=dtype, device="meta")
    return out


def decode_layer(directory: Path, name: str, module: QModule, file: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The logical tensors (leaf names) of the quantized module ``name`` from its file tensors (leaf names)."""
    fmt, wargs, iargs = layer_scheme(name, module)
    fmt = _stored_format(module, fmt)
    cls = type(module).__name__
    spec = module.spec
    qt = lookup_qtype(spec.qtype)
    out: dict[str, torch.Tensor] = {}
    static_w8a8 = cls == "QLinearW8A8" and not module.input_spec.dynamic  # type: ignore[attr-defined]
    if "bias" in file and not static_w8a8:
        out["bias"] = file["bias"]
    if fmt == "pack-quantized":
        n, k = (int(v) for v in file["weight_shape"].tolist())
        if (n, k) != (module.weight_rows, module.weight_cols):  # type: ignore[attr-defined]
            raise SlimquantError(f"checkpoint {directory}: {name}.weight_shape is {[n, k]}, the layer is "
                                 f"{[module.weight_rows, module.weight_cols]}")  # type: ignore[attr-defined]  # fmt: skip
        bits, half, shift = qt.bits, 2 ** (qt.bits - 1), _shift(module)
        q = unpack_int32(file["weight_packed"], bits, k) - half + shift
        if qt.packed:
            out["weight"] = pack(q, bits, int(qt.qmin))
        else:
            out["weight"] = q.to(qt.torch_dtype)
        out["weight_scale"] = file["weight_scale"].float().reshape(module.weight_scale.shape)
        if "weight_zero_point" in file:
            groups = module.weight_scale.shape[-1]
            zp = unpack_int32(file["weight_zero_point"].T.contiguous(), bits, n).T - half + shift
            out["weight_zero_point"] = zp.float().reshape(n, groups)
        return out
    if fmt == "naive-quantized":
        q = file["weight"].to(torch.int64) + _shift(module)
        out["weight"] = pack(q, qt.bits, int(qt.qmin)) if qt.packed else q.to(qt.torch_dtype)
        out["weight_scale"] = file["weight_scale"].float().reshape(module.weight_scale.shape)
        if "weight_zero_point" in file:
            zp = file["weight_zero_point"].to(torch.int64) + _shift(module)
            out["weight_zero_point"] = zp.float().reshape(module.weight_scale.shape)
        return out
    if cls == "QLinear":
        out["weight"] = file["weight"]
        out["weight_scale"] = file["weight_scale"].float().reshape(module.weight_scale.shape)
        return out
    out["weight"] = file["weight"]
    n = module.out_features  # type: ignore[attr-defined]
    w_scale = file["weight_scale"].float().reshape(-1).expand(n)
    if static_w8a8:
        from slimquant.nn.w8a8 import io_dtype

        dt = io_dtype(module.compute_dtype)
        out["input_scale"] = file["input_scale"].reshape(1).to(dt)
        zp = file.get("input_zero_point")
        out["input_zero_point"] = (torch.zeros(1) if zp is None else zp.float()).reshape(1).to(dt)
        from slimquant.kernels.int8 import quantize_bias

        out["acc_bias"], out["acc_scale"] = quantize_bias(w_scale, float(out["input_scale"].float()), file.get("bias"))
        return out
    out["weight_scale"] = w_scale.reshape(module.weight_scale.shape).clone()
    if cls == "QLinearFP8" and not module.input_spec.dynamic:  # type: ignore[attr-defined]
        out["input_scale"] = file["input_scale"].float().reshape(module.input_scale.shape)
    return out


def decode_state(model: nn.Module, directory: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    layers = _layers(model)
    out: dict[str, torch.Tensor] = {}
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for fname, t in tensors.items():
        prefix, _, leaf = fname.rpartition(".")
        if prefix in layers:
            by_layer.setdefault(prefix, {})[leaf] = t
        else:
            out[fname] = t
    for prefix, file in by_layer.items():
        out.update({f"{prefix}.{leaf}": t for leaf, t in decode_layer(directory, prefix, layers[prefix], file).items()})
    return out


# -- import of a checkpoint another tool wrote (llm-compressor, ...) ---------------------------------------------
def is_compressed_tensors(directory: str | os.PathLike) -> bool:
    """Whether ``directory``'s config.json says ``quant_method: compressed-tensors``."""
    cfg = Path(directory) / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    q = data.get("quantization_config") if isinstance(data, dict) else None
    return isinstance(q, dict) and q.get("quant_method") == "compressed-tensors"


def _matches(name: str, module: nn.Module, target: str) -> bool:
    if target.startswith("re:"):
        import re

        return re.match(target[3:], name) is not None
    return target == name or any(c.__name__ == target for c in type(module).__mro__)


def _spec_of(where: str, args: Any, role: str) -> Any:
    """A QuantSpec from one ``QuantizationArgs`` dict (``role``: weights or input_activations)."""
    from slimquant.types.spec import QuantSpec

    if not isinstance(args, dict):
        raise SlimquantError(f"{where}: {role} must be an object")
    bits, kind = args.get("num_bits", 8), str(args.get("type", "int")).lower()
    sym = bool(args.get("symmetric", True))
    group = args.get("group_size")
    strategy = args.get("strategy") or ("group" if isinstance(group, int) and group > 0 else
                                        "channel" if group == -1 else "tensor")  # fmt: skip
    if kind == "float":
        if bits != 8:
            raise SlimquantError(f"{where}: {role} are float{bits}; slimquant reads fp8 (e4m3) only")
        qname = "fp8_e4m3"
    elif kind == "int":
        names = {2: "int2", 3: "int3", 4: "int4", 5: "int5", 6: "int6", 8: "int8"}
        if bits not in names:
            raise SlimquantError(f"{where}: {role} have {bits} bits; slimquant reads int 2-6 and 8")
        qname = names[bits]
    else:
        raise SlimquantError(f"{where}: {role} type {kind!r}; slimquant reads int and float")
    if role == "input_activations":
        if strategy == "token" and args.get("dynamic") is True:
            return QuantSpec(qname, Granularity.PER_TOKEN, None, True, dynamic=True)
        if strategy == "tensor" and args.get("dynamic") is False:
            return QuantSpec(qname, Granularity.PER_TENSOR, None, sym or kind == "float")
        raise SlimquantError(f"{where}: input activations with strategy {strategy!r} (dynamic {args.get('dynamic')!r}); "
                             "slimquant reads dynamic per-token and static per-tensor inputs")  # fmt: skip
    if args.get("actorder") not in (None, "weight", "static", False):
        raise SlimquantError(f"{where}: actorder {args.get('actorder')!r} (a weight_g_idx permutation of the groups); "
                             "slimquant reads contiguous groups only (actorder null or weight)")  # fmt: skip
    gran = {"tensor": Granularity.PER_TENSOR, "channel": Granularity.PER_CHANNEL, "group": Granularity.PER_GROUP}.get(strategy)
    if gran is None:
        raise SlimquantError(f"{where}: weight strategy {strategy!r}; slimquant reads tensor, channel and group")
    return QuantSpec(qname, gran, int(group) if gran is Granularity.PER_GROUP else None, sym or kind == "float")


def manifest_from_config(directory: Path, config: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """A slimquant manifest for a compressed-tensors checkpoint that has none (written by another tool), from its
    config.json and the model skeleton ``model``: one entry per Linear a config group targets and ``ignore`` does
    not name. What slimquant cannot represent is refused naming the key or layer."""
    from slimquant.types.spec import LayerOverride, Recipe

    q = config["quantization_config"]
    where = f"{directory / 'config.json'}: quantization_config"
    status = q.get("quantization_status", "initialized")
    if status != "compressed":
        raise SlimquantError(f"{where}.quantization_status is {status!r}; slimquant reads compressed checkpoints")
    if q.get("kv_cache_scheme"):
        raise SlimquantError(f"{where}.kv_cache_scheme: the fp8 KV cache is not supported by slimquant yet")
    sparse = q.get("sparsity_config")
    if sparse and not (isinstance(sparse, dict) and sparse.get("format") == "dense"):
        raise SlimquantError(f"{where}.sparsity_config: the {sparse.get('format') if isinstance(sparse, dict) else sparse!r} "
                             "sparse format is not supported by slimquant yet (dense-stored sparsity is)")  # fmt: skip
    if q.get("transform_config"):
        raise SlimquantError(f"{where}.transform_config: transformed checkpoints are not supported by slimquant yet")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise SlimquantError(f"{where}.config_groups is missing or empty")
    top_format = q.get("format")
    ignore = [str(x) for x in q.get("ignore") or []]
    dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    if dtype not in ("float32", "float16", "bfloat16"):
        raise SlimquantError(f"{directory / 'config.json'}: dtype {dtype!r}; expected float32, float16 or bfloat16")
    schemes = []
    for gname, g in groups.items():
        gw = f"{where}.config_groups.{gname}"
        if not isinstance(g, dict) or not isinstance(g.get("targets"), list):
            raise SlimquantError(f"{gw}: a group needs targets (a list) and weights")
        if g.get("output_activations"):
            raise SlimquantError(f"{gw}.output_activations: output quantization is not supported by slimquant")
        fmt = g.get("format") or top_format
        weight = _spec_of(gw + ".weights", g.get("weights"), "weights")
        inp = _spec_of(gw + ".input_activations", g["input_activations"], "input_activations") \
            if g.get("input_activations") else None  # fmt: skip
        if fmt not in ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized"):
            raise SlimquantError(f"{gw}: format {fmt!r}; slimquant reads pack-quantized, int-quantized, "
                                 "naive-quantized and float-quantized")  # fmt: skip
        schemes.append((gname, [str(t) for t in g["targets"]], fmt, weight, inp))
    layers: dict[str, dict[str, Any]] = {}
    by_layer: dict[str, tuple[Any, Any]] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or any(_matches(name, mod, t) for t in ignore):
            continue
        hit = next((sc for sc in schemes if any(_matches(name, mod, t) for t in sc[1])), None)
        if hit is None:
            continue
        gname, _, fmt, weight, inp = hit
        lw = f"{where}.config_groups.{gname} (layer {name})"
        wq, iq = lookup_qtype(weight.qtype), None if inp is None else lookup_qtype(inp.qtype)
        if inp is None:
            cls = "QLinear"
            if wq.is_float and weight.granularity is Granularity.PER_GROUP:
                raise SlimquantError(f"{lw}: fp8 weights per group are not supported by slimquant")
        elif iq is not None and iq.is_float:
            cls = "QLinearFP8"
            if not wq.is_float or weight.granularity is Granularity.PER_GROUP:
                raise SlimquantError(f"{lw}: fp8 inputs need fp8 weights per channel or per tensor")
        else:
            cls = "QLinearW8A8"
            if weight.qtype != "int8" or not weight.symmetric or weight.granularity is Granularity.PER_GROUP:
                raise SlimquantError(f"{lw}: int8 inputs need symmetric int8 weights per channel or per tensor")
        if weight.granularity is Granularity.PER_GROUP and mod.in_features % int(weight.group_size) != 0:
            raise SlimquantError(f"{lw}: group size {weight.group_size} does not divide in_features {mod.in_features}")
        args: dict[str, Any] = {"in_features": mod.in_features, "out_features": mod.out_features}
        if inp is not None:
            args["input_spec"] = inp.to_dict()
        layers[name] = {"module": cls, "spec": weight.to_dict(), "dtype": dtype, "bias": mod.bias is not None,
                        "method": {"algorithm": "imported", "source": NAME, "format": fmt}, "args": args}  # fmt: skip
        by_layer[name] = (weight, inp)
    if not layers:
        raise SlimquantError(f"{where}: no Linear layer of the model matches a config group's targets")
    # the recipe it amounts to (a record: loading does not run it)
    first = next(iter(by_layer.values()))
    overrides = tuple((n, LayerOverride(weight=w, input=i)) for n, (w, i) in by_layer.items() if (w, i) != first)
    head = getattr(model, "get_output_embeddings", lambda: None)()
    head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    try:
        recipe = Recipe(weight=first[0], input=first[1], overrides=overrides,
                        disable_last_linear=head_name is not None and head_name not in layers)  # fmt: skip
    except SlimquantError:
        recipe = Recipe(weight=first[0], input=None, overrides=overrides)
    files = _weight_files(directory)
    aliases: dict[str, str] = {}
    emb = getattr(model, "get_input_embeddings", lambda: None)()
    emb_name = next((n for n, m in model.named_modules() if m is emb), None) if emb is not None else None
    if config.get("tie_word_embeddings") and head_name and emb_name and head_name not in layers:
        stored = set(_stored_names(directory, files))
        if f"{head_name}.weight" not in stored and f"{emb_name}.weight" in stored:
            aliases[f"{head_name}.weight"] = f"{emb_name}.weight"
    entries = {n: e for n, e in layers.items()}
    return {"format": "slimquant/" + NAME, "format_version": ck.FORMAT_VERSION,
            "quant_type": ck.dominant_quant_type(entries, "w8a16"), "recipe": recipe.to_dict(),
            "model": {"kind": "transformers", "architecture": str((config.get("architectures") or [""])[0])},
            "layers": entries, "aliases": aliases, "files": files, "imported": True}  # fmt: skip


def _weight_files(directory: Path) -> list[str]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return sorted(set(str(v) for v in wm.values()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise SlimquantError(f"{index} is not a valid safetensors index: {e}") from None
    files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise SlimquantError(f"{directory} has no .safetensors weights")
    return files


def _stored_names(directory: Path, files: list[str]) -> list[str]:
    from slimquant.formats.safetensors_io import read_header

    return [n for f in files for n in read_header(directory / f)]


CODEC = register_codec(CompressedTensorsCodec)

__all__ = ["CODEC", "NAME", "pack_int32", "unpack_int32", "quantization_config", "layer_scheme", "export_state"]
