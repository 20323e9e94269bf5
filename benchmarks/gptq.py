"""Low-bit weight benchmark (issue 4): RTN, RTN + clipping search, GPTQ, AWQ and GPTQ + AWQ on smollm2-135m.

Usage:
    python benchmarks/gptq.py            # full run, rewrites the gptq section of BENCHMARKS.md
    python benchmarks/gptq.py --quick    # 1 window per text, three configs, prints only
    python benchmarks/gptq.py --only "W3A16 g64 RTN,W3A16 g64 AWQ"   # these configs (and float), prints only

Same evaluation text, windows and metrics as benchmarks/weight_only.py (whose helpers it reuses);
calibration as benchmarks/w8a8.py (token windows of the calibration plays, never the evaluation plays).
Every config runs in its own process: load float, quantize, save, reload from disk, evaluate.
llm-compressor's GPTQModifier runs in its own virtual environment (benchmarks/out/llmc-venv, created on first
use; benchmarks/llmc_gptq.py) on the same exported float checkpoint and calibration windows.
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
import w8a8  # noqa: E402
import weight_only as wo  # noqa: E402

# name -> (bits, group size or None); method -> (algorithm, clip search, act order, AWQ, static groups)
SHAPES = {"W4A16 g64": (4, 64), "W4A16 per-channel": (4, None), "W3A16 g64": (3, 64), "W2A16 g32": (2, 32)}
METHODS = {"RTN": ("rtn", False, False, False, False), "RTN +clip": ("rtn", True, False, False, False),
           "GPTQ": ("gptq", False, False, False, False), "GPTQ static-groups": ("gptq", False, False, False, True),
           "GPTQ act-order": ("gptq", False, True, False, True), "AWQ": ("rtn", False, False, True, False),
           "GPTQ act-order +AWQ": ("gptq", False, True, True, True)}  # fmt: skip
CONFIGS: dict[str, dict] = {"float32": {"kind": "float"}}
for shape, (bits, group) in SHAPES.items():
    for method, (algo, clip, act, awq, static) in METHODS.items():
        if static and not act and group is None:
            continue  # per-channel: one group, static is the same as dynamic
        CONFIGS[f"{shape} {method}"] = {"kind": "ours", "shape": shape, "bits": bits, "group": group, "algo": algo,
                                        "clip": clip, "act": act, "awq": awq, "static": static}  # fmt: skip
# llm-compressor's GPTQModifier, W4A16 g64 asymmetric (integer zero point), lm_head ignored, its own venv
LLMC_SPEC = "llmcompressor==0.14.0.1"
LLMC_VENV = wo.OUT / "llmc-venv"
for act in (False, True):
    CONFIGS[f"W4A16 g64 llm-compressor GPTQ{' act-order' if act else ''}"] = {"kind": "llmc", "shape": "W4A16 g64",
                                                                             "group": 64, "act": act}  # fmt: skip
QUICK = {"float32", "W4A16 g64 GPTQ", "W3A16 g64 AWQ"}
FLOAT_EXPORT = wo.OUT / "smollm2-135m-hf"
CALIB_EXPORT = wo.OUT / "gptq-calib-windows.safetensors"


def export_float_and_calibration() -> None:
    """The float checkpoint (from the GGUF) and the calibration windows every config uses, as files llm-compressor
    reads too."""
    import slimquant as sq
    from safetensors.torch import save_file

    lm = sq.load_model(wo.LLM)
    if not (FLOAT_EXPORT / "config.json").is_file():
        lm.model.save_pretrained(FLOAT_EXPORT, safe_serialization=True)
        lm.tokenizer.save_pretrained(FLOAT_EXPORT)
    save_file({"input_ids": w8a8.calibration(lm.tokenizer).contiguous()}, str(CALIB_EXPORT))


def ensure_llmc() -> Path:
    """llm-compressor in its own virtual environment (it pins its own transformers); torch pinned to ours."""
    import os
    import subprocess

    py = LLMC_VENV / "bin" / "python"
    if not py.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(LLMC_VENV)], check=True)
        torch_spec = os.environ.get("TORCH_SPEC", f"torch=={torch.__version__.split('+')[0]}")
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", torch_spec, LLMC_SPEC], check=True)
    return py


def llmc_child(cfg: dict, tmp: Path) -> tuple[dict, Path]:
    import subprocess

    out = tmp / "llmc"
    cmd = [str(ensure_llmc()), str(HERE / "llmc_gptq.py"), "--model", str(FLOAT_EXPORT), "--calib", str(CALIB_EXPORT),
           "--out", str(out), "--group", str(cfg["group"]), "--threads", str(torch.get_num_threads())]  # fmt: skip
    if cfg["act"]:
        cmd.append("--actorder")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"llm-compressor run failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1]), out


def recipe_for(cfg: dict):
    from slimquant import AWQ, GPTQ, RTN, QuantSpec, Recipe

    gran = "per_group" if cfg["group"] else "per_channel"
    spec = QuantSpec(f"int{cfg['bits']}", gran, cfg["group"], symmetric=False, zero_point="float")
    if cfg["algo"] == "gptq":
        solve = GPTQ(act_order=cfg["act"], static_groups=cfg["static"], clip_search=cfg["clip"])
    else:
        solve = RTN(clip_search=cfg["clip"])
    return Recipe(weight=spec, steps=(AWQ(), solve) if cfg["awq"] else (solve,))


def child_main(args: argparse.Namespace) -> None:
    import slimquant as sq
    from slimquant.eval.size import checkpoint_bytes

    torch.manual_seed(0)
    cfg = CONFIGS[args.config]
    res: dict = {}
    with tempfile.TemporaryDirectory(dir=wo.OUT) as tmp:
        lm = sq.load_model(args.model)
        tok, model = lm.tokenizer, lm.model
        ckpt = Path(tmp) / "ckpt"
        if cfg["kind"] == "llmc":
            info, out = llmc_child(cfg, Path(tmp))
            res.update(quantize_s=info["quantize_s"], peak_rss_quantize_mib=info["peak_rss_quantize_mib"],
                       ckpt_bytes=float("nan"), tool=f"llmcompressor {info['llmcompressor']}, compressed-tensors "
                       f"{info['compressed_tensors']}, transformers {info['transformers']}")  # fmt: skip
            del model, lm.model
            model = sq.load_model(str(out)).model  # its dequantized weights, evaluated with our code
        elif cfg["kind"] == "float":
            model.save_pretrained(ckpt, safe_serialization=True)
            res.update(quantize_s=0.0, ckpt_bytes=checkpoint_bytes(ckpt), peak_rss_quantize_mib=wo.peak_rss_mib())
        else:
            recipe = recipe_for(cfg)
            calib = w8a8.calibration(tok) if recipe.needs_calibration else None
            t0 = time.perf_counter()
            model_q = sq.quantize(model, recipe, calib_data=calib, show_progress=False)
            res["quantize_s"] = time.perf_counter() - t0
            res["peak_rss_quantize_mib"] = wo.peak_rss_mib()
            fallbacks = [r.name for r in model_q.report.layers if r.fallback]
            res["rtn_fallbacks"] = len(fallbacks)
            sq.save(model_q, ckpt, tokenizer=tok)
            res["ckpt_bytes"] = checkpoint_bytes(ckpt)
            del model, model_q, lm.model
            model = sq.load(ckpt).model
        res.update(wo.eval_llm(model, wo.eval_windows(tok, args.windows), Path(args.ref)))
    Path(args.result).write_text(json.dumps(res))


def fmt(rows: dict[str, dict]) -> str:
    out = ["| config | perplexity | KL/token | KL vs RTN | top-1 | quantize s | peak RSS MiB | ckpt MiB |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in rows.items():
        shape = CONFIGS[name].get("shape")
        base = rows.get(f"{shape} RTN") if shape and name != f"{shape} RTN" else None
        vs = f"{r['kl'] / base['kl']:.2f}x" if base and base["kl"] > 0 else "-"
        ckpt = "-" if r["ckpt_bytes"] != r["ckpt_bytes"] else f"{r['ckpt_bytes'] / 2**20:.1f}"  # NaN: no checkpoint of ours
        out.append(f"| {name} | {r['perplexity']:.3f} | {r['kl']:.5f} | {vs} | {r['top1']:.4f} | {r['quantize_s']:.1f} | "
                   f"{r['peak_rss_quantize_mib']:.0f} | {ckpt} |")  # fmt: skip
    return "\n".join(out)


def main() -> None:
    ap = wo.benchmark_parser(__doc__, "1 window per text, three configs; prints only")
    ap.add_argument("--only", default="", help="comma-separated config names (float32 is always run); prints only")
    args = ap.parse_args()
    if args.child:
        child_main(args)
        return
    wo.OUT.mkdir(exist_ok=True)
    windows = 1 if args.quick else wo.WINDOWS_PER_TEXT
    t_start = time.perf_counter()
    ref = wo.reference(wo.LLM, windows)
    rows: dict[str, dict] = {}
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    unknown = only - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown config(s) {sorted(unknown)}; valid: {list(CONFIGS)}")
    export_float_and_calibration()
    if any(CONFIGS[n]["kind"] == "llmc" for n in (only or CONFIGS) if not args.quick):
        ensure_llmc()
    for name in CONFIGS:
        if (args.quick and name not in QUICK) or (only and name not in only | {"float32"}):
            continue
        rows[name] = wo.run_config(wo.LLM, name, ref, windows, script=__file__)
        print(f"{name}: {json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in rows[name].items()})}", flush=True)
    import transformers

    tokens = rows["float32"]["tokens"]
    report = "\n".join([
        "## Low-bit weights (issue 4): RTN vs GPTQ vs AWQ",
        "",
        f"Command: `.venv/bin/python benchmarks/gptq.py`. Machine: {torch.get_num_threads()} threads, {platform.machine()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}; one run, {(time.perf_counter() - t_start) / 60:.1f} min.",
        "",
        f"**smollm2-135m**: the weight-only benchmark's text and windows ({len(corpus.EVAL_FILES) * windows} windows x "
        f"{wo.SEQ_LEN} tokens, {tokens} predicted tokens; KL(float || quantized) per token). All rows asymmetric with a float "
        "zero point (the best RTN variant of the weight-only table). GPTQ (percdamp 0.01, blocks of 128 "
        f"columns), calibrated on {w8a8.CALIB_WINDOWS} windows x {w8a8.CALIB_SEQ_LEN} tokens of "
        f"{', '.join(corpus.CALIB_FILES)} (seed 0), block by block with the whole model in memory; act-order visits "
        "columns by decreasing Hessian diagonal with static groups; static-groups computes every group's parameters "
        "from the float weight up front (as llm-compressor does) instead of from the error-updated weight. Plain GPTQ "
        "rows (groups from the error-updated weight) are what `--w_method gptq` ran before issue 13; it now runs the "
        "act-order rows (`--desc_act False`: static groups in natural order). AWQ: `--anti_method m3` (scale search over 20 ratios "
        "on each smoothing group's block inputs, then AWQ's output-error clipping search for RTN; GPTQ + AWQ solves on the "
        "scaled, unclipped weights), same calibration. *KL vs RTN* = this row's KL / the same shape's RTN KL. "
        "lm_head stays float; every row of ours is measured on the checkpoint reloaded from disk. *llm-compressor*: "
        f"`{LLMC_SPEC}`'s `GPTQModifier` (its own venv: {next((r['tool'] for r in rows.values() if 'tool' in r), 'not run')}; "
        "torch pinned to ours) on the float checkpoint exported from the same GGUF and the same calibration windows "
        "(no shuffling), W4 g64 asymmetric with an integer zero point (its only kind), dampening 0.01, blocks of 128, "
        "actorder none or static, lm_head ignored; its quantized-dequantized weights are evaluated with our code; "
        "quantize s is its `oneshot` call alone, peak RSS its process's.",
        "",
        fmt(rows),
    ])
    print()
    print(report)
    if not args.quick and not only:
        wo.write_section(report, "gptq")


if __name__ == "__main__":
    main()
