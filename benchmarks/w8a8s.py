"""W8A8S and W8A8SC benchmark (issue 16, items 1-2) on smollm2-135m.

Accuracy: W8A8S (msModelSlim's sparse quantization) at --fraction 0.01 / 0.05 / 0.1, with searched smoothing (m4) and
with GPTQ on the W8A8S grid, and the seed's own example command (with GPTQ weights), beside W8A8 static per-channel and W4A16 per-channel rows,
all on the same evaluation and calibration windows as benchmarks/gptq.py.
Compression: each W8A8S checkpoint compressed to W8A8SC (``slimquant compress``, --tp_size 1 and 3); the
compressed bytes per layer kind against the int8 weights and against zstd (level 19) and lzma (preset 9) of the
same int8 bytes (per part, tp 1); decompression time of all weights (native and numpy reference); the W8A8SC
model's logits compared with the W8A8S model's.

Usage:
    python benchmarks/w8a8s.py            # writes the w8a8s section of BENCHMARKS.md
    python benchmarks/w8a8s.py --quick    # 1 evaluation window per text, three configs; prints only

Every config runs in its own process: load float, quantize, save, reload from disk, evaluate, compress, reload.
"""

from __future__ import annotations

import json
import lzma
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import text as corpus  # noqa: E402
import w8a8  # noqa: E402
import weight_only as wo  # noqa: E402

SEED_FLAGS = "--act_method 2 --do_smooth True --use_sigma True --is_lowbit True --co_sparse True --w_bit 4"
# name -> (msModelSlim flags, W8A8S: compress it)
CONFIGS: dict[str, tuple[str, bool]] = {
    "W8A8 per-channel": ("--a_bit 8 --mm_tensor False", False),
    "W8A8 per-channel m4": ("--a_bit 8 --mm_tensor False --anti_method m4", False),
    "W4A16 per-channel RTN": ("--w_bit 4", False),
    "W4A16 per-channel GPTQ": ("--w_bit 4 --w_method gptq", False),
    "W8A8S co_sparse fraction 0.01": ("--co_sparse True --fraction 0.01", True),
    "W8A8S co_sparse fraction 0.05": ("--co_sparse True --fraction 0.05", True),
    "W8A8S co_sparse fraction 0.1": ("--co_sparse True --fraction 0.1", True),
    "W8A8S co_sparse fraction 0.01 m4": ("--co_sparse True --fraction 0.01 --anti_method m4", True),
    "W8A8S is_lowbit fraction 0.01 GPTQ": ("--is_lowbit True --fraction 0.01 --w_method gptq", True),
    "W8A8S is_lowbit fraction 0.01 m4 GPTQ": ("--is_lowbit True --fraction 0.01 --do_smooth True --w_method gptq", True),
    "W8A8S is_lowbit fraction 0.05 GPTQ": ("--is_lowbit True --fraction 0.05 --w_method gptq", True),
    "W8A8S seed command + GPTQ (down_proj float)": (f"{SEED_FLAGS} --w_method gptq", True),
}
QUICK = {"W8A8 per-channel", "W8A8S co_sparse fraction 0.01", "W8A8S co_sparse fraction 0.01 m4"}
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DECODE_REPEATS = 5
TP = 3  # smollm2-135m has 9 attention heads and 3 KV heads: 3 parts is the smallest split they allow


def flags_for(name: str, n_layers: int) -> str:
    flags, _ = CONFIGS[name]
    if "seed command" in name:
        flags += " --disable_names " + " ".join(f"model.layers.{i}.mlp.down_proj" for i in range(n_layers))
    return flags


