"""anti_method m2 (Outlier Suppression, OS+ form) against m1 and m4 on W8A8 static (issue 16, item 5).

Usage:
    python benchmarks/outlier_suppression.py            # writes the outlier-suppression section of BENCHMARKS.md
    python benchmarks/outlier_suppression.py --quick    # 1 evaluation window per text; prints only

smollm2-135m, W8A8 static (int8 per-channel weights, per-tensor asymmetric int8 inputs), the msModelSlim flags of
each row; gptq.py's evaluation and calibration windows. Every config runs in its own process: load float,
quantize, save, reload from disk, evaluate.
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

BASE = "--a_bit 8 --mm_tensor False"
# name -> flags (None: built in recipe_for)
CONFIGS: dict[str, str | None] = {
    "W8A8 static": BASE,
    "+ m1 (SmoothQuant 0.5)": f"{BASE} --anti_method m1",
    "+ m2 before: gamma migration + token clipping": None,
    "+ m2 (OS+ scaling + token clipping)": f"{BASE} --anti_method m2",
    "+ m2, act_method 1 (no token clipping)": f"{BASE} --anti_method m2 --act_method 1",
    "+ m4 (SmoothQuant, alpha searched)": f"{BASE} --anti_method m4",
}


def recipe_for(name: str):
    from dataclasses import replace

    from slimquant import GammaMigration
    from slimquant.types.flags import recipe_from_flags

    flags = CONFIGS[name]
    if flags is None:  # the m2 of before this issue: gamma migration and token-wise clipping only
        r = recipe_from_flags(f"{BASE} --anti_method m2")
        return replace(r, steps=(GammaMigration(), r.weight_step))
    return recipe_from_flags(flags)


def child_main(args) -> None:  # noqa: ANN001
    wo.quantize_reload_eval(args, lambda: recipe_for(args.config), w8a8.calibration)


def render(rows: dict[str, dict], tokens: int, windows: int, elapsed: float) -> str:
    import transformers

    lines = [
        "## Outlier Suppression (issue 16, item 5): m2 against m1 and m4, W8A8 static on smollm2-135m",
        "",
        f"Command: `.venv/bin/python benchmarks/outlier_suppression.py`. Machine: {torch.get_num_threads()} threads, "
        f"{platform.machine()}, torch {torch.__version__}, transformers {transformers.__version__}; one run, "
        f"{elapsed / 60:.1f} min.",
        "",
        f"gptq.py's protocol: {len(corpus.EVAL_FILES) * windows} windows x {wo.SEQ_LEN} tokens of "
        f"{', '.join(corpus.EVAL_FILES)} ({tokens} predicted tokens; KL(float || quantized) per token); calibration "
        f"{w8a8.CALIB_WINDOWS} windows x {w8a8.CALIB_SEQ_LEN} tokens of {', '.join(corpus.CALIB_FILES)}; int8 weights "
        "per channel, static per-tensor asymmetric int8 inputs, lm_head float, measured on the checkpoint reloaded "
        "from disk. m2 now: each norm's weight migrated into its linears, then OS+'s channel-wise scaling (channels "
        "above a threshold scaled down to it, the threshold searched per smoothing group among 20 quantiles of the "
        "channel ranges by quantized output error on 512 sampled calibration rows, no scaling included) and, with "
        "no --act_method, token-wise clipping of the static ranges. *m2 before*: the m2 of before this change "
        "(gamma migration + token clipping).",
        "",
        "| config | flags | perplexity | KL/token | top-1 | quantize s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        flags = CONFIGS[name] or f"{BASE} --anti_method m2 (GammaMigration step)"
        lines.append(f"| {name} | `{flags}` | {r['perplexity']:.3f} | {r['kl']:.5f} | {r['top1']:.4f} | "
                     f"{r['quantize_s']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    wo.benchmark_main(__doc__, "1 window per text; prints only", CONFIGS, None, __file__, child_main,
                      wo.by_tokens(render), "outlier-suppression")

if __name__ == "__main__":
    main()
