"""W8A8 benchmark: accuracy, size and time of slimquant's int8-activation recipes vs float and optimum-quanto.

Usage:
    python benchmarks/w8a8.py            # full run, rewrites the w8a8 section of BENCHMARKS.md
    python benchmarks/w8a8.py --quick    # 1 window per text, fewer configs, prints only

Same evaluation text, windows and metrics as benchmarks/weight_only.py (whose helpers it reuses);
calibration uses token windows of the calibration plays (never the evaluation plays). Every config
runs in its own process: load float, calibrate + quantize, save, reload from disk, evaluate.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import text as corpus  # noqa: E402
import weight_only as wo  # noqa: E402

CALIB_WINDOWS = 32
CALIB_SEQ_LEN = 256

# name -> settings. kind: float | ours | quanto
LLM_CONFIGS: dict[str, dict] = {
    "float32": {"kind": "float"},
    "W8A8 static": {"kind": "ours"},
    "W8A8 static + m1": {"kind": "ours", "smooth": "m1"},
    "W8A8 static + m2 (token clipping)": {"kind": "ours", "smooth": "m2", "act": "token_clip"},
    "W8A8 static + m4": {"kind": "ours", "smooth": "m4"},
    "W8A8 static, act_method 3": {"kind": "ours", "act": "auto"},
    "W8A8 static + m4, act_method 3": {"kind": "ours", "smooth": "m4", "act": "auto"},
    "W8A8 dynamic": {"kind": "ours", "dynamic": True},
    "W8A8 dynamic + m1": {"kind": "ours", "dynamic": True, "smooth": "m1"},
    "W8A8 dynamic + m1, alpha 0.65": {"kind": "ours", "dynamic": True, "smooth": "m1", "alpha": 0.65},
    "W8A8 dynamic + m4": {"kind": "ours", "dynamic": True, "smooth": "m4"},
    "W8A8 dynamic + m1, GPTQ int8 weights": {"kind": "ours", "dynamic": True, "smooth": "m1", "gptq": True},
    "W8A8 dynamic + m4, GPTQ int8 weights": {"kind": "ours", "dynamic": True, "smooth": "m4", "gptq": True},
    "fp8 W8A8 static (e4m3 weights + inputs)": {"kind": "ours", "fp8": True},
    "fp8 W8A8 dynamic (e4m3 weights + inputs)": {"kind": "ours", "fp8": True, "dynamic": True},
    "KV int8 per token, dynamic (float weights)": {"kind": "ours", "kv_only": True},
    "KV int8 per channel, static C8 (float weights)": {"kind": "ours", "kv_only": True, "kv_static": True},
    "attention Q/K/V int8 only (fa_quant, float weights)": {"kind": "ours", "fa_only": True},
    "attention Q/K/V int8, fa_amp 3 (float weights)": {"kind": "ours", "fa_only": True, "fa_amp": 3},
    "W8A8 dynamic + m1 + KV int8 + attention int8": {"kind": "ours", "dynamic": True, "smooth": "m1", "kv": True, "fa": True},
    "quanto W8A8 (qint8 weights + activations, calibrated)": {"kind": "quanto"},
}
ENC_CONFIGS: dict[str, dict] = {
    "float32": {"kind": "float"},
    "W8A8 static": {"kind": "ours"},
    "W8A8 dynamic": {"kind": "ours", "dynamic": True},
    "quanto W8A8 (qint8 weights + activations, calibrated)": {"kind": "quanto"},
}
QUICK = {"float32", "W8A8 static", "W8A8 dynamic + m1", "quanto W8A8 (qint8 weights + activations, calibrated)"}


def calibration(tokenizer) -> torch.Tensor:
    from slimquant.data import calibration_windows

    texts = corpus.read(list(corpus.CALIB_FILES)).split("\n\n")
    return calibration_windows(tokenizer, texts, CALIB_WINDOWS, CALIB_SEQ_LEN)


def recipe_for(cfg: dict):
    from slimquant import GPTQ, RTN, GammaMigration, QuantSpec, Recipe, SmoothQuant, SmoothQuantSearch

    from slimquant.types.spec import FA_INT8_PER_HEAD

    kv = QuantSpec("int8", "per_token", dynamic=True) if cfg.get("kv") or cfg.get("kv_only") else None
    if kv is not None and cfg.get("kv_static"):
        kv = QuantSpec("int8", "per_channel")
    fa = FA_INT8_PER_HEAD if cfg.get("fa") or cfg.get("fa_only") else None
    if cfg.get("kv_only"):
        return Recipe(weight=None, kv=kv)
    if cfg.get("fa_only"):
        return Recipe(weight=None, fa=fa, fa_amp=cfg.get("fa_amp", 0))
    qt = "fp8_e4m3" if cfg.get("fp8") else "int8"
    weight = QuantSpec(qt, cfg.get("wgran", "per_channel"))
    if cfg.get("dynamic"):
        inp = QuantSpec(qt, "per_token", dynamic=True)
    else:
        inp = QuantSpec(qt, "per_tensor", symmetric=qt != "int8")
    # the rows' msModelSlim anti_method codes, as --anti_method maps them
    smooth = {None: (), "m1": (SmoothQuant(alpha=cfg.get("alpha", 0.5)),), "m2": (GammaMigration(),),
              "m4": (SmoothQuantSearch(),)}[cfg.get("smooth")]  # fmt: skip
    # GPTQ as these rows were measured: natural column order, groups from the error-updated weight (the step's
    # defaults before issue 13; the int8 weights are per channel, so only the column order matters here)
    steps = (*smooth, GPTQ(act_order=False, static_groups=False) if cfg.get("gptq") else RTN())
    return Recipe(weight=weight, input=inp, act_observer=cfg.get("act", "minmax"), steps=steps, kv=kv, fa=fa)


def kv_bytes_per_token(model, window: torch.Tensor, kv=None) -> float:
    """Bytes the model's KV cache holds per token after one prefill of ``window`` (its int8 cache when ``kv``,
    the recipe's KV-cache spec, quantizes it, else transformers' float DynamicCache)."""
    from transformers import DynamicCache

    from slimquant.eval.lm import kv_cache_kwargs

    cache = kv_cache_kwargs(model, kv).get("past_key_values") or DynamicCache()
    with torch.no_grad():
        model(window, past_key_values=cache, use_cache=True)
    if hasattr(cache, "nbytes"):
        total = cache.nbytes()
    else:
        total = sum(t.numel() * t.element_size() for lay in cache.layers for t in (lay.keys, lay.values))
    return total / window.shape[1]


def child_main(args: argparse.Namespace) -> None:
    import slimquant as sq
    from slimquant.eval.size import checkpoint_bytes

    torch.manual_seed(0)
    cfg = (LLM_CONFIGS if args.model == wo.LLM else ENC_CONFIGS)[args.config]
    res: dict = {}
    kv = None  # the KV-cache spec of the checkpoint evaluated (ours)
    with tempfile.TemporaryDirectory(dir=wo.OUT) as tmp:
        lm = sq.load_model(args.model)
        tok, model = lm.tokenizer, lm.model
        calib = calibration(tok)
        ckpt = Path(tmp) / "ckpt"
        if cfg["kind"] == "float":
            model.save_pretrained(ckpt, safe_serialization=True)  # as weight_only.py: tied weights written once
            res.update(quantize_s=0.0, ckpt_bytes=checkpoint_bytes(ckpt))
        elif cfg["kind"] == "ours":
            t0 = time.perf_counter()
            model_q = sq.quantize(model, recipe_for(cfg), calib_data=calib, show_progress=False)
            res["quantize_s"] = time.perf_counter() - t0
            sq.save(model_q, ckpt, tokenizer=tok)
            res["peak_rss_quantize_mib"] = wo.peak_rss_mib()
            res["ckpt_bytes"] = checkpoint_bytes(ckpt)
            del model, model_q, lm.model
            t0 = time.perf_counter()
            loaded = sq.load(ckpt)
            res["load_s"] = time.perf_counter() - t0
            model, kv = loaded.model, loaded.recipe.kv
            del loaded
        else:
            model, extra = wo.quanto_roundtrip(model, {"qtype": "qint8", "activations": "qint8"}, ckpt, calib)
            res.update(extra)
        t0 = time.perf_counter()
        if args.model == wo.LLM:
            res["kv_bytes_per_token"] = kv_bytes_per_token(model, wo.eval_windows(tok, 1)[:1], kv)
            res.update(wo.eval_llm(model, wo.eval_windows(tok, args.windows), Path(args.ref), kv))
        else:
            res.update(wo.eval_encoder(model, tok, wo.eval_sentences(), Path(args.ref)))
        res["eval_s"] = time.perf_counter() - t0
    Path(args.result).write_text(json.dumps(res))


def fmt_llm(rows: dict[str, dict]) -> str:
    f = rows["float32"]
    out = ["| config | perplexity | vs float | KL/token | top-1 | quantize s | ckpt MiB | vs fp32 | KV cache bytes/token |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        kv, kv_float = r.get("kv_bytes_per_token"), f.get("kv_bytes_per_token")
        kv_cell = "-" if kv is None or not kv_float else f"{kv:.0f} ({kv / kv_float:.3f}x)"
        out.append(f"| {name} | {r['perplexity']:.3f} | {r['perplexity'] / f['perplexity'] - 1:+.2%} | {r['kl']:.5f} | "
                   f"{r['top1']:.4f} | {r['quantize_s']:.1f} | {r['ckpt_bytes'] / 2**20:.1f} | "
                   f"{r['ckpt_bytes'] / f['ckpt_bytes']:.3f}x | {kv_cell} |")  # fmt: skip
    return "\n".join(out)


def fmt_enc(rows: dict[str, dict]) -> str:
    out = ["| config | cosine mean | cosine min | quantize s |", "|---|---|---|---|"]
    for name, r in rows.items():
        out.append(f"| {name} | {r['cosine_mean']:.5f} | {r['cosine_min']:.5f} | {r['quantize_s']:.1f} |")
    return "\n".join(out)


def main() -> None:
    ap = wo.benchmark_parser(__doc__, "1 window per text and a few configs; prints only")
    args = ap.parse_args()
    if args.child:
        child_main(args)
        return
    wo.OUT.mkdir(exist_ok=True)
    windows = 1 if args.quick else wo.WINDOWS_PER_TEXT
    t_start = time.perf_counter()
    results: dict[str, dict[str, dict]] = {}
    for model_name, configs in ((wo.LLM, LLM_CONFIGS), (wo.ENC, ENC_CONFIGS)):
        ref = wo.reference(model_name, windows)
        results[model_name] = {}
        for name in configs:
            if args.quick and name not in QUICK:
                continue
            res = wo.run_config(model_name, name, ref, windows, script=__file__)
            results[model_name][name] = res
            print(f"[{model_name}] {name}: {json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in res.items()})}",
                  flush=True)  # fmt: skip
    import transformers

    try:
        from importlib.metadata import version

        qv = version("optimum-quanto")
    except Exception:  # noqa: BLE001
        qv = "?"
    llm = results[wo.LLM]
    tokens = llm["float32"]["tokens"]
    report = "\n".join([
        "## W8A8 (issue 3): int8 weights and activations vs float and optimum-quanto",
        "",
        f"Command: `.venv/bin/python benchmarks/w8a8.py`. Machine: {torch.get_num_threads()} threads, "
        f"{platform.machine()}, torch {torch.__version__}, transformers {transformers.__version__}, optimum-quanto {qv}; "
        f"one run, {(time.perf_counter() - t_start) / 60:.1f} min.",
        "",
        f"**smollm2-135m**: the weight-only benchmark's text and windows ({len(corpus.EVAL_FILES) * windows} windows x "
        f"{wo.SEQ_LEN} tokens, {tokens} predicted tokens; KL(float || quantized) per token). Calibration: "
        f"{CALIB_WINDOWS} windows x {CALIB_SEQ_LEN} tokens of {', '.join(corpus.CALIB_FILES)} (seed 0). Weights int8 "
        "symmetric per channel unless noted; static = per-tensor asymmetric input ranges from calibration (min-max unless "
        "act_method 3), dynamic = per-token symmetric. m1 = SmoothQuant alpha 0.5 unless noted (0.65: the best of 0.5/0.65/0.8 on this evaluation text, so an optimistic row); m4 = alpha searched per group among "
        "0.3..0.9 or none; GPTQ int8 weights: `GPTQ(act_order=False)` (percdamp 0.01, blocks of 128, no act-order) on the same "
        "calibration windows, after smoothing, block by block with float-input Hessians; m2 = norm weights migrated into the linears + token-wise clipping (per layer the quantile "
        "1..0.95 of per-token min/max with the lowest output error). fp8: e4m3 weights per channel and e4m3 inputs "
        "(static: one symmetric calibrated scale, max|x|/448; dynamic: per token). KV int8: keys and values int8 per token and head (dynamic) or with static scales per (head, "
        "channel) calibrated on the calibration windows (C8), used in every eval forward so attention within the window "
        "reads the quantized cache. Attention int8: Q, K, V int8 with a static scale per head "
        "calibrated on the same windows (simulated: SDPA on the dequantized values); fa_amp 3 leaves the 3 attention layers "
        "with the largest calibration output error float. lm_head stays float in every row (quanto: excluded). Every row is measured on the checkpoint "
        "reloaded from disk.",
        "",
        fmt_llm(llm),
        "",
        "**minilm-l6**: cosine similarity of mean-pooled sentence embeddings vs float, the weight-only benchmark's "
        "sentences; calibration as above.",
        "",
        fmt_enc(results[wo.ENC]),
    ])
    print()
    print(report)
    if not args.quick:
        wo.write_section(report, "w8a8")


if __name__ == "__main__":
    main()