def compression(ckpt: Path, out: Path) -> dict:
    """Compress ``ckpt`` (W8A8S) at tp 1 and 2; bytes per layer kind, general-purpose compressors, decode time."""
    import zstandard
    from safetensors.torch import load_file

    from slimquant.formats import w8a8sc as sc

    res: dict = {}
    src = load_file(str(ckpt / "quant_model_weight_w8a8s.safetensors"))
    for tp in (1, TP):
        t0 = time.perf_counter()
        d = sc.compress(ckpt, out / f"tp{tp}", tp_size=tp, show_progress=False)
        res[f"compress_s_tp{tp}"] = time.perf_counter() - t0
        kinds: dict[str, dict[str, int]] = {}
        for part in sorted(d.glob("part*-of-*")):
            tensors = load_file(str(part / sc.WEIGHT_FILE))
            for name, t in tensors.items():
                prefix, _, leaf = name.rpartition(".")
                kind = prefix.rpartition(".")[2]
                if leaf not in ("weight", "index", "info") or f"{prefix}.info" not in tensors:
                    continue
                k = kinds.setdefault(kind, {"int8": 0, "w8a8sc": 0, "zstd": 0, "lzma": 0, "outliers": 0})
                k["w8a8sc"] += t.numel() * t.element_size()
                if leaf == "info":
                    n, kk = int(t[1]), int(t[2])
                    k["int8"] += n * kk
                    if tp == 1:
                        raw = src[f"{prefix}.weight"].contiguous().numpy().tobytes()
                        k["zstd"] += len(zstandard.ZstdCompressor(level=19).compress(raw))
                        k["lzma"] += len(lzma.compress(raw, preset=9))
                        w = src[f"{prefix}.weight"].to(torch.int16)
                        k["outliers"] += int(((w < -8) | (w > 7)).sum())
        res[f"kinds_tp{tp}"] = kinds
        res[f"part_file_bytes_tp{tp}"] = sum(f.stat().st_size for f in d.glob("part*-of-*/*.safetensors"))
    res["w8a8s_file_bytes"] = (ckpt / "quant_model_weight_w8a8s.safetensors").stat().st_size
    # decompression of every weight of the tp-1 directory: native (median of repeats) and the numpy reference
    tensors = load_file(str(out / "tp1" / "part0-of-1" / sc.WEIGHT_FILE))
    items = [sc.Compressed(tensors[f"{p}.weight"], tensors[f"{p}.index"], tensors[f"{p}.info"])
             for p in {n.rpartition(".")[0] for n in tensors if n.endswith(".info")}]  # fmt: skip
    times = []
    for _ in range(DECODE_REPEATS):
        t0 = time.perf_counter()
        for c in items:
            sc.decompress_weight(c, "bench", impl="native")
        times.append(time.perf_counter() - t0)
    res["decode_native_s"] = statistics.median(times)
    res["decoded_weights"] = sum(int(c.info[1]) * int(c.info[2]) for c in items)
    # the numpy reference on the first block's weights only (it runs ~1000x slower)
    first = [sc.Compressed(tensors[f"{p}.weight"], tensors[f"{p}.index"], tensors[f"{p}.info"])
             for p in {n.rpartition(".")[0] for n in tensors if n.endswith(".info") and ".layers.0." in n}]  # fmt: skip
    t0 = time.perf_counter()
    for c in first:
        sc.decompress_weight(c, "bench", impl="reference")
    res["decode_reference_s_block0"] = time.perf_counter() - t0
    res["decoded_weights_block0"] = sum(int(c.info[1]) * int(c.info[2]) for c in first)
    from slimquant.kernels import native

    res["native_threads"] = torch.get_num_threads()
    res["native"] = native.codec_library() is not None
    return res


def child_main(args) -> None:  # noqa: ANN001
    import slimquant as sq
    from slimquant.types.flags import recipe_from_flags

    torch.manual_seed(0)
    res: dict = {}
    name = args.config
    with tempfile.TemporaryDirectory(dir=wo.OUT) as tmp:
        lm = sq.load_model(args.model)
        tok, model = lm.tokenizer, lm.model
        recipe = recipe_from_flags(flags_for(name, model.config.num_hidden_layers))
        ckpt = Path(tmp) / "ckpt"
        calib = w8a8.calibration(tok)
        t0 = time.perf_counter()
        result = sq.quantize(model, recipe, calib_data=calib, show_progress=False)
        res["quantize_s"] = time.perf_counter() - t0
        sq.save(result, ckpt, tokenizer=tok)
        del model, lm.model, result
        windows = wo.eval_windows(tok, args.windows)
        loaded = sq.load(ckpt)
        with torch.no_grad():
            res.update(wo.eval_llm(loaded.model, windows, Path(args.ref)))
            if CONFIGS[name][1]:
                res["compression"] = compression(ckpt, Path(tmp) / "sc")
                probe = windows[:1]
                want = loaded.model(probe).logits
                for tp in (1, TP):
                    got = sq.load(Path(tmp) / "sc" / f"tp{tp}").model(probe).logits
                    res["compression"][f"logits_equal_tp{tp}"] = bool(torch.equal(got, want))
    Path(args.result).write_text(json.dumps(res))


