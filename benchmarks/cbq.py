"""CBQ (--anti_method m5) against m4 on W8A8 static and against GPTQ + AWQ on W4A16 (issue 16, item 4).

Usage:
    python benchmarks/cbq.py            # writes the cbq section of BENCHMARKS.md
    python benchmarks/cbq.py --quick    # 1 evaluation window per text; prints only

smollm2-135m; gptq.py's evaluation and calibration windows; the msModelSlim flags of each row. The CBQ rows train
``ITERS`` steps of ``BATCH`` calibration windows per window of 2 blocks (a CPU budget: CBQ's default is 100 x 4).
"*m5 pre-processing only*" is CBQ's coarse-to-fine step followed by round to nearest (the ablation); "*m4 + CBQ
weight step*" / "*AWQ + CBQ weight step*" are m4's smoothing / AWQ's scales followed by CBQ's window training (a
Python-API recipe); "*3x steps*" rows train three times as many steps. Every config
runs in its own process: load float, quantize, save, reload from disk, evaluate.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import text as corpus  # noqa: E402
import w8a8  # noqa: E402
import weight_only as wo  # noqa: E402

ITERS, BATCH = 20, 2
W8A8 = "--a_bit 8 --mm_tensor False"
W4 = "--w_bit 4 --w_sym False"
CBQ_KNOBS = f"--iters {ITERS} --batch_size {BATCH}"
LONGER = f"--iters {3 * ITERS} --batch_size {BATCH}"  # the training budget x 3
# name -> flags (a trailing " +pre-only" / " +cbq-weights" marks the recipes recipe_for builds from the flags)
CONFIGS: dict[str, str] = {
    "W8A8 static": W8A8,
    "W8A8 static + m4 (SmoothQuant, alpha searched)": f"{W8A8} --anti_method m4",
    "W8A8 static + m5 pre-processing only": f"{W8A8} --anti_method m5 +pre-only",
    "W8A8 static + m5 (CBQ)": f"{W8A8} --anti_method m5 {CBQ_KNOBS}",
    "W8A8 static + m5 (CBQ), 3x steps": f"{W8A8} --anti_method m5 {LONGER}",
    "W8A8 static + m4 + CBQ weight step": f"{W8A8} --anti_method m4 +cbq-weights",
    "W4A16 per-channel RTN": W4,
    "W4A16 per-channel GPTQ + AWQ": f"{W4} --w_method gptq --anti_method m3",
    "W4A16 per-channel + m5 (CBQ)": f"{W4} --anti_method m5 {CBQ_KNOBS}",
    "W4A16 per-channel + m5 (CBQ), 3x steps": f"{W4} --anti_method m5 {LONGER}",
    "W4A16 per-channel AWQ + CBQ weight step": f"{W4} --anti_method m3 +cbq-weights",
}


def recipe_for(name: str):
    from dataclasses import replace

    from slimquant import CBQ, RTN
    from slimquant.types.flags import recipe_from_flags

    flags = CONFIGS[name]
    if flags.endswith(" +pre-only"):  # CBQ's pre-processing, then round to nearest
        r = recipe_from_flags(flags[: -len(" +pre-only")])
        return replace(r, steps=(r.steps[0], RTN()))
    if flags.endswith(" +cbq-weights"):  # m4's / m3's scaling, then CBQ's window training (Python API only)
        r = recipe_from_flags(flags[: -len(" +cbq-weights")])
        return replace(r, steps=(r.steps[0], CBQ(iters=ITERS, batch_size=BATCH)))
    return recipe_from_flags(flags)


def child_main(args) -> None:  # noqa: ANN001
    def details(result) -> dict:  # noqa: ANN001
        res = {}
        cbq = [r.details["cbq"]["best_rel_loss"] for r in result.report.layers if r.name.endswith("self_attn.q_proj")
               and "cbq" in r.details]  # fmt: skip
        if cbq:
            res["cbq_rel_loss_median"] = sorted(cbq)[len(cbq) // 2]
        pre = result.report.steps_of("cbq_preprocess")
        if pre:
            res["scaled_groups"] = sum(r.values["alpha"] is not None for r in pre)
            res["truncated_linears"] = sum(len(r.values["truncated"]) for r in pre)
        return res

    wo.quantize_reload_eval(args, lambda: recipe_for(args.config), w8a8.calibration, details)


def render(rows: dict[str, dict], tokens: int, windows: int, elapsed: float) -> str:
    import transformers

    lines = [
        "## CBQ (issue 16, item 4): m5 against m4 on W8A8 static and against GPTQ + AWQ on W4A16, smollm2-135m",
        "",
        f"Command: `.venv/bin/python benchmarks/cbq.py`. Machine: {torch.get_num_threads()} threads, "
        f"{platform.machine()}, torch {torch.__version__}, transformers {transformers.__version__}; one run, "
        f"{elapsed / 60:.1f} min.",
        "",
        f"gptq.py's protocol: {len(corpus.EVAL_FILES) * windows} windows x {wo.SEQ_LEN} tokens of "
        f"{', '.join(corpus.EVAL_FILES)} ({tokens} predicted tokens; KL(float || quantized) per token); calibration "
        f"{w8a8.CALIB_WINDOWS} windows x {w8a8.CALIB_SEQ_LEN} tokens of {', '.join(corpus.CALIB_FILES)}; lm_head "
        "float; measured on the checkpoint reloaded from disk. W8A8: int8 weights per channel, static per-tensor "
        "asymmetric int8 inputs (min-max ranges; CBQ tunes them). W4A16: asymmetric int4 per channel. m5 = CBQ's "
        "coarse-to-fine pre-processing (outlier input channels scaled down; per group the extreme set or every "
        "coarse candidate, and the strength, searched by quantized output error; outlier "
        "weights truncated where that lowers the quantized output error), then windows of 2 consecutive blocks "
        f"trained with LoRA-Rounding (rank 8) and learnable weight and input ranges, Adam lr 5e-3, {ITERS} steps x "
        f"{BATCH} calibration windows per window (CBQ's default is 100 x 4; a CPU budget), MSE + KL loss. "
        "*m5 pre-processing only*: CBQ's pre-processing then round to nearest; *m4 / AWQ + CBQ weight step*: "
        "`steps=(SmoothQuantSearch(), CBQ(...))` / `steps=(AWQ(), CBQ(...))`; *3x steps*: "
        f"{3 * ITERS} steps. *rel. loss*: median over blocks of the kept step's window loss relative to its start.",
        "",
        "| config | flags | perplexity | KL/token | top-1 | quantize s | rel. loss | scaled groups / truncated linears |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        flags = CONFIGS[name].replace(" +pre-only", " (weight step: rtn)").replace(
            " +cbq-weights", f" (weight step: CBQ(iters={ITERS}, batch_size={BATCH}))")
        rel = f"{r['cbq_rel_loss_median']:.3f}" if "cbq_rel_loss_median" in r else ""
        pre = f"{r['scaled_groups']} / {r['truncated_linears']}" if "scaled_groups" in r else ""
        lines.append(f"| {name} | `{flags}` | {r['perplexity']:.3f} | {r['kl']:.5f} | {r['top1']:.4f} | "
                     f"{r['quantize_s']:.1f} | {rel} | {pre} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    wo.benchmark_main(__doc__, "1 window per text; prints only", CONFIGS, None, __file__, child_main,
                      wo.by_tokens(render), "cbq")


if __name__ == "__main__":
    main()
