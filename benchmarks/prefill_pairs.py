"""Paired prefill timing (CPU, batch 1): float32 vs the W4A16 models of benchmarks/speed.py, many alternations.

Usage:
    python benchmarks/prefill_pairs.py               # 30 alternations, writes the prefill-pairs section of BENCHMARKS.md
    python benchmarks/prefill_pairs.py --pairs 5     # quick; prints only
    MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/prefill_pairs.py --isa avx2
                                                     # an AVX2-only CPU emulated on an AVX512 one: torch's BLAS and
                                                     # kernels (the variables) and slimquant's native kernels (--isa)
                                                     # limited to AVX2; writes the prefill-pairs-avx2 section

speed.py times each model a handful of times (5 rounds) among eleven others, and on this shared machine one
prefill's time moves by 10-50% between rounds, so its medians cannot tell 0.97x from 1.03x. Here the same
prefill (``model(input_ids, logits_to_keep=1)`` under ``torch.inference_mode`` on speed.py's 512-token window,
2 threads) runs for float32 and for each 4-bit model back to back, ``--pairs`` times, in a rotated order; each
alternation gives one ratio per model (float32 time / model time, measured seconds apart), and the table shows the
median of those paired ratios with their interquartile range: machine drift between alternations cancels out.
The models are built exactly as speed.py builds them (its ``build_models``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import speed  # noqa: E402
import text as corpus  # noqa: E402
import weight_only as wo  # noqa: E402

PAIRS = 30
MODELS = ("float32", speed.W4_MAIN, "W4A16 g64 asym", "W4A16 g32 asym", "W4A16 per-channel sym", speed.W4_Q4_0,
          speed.W4_UNFUSED, "W8A16")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=PAIRS, help=f"alternations (default {PAIRS}); fewer: prints only")
    ap.add_argument("--isa", choices=("avx2", "scalar"), default=None,
                    help="the widest code path slimquant's native kernels may take (default: the CPU's widest); "
                         "set MKL_ENABLE_INSTRUCTIONS / ATEN_CPU_CAPABILITY for torch's own kernels")  # fmt: skip
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    from slimquant.kernels import native
    from slimquant.models.loading import load_model

    if args.isa is not None:
        if not native.available():
            raise SystemExit(f"--isa {args.isa}: native kernels unavailable: {native.unavailable_reason()}")
        native.set_isa(args.isa)

    torch.set_num_threads(speed.THREADS)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    lm = load_model(speed.LLM)
    built, _ = speed.build_models(lm, quick=False)
    models = {name: built[name] for name in MODELS}
    del built
    window = speed.token_window(lm.tokenizer)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for m in models.values():  # warm-up: kernel builds, allocator
            m(window, logits_to_keep=1)
        names = list(models)
        for i in range(args.pairs):
            order = names[i % len(names):] + names[: i % len(names)]
            for name in order:
                times[name].append(speed.timed(lambda m=models[name]: m(window, logits_to_keep=1)))
            print(f"alternation {i + 1}/{args.pairs}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names),
                  flush=True)
    report = render(times, args.pairs, time.perf_counter() - t_start, args.isa)
    print(report)
    if args.pairs >= PAIRS:
        wo.write_section(report, "prefill-pairs" if args.isa is None else f"prefill-pairs-{args.isa}")


def render(times: dict[str, list[float]], pairs: int, elapsed: float, isa: str | None = None) -> str:
    base = times["float32"]
    rows = ["| model | median prefill ms | median paired ratio (float32 / model) | ratio IQR | alternations faster than float32 |",
            "|---|---|---|---|---|"]  # fmt: skip
    for name, t in times.items():
        ratios = [b / x for b, x in zip(base, t)]
        q1, med, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        faster = sum(r > 1.0 for r in ratios)
        rows.append(f"| {name} | {statistics.median(t) * 1e3:.0f} | {statistics.median(ratios):.3f}x | "
                    f"{q1:.3f}-{q3:.3f} | {faster}/{len(ratios)} |")  # fmt: skip
    from slimquant.kernels import native

    env = " ".join(f"{v}={os.environ[v]}" for v in ("MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY") if v in os.environ)
    command = f"{env + ' ' if env else ''}.venv/bin/python benchmarks/prefill_pairs.py{f' --isa {isa}' if isa else ''}"
    title = "## Prefill, paired (issue 14): float32 vs the W4A16 models, many alternations"
    if isa:
        title += f", {isa.upper() if isa != 'scalar' else 'portable'} code paths only"
    return "\n".join([
        title,
        "",
        f"Command: `{command}`. Machine: {os.cpu_count()} CPU cores, "
        f"{platform.machine()}, torch {torch.__version__}, `torch.set_num_threads({speed.THREADS})`, slimquant's "
        f"native kernels on {native.cpu_features() if native.available() else 'none (unavailable)'}, torch's CPU "
        f"capability {torch.backends.cpu.get_cpu_capability()}; {pairs} "
        f"alternations, {elapsed / 60:.1f} min. Prefill = `model(input_ids, logits_to_keep=1)` on tokens "
        f"{speed.SKIP_TOKENS}..{speed.SKIP_TOKENS + speed.PREFILL_LEN} of {corpus.EVAL_FILES[0]} (smollm2-135m, "
        "the models of the speed section, built by the same code). Each alternation runs every model once, back "
        "to back in a rotated order; a model's paired ratio is float32's time / its time in the same alternation, "
        "and the table gives the median and interquartile range of those ratios (>1: faster than float32).",
        "",
        *rows,
    ])


if __name__ == "__main__":
    main()
