"""Bare commands (issue 13 item 0): what msModelSlim's flags give with no calibration file, before and after.

Usage:
    python benchmarks/defaults.py                 # the commands with this checkout's code; rewrites the section
    python benchmarks/defaults.py --rev e9d48ab   # the same commands with another commit's code (a git worktree
                                                  # under benchmarks/out), kept as that revision's rows
    python benchmarks/defaults.py --study         # GPTQ: groups vs calibration size (why more data hurt)
    python benchmarks/defaults.py --only "W8A8 dynamic m1"   # only these commands (comma-separated names)

Each command runs as a user types it (``python -m slimquant quantize ...`` in its own process, wall time of the
whole command: load, calibration, quantize, save); its checkpoint is then evaluated on the weight-only
benchmark's text and windows (KL vs float logits cached once). Rows of every revision measured are kept in
``benchmarks/out/defaults-rows.json`` and the section shows them side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import text as corpus  # noqa: E402
import weight_only as wo  # noqa: E402

ROWS = wo.OUT / "defaults-rows.json"
WINDOWS = wo.WINDOWS_PER_TEXT
# name -> the command after `slimquant` (DIR: the output directory; TEXT: the demo's text, as `make demo` gives it)
COMMANDS = {
    "W8A8 dynamic m1": "quantize --model_path smollm2-135m --save_directory DIR --w_bit 8 --a_bit 8 --is_dynamic True "
                       "--anti_method m1",
    "W8A8 dynamic m1, --mm_tensor False": "quantize --model_path smollm2-135m --save_directory DIR --w_bit 8 --a_bit 8 "
                                          "--is_dynamic True --anti_method m1 --mm_tensor False",
    "W4A16 g64 gptq": "quantize --model_path smollm2-135m --save_directory DIR --w_bit 4 --group_size 64 --w_method gptq",
    "make demo": "demo --text TEXT --save_directory DIR",
}  # fmt: skip
# The study: symmetric W4 g64 GPTQ (the bare command's spec) per group rule x calibration (windows, tokens)
STUDY_RULES = {"dynamic groups": dict(act_order=False, static_groups=False),
               "static groups": dict(act_order=False, static_groups=True),
               "act-order": dict(act_order=True, static_groups=True)}  # fmt: skip
STUDY_CALIB = [(64, 256), (128, 256), (64, 512)]


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(HERE.parent), *args], check=True, capture_output=True, text=True).stdout.strip()


def code_for(rev: str | None) -> tuple[str, dict]:
    """(short revision, environment) to run a command with ``rev``'s code (None: this checkout)."""
    env = dict(os.environ)
    if rev is None:
        dirty = " (uncommitted changes)" if git("status", "--porcelain", "--", "src") else ""
        return git("rev-parse", "--short", "HEAD") + dirty, env
    sha = git("rev-parse", "--short", rev)
    tree = wo.OUT / f"rev-{sha}"
    if not (tree / "src").is_dir():
        subprocess.run(["git", "-C", str(HERE.parent), "worktree", "add", "--detach", str(tree), sha], check=True)
    env["PYTHONPATH"] = str(tree / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return sha, env


def run_command(name: str, rev: str | None, ref: Path) -> dict:
    sha, env = code_for(rev)
    with tempfile.TemporaryDirectory(dir=wo.OUT) as tmp:
        out = Path(tmp) / "ckpt"
        words = {"DIR": str(out), "TEXT": str(corpus.text_path("romeo_and_juliet_gut.txt"))}
        argv = [sys.executable, "-m", "slimquant", *[words.get(w, w) for w in COMMANDS[name].split()]]
        t0 = time.perf_counter()
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name} with {sha} failed")
        warned = "--mm_tensor False" in proc.stderr
        (wo.OUT / f"defaults-{name.replace(' ', '_').replace(',', '')}-{sha.split()[0]}.log").write_text(proc.stdout + proc.stderr)
        result = Path(tmp) / "eval.json"
        subprocess.run([sys.executable, __file__, "--child", str(out), "--ref", str(ref), "--result", str(result)],
                       env=env, check=True)  # fmt: skip
        res = json.loads(result.read_text())
    res.update(rev=sha, wall_s=wall, mm_tensor_warning=warned, command=COMMANDS[name])
    return res


