"""Accuracy-aware tuning (issue 13 item 3): slimquant.autotune on smollm2-135m W8A8 with a 1% perplexity tolerance.

Usage:
    python benchmarks/tune.py          # rewrites the tune section of BENCHMARKS.md

The eval function is what a user would write: perplexity of the quantized model on held-out windows of the
evaluation plays (2 windows x 512 tokens of each), lower is better, tolerable loss 1% relative. Candidates are
msModelSlim flag strings; calibration: 64 windows x 256 tokens of the calibration plays.
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
import weight_only as wo  # noqa: E402
from sensitivity import calib_windows  # noqa: E402

ROWS = wo.OUT / "tune-rows.json"
EVAL_WINDOWS = 2  # per evaluation play
CANDIDATES = [  # msModelSlim's example flags first (per-tensor weights), then per-channel, then the alpha search
    "--w_bit 8 --a_bit 8 --is_dynamic True --anti_method m1",
    "--w_bit 8 --a_bit 8 --is_dynamic True --anti_method m1 --mm_tensor False",
    "--w_bit 8 --a_bit 8 --is_dynamic True --anti_method m4 --mm_tensor False",
]


def main() -> None:
    import slimquant as sq

    wo.OUT.mkdir(parents=True, exist_ok=True)
    lm = sq.load_model(wo.LLM)
    windows = wo.eval_windows(lm.tokenizer, EVAL_WINDOWS)

    @torch.no_grad()
    def perplexity(model) -> float:
        nll, count = 0.0, 0
        for ids in windows:
            logits = model(input_ids=ids[None]).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum"))
            count += len(ids) - 1
        return float(torch.exp(torch.tensor(nll / count)))

    calib = calib_windows(lm.tokenizer, 64, 256, seed=0)
    config = sq.TuningConfig(CANDIDATES, tolerable_loss=0.01, higher_is_better=False, max_trials=30)
    tables = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=wo.OUT) as work:
        res = sq.autotune(lm.model, config, perplexity, calib_data=calib, work_dir=work,
                          on_trial=lambda t, table: (print(table, flush=True), tables.append(table)))  # fmt: skip
    total = time.perf_counter() - t0
    rows = {"baseline": res.baseline, "target": res.target, "passed": res.passed, "seconds": total,
            "best": res.best.name if res.best else None,
            "trials": [{"n": t.index + 1, "label": t.label, "level": t.level, "metric": t.metric, "passed": t.passed,
                        "seconds": t.seconds, "error": t.error} for t in res.history]}  # fmt: skip
    ROWS.write_text(json.dumps(rows, indent=1))
    machine = f"Machine: {torch.get_num_threads()} threads, {platform.machine()}, torch {torch.__version__}"
    lines = ["## Accuracy-aware tuning (issue 13 item 3)", "",
             f"Command: `.venv/bin/python benchmarks/tune.py` (one run, alone on the machine). {machine}.", "",
             "`slimquant.autotune` on smollm2-135m with a user-style eval function: perplexity on "
             f"{EVAL_WINDOWS} windows x {wo.SEQ_LEN} tokens of each of {', '.join(corpus.EVAL_FILES)} (after the "
             f"first {wo.SKIP_TOKENS} tokens), lower is better, tolerable loss 1% (target = float x 1.01). "
             "Calibration: 64 windows x 256 tokens of the calibration plays. Candidates as msModelSlim flag "
             "strings, tried in cost order, then fallback levels L1..L5 on the best first-phase candidate first. "
             f"Float perplexity {res.baseline:.3f}, target {res.target:.3f}; whole run {total / 60:.1f} min "
             f"(float evaluation, every trial, the fallback ranking).", "",
             "| trial | candidate | level | perplexity | vs float | passes | trial s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for t in rows["trials"]:
        ppl = "failed: " + str(t["error"]) if t["metric"] is None else f"{t['metric']:.3f}"
        rel = "" if t["metric"] is None else f"{100 * (t['metric'] / res.baseline - 1):+.2f}%"
        lines.append(f"| {t['n']} | `{t['label']}` | L{t['level']} | {ppl} | {rel} | {'yes' if t['passed'] else 'no'} | "
                     f"{t['seconds']:.0f} |")  # fmt: skip
    verdict = (f"first passing configuration: trial {len(rows['trials'])} ({rows['best']})" if res.passed
               else f"no configuration passed; best: {rows['best']}")  # fmt: skip
    lines += ["", f"Result: {verdict}, {total / 60:.1f} min from start."]
    text = "\n".join(lines)
    print(text)
    wo.write_section(text, "tune")


if __name__ == "__main__":
    main()
