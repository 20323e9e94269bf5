"""W8A8SC: a W8A8S checkpoint split for tensor parallelism and its weights compressed (seed 002's
``sparse_compressor``), with an open codec (:mod:`slimquant.kernels.w8a8sc`).

Directory written by :func:`compress` (``slimquant compress``)::

    config.json                                        the model config + "quantize": "w8a8sc"
    slimquant_manifest.json                            the W8A8S manifest (format slimquant/w8a8sc) + "w8a8sc": the
                                                       split (tp_size, tiling, parts, each layer's kind)
    part0-of-N/quant_model_weight_w8a8sc.safetensors   part 0's tensors
    part0-of-N/quant_model_description_w8a8sc.json     "model_quant_type": "W8A8SC" + one label per tensor
    ...                                                one directory per part
    tokenizer files, quantize_report.*                 copied from the W8A8S checkpoint

The split (before compression, as the seed asks): ``column`` layers (q/k/v/gate/up: ``TensorParallel`` in
:mod:`slimquant.adapters.architectures`) give each part a contiguous block of output channels (weight rows,
``quant_bias``, ``deq_scale``, ``bias``); ``row`` layers (o/down) a block of input channels (weight columns) with
``quant_bias`` re-folded per part (``acc_bias`` on part 0 only, each part's zero-point correction from its own
columns) so the parts' int32 accumulators sum to the whole layer's, and ``bias`` on part 0 (zeros elsewhere).
``input_scale`` / ``input_offset`` / ``deq_scale`` of row layers and every other tensor (embeddings, norms, the
output layer) are whole in every part. Float (disabled) linears are split the same way, uncompressed.

Per W8A8S linear and part, ``weight`` [n, k] int8 becomes three tensors (labels ``W8A8SC``; the others keep
``W8A8S``): ``weight`` int8 ``[x]`` (the tile stream), ``index`` int8 ``[y]``, ``y = k_index * n_index * 8``
(``k_index = ceil(k1 / tilingK)``, ``n_index = ceil(n1 / tilingN)``, ``k1 = ceil(k / 32)``, ``n1 = ceil(n / 16)``:
8 bytes per tile, its offset and length) and ``info`` int64 ``[10]``: ``[format id, n, k, tilingN, tilingK, x,
y, crc32(weight stream), crc32(index), crc32(decoded int8 weight)]``. Loading checks every checksum, decodes,
and reassembles the W8A8S tensors exactly, so the model runs as the W8A8S checkpoint does, bit for bit.
docs/format.md describes the bytes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from slimquant.errors import SlimquantError
from slimquant.formats import checkpoint as ck
from slimquant.formats import msmodelslim as ms
from slimquant.formats.codec import Codec, format_tag, register_codec
from slimquant.kernels import w8a8sc as kc

log = logging.getLogger(__name__)

NAME = "w8a8sc"
WEIGHT_FILE = "quant_model_weight_w8a8sc.safetensors"
DESCRIPTION_FILE = "quant_model_description_w8a8sc.json"
FORMAT_ID = 0x53430001  # "SC", codec version 1
INFO_FIELDS = ("format_id", "n", "k", "tiling_n", "tiling_k", "x", "y", "crc32_weight", "crc32_index",
               "crc32_decoded")  # fmt: skip
TILING = (8, 16)  # (tilingN, tilingK): tiles of 8 * 16 = 128 rows by 16 * 32 = 512 columns (64 Ki values)
W8A8S_LEAVES = ("weight", "input_scale", "input_offset", "quant_bias", "deq_scale")


def part_name(i: int, tp_size: int) -> str:
    return f"part{i}-of-{tp_size}"


def crc32(t: np.ndarray | torch.Tensor) -> int:
    a = t.numpy() if isinstance(t, torch.Tensor) else t
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8).tobytes()) & 0xFFFFFFFF


@dataclass(frozen=True)
class Compressed:
    """One part of one W8A8S weight: the stream, the index and the info vector."""

    weight: torch.Tensor  # int8 [x]
    index: torch.Tensor  # int8 [y]
    info: torch.Tensor  # int64 [10]


def compress_weight(weight: torch.Tensor, tiling: tuple[int, int] = TILING, impl: str = "native") -> Compressed:
    """An int8 ``[n, k]`` weight -> its W8A8SC tensors (``tiling``: ``(tilingN, tilingK)``, tiles of
    ``16 * tilingN`` rows by ``32 * tilingK`` columns)."""
    tn, tk = _check_tiling(tiling)
    n, k = weight.shape
    t = kc.Tiling(n, k, 16 * tn, 32 * tk)
    stream, index = kc.encode_weight(weight.contiguous(), t, impl)
    info = [FORMAT_ID, n, k, tn, tk, stream.size, index.size, crc32(stream), crc32(index), crc32(weight.contiguous())]
    return Compressed(torch.from_numpy(stream), torch.from_numpy(index), torch.tensor(info, dtype=torch.int64))


def decompress_weight(c: Compressed, where: str, impl: str = "native") -> torch.Tensor:
    """The int8 ``[n, k]`` weight of W8A8SC tensors, every checksum checked (``where`` names them in errors)."""
    info = c.info
    if info.dtype != torch.int64 or tuple(info.shape) != (len(INFO_FIELDS),):
        raise SlimquantError(f"{where}.info: expected int64 [{len(INFO_FIELDS)}], got {info.dtype} {list(info.shape)}")
    v = dict(zip(INFO_FIELDS, (int(x) for x in info.tolist())))
    if v["format_id"] != FORMAT_ID:
        raise SlimquantError(f"{where}.info: unknown format id {v['format_id']:#x} (this slimquant reads {FORMAT_ID:#x})")
    n, k, tn, tk = v["n"], v["k"], v["tiling_n"], v["tiling_k"]
    if min(n, k, tn, tk) <= 0:
        raise SlimquantError(f"{where}.info: shape and tiling must be positive, got n={n} k={k} tiling=({tn}, {tk})")
    for name, t, dtype, size in (("weight", c.weight, torch.int8, v["x"]), ("index", c.index, torch.int8, v["y"])):
        if t.dtype != dtype or t.dim() != 1 or t.numel() != size:
            raise SlimquantError(f"{where}.{name}: expected int8 [{size}] (info), got {t.dtype} {list(t.shape)}")
    tiling = kc.Tiling(n, k, 16 * tn, 32 * tk)
    nt, kt = tiling.n_tiles
    if v["y"] != nt * kt * 8:
        raise SlimquantError(f"{where}.info: index length {v['y']} is not k_index * n_index * 8 = {nt * kt * 8}")
    if crc32(c.index) != v["crc32_index"]:
        raise SlimquantError(f"{where}.index is corrupt (its CRC-32 does not match info)")
    if crc32(c.weight) != v["crc32_weight"]:
        raise SlimquantError(f"{where}.weight is corrupt (the stream's CRC-32 does not match info)")
    try:
        w = kc.decode_weight(c.weight.numpy(), c.index.numpy(), tiling, impl)
    except ValueError as e:
        raise SlimquantError(f"{where}: cannot decode: {e}") from None
    if crc32(w) != v["crc32_decoded"]:
        raise SlimquantError(f"{where}: the decoded weight's CRC-32 does not match info")
    return w


def _check_tiling(tiling: tuple[int, int]) -> tuple[int, int]:
    if (not isinstance(tiling, (tuple, list)) or len(tiling) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= 256 for x in tiling)):  # fmt: skip
        raise SlimquantError(f"tiling must be (tilingN, tilingK), positive integers up to 256, got {tiling!r}")
    return int(tiling[0]), int(tiling[1])


# -- the tensor-parallel plan ---------------------------------------------------------------------------------


def tp_plan(config: dict[str, Any], linears: Iterable[str], tp_size: int) -> dict[str, str]:
    """Each linear layer's kind for ``tp_size`` parts: ``column``, ``row`` or ``whole`` (not split). With one
    part every layer is ``whole``; with more the architecture (config ``model_type``) must be known and its head
    counts divisible by ``tp_size``."""
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise SlimquantError(f"--tp_size {tp_size!r}: must be a positive integer")
    names = list(linears)
    if tp_size == 1:
        return {n: "whole" for n in names}
    from slimquant.adapters.architectures import architecture_of_type

    model_type = config.get("model_type")
    arch = architecture_of_type(model_type, f"model_type {model_type!r}" if model_type else "a model without config.json")
    tp = arch.tensor_parallel
    if tp is None:
        raise SlimquantError(f"--tp_size {tp_size}: no tensor-parallel layout is known for the {arch.name} "
                             "architecture; use --tp_size 1")  # fmt: skip
    for key in tp.heads:
        heads = config.get(key)
        if isinstance(heads, int) and heads % tp_size:
            raise SlimquantError(f"--tp_size {tp_size} does not divide the model's {key} ({heads}): attention heads "
                                 "cannot be split across parts")  # fmt: skip
    blocks = arch.blocks
    plan: dict[str, str] = {}
    for n in names:
        kind = "whole"
        head, _, rest = n.partition(f"{blocks}.")
        if rest and (not head or head.endswith(".")):
            idx, _, rel = rest.partition(".")
            if idx.isdigit():
                kind = "column" if rel in tp.column else "row" if rel in tp.row else "whole"
        plan[n] = kind
    if not any(k != "whole" for k in plan.values()):
        raise SlimquantError(f"--tp_size {tp_size}: none of the model's linears is one the {arch.name} layout splits")
    return plan


def _split(t: torch.Tensor, dim: int, tp_size: int, where: str) -> list[torch.Tensor]:
    size = t.shape[dim]
    if size % tp_size:
        what = "output channels" if dim == 0 else "input channels"
        raise SlimquantError(f"--tp_size {tp_size} does not divide {where}'s {size} {what}")
    return [c.contiguous() for c in torch.chunk(t, tp_size, dim=dim)]


def split_layer(prefix: str, file: dict[str, torch.Tensor], kind: str, tp_size: int, w8a8s: bool) -> list[dict[str, torch.Tensor]]:
    """One linear's file tensors (leaf -> tensor, the W8A8S layout or a float linear's weight / bias) -> one
    dict per part."""
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(tp_size)]
    if kind == "whole":
        for leaf, t in file.items():
            for p in parts:
                p[leaf] = t
        return parts
    w = file["weight"]
    dim = 0 if kind == "column" else 1
    for i, chunk in enumerate(_split(w, dim, tp_size, prefix)):
        parts[i]["weight"] = chunk
    for leaf, t in file.items():
        if leaf == "weight":
            continue
        if kind == "column" and leaf in ("quant_bias", "deq_scale", "bias"):
            for i, chunk in enumerate(_split(t, 0, tp_size, f"{prefix}.{leaf}")):
                parts[i][leaf] = chunk
        elif kind == "row" and leaf == "quant_bias":
            zp = int(file["input_offset"].float())
            from slimquant.kernels.int8 import fold_input_zero_point, unfold_input_zero_point

            acc_bias = unfold_input_zero_point(t, zp, w)
            for i in range(tp_size):
                part_acc = acc_bias if i == 0 else torch.zeros_like(acc_bias)
                parts[i][leaf] = fold_input_zero_point(part_acc, zp, parts[i]["weight"])
        elif kind == "row" and leaf == "bias":
            for i in range(tp_size):
                parts[i][leaf] = t if i == 0 else torch.zeros_like(t)
        else:  # input_scale / input_offset, and a row layer's deq_scale: whole in every part
            for p in parts:
                p[leaf] = t
    return parts


def merge_layer(prefix: str, parts: list[dict[str, torch.Tensor]], kind: str, where: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`split_layer` (weights already decompressed): the layer's file tensors, exactly."""
    out: dict[str, torch.Tensor] = {}
    leaves = list(parts[0])
    for i, p in enumerate(parts):
        if set(p) != set(leaves):
            raise SlimquantError(f"{where}: {prefix} has tensors {sorted(p)} in {part_name(i, len(parts))} but "
                                 f"{sorted(leaves)} in {part_name(0, len(parts))}")  # fmt: skip
    for leaf in leaves:
        ts = [p[leaf] for p in parts]
        if kind == "whole" or (kind == "row" and leaf not in ("weight", "quant_bias", "bias")) or (
                kind == "column" and leaf in ("input_scale", "input_offset")):  # fmt: skip
            for i, t in enumerate(ts[1:], 1):
                if t.shape != ts[0].shape or t.dtype != ts[0].dtype or not torch.equal(t, ts[0]):
                    raise SlimquantError(f"{where}: {prefix}.{leaf} differs between {part_name(0, len(parts))} and "
                                         f"{part_name(i, len(parts))}; it must be the same in every part")  # fmt: skip
            out[leaf] = ts[0]
        elif kind == "column" or leaf == "weight":
            out[leaf] = torch.cat(ts, dim=0 if kind == "column" else 1)
        elif leaf == "bias":  # row: part 0's, zeros elsewhere
            if any(bool((t != 0).any()) for t in ts[1:]):
                raise SlimquantError(f"{where}: {prefix}.bias of a row-parallel layer must be zero past part 0")
            out[leaf] = ts[0]
        else:  # row quant_bias: the parts' int32 biases sum to the layer's
            total = torch.stack([t.to(torch.int64) for t in ts]).sum(0)
            if total.numel() and total.abs().max() >= 2**31:
                raise SlimquantError(f"{where}: {prefix}.quant_bias overflows int32 when its parts are summed")
            out[leaf] = total.to(torch.int32)
    return out


