"""End-to-end distillation benchmark (issue 15, item 3): slimquant.distill on top of the best post-training W4 and
W3 rows of benchmarks/gptq.py (GPTQ act-order + AWQ, g64, asymmetric, float zero points) on smollm2-135m.

Usage:
    python benchmarks/distill_llm.py           # writes the distill section of BENCHMARKS.md
    python benchmarks/distill_llm.py --quick   # 1 evaluation window per text, 10 steps; prints only

One process: the float model (the teacher) and, per shape, a copy quantized exactly as gptq.py's
"GPTQ act-order +AWQ" row (same calibration windows: benchmarks/w8a8.py's, from the calibration plays), evaluated
before and after ``slimquant.distill`` on the same evaluation windows as weight_only.py / gptq.py (perplexity, KL
per token from the float model, top-1 agreement). Distillation trains only the scales (integers frozen) on the
calibration windows, the last 2 held out to pick the kept step; never on the evaluation plays.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gptq  # noqa: E402
import text as corpus  # noqa: E402
import w8a8  # noqa: E402
import weight_only as wo  # noqa: E402

SHAPES = ("W4A16 g64", "W3A16 g64")
STEPS, LR, EVAL_EVERY = 60, 2e-3, 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 window per text, 10 steps; prints only")
    args = ap.parse_args()
    import logging

    import slimquant as sq

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    windows_per_text = 1 if args.quick else wo.WINDOWS_PER_TEXT
    steps = 10 if args.quick else STEPS
    ref = wo.reference(wo.LLM, windows_per_text)
    lm = sq.load_model(wo.LLM)
    windows = wo.eval_windows(lm.tokenizer, windows_per_text)
    calib = w8a8.calibration(lm.tokenizer)
    teacher = lm.model.eval()
    rows = []
    for shape in SHAPES:
        cfg = gptq.CONFIGS[f"{shape} GPTQ act-order +AWQ"]
        model = copy.deepcopy(teacher)
        t0 = time.perf_counter()
        result = sq.quantize(model, gptq.recipe_for(cfg), calib_data=calib, show_progress=False)
        quant_s = time.perf_counter() - t0
        with torch.no_grad():
            before = wo.eval_llm(result.model, windows, ref)
        rep = sq.distill(result, teacher, calib, steps=steps, lr=LR, eval_every=EVAL_EVERY, show_progress=False)
        with torch.no_grad():
            after = wo.eval_llm(result.model, windows, ref)
        rows.append((shape, quant_s, before, after, rep))
        print(f"{shape}: KL {before['kl']:.5f} -> {after['kl']:.5f}, ppl {before['perplexity']:.3f} -> "
              f"{after['perplexity']:.3f}, {rep.seconds:.0f} s, held-out calib KL {rep.kl_before:.5f} -> "
              f"{rep.kl_after:.5f} (step {rep.best_step})", flush=True)
        del model, result
    report = render(rows, before["tokens"], windows_per_text, steps, time.perf_counter() - t_start)
    print(report)
    if not args.quick:
        wo.write_section(report, "distill")


def render(rows, tokens: int, wpt: int, steps: int, elapsed: float) -> str:  # noqa: ANN001
    table = ["| model | KL before | KL after | KL after / before | perplexity before -> after | top-1 before -> after "
             "| held-out calib KL before -> after | kept step | distill s | quantize s |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for shape, qs, b, a, rep in rows:
        table.append(f"| {shape} GPTQ act-order +AWQ | {b['kl']:.5f} | {a['kl']:.5f} | {a['kl'] / b['kl']:.2f}x | "
                     f"{b['perplexity']:.3f} -> {a['perplexity']:.3f} | {b['top1']:.4f} -> {a['top1']:.4f} | "
                     f"{rep.kl_before:.5f} -> {rep.kl_after:.5f} | {rep.best_step}/{rep.steps} | {rep.seconds:.0f} | "
                     f"{qs:.0f} |")  # fmt: skip
    return "\n".join([
        "## End-to-end distillation of the scales (issue 15): on top of the best W4 / W3 rows",
        "",
        f"Command: `.venv/bin/python benchmarks/distill_llm.py`. Machine: {os.cpu_count()} CPU cores, "
        f"{platform.machine()}, torch {torch.__version__}, 2 threads; {elapsed / 60:.1f} min. smollm2-135m; each "
        "model quantized as gptq.py's *GPTQ act-order +AWQ* row (int4 / int3, groups of 64, asymmetric, float "
        f"zero points; calibration: {w8a8.CALIB_WINDOWS} x {w8a8.CALIB_SEQ_LEN}-token windows of "
        f"{', '.join(corpus.CALIB_FILES)}), then `slimquant.distill` with the float model as teacher: {steps} steps "
        f"of Adam (lr {LR}, cosine) on the scales only (integers frozen), one calibration window per step (the "
        f"last 2 held out; the step with the lowest held-out KL is kept, checked every {EVAL_EVERY}). Evaluation: "
        f"{tokens} predicted tokens of {', '.join(corpus.EVAL_FILES)} ({wpt} windows x {wo.SEQ_LEN} per text, as "
        "weight_only.py / gptq.py), KL per token from the float model.",
        "",
        *table,
    ])


if __name__ == "__main__":
    main()