def render(rows: dict[str, dict], tokens: int, windows: int, elapsed: float) -> str:
    import transformers
    import zstandard

    lines = [
        "## W8A8S and W8A8SC (issue 16): sparse quantization and compression on smollm2-135m",
        "",
        f"Command: `.venv/bin/python benchmarks/w8a8s.py`. Machine: {torch.get_num_threads()} threads, "
        f"{platform.machine()}, torch {torch.__version__}, transformers {transformers.__version__}, zstandard "
        f"{zstandard.__version__}; one run, {elapsed / 60:.1f} min.",
        "",
        f"**Accuracy**, gptq.py's protocol: {len(corpus.EVAL_FILES) * windows} windows x {wo.SEQ_LEN} tokens of "
        f"{', '.join(corpus.EVAL_FILES)} ({tokens} predicted tokens; KL(float || quantized) per token); calibration "
        f"{w8a8.CALIB_WINDOWS} windows x {w8a8.CALIB_SEQ_LEN} tokens of {', '.join(corpus.CALIB_FILES)}; lm_head "
        "float; each row's msModelSlim flags are quoted; measured on the checkpoint reloaded from disk. W8A8 rows: "
        "static per-tensor int8 inputs (min-max unless the flags say otherwise). *outliers*: the share of W8A8S weight "
        "values outside [-8, 7].",
        "",
        "| config | flags | perplexity | KL/token | top-1 | quantize s | outliers |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        c = r.get("compression")
        out = "-"
        if c:
            k = c["kinds_tp1"]
            out = f"{100 * sum(v['outliers'] for v in k.values()) / sum(v['int8'] for v in k.values()):.2f}%"
        flags = CONFIGS[name][0] + (" --disable_names <every down_proj>" if "seed command" in name else "")
        lines.append(f"| {name} | `{flags}` | {r['perplexity']:.3f} | {r['kl']:.5f} | {r['top1']:.4f} | "
                     f"{r['quantize_s']:.1f} | {out} |")  # fmt: skip
    comp = {n: r["compression"] for n, r in rows.items() if "compression" in r}
    if comp:
        lines += ["", "**W8A8SC size** (`slimquant compress --tp_size 1`; tiles 128 x 512): compressed bytes "
                  "(stream + index + info) against the int8 weight bytes, and zstd -19 / lzma -9 of the same int8 "
                  "bytes, per layer; *x* = int8 bytes / compressed bytes.", "",
                  "| config | layer kind | int8 MB | W8A8SC MB | W8A8SC x | zstd x | lzma x |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, c in comp.items():
            kinds = c["kinds_tp1"]
            tot = {f: sum(v[f] for v in kinds.values()) for f in ("int8", "w8a8sc", "zstd", "lzma")}
            for kind in (*[k for k in KINDS if k in kinds], "all"):
                v = tot if kind == "all" else kinds[kind]
                label = f"**{kind}**" if kind == "all" else kind
                lines.append(f"| {name} | {label} | {v['int8'] / 1e6:.2f} | {v['w8a8sc'] / 1e6:.2f} | "
                             f"{v['int8'] / v['w8a8sc']:.2f} | {v['int8'] / v['zstd']:.2f} | "
                             f"{v['int8'] / v['lzma']:.2f} |")  # fmt: skip
        lines += ["", "**Files, tensor parallelism, decompression**: the weight file of the W8A8S checkpoint against "
                  "the W8A8SC parts' files (all tensors: embeddings and norms are whole in every part); decoding every "
                  f"compressed weight of the tp-1 directory (checksums included), median of {DECODE_REPEATS} "
                  "runs (native; MB/s of int8 weights out), and the numpy reference on the first block's weights "
                  "(once); *logits equal*: the reloaded W8A8SC model's logits on one "
                  "window, bit for bit against the W8A8S model's.", "",
                  f"| config | W8A8S file MB | W8A8SC tp1 MB | W8A8SC tp{TP} MB ({TP} parts) | compress s tp1 / tp{TP} | "
                  f"decode native s | native MB/s | reference MB/s | logits equal tp1 / tp{TP} |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, c in comp.items():
            mbs = c["decoded_weights"] / 1e6 / c["decode_native_s"]
            ref_mbs = c["decoded_weights_block0"] / 1e6 / c["decode_reference_s_block0"]
            lines.append(f"| {name} | {c['w8a8s_file_bytes'] / 1e6:.1f} | {c['part_file_bytes_tp1'] / 1e6:.1f} | "
                         f"{c[f'part_file_bytes_tp{TP}'] / 1e6:.1f} | {c['compress_s_tp1']:.1f} / {c[f'compress_s_tp{TP}']:.1f} | "
                         f"{c['decode_native_s']:.3f} | {mbs:.0f} | {ref_mbs:.2f} | "
                         f"{c['logits_equal_tp1']} / {c[f'logits_equal_tp{TP}']} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    wo.benchmark_main(__doc__, "1 window per text, three configs; prints only", CONFIGS, QUICK, __file__, child_main,
                      wo.by_tokens(render), "w8a8s")

if __name__ == "__main__":
    main()