# -- whole checkpoints ----------------------------------------------------------------------------------------


def _layers_of(manifest: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> tuple[list[str], list[str]]:
    """(W8A8S layer prefixes, float linear prefixes) of a W8A8S checkpoint; any other quantized layer is refused."""
    w8a8s: list[str] = []
    for name, entry in manifest["layers"].items():
        label = ck.layer_type(entry)
        if label != "W8A8S":
            raise SlimquantError(f"{where}: layer {name} is {label}; W8A8SC compresses W8A8S checkpoints (slimquant "
                                 "quantize --co_sparse True or --is_lowbit True)")  # fmt: skip
        w8a8s.append(name)
    if not w8a8s:
        raise SlimquantError(f"{where}: no W8A8S layer to compress (quant_type {manifest.get('quant_type')!r})")
    floats = [n[: -len(".weight")] for n, t in tensors.items()
              if n.endswith(".weight") and t.dim() == 2 and n[: -len(".weight")] not in manifest["layers"]]  # fmt: skip
    return w8a8s, floats


def split_and_compress(tensors: dict[str, torch.Tensor], manifest: dict[str, Any], description: dict[str, Any],
                       config: dict[str, Any], tp_size: int, tiling: tuple[int, int] = TILING, impl: str = "native",
                       where: str = "checkpoint", show_progress: bool = True,
                       ) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    """A W8A8S checkpoint's file tensors (name -> tensor), manifest, description and config -> (per part: its
    tensors, its description) and the W8A8SC manifest."""
    from tqdm.auto import tqdm

    tiling = _check_tiling(tiling)
    if tp_size > 1 and ("kv_cache" in manifest or "attention" in manifest):
        raise SlimquantError(f"--tp_size {tp_size} with KV-cache or attention quantization is not supported yet (their "
                             "per-head scales are not split); use --tp_size 1")  # fmt: skip
    w8a8s, floats = _layers_of(manifest, tensors, where)
    plan = tp_plan(config, w8a8s + floats, tp_size)
    by_layer: dict[str, dict[str, torch.Tensor]] = {p: {} for p in plan}
    rest: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        if prefix in by_layer and (prefix in floats and leaf in ("weight", "bias")
                                   or prefix not in floats and leaf in (*W8A8S_LEAVES, "bias")):  # fmt: skip
            by_layer[prefix][leaf] = t
        else:
            rest[name] = t
    for prefix in w8a8s:
        missing = [leaf for leaf in W8A8S_LEAVES if leaf not in by_layer[prefix]]
        if missing:
            raise SlimquantError(f"{where}: W8A8S layer {prefix} lacks {', '.join(missing)}")
        if by_layer[prefix]["weight"].dtype != torch.int8 or by_layer[prefix]["weight"].dim() != 2:
            raise SlimquantError(f"{where}: {prefix}.weight must be int8 [n, k]")
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(tp_size)]
    labels: list[dict[str, Any]] = [{"model_quant_type": "W8A8SC"} for _ in range(tp_size)]
    order = list(tensors)  # the W8A8S file's order, each layer's tensors where its first one was
    done: set[str] = set()
    bar = tqdm(total=len(w8a8s) * tp_size, desc="compress", unit="weight", disable=not show_progress)
    for name in order:
        prefix = name.rpartition(".")[0]
        if name in rest:
            for i in range(tp_size):
                parts[i][name] = rest[name]
                labels[i][name] = description.get(name, "FLOAT")
            continue
        if prefix in done:
            continue
        done.add(prefix)
        for i, p in enumerate(split_layer(prefix, by_layer[prefix], plan[prefix], tp_size, prefix in w8a8s)):
            for leaf, t in p.items():
                if prefix in w8a8s and leaf == "weight":
                    c = compress_weight(t, tiling, impl)
                    for sub, v in (("weight", c.weight), ("index", c.index), ("info", c.info)):
                        parts[i][f"{prefix}.{sub}"] = v
                        labels[i][f"{prefix}.{sub}"] = "W8A8SC"
                    bar.update(1)
                else:
                    parts[i][f"{prefix}.{leaf}"] = t
                    labels[i][f"{prefix}.{leaf}"] = "W8A8S" if prefix in w8a8s else "FLOAT"
    bar.close()
    out_manifest = dict(manifest)
    out_manifest.update(format=format_tag(NAME), quant_type=NAME,
                        files=[part_name(i, tp_size) for i in range(tp_size)],
                        w8a8sc={"tp_size": tp_size, "tiling": list(tiling), "weight_file": WEIGHT_FILE,
                                "description_file": DESCRIPTION_FILE, "layers": plan,
                                "compressed": sorted(w8a8s)})  # fmt: skip
    return parts, labels, out_manifest


