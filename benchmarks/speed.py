"""Speed benchmark (CPU, batch 1): prefill and greedy decode of smollm2-135m, float32 vs W8A16 vs W8A8 vs W4A16,
with llama.cpp on our own Q4_0 GGUF export as the anchor.

Usage:
    python benchmarks/speed.py            # full run (5 rounds), rewrites the speed section of BENCHMARKS.md
    python benchmarks/speed.py --quick    # 1 round, fewer steps; prints only

One process loads the float model once and builds quantized copies (``copy.deepcopy`` before quantizing):
float32, W8A16 (int8 per-channel symmetric RTN weights, float32 activations), W8A8 dynamic (per-token
int8 inputs), W8A8 static (per-tensor asymmetric int8 inputs calibrated on 8 windows x 256 tokens of
the calibration plays), and W4A16 (int4 RTN weights, packed) at the group sizes and symmetric / asymmetric
kinds slimquant exports (g64 sym / asym, g32 asym, per-channel sym, g32 sym on the GGUF Q4_0 grid), plus the
g64 sym model with its gated MLPs and norms unfused (the 4-bit linears alone) and on the torch dequantize path the
native 4-bit kernels replace. lm_head stays float in every copy
(the recipes' default ``disable_last_linear``). After the rounds, the Q4_0-grid model is exported to GGUF and
llama.cpp (benchmarks/gguf_llama.py's llama-cpp-python environment, built there on first use) times it.

Timing is interleaved: each round runs every model once, in a rotated order, so all of them see the same
machine load; tables show the median over rounds and ratios are float32 time / model time (>1: faster).
    prefill  ``model(input_ids, logits_to_keep=1)`` on one 512-token window under ``torch.inference_mode``: the
             KV cache plus the next token's logits, what ``generate``'s prefill computes; ``prefill, all logits``
             is ``model(input_ids)`` (the 576 x 49152 lm_head on all 512 positions, as perplexity evaluation does)
    decode   greedy ``generate`` from a 32-token prompt with ``min_new_tokens == max_new_tokens``, timed for
             64 and for 1 new token; tokens/s = 63 / (t64 - t1), so the prompt's prefill is excluded
    step     one bare decode forward (1 token, KV cache of the prompt, cropped back after each call): the
             model's own per-token cost without ``generate``'s bookkeeping
    split    one more prefill per model with forward hooks timing the MLP blocks, the attention projections
             and the norms (each timed whole, so fused and unfused models split the same work alike), under
             ``torch.no_grad`` (see ``HOOKED_MODE``)
Then one decode step per model (under ``torch.no_grad`` too) runs under ``torch.profiler`` (record_shapes off). Forward hooks (removed
afterwards) wrap every Linear-like module in a ``record_function`` range, so op self-times split into
matmul kernels, the native C++ kernels (their ``slimquant::*`` ranges), the other aten ops of the linear
layers (quantize, rescale, dequantize, dtype casts), attention, the model's remaining aten ops, and
interpreter time between ops (python; a range's self-time is python inside the layer's forward). The
profiler adds a few microseconds per op: read shares, not totals.

``torch.set_num_threads(2)`` (the benchmark machine's 2 cores): the numbers are for two intra-op threads.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import text as corpus  # noqa: E402
import weight_only as wo  # noqa: E402

LLM = "smollm2-135m"
THREADS = 2
PREFILL_LEN = 512
SKIP_TOKENS = 1024  # skip the title page and cast list, as benchmarks/weight_only.py
PROMPT_LEN = 32
NEW_TOKENS = 64
CALIB_WINDOWS, CALIB_LEN = 8, 256
ROUNDS = 5
STEPS = 20  # bare decode steps timed per model per round
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::_int_mm", "aten::_weight_int8pack_mm"}
NATIVE_PREFIX = "slimquant::"  # the native kernels' profiler ranges (slimquant.kernels.native)
FUSED_PRODUCERS = {"slimquant::rmsnorm", "slimquant::rmsnorm_quant", "slimquant::silu_mul_quant"}  # slimquant.nn.fused
ATTENTION_OPS = {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::scaled_dot_product_attention",
                 "aten::_scaled_dot_product_attention_math"}  # fmt: skip
LINEAR_RANGE = "linear_layer"
W4_MAIN = "W4A16 g64 sym"
W4_Q4_0 = "W4A16 g32 sym, Q4_0 grid"
W4_BEFORE = "W4A16 g64 sym, torch dequant"
W4_UNFUSED = "W4A16 g64 sym, linears only"
PROFILED = ("float32", "W8A16", "W8A8 dynamic", "W8A8 static", W4_MAIN)  # the decode-step profile's columns


# -- models ----------------------------------------------------------------------------------------


def build_models(lm, quick: bool) -> tuple[dict[str, nn.Module], dict[str, float]]:
    """name -> model (eval), plus quantize seconds per quantized model."""
    import slimquant as sq
    from slimquant import QuantSpec, Recipe
    from slimquant.data import calibration_windows

    weight = QuantSpec("int8", "per_channel")
    calib = calibration_windows(lm.tokenizer, [corpus.read(list(corpus.CALIB_FILES))], CALIB_WINDOWS, CALIB_LEN)
    from slimquant.formats.gguf import gguf_recipe
    from slimquant.nn.fused import FusedW4A16GatedMLP, NativeRMSNorm

    def w4(group: int | None, symmetric: bool = True) -> Recipe:
        gran = ("per_group", group) if group else ("per_channel", None)
        return Recipe(weight=QuantSpec("int4", gran[0], group_size=gran[1], symmetric=symmetric))

    recipes = {
        "W8A16": (Recipe(weight=weight), None),
        "W8A8 dynamic": (Recipe(weight=weight, input=QuantSpec("int8", "per_token", dynamic=True)), None),
        "W8A8 static": (Recipe(weight=weight, input=QuantSpec("int8", "per_tensor", symmetric=False)), calib),
        W4_MAIN: (w4(64), None),
        "W4A16 g64 asym": (w4(64, False), None),
        "W4A16 g32 asym": (w4(32, False), None),
        "W4A16 per-channel sym": (w4(None), None),
        W4_Q4_0: (gguf_recipe(w4(32), lm.model, "Q4_0"), None),
        W4_UNFUSED: (w4(64), None),
        W4_BEFORE: (w4(64), None),
    }
    models = {"float32": lm.model.eval()}
    seconds = {}
    for name, (recipe, data) in recipes.items():
        m = copy.deepcopy(lm.model)
        t0 = time.perf_counter()
        sq.quantize(m, recipe, calib_data=data, show_progress=False)  # in place
        seconds[name] = time.perf_counter() - t0
        if name == W4_UNFUSED:  # gate(x), up(x), silu * up and transformers' norms again: the 4-bit linears alone
            for mlp_name, mod in list(m.named_modules()):
                if isinstance(mod, (FusedW4A16GatedMLP, NativeRMSNorm)):
                    parent, _, child = mlp_name.rpartition(".")
                    setattr(m.get_submodule(parent), child, mod.original)
        if name == W4_BEFORE:  # the weight-only path before the native 4-bit kernels: dequantize + F.linear per call
            for mod in m.modules():
                if hasattr(mod, "kernel") and hasattr(mod, "weight_zero_point"):
                    mod.kernel = "torch"
        models[name] = m.eval()
    return models, seconds


def llama_anchor(lm, model: nn.Module, window: torch.Tensor, rounds: int) -> dict:
    """llama.cpp (benchmarks/gguf_llama.py's llama-cpp-python build) on our own GGUF Q4_0 export of ``model``:
    prefill tokens/s with all logits on ``window`` and the median decode tokens/s of ``rounds`` greedy
    continuations of its first PROMPT_LEN tokens, 2 threads, run after our rounds (not beside them)."""
    import json
    import shutil

    import gguf_llama
    import numpy as np

    from slimquant.formats.gguf import export_gguf

    py = gguf_llama.llama_python()
    work = wo.OUT / "speed-gguf"
    shutil.rmtree(work, ignore_errors=True)
    ex = export_gguf(model, work / "q4_0", lm.tokenizer, "Q4_0")
    np.save(work / "ids.npy", window.numpy())
    np.save(work / "prompts.npy", window[:, :PROMPT_LEN].repeat(max(rounds, 1), 1).numpy())
    gguf_llama.llama(py, "run", str(work / "q4_0" / "model.gguf"), str(work / "ids.npy"), str(work / "prompts.npy"),
                     str(work / "run"))  # fmt: skip
    info = json.loads((work / "run.json").read_text())
    types: dict[str, int] = {}
    for r in ex.tensors:
        types[r.type] = types.get(r.type, 0) + 1
    info["tensor_types"] = types
    info["bytes"] = (work / "q4_0" / "model.gguf").stat().st_size
    info["exact"] = all(r.how in ("exact", "float") for r in ex.tensors)
    shutil.rmtree(work, ignore_errors=True)
    return info


def token_window(tokenizer) -> torch.Tensor:
    """``[1, 512]`` int64: consecutive tokens of the first eval play after its front matter."""
    ids = tokenizer(corpus.read([corpus.EVAL_FILES[0]]), add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ids[:, SKIP_TOKENS : SKIP_TOKENS + PREFILL_LEN].contiguous()


# -- timing ----------------------------------------------------------------------------------------


def timed(f: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def generate(model: nn.Module, prompt: torch.Tensor, n: int) -> torch.Tensor:
    return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          attention_mask=torch.ones_like(prompt))  # fmt: skip


# Measurements that hook into the model (the split and the profile) run under no_grad, not inference_mode:
# inference tensors have no version counter, so there the fused norms hand their int8 rows to q/k/v and
# gate/up only while no hook that could edit them is registered (slimquant.nn.fused), and the timing hooks
# would switch the hand-off off. Without hooks (every other timing) inference_mode is used.
HOOKED_MODE = torch.no_grad


class DecodeStep:
    """One bare decode forward on a fixed KV cache of the prompt (cropped back after each call)."""

    def __init__(self, model: nn.Module, prompt: torch.Tensor, mode: Callable = torch.inference_mode) -> None:
        self.model, self.mode = model, mode
        with mode():
            out = model(prompt, use_cache=True)
        self.cache = out.past_key_values
        self.token = out.logits[:, -1:].argmax(-1)
        self.length = prompt.shape[1]

    def __call__(self) -> None:
        with self.mode():
            self.model(self.token, past_key_values=self.cache, use_cache=True)
        self.cache.crop(self.length - self.cache.get_seq_length())  # a negative count: tokens to drop


def measure(models: dict[str, nn.Module], window: torch.Tensor, rounds: int, steps: int, new_tokens: int) -> dict:
    """Interleaved rounds; per model lists of prefill s, decode tokens/s, bare step s, generate s/token."""
    prompt = window[:, :PROMPT_LEN]
    names = list(models)
    stepper = {n: DecodeStep(m, prompt) for n, m in models.items()}
    res: dict[str, dict[str, list[float]]] = {n: defaultdict(list) for n in names}
    with torch.inference_mode():
        for m in models.values():  # warm-up: oneDNN primitives, allocator, cache classes
            m(window)
            generate(m, prompt, 2)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                m = models[name]
                res[name]["prefill_s"].append(timed(lambda: m(window, logits_to_keep=1)))
                res[name]["prefill_all_s"].append(timed(lambda: m(window)))
                t1 = timed(lambda: generate(m, prompt, 1))
                tn = timed(lambda: generate(m, prompt, new_tokens))
                res[name]["decode_tok_s"].append((new_tokens - 1) / (tn - t1))
                res[name]["gen_s_per_token"].append((tn - t1) / (new_tokens - 1))
                stepper[name]()
                res[name]["step_s"].append(statistics.median(timed(stepper[name]) for _ in range(steps)))
    return res


def agreement(models: dict[str, nn.Module], window: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement of each model's next-token argmax with float32 on the prefill window (a sanity check)."""
    with torch.inference_mode():
        logits = {n: m(window).logits[0].float() for n, m in models.items()}
    ref = logits["float32"].argmax(-1)
    return {n: float((lg.argmax(-1) == ref).float().mean()) for n, lg in logits.items()}


SPLIT_PARTS = ("MLP blocks", "attention projections", "norms", "rest")


def split_part(module: nn.Module) -> str | None:
    """Which part of the prefill split ``module``'s time belongs to (None: not timed by itself). The MLP
    blocks (gate, up, act * up, down) and the norms are timed whole, so a fused module and the float ops
    it replaces land in the same part."""
    name = type(module).__name__
    if name.endswith("MLP"):
        return "MLP blocks"
    if name.endswith("RMSNorm") or isinstance(module, nn.LayerNorm):
        return "norms"
    if linear_like(module):
        return "attention projections"  # q/k/v/o (the float lm_head on one position goes to "rest")
    return None


def prefill_split(models: dict[str, nn.Module], window: torch.Tensor, reps: int = 3) -> dict[str, dict[str, float]]:
    """Per model, median over ``reps`` prefills (``logits_to_keep=1``) of the seconds in each of
    :data:`SPLIT_PARTS` and in total, timed by forward hooks on the outermost timed modules."""
    out = {}
    for name, m in models.items():
        lm_head = m.get_output_embeddings()
        spent: dict[str, float] = defaultdict(float)
        stack: list[tuple[nn.Module, float]] = []

        def pre(mod, args):
            if not stack:
                stack.append((mod, time.perf_counter()))
            else:
                stack.append((mod, -1.0))

        def post(mod, args, res):
            _, t0 = stack.pop()
            if t0 >= 0:
                spent[mod._sq_part] += time.perf_counter() - t0

        handles = []
        blocks: list[str] = []  # MLP blocks are timed whole: no hooks inside them (hooks on a 4-bit MLP's
        for mod_name, mod in m.named_modules():  # gate / up would make it run unfused, slimquant.nn.fused)
            part = split_part(mod)
            if part is None or mod is lm_head or any(mod_name.startswith(b + ".") for b in blocks):
                continue
            if part == "MLP blocks":
                blocks.append(mod_name)
            mod._sq_part = part
            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
        runs: dict[str, list[float]] = defaultdict(list)
        try:
            with HOOKED_MODE():
                m(window, logits_to_keep=1)
                for _ in range(reps):
                    spent.clear()
                    total = timed(lambda: m(window, logits_to_keep=1))
                    runs["total"].append(total)
                    for part in SPLIT_PARTS[:-1]:
                        runs[part].append(spent[part])
                    runs["rest"].append(total - sum(spent.values()))
        finally:
            for h in handles:
                h.remove()
        out[name] = {part: statistics.median(v) for part, v in runs.items()}
    return out


# -- profile of one decode step --------------------------------------------------------------------


def linear_like(module: nn.Module) -> bool:
    from slimquant.nn import QLinear, QLinearFP8, QLinearW8A8

    return isinstance(module, (nn.Linear, QLinear, QLinearW8A8, QLinearFP8))


def profile_step(model: nn.Module, step: DecodeStep) -> tuple[dict[str, float], object]:
    """Self-time (s) of one decode step by category, and the profiler's key averages."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    open_ranges: dict[int, record_function] = {}

    def pre(mod, args):
        rf = record_function(LINEAR_RANGE)
        rf.__enter__()
        open_ranges[id(mod)] = rf

    def post(mod, args, out):
        open_ranges.pop(id(mod)).__exit__(None, None, None)

    handles = []
    for mod in model.modules():
        if linear_like(mod):
            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        step()  # warm with the hooks on
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            t0 = time.perf_counter()
            step()
            wall = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    cat: dict[str, float] = defaultdict(float)
    events = [e for e in prof.events() if e.device_type.name == "CPU"]
    for e in events:
        inside, p = e.name == LINEAR_RANGE, e.cpu_parent
        while p is not None and not inside:
            inside, p = p.name == LINEAR_RANGE, p.cpu_parent
        t = e.self_cpu_time_total * 1e-6
        if e.name == LINEAR_RANGE:
            cat["linear: python"] += t
        elif e.name in FUSED_PRODUCERS:
            cat["native norm / SiLU*up (+ int8 rows)"] += t
        elif e.name.startswith(NATIVE_PREFIX):
            cat["linear: native kernel"] += t
        elif e.name in MATMUL_OPS:
            cat["linear: matmul" if inside else "other: matmul"] += t
        elif inside:
            cat["linear: other aten ops"] += t
        elif e.name in ATTENTION_OPS:
            cat["attention (sdpa)"] += t
        else:
            cat["model: other aten ops"] += t
    accounted = sum(cat.values())
    cat["model: python + generate-free glue"] = max(0.0, wall - accounted)
    cat["wall (profiled)"] = wall
    return dict(cat), prof.key_averages()


CATEGORIES = ("linear: matmul", "linear: native kernel", "linear: other aten ops", "linear: python",
              "native norm / SiLU*up (+ int8 rows)", "attention (sdpa)", "model: other aten ops",
              "model: python + generate-free glue")  # fmt: skip


def top_ops(averages, n: int) -> str:
    rows = sorted(averages, key=lambda a: a.self_cpu_time_total, reverse=True)
    rows = [a for a in rows if a.key != LINEAR_RANGE][:n]
    total = sum(a.self_cpu_time_total for a in averages)
    lines = ["| op | calls | self ms | share of op time |", "|---|---|---|---|"]
    for a in rows:
        lines.append(f"| `{a.key}` | {a.count} | {a.self_cpu_time_total / 1e3:.2f} | "
                     f"{a.self_cpu_time_total / total:.1%} |")  # fmt: skip
    return "\n".join(lines)


# -- report ----------------------------------------------------------------------------------------


def med(v: list[float]) -> float:
    return statistics.median(v)


def spread(v: list[float]) -> str:
    return f"{(max(v) - min(v)) / med(v):.0%}" if len(v) > 1 else "-"


def speed_table(res: dict, top1: dict[str, float], anchor: dict | None = None) -> str:
    f = res["float32"]
    head = ("| model | prefill 512 ms | prefill vs fp32 | prefill, all logits ms | vs fp32 | decode tok/s | decode vs fp32 | "
            "bare step ms | step vs fp32 | generate overhead ms/token | top-1 vs fp32 |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in res.items():
        pf, dec, st, g = med(r["prefill_s"]), med(r["decode_tok_s"]), med(r["step_s"]), med(r["gen_s_per_token"])
        lines.append(
            f"| {name} | {pf * 1e3:.0f} (±{spread(r['prefill_s'])}) | {med(f['prefill_s']) / pf:.2f}x | "
            f"{med(r['prefill_all_s']) * 1e3:.0f} | {med(f['prefill_all_s']) / med(r['prefill_all_s']):.2f}x | "
            f"{dec:.1f} (±{spread(r['decode_tok_s'])}) | {dec / med(f['decode_tok_s']):.2f}x | "
            f"{st * 1e3:.1f} | {med(f['step_s']) / st:.2f}x | {(g - st) * 1e3:.1f} | {top1[name]:.3f} |"
        )
    if anchor:
        pre_all = PREFILL_LEN / anchor["prefill_tok_s"]
        dec = anchor["decode_tok_s"]
        lines.append(
            f"| llama.cpp on our {W4_Q4_0} GGUF | - | - | {pre_all * 1e3:.0f} | {med(f['prefill_all_s']) / pre_all:.2f}x | "
            f"{dec:.1f} | {dec / med(f['decode_tok_s']):.2f}x | {1e3 / dec:.1f} | {med(f['step_s']) * dec:.2f}x | - | - |"
        )
    return "\n".join(lines)


def profile_table(cats: dict[str, dict[str, float]]) -> str:
    names = list(cats)
    lines = ["| share of one decode step | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for c in CATEGORIES:
        cells = [f"{cats[n].get(c, 0.0) * 1e3:.1f} ms ({cats[n].get(c, 0.0) / cats[n]['wall (profiled)']:.0%})"
                 for n in names]  # fmt: skip
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append("| **wall, profiled** | " + " | ".join(f"{cats[n]['wall (profiled)'] * 1e3:.1f} ms" for n in names) + " |")
    return "\n".join(lines)


def split_table(split: dict[str, dict[str, float]]) -> str:
    f = split["float32"]
    lines = ["| model | prefill ms | " + " | ".join(f"{p} ms (vs fp32)" for p in SPLIT_PARTS) + " |",
             "|---|---|" + "---|" * len(SPLIT_PARTS)]  # fmt: skip
    for name, r in split.items():
        cells = [f"{r[p] * 1e3:.0f} ({f[p] / r[p]:.2f}x)" for p in SPLIT_PARTS]
        lines.append(f"| {name} | {r['total'] * 1e3:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def anchor_build() -> str:
    import gguf_llama

    return f"{gguf_llama.LLAMA_CPP_PYTHON}, CMAKE_ARGS `{gguf_llama.CMAKE_ARGS}`"


def anchor_types(anchor: dict) -> str:
    return ", ".join(f"{n} x {t}" for t, n in sorted(anchor.get("tensor_types", {}).items()))


def render(res, top1, cats, tops, quant_s, rounds, elapsed, split, anchor) -> str:
    import transformers

    from slimquant.kernels import native

    return "\n".join([
        "## Speed (issues 3, 14): prefill and decode, float32 vs W8A16 vs W8A8 vs W4A16 (CPU, batch 1)",
        "",
        f"Command: `.venv/bin/python benchmarks/speed.py{'' if rounds == ROUNDS else f' --rounds {rounds}'}`. "
        f"Machine: {os.cpu_count()} CPU cores, "
        f"{platform.machine()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"`torch.set_num_threads({THREADS})`; one process, {rounds} interleaved rounds, {elapsed / 60:.1f} min. "
        "The machine is shared: compare ratios (all measured side by side in one process), not absolute times.",
        "",
        f"**{LLM}** float32 (from the GGUF); every quantized copy keeps lm_head float (576 x 49152, "
        "113 MB of float32 read per decoded token). W8A16 = int8 per-channel symmetric RTN weights; W8A8 dynamic = "
        "+ per-token symmetric int8 inputs; W8A8 static = + per-tensor asymmetric int8 inputs calibrated (minmax) on "
        f"{CALIB_WINDOWS} x {CALIB_LEN}-token windows of {', '.join(corpus.CALIB_FILES)}. "
        f"Prefill: `model(input_ids, logits_to_keep=1)` (the KV cache and the next token's logits, as `generate`'s "
        f"prefill) on tokens {SKIP_TOKENS}..{SKIP_TOKENS + PREFILL_LEN} of {corpus.EVAL_FILES[0]}; *all logits*: "
        "`model(input_ids)`, which adds the float lm_head on all 512 positions (~21% of the float model's FLOPs). "
        f"Decode: greedy `generate` of {NEW_TOKENS} and of 1 new token from the first "
        f"{PROMPT_LEN} of those tokens (`min_new_tokens == max_new_tokens`); tokens/s = {NEW_TOKENS - 1} / "
        "(t64 - t1). Bare step: one `model(token, past_key_values=cache)` call (median of "
        f"{STEPS} per round); generate overhead = generate's time per token - bare step. ± = (max - min) / median "
        "over rounds. Quantize time: " + ", ".join(f"{n} {s:.1f} s" for n, s in quant_s.items()) + ". "
        f"Quantized layers run the default `fast` kernels: native C++ ({native.cpu_features()}) when built, "
        f"else torch ops{'' if native.available() else ' (native unavailable here: ' + str(native.unavailable_reason()) + ')'}; "
        "in the W8A8 models `slimquant.quantize` has fused each RMSNorm and gated MLP that feed W8A8 layers "
        "with their int8 input quantization (`slimquant.nn.fused`: the norm writes its float output and the "
        "int8 rows q/k/v or gate/up read, so a shared input is quantized once; SiLU * up goes to int8 rows "
        "without a float copy); in the W8A16 and W4A16 models each RMSNorm that feeds only weight-only layers "
        "runs the native float kernel instead (`NativeRMSNorm`: one pass per row, rows in parallel; transformers' "
        "norm is five torch ops), and the float32 model keeps transformers' norms. "
        "W4A16 = int4 RTN weights packed two per byte (per group of 32 / 64 columns or per channel; smollm2's 576 columns allow no 128; sym: "
        "no zero point, asym: integer zero point); they run the native 4-bit kernels: a GEMV over the nibbles "
        f"for up to {native.W4A16_GEMV_MAX_ROWS} rows (decode), and for more rows (prefill) a GEMM over float "
        f"tiles of the weight ({native.library().w4_tile_bytes() // 1024 if native.available() else '?'} KiB each, "
        "at::mm per tile; no more float weight than one tile exists at a time, and only a layer smaller than a tile is ever whole in float), and `slimquant.quantize` has swapped each gated "
        "MLP for `slimquant.nn.fused.FusedW4A16GatedMLP`: one native call computes silu(gate(x)) * up(x) from both "
        "packed weights (at prefill one tiled GEMM for the two weights, silu * up applied to each tile's products "
        "in cache, so neither product is written whole; at decode the two nibble GEMVs and silu * up in one call). "
        f"*{W4_UNFUSED}* = {W4_MAIN} with those MLPs and norms put back (gate, up, silu, *, down as separate calls, "
        "transformers' RMSNorm): what the 4-bit linear layers alone give. "
        f"*{W4_Q4_0}* = the same on llama.cpp's Q4_0 grid (fp16 block scales, `quantize --gguf_type Q4_0`); "
        f"its GGUF export is exact: {anchor.get('exact')}, {anchor.get('bytes', 0) / 2**20:.1f} MiB; "
        f"*{W4_BEFORE}* = {W4_MAIN} run as before these kernels (dequantize the whole weight, then F.linear, per call). "
        f"The last row is llama.cpp ({anchor_build()}) on our own GGUF export of the {W4_Q4_0} model, run after "
        "our rounds in the same job with 2 threads: the transformer weights are the identical Q4_0 blocks, but "
        f"llama.cpp also quantizes the tied embedding / output ({anchor_types(anchor)}) and its Q4_0 dot "
        "products run on int8-quantized activations (W4A8), while every slimquant row keeps lm_head float32 and "
        "float32 activations. Its *prefill, all logits* is llama.cpp's own batch eval of the 512 tokens with "
        f"`logits_all`, its decode the median over {anchor.get('decode_rounds', '?')} prompts of 64 `eval([token])` calls "
        "(no generate loop, so it is also its *bare step*).",
        "",
        speed_table(res, top1, anchor),
        "",
        "**Prefill split** (one more prefill per model, median of 3, forward hooks on the outermost timed modules): "
        "*MLP blocks* = gate, up, SiLU * up and down; *attention projections* = q/k/v/o; *norms* = the RMSNorms; "
        "*rest* = everything else (attention itself, rotary embeddings, residual adds, embeddings, the float "
        "lm_head on one position, hook overhead). In W8A8 models the norms that feed W8A8 layers also write "
        "their int8 rows, and the MLP never writes SiLU * up in float (`slimquant.nn.fused`), so their "
        "quantize passes are timed under *norms* and *MLP blocks*; attention, rotary embeddings and residual "
        "adds are the same float32 code in every model.",
        "",
        split_table(split),
        "",
        "**Where one decode step goes** (torch.profiler, record_shapes off, one step after the prompt; forward "
        "hooks put each Linear / QLinear / QLinearW8A8 call in a range). *linear: matmul* = `mm`/`addmm`/`_int_mm` "
        "inside the linear layers (lm_head included); *linear: other aten ops* = everything else the layers run "
        "(per-token quantize, rescale, dequantize, casts, `t`/views of `F.linear`); *linear: native kernel* = "
        "the C++ kernels' own time (quantize, GEMV, rescale; a `_int_mm` they call counts as matmul); "
        "*native norm / SiLU*up (+ int8 rows)* = the native RMSNorm and SiLU * up kernels outside the linear "
        "layers (in the W8A8 models they also write the next layers' int8 input; the W8A16 / W4A16 norms write "
        "only the float output); "
        "The hooks on every linear layer make the 4-bit models' gated MLPs run unfused in this profile. "
        "*linear: python* = interpreter "
        "time inside the layers' forwards (hooks included); *model: python* = the rest of the step not inside any "
        "aten op. The profiler adds a few us per op, so the shares of small ops are inflated.",
        "",
        profile_table(cats),
        "",
        *[part for name, t in tops.items() for part in (f"Top ops by self time, {name}:", "", t, "")],
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round, 16 new tokens, 5 steps; no BENCHMARKS.md")
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    from slimquant.models.loading import load_model

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    rounds = 1 if args.quick else args.rounds
    steps = 5 if args.quick else STEPS
    new_tokens = 16 if args.quick else NEW_TOKENS
    lm = load_model(LLM)
    models, quant_s = build_models(lm, args.quick)
    window = token_window(lm.tokenizer)
    top1 = agreement(models, window)
    res = measure(models, window, rounds, steps, new_tokens)
    split = prefill_split(models, window)
    cats, tops = {}, {}
    for name in PROFILED:
        m = models[name]
        cats[name], averages = profile_step(m, DecodeStep(m, window[:, :PROMPT_LEN], HOOKED_MODE))
        if name in ("float32", "W8A8 dynamic", "W8A16", W4_MAIN):
            tops[name] = top_ops(averages, 12)
    anchor = llama_anchor(lm, models[W4_Q4_0], window, rounds)
    anchor["decode_rounds"] = rounds
    print("llama.cpp anchor", anchor, flush=True)
    report = render(res, top1, cats, tops, quant_s, rounds, time.perf_counter() - t_start, split, anchor)
    print(report)
    if not args.quick:
        wo.write_section(report, "speed")


if __name__ == "__main__":
    main()
