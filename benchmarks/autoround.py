"""AutoRound benchmark (issue 15, item 2): AutoRound W4A16 g64, W3A16 g64 and W2A16 g32 on smollm2-135m, beside the
RTN / GPTQ / AWQ / GPTQ + AWQ rows of benchmarks/gptq.py (same evaluation windows, same calibration windows, same
float zero points), with time and peak RSS; then end-to-end distillation of the scales on top of the W4 and W3
AutoRound rows.

Usage:
    python benchmarks/autoround.py            # writes the autoround section of BENCHMARKS.md
    python benchmarks/autoround.py --quick    # 1 evaluation window per text, W4 with 20 steps per block; prints only

Every config runs in its own process (as gptq.py): load float, quantize, save, reload from disk, evaluate; the
distillation rows continue in that process on the reloaded model (60 steps, as benchmarks/distill_llm.py).
AutoRound runs with one 256-token calibration window per step (``batch_size=1``): the paper's 8 windows of 2048
tokens per step would take about 60x longer on this 2-core machine (``--batch_size`` and the calibration size are
flags; the default step batch is 4).
"""

from __future__ import annotations

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

# name -> (bits, group size, AWQ first, steps per block, lr (None: 1 / steps), distill afterwards)
CONFIGS: dict[str, tuple[int, int, bool, int, float | None, bool]] = {
    "W4A16 g64 AutoRound": (4, 64, False, 200, None, False),
    "W4A16 g64 AutoRound +AWQ": (4, 64, True, 200, None, True),
    "W4A16 g64 AutoRound-light +AWQ": (4, 64, True, 50, 5e-3, False),
    "W3A16 g64 AutoRound +AWQ": (3, 64, True, 200, None, True),
    "W2A16 g32 AutoRound +AWQ": (2, 32, True, 200, None, False),
}
QUICK = {"W4A16 g64 AutoRound +AWQ"}
BATCH = 1
DISTILL_STEPS, DISTILL_LR, DISTILL_EVERY = 60, 2e-3, 10
# the comparison rows: benchmarks/gptq.py's table in BENCHMARKS.md (same windows and calibration)
BASELINES = ("RTN", "GPTQ act-order", "AWQ", "GPTQ act-order +AWQ")


def recipe_for(name: str, quick: bool = False):
    from slimquant import AWQ, AutoRound, QuantSpec, Recipe

    bits, group, awq, iters, lr, _ = CONFIGS[name]
    spec = QuantSpec(f"int{bits}", "per_group", group, symmetric=False, zero_point="float")
    step = AutoRound(iters=20 if quick else iters, lr=lr, batch_size=BATCH)
    return Recipe(weight=spec, steps=(AWQ(), step) if awq else (step,))