def _read_w8a8s(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(manifest, file tensors, description, config) of a W8A8S checkpoint directory."""
    manifest = ck.read_manifest(directory)
    if manifest.get("format") != format_tag(ms.NAME):
        raise SlimquantError(f"{directory}: slimquant compress reads msModelSlim-layout W8A8S checkpoints (format "
                             f"{format_tag(ms.NAME)!r}), not {manifest.get('format')!r}")  # fmt: skip
    tensors = ck.read_tensors(directory, manifest["files"])
    desc_path = directory / ms.description_file(manifest["quant_type"])
    description = json.loads(desc_path.read_text(encoding="utf-8")) if desc_path.is_file() else {}
    cfg = directory / "config.json"
    config = json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else {}
    return manifest, tensors, description, config


def _extra_files(directory: Path, manifest: dict[str, Any]) -> list[Path]:
    """The W8A8S checkpoint's files a W8A8SC directory keeps as they are (tokenizer, generation config, report)."""
    skip = {ck.MANIFEST, "config.json", *manifest["files"], ms.description_file(manifest["quant_type"])}
    skip |= {f"{f}.index.json" for f in manifest["files"]} | {ms.weight_file(manifest["quant_type"]) + ".index.json"}
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name not in skip and not p.name.startswith("."))


def write_w8a8sc(directory: str | os.PathLike, parts: list[dict[str, torch.Tensor]], labels: list[dict[str, Any]],
                 manifest: dict[str, Any], config: dict[str, Any], extra_files: Iterable[Path] = (), *,
                 overwrite: bool = False, force_overwrite: bool = False, protect: Iterable[str | os.PathLike] = (),
                 tokenizer: Any = None) -> Path:  # fmt: skip
    """Write a W8A8SC directory atomically (see the module doc)."""
    from slimquant.formats.atomic import atomic_directory
    from slimquant.formats.safetensors_io import write_safetensors

    with atomic_directory(directory, overwrite, list(protect), force_overwrite) as tmp:
        for i, (tensors, desc) in enumerate(zip(parts, labels)):
            d = tmp / part_name(i, len(parts))
            d.mkdir()
            write_safetensors(d / WEIGHT_FILE, [(n, tuple(t.shape), t.dtype, lambda t=t: t) for n, t in tensors.items()])
            ck.write_json(d / DESCRIPTION_FILE, desc)
        ck.write_json(tmp / "config.json", {**config, "quantize": NAME})
        ck.write_json(tmp / ck.MANIFEST, manifest)
        for f in extra_files:
            shutil.copy2(f, tmp / f.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(directory)


def compress(model_path: str | os.PathLike, save_directory: str | os.PathLike, tp_size: int = 1,
             tiling: tuple[int, int] = TILING, overwrite: bool = False, force_overwrite: bool = False,
             impl: str = "native", show_progress: bool = True) -> Path:  # fmt: skip
    """``slimquant compress``: the W8A8S checkpoint at ``model_path`` -> a W8A8SC directory at ``save_directory``
    (``tp_size`` parts, each weight compressed after the split). The input is never modified or replaced."""
    from slimquant.formats.atomic import check_target

    src = Path(model_path)
    check_target(save_directory, overwrite, [src], force_overwrite)  # before any work; checked again when renaming
    manifest, tensors, description, config = _read_w8a8s(src)
    parts, labels, out_manifest = split_and_compress(tensors, manifest, description, config, tp_size, tiling, impl,
                                                     where=str(src), show_progress=show_progress)  # fmt: skip
    out = write_w8a8sc(save_directory, parts, labels, out_manifest, config, _extra_files(src, manifest),
                       overwrite=overwrite, force_overwrite=force_overwrite, protect=[src])  # fmt: skip
    log.info("wrote W8A8SC (%d part(s)) to %s", tp_size, out)
    return out


def read_parts(directory: Path, manifest: dict[str, Any], impl: str = "native") -> dict[str, torch.Tensor]:
    """A W8A8SC directory -> the W8A8S file tensors it was made from, exactly (every part present and checked)."""
    meta = manifest.get("w8a8sc")
    if (not isinstance(meta, dict) or not isinstance(meta.get("tp_size"), int) or meta["tp_size"] < 1
            or not isinstance(meta.get("layers"), dict)):  # fmt: skip
        raise SlimquantError(f"{directory / ck.MANIFEST}: 'w8a8sc' (tp_size, layers) is missing or invalid")
    tp_size = meta["tp_size"]
    parts: list[dict[str, torch.Tensor]] = []
    for i in range(tp_size):
        d = directory / part_name(i, tp_size)
        if not d.is_dir():
            raise SlimquantError(f"W8A8SC checkpoint {directory}: part {part_name(i, tp_size)} is missing (all "
                                 f"{tp_size} parts are needed)")  # fmt: skip
        parts.append(ck.read_tensors(d, [WEIGHT_FILE]))
    names = set(parts[0])
    for i, p in enumerate(parts[1:], 1):
        if set(p) != names:
            diff = sorted(names ^ set(p))[:3]
            raise SlimquantError(f"W8A8SC checkpoint {directory}: {part_name(i, tp_size)} holds other tensors than "
                                 f"{part_name(0, tp_size)} (e.g. {', '.join(diff)})")  # fmt: skip
    plan: dict[str, str] = meta["layers"]
    compressed = set(meta.get("compressed", []))
    out: dict[str, torch.Tensor] = {}
    grouped: dict[str, list[dict[str, torch.Tensor]]] = {}
    for name in parts[0]:
        prefix, _, leaf = name.rpartition(".")
        if prefix in plan:
            grouped.setdefault(prefix, [{} for _ in range(tp_size)])
            continue
        for i, p in enumerate(parts[1:], 1):
            if not torch.equal(p[name], parts[0][name]):
                raise SlimquantError(f"W8A8SC checkpoint {directory}: {name} differs between {part_name(0, tp_size)} "
                                     f"and {part_name(i, tp_size)}")  # fmt: skip
        out[name] = parts[0][name]
    for prefix, layer_parts in grouped.items():
        for i, p in enumerate(parts):
            where = f"{directory / part_name(i, tp_size)}: {prefix}"
            leaves = {n.rpartition(".")[2]: t for n, t in p.items() if n.rpartition(".")[0] == prefix}
            if prefix in compressed:
                for need in ("weight", "index", "info"):
                    if need not in leaves:
                        raise SlimquantError(f"{where}.{need} is missing")
                w = decompress_weight(Compressed(leaves.pop("weight"), leaves.pop("index"), leaves.pop("info")), where,
                                      impl)  # fmt: skip
                leaves["weight"] = w
            layer_parts[i] = leaves
        merged = merge_layer(prefix, layer_parts, plan[prefix], str(directory))
        out.update({f"{prefix}.{leaf}": t for leaf, t in merged.items()})
    return out


class W8A8SCCodec(Codec):
    """W8A8SC: W8A8S split for tensor parallelism and compressed (see module doc). ``save`` takes ``tp_size``
    (default 1) and ``tiling``."""

    name = NAME
    description = "msModelSlim W8A8SC layout: W8A8S weights split into partI-of-N and rANS-compressed with an index"

    def save(self, result: Any, directory: str | os.PathLike, *, tokenizer: Any = None, overwrite: bool = False,
             force_overwrite: bool = False, protect: Iterable[str | os.PathLike] = (), tp_size: int = 1,
             tiling: tuple[int, int] = TILING, **options: Any) -> Path:  # fmt: skip
        ck.check_save_options(NAME, options, None)
        entries, description, manifest = ms.export_state(result)
        tensors = {name: produce() for name, _, _, produce in entries}
        config = ck.config_dict(result.model)
        parts, labels, out_manifest = split_and_compress(tensors, manifest, description, config, tp_size, tiling,
                                                         show_progress=False)  # fmt: skip
        protect = list(protect) + ck.model_sources(result.model, result.tensor_source)
        return write_w8a8sc(directory, parts, labels, out_manifest, config, overwrite=overwrite,
                            force_overwrite=force_overwrite, protect=protect, tokenizer=tokenizer)  # fmt: skip

    def weight_files(self, directory: Path, manifest: dict[str, Any]) -> list[Path]:
        return [directory / part / WEIGHT_FILE for part in manifest["files"]]

    def load_into(self, model: nn.Module, directory: Path, manifest: dict[str, Any]) -> nn.Module:
        ck.rebuild(model, manifest)
        tensors = read_parts(directory, manifest)
        ck.resolve_aliases(tensors, manifest.get("aliases", {}))
        ck.check_tensors(directory, ms._expected(model), tensors, ck.strict_dtype_prefixes(model, manifest))
        return ck.finish_load(model, directory, manifest, ms._decode(model, directory, tensors))


CODEC = register_codec(W8A8SCCodec)
