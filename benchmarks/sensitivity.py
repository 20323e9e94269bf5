"""Layer sensitivity and automatic fallback on smollm2-135m (issue 13 items 1 and 2).

Usage:
    python benchmarks/sensitivity.py                # both parts; rewrites the sensitivity section of BENCHMARKS.md
    python benchmarks/sensitivity.py --part proxies # only the proxy study (prints; keeps the stored rows)
    python benchmarks/sensitivity.py --part fallback

Proxies: every Linear layer of the blocks (210) is quantized alone under each candidate and the model's KL vs
float is measured on calibration windows (the exact ablation); the cheap proxies are computed on the same
windows, and their Spearman rank correlation with the exact ablation, their top-k overlap and their time are
reported. The exact ablation is measured a second time on other windows of the calibration plays: how well it
agrees with itself bounds what any proxy can reach.

Fallback: ``slimquant.quantize`` with ``--disable_level L0 .. L5`` (msModelSlim flags) on W8A8 static + m1 and on
W4A16 RTN, calibrated on the calibration plays, each checkpoint evaluated on the usual held-out windows.
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

ROWS = wo.OUT / "sensitivity-rows.json"
PLOT = HERE / "plots" / "sensitivity.png"
SENS_WINDOWS, SENS_LEN = 4, 256  # the ablation's calibration (what `slimquant sensitivity` uses by default)
CALIB_WINDOWS, CALIB_LEN = 64, 256  # the quantization's calibration (slimquant quantize's default size)
CANDIDATES = {"W4A16 g64 sym (RTN)": "--w_bit 4 --group_size 64",
              "W8A8 dynamic, per-channel weights": "--w_bit 8 --a_bit 8 --is_dynamic True --mm_tensor False"}  # fmt: skip
FALLBACK = {"W8A8 static + m1 (msModelSlim defaults: per-tensor weights)": "--w_bit 8 --a_bit 8 --anti_method m1",
            "W4A16 g64 sym (RTN)": "--w_bit 4 --group_size 64"}  # fmt: skip
LEVELS = range(6)
TOPK = (5, 10)


def calib_windows(tokenizer, windows: int, seq_len: int, seed: int) -> torch.Tensor:
    from slimquant.data import calibration_windows

    return calibration_windows(tokenizer, corpus.read(list(corpus.CALIB_FILES)).split("\n\n"), windows, seq_len, seed=seed)


def proxies() -> dict:
    import slimquant as sq
    from slimquant.math.metrics import spearman
    from slimquant.search import layer_sensitivity

    lm = sq.load_model(wo.LLM)
    cands = {k: sq.Recipe.from_flags(v) for k, v in CANDIDATES.items()}
    calib = calib_windows(lm.tokenizer, SENS_WINDOWS, SENS_LEN, seed=0)
    t0 = time.perf_counter()
    s = layer_sensitivity(lm.model, cands, calib)
    total = time.perf_counter() - t0
    PLOT.parent.mkdir(exist_ok=True)
    s.plot(PLOT, top=20)
    out: dict = {"seconds": total, "timing": s.timing, "positions": s.calibration["positions"], "candidates": {}}
    for label in cands:
        exact = s.ranking("ablation", label)
        row = {"spearman": s.spearman(label), "top": exact[:10], "overlap": {}}
        for m in s.metrics:
            if m == "ablation":
                continue
            proxy = s.most_sensitive(max(TOPK), m, label)
            row["overlap"][m] = {k: len({n for n, _ in exact[:k]} & set(proxy[:k])) for k in TOPK}
        out["candidates"][label] = row
    # the exact ablation on other windows (seed 1) of the same plays: its agreement with itself
    first = next(iter(cands))
    other = calib_windows(lm.tokenizer, SENS_WINDOWS, SENS_LEN, seed=1)
    t1 = time.perf_counter()
    s2 = layer_sensitivity(lm.model, {first: cands[first]}, other, metrics=("ablation", "fisher"))
    a, b = s.scores("ablation", first), s2.scores("ablation", first)
    names = list(a)
    exact2 = s2.ranking("ablation", first)
    out["self"] = {"candidate": first, "seconds": time.perf_counter() - t1,
                   "spearman": spearman(torch.tensor([a[n] for n in names]), torch.tensor([b[n] for n in names])),
                   "overlap": {k: len({n for n, _ in s.ranking("ablation", first)[:k]} & {n for n, _ in exact2[:k]})
                               for k in TOPK},
                   "fisher_vs_own": s2.spearman(first)["fisher"]}  # fmt: skip
    return out


def fallback() -> dict:
    import slimquant as sq

    ref = wo.reference(wo.LLM, wo.WINDOWS_PER_TEXT)
    rows: dict = {}
    with tempfile.TemporaryDirectory(dir=wo.OUT) as cache:
        for label, flags in FALLBACK.items():
            for level in LEVELS:
                lm = sq.load_model(wo.LLM)
                calib = calib_windows(lm.tokenizer, CALIB_WINDOWS, CALIB_LEN, seed=0)
                recipe = sq.Recipe.from_flags(f"{flags} --disable_level L{level}")
                t0 = time.perf_counter()
                res = sq.quantize(lm.model, recipe, calib_data=calib, sensitivity_cache=cache)
                qs = time.perf_counter() - t0
                kept = {n: why for n, why in res.report.skipped.items() if why.startswith("disable_level")}
                with torch.no_grad():
                    ev = wo.eval_llm(res.model, wo.eval_windows(lm.tokenizer, wo.WINDOWS_PER_TEXT), ref)
                rows[f"{label} L{level}"] = {"label": label, "level": level, "quantize_s": qs, **ev, "float": list(kept)}
                print(label, f"L{level}", {k: v for k, v in rows[f"{label} L{level}"].items() if k != "label"}, flush=True)
    return rows


def render(stored: dict, machine: str) -> str:
    parts = ["## Layer sensitivity and automatic fallback (issue 13 items 1, 2)", "",
             f"Command: `.venv/bin/python benchmarks/sensitivity.py` (one run, alone on the machine). {machine}.", ""]  # fmt: skip
    p = stored.get("proxies")
    if p:
        parts += [f"**Proxies vs the exact ablation.** smollm2-135m, the 210 Linear layers of the blocks, each quantized "
                  f"alone (round to nearest) under each candidate; loss: KL(float || quantized) per token on "
                  f"{SENS_WINDOWS} windows x {SENS_LEN} tokens of the calibration plays ({p['positions']} positions, "
                  f"`slimquant sensitivity`'s default size). Spearman: rank correlation over the 210 layers; top-k: "
                  f"how many of the exact ablation's k most sensitive layers the proxy also puts in its top k. "
                  f"Whole measurement {p['seconds'] / 60:.1f} min for both candidates: "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in p["timing"].items()) + ". Plot of the 20 most sensitive "
                  "layers: [benchmarks/plots/sensitivity.png](benchmarks/plots/sensitivity.png).", "",
                  "| candidate | proxy | Spearman vs exact | top-5 overlap | top-10 overlap |", "|---|---|---|---|---|"]  # fmt: skip
        for label, row in p["candidates"].items():
            for m, rho in row["spearman"].items():
                ov = row["overlap"][m]
                parts.append(f"| {label} | {m} | {rho:+.3f} | {ov['5']}/5 | {ov['10']}/10 |")
        st = p["self"]
        parts += ["", f"The exact ablation against itself on other windows of the same plays ({st['candidate']}, "
                  f"{st['seconds'] / 60:.1f} min): Spearman {st['spearman']:+.3f}, top-5 overlap {st['overlap']['5']}/5, "
                  f"top-10 {st['overlap']['10']}/10; fisher vs the exact ablation on those windows "
                  f"{st['fisher_vs_own']:+.3f}.", ""]  # fmt: skip
        for label, row in p["candidates"].items():
            parts.append(f"Most sensitive under {label}: " + ", ".join(f"{n} ({v:.2g})" for n, v in row["top"][:5]) + ".")
        parts.append("")
    f = stored.get("fallback")
    if f:
        parts += [f"**`--disable_level` L0..L5.** `slimquant.quantize` with the flags shown plus `--disable_level Ln`, "
                  f"calibrated on {CALIB_WINDOWS} x {CALIB_LEN} tokens of the calibration plays (the ranking: exact "
                  f"ablation on the first {4} of them, after smoothing; measured once per configuration and reused "
                  f"from the cache by the other levels), evaluated on {', '.join(corpus.EVAL_FILES)}, "
                  f"{wo.WINDOWS_PER_TEXT} windows x {wo.SEQ_LEN} tokens each after the first {wo.SKIP_TOKENS} "
                  "tokens. Float perplexity there: 33.462.", "",
                  "| configuration | level | KL/token | perplexity | top-1 | quantize s | layers kept float |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for key, r in f.items():
            parts.append(f"| {r['label']} | L{r['level']} | {r['kl']:.5f} | {r['perplexity']:.3f} | {r['top1']:.4f} | "
                         f"{r['quantize_s']:.0f} | {', '.join(n.replace('model.layers.', '') for n in r['float']) or '-'} |")  # fmt: skip
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "proxies", "fallback"), default="all")
    args = ap.parse_args()
    wo.OUT.mkdir(parents=True, exist_ok=True)
    stored = json.loads(ROWS.read_text()) if ROWS.is_file() else {}
    machine = f"Machine: {torch.get_num_threads()} threads, {platform.machine()}, torch {torch.__version__}"
    if args.part in ("all", "proxies"):
        stored["proxies"] = proxies()
        ROWS.write_text(json.dumps(stored, indent=1))
    if args.part in ("all", "fallback"):
        stored["fallback"] = fallback()
        ROWS.write_text(json.dumps(stored, indent=1))
    stored = json.loads(ROWS.read_text())  # as it reads back (top-k keys become strings)
    text = render(stored, machine)
    print(text)
    wo.write_section(text, "sensitivity")


if __name__ == "__main__":
    main()