def child_eval(ckpt: Path, ref: Path, result: Path) -> None:
    import slimquant as sq
    from slimquant.eval.size import checkpoint_bytes

    loaded = sq.load(ckpt)
    res = wo.eval_llm(loaded.model, wo.eval_windows(loaded.tokenizer, WINDOWS), ref, kv=loaded.recipe.kv)
    res["ckpt_bytes"] = checkpoint_bytes(ckpt)
    result.write_text(json.dumps(res))


def child_study(rule: str, windows: int, seq_len: int, ref: Path, result: Path) -> None:
    """One study point: GPTQ with ``rule`` on ``windows`` x ``seq_len`` tokens of the calibration plays; KL on the
    evaluation windows, and how the group scales GPTQ chose compare with round-to-nearest's of the float weight."""
    import slimquant as sq
    from slimquant.data import calibration_windows
    from slimquant.math.weights import quantize_weight
    from slimquant.nn.modules import QLinear

    lm = sq.load_model(wo.LLM)
    spec = sq.QuantSpec("int4", "per_group", 64, True)
    floats = {n: m.weight.detach().clone() for n, m in lm.model.named_modules() if isinstance(m, torch.nn.Linear)}
    calib = calibration_windows(lm.tokenizer, corpus.read(list(corpus.CALIB_FILES)).split("\n\n"), windows, seq_len)
    t0 = time.perf_counter()
    res_q = sq.quantize(lm.model, sq.Recipe(weight=spec, steps=(sq.GPTQ(**STUDY_RULES[rule]),)), calib_data=calib,
                        show_progress=False)  # fmt: skip
    qs = time.perf_counter() - t0
    ratios, clipped = [], []
    for name, mod in res_q.model.named_modules():
        if isinstance(mod, QLinear) and name in floats:
            w = floats[name].float()
            rtn = quantize_weight(w, spec).scale
            ratios.append(float((mod.weight_scale.float() / rtn).mean()))
            # how much of the float weight falls outside the grid GPTQ chose (clipped if it were rounded there)
            s = mod.weight_scale.float().repeat_interleave(64, dim=1)
            clipped.append(float(((w / s).round() > 7).float().mean() + ((w / s).round() < -8).float().mean()))
    res = wo.eval_llm(res_q.model, wo.eval_windows(lm.tokenizer, WINDOWS), ref)
    res.update(quantize_s=qs, scale_ratio=sum(ratios) / len(ratios), scale_ratio_max=max(ratios),
               clipped=sum(clipped) / len(clipped), tokens=int(calib.numel()))  # fmt: skip
    result.write_text(json.dumps(res))


def run_study(ref: Path) -> dict[str, dict]:
    rows = {}
    for windows, seq_len in STUDY_CALIB:
        for rule in STUDY_RULES:
            with tempfile.NamedTemporaryFile(dir=wo.OUT, suffix=".json", delete=False) as fh:
                result = Path(fh.name)
            subprocess.run([sys.executable, __file__, "--study-child", rule, str(windows), str(seq_len), "--ref",
                            str(ref), "--result", str(result)], check=True)  # fmt: skip
            key = f"{rule}, {windows} x {seq_len}"
            rows[key] = json.loads(result.read_text())
            result.unlink()
            print(key, {k: round(v, 5) if isinstance(v, float) else v for k, v in rows[key].items()}, flush=True)
    return rows


def commit_time(rev: str) -> int:
    """When ``rev`` was committed (rows of older code first)."""
    return int(git("log", "-1", "--format=%ct", rev.split()[0]))


