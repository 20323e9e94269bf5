"""The AutoML bit-width search on smollm2-135m (issue 13 item 4).

Usage:
    python benchmarks/search.py                 # every part; rewrites the search section of BENCHMARKS.md
    python benchmarks/search.py --part agents   # one part (rtn, agents, gptq, gptq_fine, gptq_wide, gptq_mix, small);
                                                # finished parts are kept in
                                                # benchmarks/out/search-rows.json and reused

The search's metric (what the agents see) is the KL divergence from the float model per token on 4 windows x 256
tokens of Much Ado About Nothing; calibration (Fisher sensitivity, GPTQ) uses 64 windows x 256 tokens of The
Merchant of Venice and As You Like It. Every configuration a table reports is then evaluated on the usual
held-out text (4 windows x 512 tokens of each of Romeo and Juliet, Julius Caesar and A Midsummer Night's Dream,
after the first 1024 tokens): perplexity, KL from the float model per token, top-1 agreement.

- rtn / agents: options int3 / int4 (group 64, symmetric), int8 per channel, float per Linear layer of the 30
  blocks (210 layers; lm_head stays float), round to nearest; size budget: the bytes of uniform W4A16 g64
  (``compress_threshold`` = its percent saved), reward ``acc_first``. Each agent (rl = DDPG, evolutionary,
  greedy, random) gets the same number of evaluated configurations.
- gptq: the same search with GPTQ (act-order, static groups) solving each option over the whole model; the
  best configuration is then quantized for real (mixed GPTQ) and that checkpoint is evaluated.
- gptq_fine / gptq_wide / gptq_mix: the GPTQ search (greedy) with more options: int4 g32 / g128 besides the
  above; int3-6 g64; int3-6 g64 + int4-6 g128 + asymmetric int3 / int4 g64 with 80 evaluations (ten whole-model
  GPTQ runs: about 23 minutes to build here).
- small: ``compress_first`` with ``acc_threshold`` = 2 x uniform W8A16's KL on the search windows: the
  smallest checkpoint the search finds within it.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import text as corpus  # noqa: E402
import weight_only as wo  # noqa: E402

ROWS = wo.OUT / "search-rows.json"
PLOT = HERE / "plots" / "search.png"
DEV_WINDOWS, DEV_LEN = 4, 256
CALIB_WINDOWS, CALIB_LEN = 64, 256
EVALS = 40  # evaluated configurations per search
AGENTS = ("rl", "evolutionary", "greedy", "random")
BITS, GROUP = (3, 4, 8, 16), 64


def windows(tokenizer, files, n: int, seq_len: int, seed: int) -> torch.Tensor:
    from slimquant.data import calibration_windows

    return calibration_windows(tokenizer, corpus.read(list(files)).split("\n\n"), n, seq_len, seed=seed)


class DevKL:
    """The search metric: KL from the float model per token on the dev windows (lower is better)."""

    def __init__(self, model, dev: torch.Tensor) -> None:
        self.dev = dev
        with torch.no_grad():
            self.ref = [torch.log_softmax(model(input_ids=w[None]).logits.float(), -1) for w in dev]

    @torch.no_grad()
    def __call__(self, model) -> float:
        kl, n = 0.0, 0
        for w, ref in zip(self.dev, self.ref):
            logp = torch.log_softmax(model(input_ids=w[None]).logits.float(), -1)
            kl += float((ref.exp() * (ref - logp)).sum())
            n += ref.shape[1]
        return kl / n


def held_out(model, eval_ids, ref_path) -> dict:
    with torch.no_grad():
        return wo.eval_llm(model, eval_ids, ref_path)


def mix(choice: dict) -> str:
    counts: dict[str, int] = {}
    for v in choice.values():
        counts[v] = counts.get(v, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def run_search(model, ev, space, calib, config):
    import slimquant as sq

    t0 = time.perf_counter()
    res = sq.bit_search(model, ev, calib_data=calib, config=config, space=space)
    return res, time.perf_counter() - t0


def rtn_space(lm, calib):
    from slimquant.search.space import Assembly, bit_options

    t0 = time.perf_counter()
    space = Assembly(lm.model, bit_options(BITS, GROUP), calib_data=calib)
    return space, time.perf_counter() - t0


def part_rtn_agents(lm, ev, space, calib, eval_ids, ref_path, rows: dict, parts: set[str]) -> None:
    """The uniform references in the RTN search space; each agent at the W4 g64 budget."""
    import slimquant as sq

    uniform = {}
    for label in ("w3g64", "w4g64", "w8"):
        with space.configured(space.uniform(label)) as m:
            uniform[label] = {"dev_kl": ev(m), **held_out(m, eval_ids, ref_path), "bytes": space.bytes(space.uniform(label)),
                              "compress": 100 * (1 - space.bytes(space.uniform(label)) / space.float_bytes())}  # fmt: skip
        print(label, uniform[label], flush=True)
    rows["rtn_uniform"] = uniform
    rows["float_bytes"] = space.float_bytes()
    thr = uniform["w4g64"]["compress"]
    for agent in AGENTS:
        key = f"rtn_{agent}"
        if key in rows and "agents" not in parts:
            continue
        cfg = sq.SearchConfig(agent=agent, max_episode=EVALS, num_warmup=10, compress_threshold=thr,
                              higher_is_better=False, objective_keys=["accuracy", "compress_ratio", "flops"])  # fmt: skip
        res, secs = run_search(lm.model, ev, space, calib, cfg)
        best = res.best
        with res.space.configured(best.choice) as m:
            ho = held_out(m, eval_ids, ref_path)
        curve = []
        for e in res.history:
            if e.accuracy is not None:
                curve.append(min(e.accuracy, curve[-1]) if curve else e.accuracy)
        rows[key] = {"agent": agent, "dev_kl": best.accuracy, "evaluations": len(res.history), "seconds": secs,
                     "best_at": best.index + 1, "bytes": res.space.bytes(best.choice), "compress": best.compress_ratio,
                     "mix": mix(best.choice), "curve": curve, **ho}  # fmt: skip
        print(key, {k: v for k, v in rows[key].items() if k != "curve"}, flush=True)
        if agent == "rl":
            res.save(wo.OUT / "search-rtn-rl")
        del res
        gc.collect()
        ROWS.write_text(json.dumps(rows, indent=1))


def part_gptq(lm, ev, calib, eval_ids, ref_path, rows: dict) -> None:
    import copy
    import dataclasses

    import slimquant as sq
    from slimquant.search.space import Assembly, bit_options

    base = sq.Recipe.from_flags("--w_method gptq")
    base = dataclasses.replace(base, steps=(base.weight_step,))
    t0 = time.perf_counter()
    space = Assembly(lm.model, bit_options(BITS, GROUP), base=base, calib_data=calib)
    rows["gptq_space_build_s"] = time.perf_counter() - t0
    thr = rows["rtn_uniform"]["w4g64"]["compress"]
    out = {}
    for agent in ("rl", "greedy"):
        cfg = sq.SearchConfig(agent=agent, max_episode=EVALS, num_warmup=10, compress_threshold=thr,
                              higher_is_better=False, objective_keys=["accuracy", "compress_ratio"])  # fmt: skip
        res, secs = run_search(lm.model, ev, space, calib, cfg)
        if "uniform" not in out:
            uni = {}
            for label in ("w4g64", "w8"):
                with res.space.configured(res.space.uniform(label)) as m:
                    uni[label] = {"dev_kl": ev(m), **held_out(m, eval_ids, ref_path),
                                  "bytes": res.space.bytes(res.space.uniform(label))}  # fmt: skip
            out["uniform"] = uni
        best = res.best
        with res.space.configured(best.choice) as m:
            assembled = held_out(m, eval_ids, ref_path)
        t0 = time.perf_counter()
        real = sq.quantize(copy.deepcopy(lm.model), res.recipe, calib_data=calib)
        real_s = time.perf_counter() - t0
        out[agent] = {"dev_kl": best.accuracy, "evaluations": len(res.history), "seconds": secs, "real_s": real_s,
                      "bytes": res.space.bytes(best.choice), "compress": best.compress_ratio, "mix": mix(best.choice),
                      "assembled": assembled, **held_out(real.model, eval_ids, ref_path)}  # fmt: skip
        print("gptq", agent, out[agent], flush=True)
        del res, real
        gc.collect()
    rows["gptq"] = out
    ROWS.write_text(json.dumps(rows, indent=1))


def part_gptq_fine(lm, ev, calib, eval_ids, ref_path, rows: dict, key: str = "gptq_fine") -> None:
    """GPTQ with finer options (greedy). ``gptq_fine``: int4 with groups of 32 and 128 besides int3 / int4 g64 /
    int8 / float; ``gptq_wide``: int3 / int4 / int5 / int6 g64, int8, float (one bit steps in the middle)."""
    import copy
    import dataclasses

    import slimquant as sq
    from slimquant.search.space import Assembly, bit_options

    base = sq.Recipe.from_flags("--w_method gptq")
    base = dataclasses.replace(base, steps=(base.weight_step,))
    evals = EVALS
    if key == "gptq_fine":
        opts = bit_options(BITS, GROUP) + bit_options([4], 32) + bit_options([4], 128)
    elif key == "gptq_wide":
        opts = bit_options((3, 4, 5, 6, 8, 16), GROUP)
    else:  # gptq_mix: bits x group sizes, asymmetric int3 / int4 too, twice the evaluations
        from slimquant.search.space import Option
        from slimquant.types.spec import Granularity, QuantSpec

        opts = (bit_options((3, 4, 5, 6, 8, 16), GROUP) + bit_options((4, 5, 6), 128)
                + [Option(f"w{b}g64a", QuantSpec(f"int{b}", Granularity.PER_GROUP, 64, False)) for b in (3, 4)])
        evals = 2 * EVALS
    t0 = time.perf_counter()
    space = Assembly(lm.model, opts, base=base, calib_data=calib)
    build_s = time.perf_counter() - t0
    cfg = sq.SearchConfig(agent="greedy", max_episode=evals, compress_threshold=rows["rtn_uniform"]["w4g64"]["compress"],
                          higher_is_better=False, objective_keys=["accuracy", "compress_ratio"])  # fmt: skip
    res, secs = run_search(lm.model, ev, space, calib, cfg)
    best = res.best
    if key == "gptq_mix":  # the asymmetric uniform W4 g64 for reference (a little larger: its zero points)
        with res.space.configured(res.space.uniform("w4g64a")) as m:
            rows["gptq_uniform_w4g64a"] = {"dev_kl": ev(m), **held_out(m, eval_ids, ref_path),
                                           "bytes": res.space.bytes(res.space.uniform("w4g64a"))}  # fmt: skip
    real = sq.quantize(copy.deepcopy(lm.model), res.recipe, calib_data=calib)
    rows[key] = {"dev_kl": best.accuracy, "evaluations": len(res.history), "seconds": secs, "build_s": build_s,
                 "bytes": res.space.bytes(best.choice), "compress": best.compress_ratio, "mix": mix(best.choice),
                 "best_at": best.index + 1, **held_out(real.model, eval_ids, ref_path)}  # fmt: skip
    print(key, rows[key], flush=True)
    ROWS.write_text(json.dumps(rows, indent=1))


def part_small(lm, ev, space, calib, eval_ids, ref_path, rows: dict) -> None:
    import slimquant as sq

    target = 2 * rows["rtn_uniform"]["w8"]["dev_kl"]
    out = {"target_dev_kl": target}
    for agent in ("rl", "greedy"):
        cfg = sq.SearchConfig(agent=agent, max_episode=EVALS, num_warmup=10, reward_type="compress_first",
                              acc_threshold=target, higher_is_better=False)  # fmt: skip
        res, secs = run_search(lm.model, ev, space, calib, cfg)
        best = res.best
        with res.space.configured(best.choice) as m:
            ho = held_out(m, eval_ids, ref_path)
        out[agent] = {"dev_kl": best.accuracy, "feasible": best.feasible, "evaluations": len(res.history),
                      "seconds": secs, "bytes": res.space.bytes(best.choice), "compress": best.compress_ratio,
                      "mix": mix(best.choice), "unmet": res.unmet, **ho}  # fmt: skip
        print("small", agent, out[agent], flush=True)
        del res
        gc.collect()
    rows["small"] = out
    ROWS.write_text(json.dumps(rows, indent=1))


def plot(rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for agent in AGENTS:
        r = rows.get(f"rtn_{agent}")
        if r:
            ax.plot(range(1, len(r["curve"]) + 1), r["curve"], label=agent)
    u = rows["rtn_uniform"]["w4g64"]["dev_kl"]
    ax.axhline(u, ls="--", c="k", lw=1, label="uniform W4 g64")
    ax.set_xlabel("evaluated configurations")
    ax.set_ylabel("best KL so far (search windows)")
    ax.set_yscale("log")
    ax.set_title("smollm2-135m, RTN, size of uniform W4A16 g64")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    PLOT.parent.mkdir(exist_ok=True)
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def render(rows: dict, machine: str) -> str:
    fb = rows["float_bytes"]
    u = rows["rtn_uniform"]

    def ho(r: dict) -> str:
        return f"{r['perplexity']:.3f} | {r['kl']:.4f} | {100 * r['top1']:.1f}"

    lines = ["## AutoML bit-width search (issue 13 item 4)", "",
             f"Command: `.venv/bin/python benchmarks/search.py` (one run, alone on the machine). {machine}.", "",
             f"smollm2-135m, 210 searchable Linear layers (lm_head stays float; {fb / 2**20:.1f} MiB of float32 "
             f"weights). Options per layer: int3 / int4 g{GROUP} symmetric, int8 per channel, float. Search metric: "
             f"KL from float per token on {DEV_WINDOWS} windows x {DEV_LEN} tokens of Much Ado About Nothing; "
             f"calibration {CALIB_WINDOWS} x {CALIB_LEN} tokens of The Merchant of Venice and As You Like It. "
             "Held-out columns: 4 windows x 512 tokens of each evaluation play (Romeo and Juliet, Julius Caesar, "
             "A Midsummer Night's Dream). Sizes are the searchable layers' stored bytes (packed weights, float32 "
             "scales); the rest of the model is the same in every row.",
             "", "### Mixed vs uniform at the size of uniform W4A16 g64", "",
             "| configuration | searchable MiB | vs uniform W4 size | search KL | ppl | KL | top-1 % | mix |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    base_b = u["w4g64"]["bytes"]
    for label in ("w8", "w4g64", "w3g64"):
        r = u[label]
        lines.append(f"| RTN uniform {label} | {r['bytes'] / 2**20:.2f} | {r['bytes'] / base_b:.3f} | {r['dev_kl']:.4f} | "
                     f"{ho(r)} | |")  # fmt: skip
    for agent in AGENTS:
        r = rows.get(f"rtn_{agent}")
        if r:
            lines.append(f"| RTN mixed ({agent}) | {r['bytes'] / 2**20:.2f} | {r['bytes'] / base_b:.3f} | {r['dev_kl']:.4f} "
                         f"| {ho(r)} | {r['mix']} |")  # fmt: skip
    g = rows.get("gptq")
    if g:
        gu = g["uniform"]
        for label in ("w8", "w4g64"):
            r = gu[label]
            lines.append(f"| GPTQ uniform {label} | {r['bytes'] / 2**20:.2f} | {r['bytes'] / base_b:.3f} | {r['dev_kl']:.4f} "
                         f"| {ho(r)} | |")  # fmt: skip
        for agent in ("rl", "greedy"):
            r = g.get(agent)
            if r:
                lines.append(f"| GPTQ mixed ({agent}), quantized for real | {r['bytes'] / 2**20:.2f} | "
                             f"{r['bytes'] / base_b:.3f} | {r['dev_kl']:.4f} | {ho(r)} | {r['mix']} |")  # fmt: skip
    f = rows.get("gptq_fine")
    if f:
        lines.append(f"| GPTQ mixed (greedy, + int4 g32 / g128 options), quantized for real | {f['bytes'] / 2**20:.2f} | "
                     f"{f['bytes'] / base_b:.3f} | {f['dev_kl']:.4f} | {ho(f)} | {f['mix']} |")  # fmt: skip
    wide_labels = {"gptq_wide": "int3 / int4 / int5 / int6 g64, int8, float",
                   "gptq_mix": f"int3-6 g64, int4-6 g128, asymmetric int3 / int4 g64, int8, float; {2 * EVALS} evaluations"}
    ua = rows.get("gptq_uniform_w4g64a")
    if ua:
        lines.append(f"| GPTQ uniform w4g64 asymmetric | {ua['bytes'] / 2**20:.2f} | {ua['bytes'] / base_b:.3f} | "
                     f"{ua['dev_kl']:.4f} | {ho(ua)} | |")  # fmt: skip
    for key, what in wide_labels.items():
        r = rows.get(key)
        if r:
            lines.append(f"| GPTQ mixed (greedy; {what}), quantized for real | {r['bytes'] / 2**20:.2f} | "
                         f"{r['bytes'] / base_b:.3f} | {r['dev_kl']:.4f} | {ho(r)} | {r['mix']} |")  # fmt: skip
    best_rtn = min((rows[f"rtn_{a}"] for a in AGENTS if f"rtn_{a}" in rows), key=lambda r: r["dev_kl"])
    lines += ["", f"Held-out KL ratio mixed / uniform W4 g64, RTN: {best_rtn['kl'] / u['w4g64']['kl']:.2f} "
              f"(best agent on the search metric: {best_rtn['agent']}; rl: "
              f"{rows['rtn_rl']['kl'] / u['w4g64']['kl']:.2f})"
              + (f"; GPTQ: rl {g['rl']['kl'] / g['uniform']['w4g64']['kl']:.2f}, greedy "
                 f"{g['greedy']['kl'] / g['uniform']['w4g64']['kl']:.2f} (the real mixed-GPTQ checkpoints; assembled "
                 f"from the per-option runs: rl {g['rl']['assembled']['kl']:.4f}, greedy "
                 f"{g['greedy']['assembled']['kl']:.4f})" if g else "")
              + (f"; GPTQ with int4 g32 / g128 options too (greedy): {f['kl'] / g['uniform']['w4g64']['kl']:.2f}"
                 if f and g else "")
              + "".join(f"; GPTQ, {wide_labels[k]}: {rows[k]['kl'] / g['uniform']['w4g64']['kl']:.2f}"
                        for k in wide_labels if k in rows and g) + "."]  # fmt: skip
    lines += ["", f"### Agents at equal evaluations ({EVALS} configurations each, 10 random warm-up episodes)", "",
              "| agent | best search KL | found at evaluation | held-out KL | search wall s |", "|---|---|---|---|---|"]
    for agent in AGENTS:
        r = rows.get(f"rtn_{agent}")
        if r:
            lines.append(f"| {agent} | {r['dev_kl']:.4f} | {r['best_at']} | {r['kl']:.4f} | {r['seconds']:.0f} |")
    lines += ["", f"Best-so-far curves: `benchmarks/plots/{PLOT.name}`. The search space (every layer under every "
              f"option, once) is built once and shared: {rows['space_build_s']:.0f} s for RTN"
              + (f", {rows['gptq_space_build_s']:.0f} s for GPTQ (three whole-model runs)" if "gptq_space_build_s" in rows
                 else "") + "; the wall times above exclude it."]
    s = rows.get("small")
    if s:
        lines += ["", "### Smallest checkpoint within 2x W8A16's KL", "",
                  f"Target: search KL <= {s['target_dev_kl']:.4f} (2 x uniform W8A16 RTN's "
                  f"{u['w8']['dev_kl']:.4f}); reward compress_first.", "",
                  "| agent | searchable MiB | saved % | search KL | meets target | ppl | KL | top-1 % | held-out KL / W8A16's | mix |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for agent in ("rl", "greedy"):
            r = s.get(agent)
            if r:
                lines.append(f"| {agent} | {r['bytes'] / 2**20:.2f} | {r['compress']:.1f} | {r['dev_kl']:.4f} | "
                             f"{'yes' if r['feasible'] else 'no'} | {ho(r)} | {r['kl'] / u['w8']['kl']:.2f} | {r['mix']} |")  # fmt: skip
        lines.append(f"\nFor scale: uniform W8A16 is {u['w8']['bytes'] / 2**20:.2f} MiB, uniform W4 g64 "
                     f"{u['w4g64']['bytes'] / 2**20:.2f} MiB.")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    import slimquant as sq

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", action="append", choices=("rtn", "agents", "gptq", "gptq_fine", "gptq_wide", "gptq_mix", "small"))
    args = p.parse_args()
    parts = set(args.part or ("rtn", "agents", "gptq", "gptq_fine", "gptq_wide", "gptq_mix", "small"))
    torch.set_num_threads(2)
    wo.OUT.mkdir(parents=True, exist_ok=True)
    rows = json.loads(ROWS.read_text()) if ROWS.is_file() else {}
    lm = sq.load_model(wo.LLM)
    calib = windows(lm.tokenizer, corpus.CALIB_FILES[:2], CALIB_WINDOWS, CALIB_LEN, seed=0)
    dev = windows(lm.tokenizer, corpus.CALIB_FILES[2:], DEV_WINDOWS, DEV_LEN, seed=0)
    ev = DevKL(lm.model, dev)
    eval_ids = wo.eval_windows(lm.tokenizer, wo.WINDOWS_PER_TEXT)
    ref_path = wo.OUT / f"ref-{wo.LLM}-{wo.WINDOWS_PER_TEXT}.safetensors"
    if not ref_path.is_file():
        ref_path = wo.reference(wo.LLM, wo.WINDOWS_PER_TEXT)
    t0 = time.perf_counter()
    if parts & {"rtn", "agents", "small"} or "rtn_uniform" not in rows:
        space, rows["space_build_s"] = rtn_space(lm, calib)
        if parts & {"rtn", "agents"} or "rtn_uniform" not in rows:
            part_rtn_agents(lm, ev, space, calib, eval_ids, ref_path, rows, parts)
        if "small" in parts:
            part_small(lm, ev, space, calib, eval_ids, ref_path, rows)
        del space
        gc.collect()
    if "gptq" in parts:
        part_gptq(lm, ev, calib, eval_ids, ref_path, rows)
    if "gptq_fine" in parts:
        part_gptq_fine(lm, ev, calib, eval_ids, ref_path, rows)
    for key in ("gptq_wide", "gptq_mix"):
        if key in parts:
            part_gptq_fine(lm, ev, calib, eval_ids, ref_path, rows, key=key)
    rows["seconds"] = time.perf_counter() - t0
    ROWS.write_text(json.dumps(rows, indent=1))
    plot(rows)
    machine = f"Machine: {torch.get_num_threads()} threads, {platform.machine()}, torch {torch.__version__}"
    text = render(rows, machine)
    print(text)
    wo.write_section(text, "search")


if __name__ == "__main__":
    main()