def child_main(args) -> None:  # noqa: ANN001
    import slimquant as sq
    from slimquant.eval.size import checkpoint_bytes

    torch.manual_seed(0)
    quick = args.windows == 1
    res: dict = {}
    with tempfile.TemporaryDirectory(dir=wo.OUT) as tmp:
        lm = sq.load_model(args.model)
        tok, model = lm.tokenizer, lm.model
        ckpt = Path(tmp) / "ckpt"
        calib = w8a8.calibration(tok)
        t0 = time.perf_counter()
        result = sq.quantize(model, recipe_for(args.config, quick), calib_data=calib, show_progress=False)
        res["quantize_s"] = time.perf_counter() - t0
        res["peak_rss_quantize_mib"] = wo.peak_rss_mib()
        # one record per block (every layer of a block carries its block's)
        tuned = list({r.name.rsplit(".", 2)[0]: r.details["autoround"] for r in result.report.layers
                      if "autoround" in r.details}.values())  # fmt: skip
        res["best_rel_loss_median"] = sorted(t["best_rel_loss"] for t in tuned)[len(tuned) // 2]
        res["stopped"] = sum(1 for t in tuned if t.get("stopped"))
        sq.save(result, ckpt, tokenizer=tok)
        res["ckpt_bytes"] = checkpoint_bytes(ckpt)
        del model, lm.model
        windows = wo.eval_windows(tok, args.windows)
        loaded = sq.load(ckpt)
        with torch.no_grad():
            res.update(wo.eval_llm(loaded.model, windows, Path(args.ref)))
        del loaded
        if CONFIGS[args.config][5]:  # distill the in-memory result (unfused modules), as distill_llm.py does
            teacher = sq.load_model(args.model).model.eval()
            rep = sq.distill(result, teacher, calib, steps=3 if quick else DISTILL_STEPS, lr=DISTILL_LR,
                             eval_every=DISTILL_EVERY, show_progress=False)  # fmt: skip
            with torch.no_grad():
                after = wo.eval_llm(result.model, windows, Path(args.ref))
            res["distill"] = {"kl": after["kl"], "perplexity": after["perplexity"], "top1": after["top1"],
                              "seconds": rep.seconds, "best_step": rep.best_step, "steps": rep.steps}  # fmt: skip
    Path(args.result).write_text(json.dumps(res))


def baselines() -> dict[str, dict]:
    """The comparison rows of the gptq section of BENCHMARKS.md: ``{config: {perplexity, kl, top1, quantize_s}}``."""
    text = (HERE.parent / "BENCHMARKS.md").read_text()
    section = text[text.index("<!-- gptq:begin -->") : text.index("<!-- gptq:end -->")]
    out = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and any(cells[0] == f"{shape} {m}" for shape in ("W4A16 g64", "W3A16 g64", "W2A16 g32")
                                   for m in BASELINES):  # fmt: skip
            out[cells[0]] = {"perplexity": float(cells[1]), "kl": float(cells[2]), "top1": float(cells[4]),
                             "quantize_s": float(cells[5]), "peak_rss_quantize_mib": float(cells[6])}  # fmt: skip
    return out


def render(rows: dict[str, dict], base: dict[str, dict], tokens: int, windows: int, elapsed: float) -> str:
    import transformers

    lines = [
        "## AutoRound (issue 15): W4 / W3 / W2 on smollm2-135m, beside RTN / GPTQ / AWQ",
        "",
        f"Command: `.venv/bin/python benchmarks/autoround.py`. Machine: {torch.get_num_threads()} threads, "
        f"{platform.machine()}, torch {torch.__version__}, transformers {transformers.__version__}; one run, "
        f"{elapsed / 60:.1f} min.",
        "",
        f"**smollm2-135m**, gptq.py's protocol: {len(corpus.EVAL_FILES) * windows} windows x {wo.SEQ_LEN} tokens of "
        f"{', '.join(corpus.EVAL_FILES)} ({tokens} predicted tokens; KL(float || quantized) per token); calibration "
        f"{w8a8.CALIB_WINDOWS} windows x {w8a8.CALIB_SEQ_LEN} tokens of {', '.join(corpus.CALIB_FILES)} (seed 0); every "
        "row asymmetric with a float zero point, lm_head float, measured on the checkpoint reloaded from disk. "
        f"AutoRound: `AutoRound(iters, batch_size={BATCH})` (signed gradient descent on per-weight rounding offsets and "
        "per-group min / max factors, lr 1 / iters decayed linearly to 0, the step with the lowest batch loss relative "
        "to round-to-nearest kept; *light*: 50 steps at lr 5e-3), block by block on the quantized blocks' outputs "
        "against the float blocks' outputs; *+AWQ*: `--anti_method m3` scales first (no AWQ clipping: AutoRound tunes "
        "the ranges). *median best rel. loss*: the kept step's block-output MSE / round-to-nearest's, median over "
        "blocks. Rows marked *gptq.py* are copied from that section of this file (same windows, same calibration; "
        "not rerun here).",
        "",
        "| config | perplexity | KL/token | top-1 | quantize s | peak RSS MiB | median best rel. loss |",
        "|---|---|---|---|---|---|---|",
    ]
    shapes = ("W4A16 g64", "W3A16 g64", "W2A16 g32")
    for shape in shapes:
        for m in BASELINES:
            r = base.get(f"{shape} {m}")
            if r:
                lines.append(f"| {shape} {m} (gptq.py) | {r['perplexity']:.3f} | {r['kl']:.5f} | {r['top1']:.4f} | "
                             f"{r['quantize_s']:.1f} | {r['peak_rss_quantize_mib']:.0f} | - |")  # fmt: skip
        for name, r in rows.items():
            if name.startswith(shape):
                lines.append(f"| **{name}** | {r['perplexity']:.3f} | {r['kl']:.5f} | {r['top1']:.4f} | "
                             f"{r['quantize_s']:.1f} | {r['peak_rss_quantize_mib']:.0f} | {r['best_rel_loss_median']:.3f} |")  # fmt: skip
    dist = [(n, r) for n, r in rows.items() if "distill" in r]
    if dist:
        lines += ["", f"Then `slimquant.distill` on the AutoRound model (the in-memory one that was saved; {DISTILL_STEPS} steps, Adam lr "
                  f"{DISTILL_LR}, scales only, as benchmarks/distill_llm.py):", "",
                  "| model | KL before | KL after | after / before | perplexity before -> after | top-1 before -> after | "
                  "kept step | distill s |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, r in dist:
            d = r["distill"]
            lines.append(f"| {name} | {r['kl']:.5f} | {d['kl']:.5f} | {d['kl'] / r['kl']:.2f}x | {r['perplexity']:.3f} -> "
                         f"{d['perplexity']:.3f} | {r['top1']:.4f} -> {d['top1']:.4f} | {d['best_step']}/{d['steps']} | "
                         f"{d['seconds']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = wo.benchmark_parser(__doc__, "1 window per text, W4 with 20 steps per block; prints only")
    args = ap.parse_args()
    if args.child:
        child_main(args)
        return
    wo.OUT.mkdir(exist_ok=True)
    windows = 1 if args.quick else wo.WINDOWS_PER_TEXT
    t_start = time.perf_counter()
    ref = wo.reference(wo.LLM, windows)
    rows: dict[str, dict] = {}
    for name in CONFIGS:
        if args.quick and name not in QUICK:
            continue
        rows[name] = wo.run_config(wo.LLM, name, ref, windows, script=__file__)
        print(f"{name}: {json.dumps(rows[name])}", flush=True)
    tokens = next(iter(rows.values()))["tokens"]
    report = render(rows, baselines(), tokens, windows, time.perf_counter() - t_start)
    print()
    print(report)
    if not args.quick:
        wo.write_section(report, "autoround")


if __name__ == "__main__":
    main()