def fmt_rows(stored: dict) -> str:
    lines = ["| command | code | whole command s | perplexity | KL/token | top-1 | ckpt MiB | --mm_tensor warning |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, flags in COMMANDS.items():
        for key, r in sorted(stored.items(), key=lambda kv: (commit_time(kv[1]["rev"]), kv[1].get("order", 0))):
            if r["name"] != name:
                continue
            lines.append(f"| `slimquant {flags}` | {r['rev']} | {r['wall_s']:.0f} | {r['perplexity']:.3f} | {r['kl']:.5f} | "
                         f"{r['top1']:.4f} | {r['ckpt_bytes'] / 2**20:.1f} | {'yes' if r['mm_tensor_warning'] else 'no'} |")  # fmt: skip
    return "\n".join(lines)


def fmt_study(rows: dict) -> str:
    lines = ["| GPTQ groups | calibration (windows x tokens) | KL/token | perplexity | top-1 | mean scale / RTN scale "
             "| float weights outside the grid | quantize s |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, r in rows.items():
        rule, calib = key.split(", ")
        lines.append(f"| {rule} | {calib} | {r['kl']:.5f} | {r['perplexity']:.3f} | {r['top1']:.4f} | "
                     f"{r['scale_ratio']:.3f} | {100 * r['clipped']:.2f}% | {r['quantize_s']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", help="run the commands with this commit's code instead of the checkout's")
    ap.add_argument("--only", help="comma-separated command names (the others' stored rows are kept)")
    ap.add_argument("--study", action="store_true", help="the GPTQ group / calibration-size study")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--study-child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--ref", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_eval(Path(args.child), Path(args.ref), Path(args.result))
    if args.study_child:
        rule, windows, seq_len = args.study_child
        return child_study(rule, int(windows), int(seq_len), Path(args.ref), Path(args.result))
    wo.OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ref = wo.reference(wo.LLM, WINDOWS)
    machine = (f"Machine: {torch.get_num_threads()} threads, {platform.machine()}, torch {torch.__version__}; "
               f"evaluation: {', '.join(corpus.EVAL_FILES)}, {WINDOWS} windows x {wo.SEQ_LEN} tokens each after the "
               f"first {wo.SKIP_TOKENS} tokens (KL(float || quantized) per token, top-1 agreement with float)")  # fmt: skip
    stored = json.loads(ROWS.read_text()) if ROWS.is_file() else {}
    if args.study:
        study = run_study(ref)
        stored["_study"] = {"rows": study, "machine": machine, "minutes": (time.perf_counter() - t0) / 60,
                            "code": code_for(None)[0]}  # fmt: skip
        ROWS.write_text(json.dumps(stored, indent=1))
        print(fmt_study(study))
    else:
        names = [n.strip() for n in args.only.split(",")] if args.only else list(COMMANDS)
        for name in names:
            if name not in COMMANDS:
                raise SystemExit(f"unknown command {name!r}; valid: {list(COMMANDS)}")
            res = run_command(name, args.rev, ref)
            res.update(name=name, order=len(stored), machine=machine)
            print(name, {k: v for k, v in res.items() if k != "machine"}, flush=True)
            stored[f"{name} @ {res['rev']}"] = res
            ROWS.write_text(json.dumps(stored, indent=1))  # each row as soon as it is measured
        ROWS.write_text(json.dumps(stored, indent=1))
    write(stored)


def write(stored: dict) -> None:
    commands = {k: v for k, v in stored.items() if not k.startswith("_")}
    parts = ["## Bare commands (issue 13 item 0): msModelSlim's flags with no calibration file",
             "",
             "Command: `.venv/bin/python benchmarks/defaults.py` (this checkout's code) and `benchmarks/defaults.py --rev "
             "REV` (another commit's code, from a git worktree), one command at a time, alone on the machine. Each "
             "row is one run of `python -m slimquant` with the arguments shown (TEXT: romeo_and_juliet_gut.txt, as "
             "`make demo` passes it), timed as a whole (load, calibration, quantize, save; the demo also evaluates "
             "and generates); the checkpoint it wrote is then reloaded and evaluated here. " + next((r["machine"] for r in commands.values()), "") + "."]  # fmt: skip
    if commands:
        parts += ["", fmt_rows(commands)]
    if "_study" in stored:
        st = stored["_study"]
        parts += ["", f"**Why more calibration data hurt GPTQ's default** (`benchmarks/defaults.py --study`, code {st['code']}, "
                  f"{st['minutes']:.1f} min): symmetric W4A16 g64 GPTQ (percdamp 0.01, blocks of 128) calibrated on "
                  "windows of the calibration plays (merchant_of_venice, as_you_like_it, much_ado_about_nothing); "
                  "*mean scale / RTN scale*: each group's scale divided by round-to-nearest's scale of the float "
                  "weight's group, averaged over groups and layers; *float weights outside the grid*: the share of the "
                  "float weights that the chosen grid cannot hold (they round past the int4 range). Same evaluation "
                  "as above.", "", fmt_study(st["rows"])]  # fmt: skip
    wo.write_section("\n".join(parts), "defaults")


if __name__ == "__main__":
    main()
