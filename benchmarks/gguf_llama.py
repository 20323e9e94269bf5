"""GGUF files in llama.cpp (issue 14 item 3), on smollm2-135m: slimquant's exports against llama.cpp's own
quantization of slimquant's F16 export, and against slimquant's simulation of the same weights.

Usage:
    python benchmarks/gguf_llama.py            # rewrites the "gguf" section of BENCHMARKS.md

llama.cpp runs from PyPI's llama-cpp-python in its own environment, benchmarks/out/llama-venv, built on first
use with a portable CPU build (CMAKE_ARGS below: AVX2/FMA/F16C, no AVX512/AMX, not -march=native: pip's
native build on this kind of machine segfaults in llama_decode). Building takes ~15 minutes on 2 cores.

Per GGUF file type (Q4_0, Q4_K_M):
  * llama.cpp: ``llama_model_quantize`` (llama-quantize's function, no importance matrix) of slimquant's F16
    export of the float model;
  * slimquant RTN: ``slimquant quantize --gguf_type T`` (round-to-nearest on T's grid), and with
    ``--w_clip_search True`` (per-group MSE-optimal clipping: llama.cpp's own K-quant rounding searches too);
  * slimquant GPTQ+AWQ: the same with ``--w_method gptq --anti_method m3``, calibrated on 64 windows x 256 tokens
    of The Merchant of Venice and As You Like It.
Every file runs in llama.cpp on the held-out windows (4 windows x 512 tokens of each of Romeo and Juliet, Julius
Caesar, A Midsummer Night's Dream, after the first 1024 tokens): KL from the float model (slimquant's float
logits, per token), perplexity, top-1 agreement with the float model, file size, decode tokens/s (greedy, 64
tokens after each of 3 prompts of 64 tokens, median; 2 threads). For slimquant's files also: KL between
llama.cpp's logits and slimquant's own model of the same weights, and how much of greedy generation agrees
(the share of equal tokens and, per prompt, the first position where the two differ; 64 = none).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import text as corpus  # noqa: E402
import weight_only as wo  # noqa: E402

ROWS = wo.OUT / "gguf-rows.json"
VENV = wo.OUT / "llama-venv"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF "
              "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF")  # fmt: skip
FILE_TYPES = {"Q4_0": 2, "Q4_K_M": 15}
OURS = {"RTN": "", "RTN + clip search": "--w_clip_search True", "GPTQ+AWQ": "--w_method gptq --anti_method m3"}


def llama_python() -> Path:
    py = VENV / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return py
    print(f"building {LLAMA_CPP_PYTHON} in {VENV} (CMAKE_ARGS={CMAKE_ARGS}); this takes minutes", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    subprocess.run([str(py), "-m", "pip", "install", "--no-cache-dir", LLAMA_CPP_PYTHON, "numpy"], check=True, env=env)
    return py


def llama(py: Path, *args: str) -> None:
    subprocess.run([str(py), str(HERE / "llama_runner.py"), *args], check=True)


def metrics(ref: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> dict:
    from slimquant.math.metrics import kl_divergence, top1_agreement

    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    nll = -lp.gather(-1, ids[:, 1:, None]).mean()
    return {"kl": float(kl_divergence(ref, logits).mean()), "top1": float(top1_agreement(ref, logits).mean()),
            "ppl": float(nll.exp())}  # fmt: skip


@torch.no_grad()
def our_logits(model, windows: torch.Tensor) -> torch.Tensor:
    return torch.stack([model(input_ids=w[None]).logits[0].float() for w in windows])


@torch.no_grad()
def our_greedy(model, prompts: torch.Tensor, n: int = 64) -> np.ndarray:
    out = []
    for p in prompts:
        g = model.generate(p[None], max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=0)
        out.append(g[0, len(p):].numpy())
    return np.stack(out)


@torch.no_grad()
def teacher_forced(model, prompts: torch.Tensor, continuation: np.ndarray) -> dict:
    """slimquant's model run on llama.cpp's own greedy continuation of each prompt: at every step, does our
    argmax equal the token llama.cpp chose from the same prefix? Where not, how far below our top-1 was that
    token (logit margin), against our top-1 / top-2 gap over all steps (how close the race usually is)."""
    agree, margins, gaps = [], [], []
    for p, c in zip(prompts, continuation):
        seq = torch.cat([p, torch.from_numpy(np.asarray(c, dtype=np.int64))])
        logits = model(input_ids=seq[None]).logits[0, len(p) - 1 : len(seq) - 1].float()
        chosen = torch.from_numpy(np.asarray(c, dtype=np.int64))
        top2 = logits.topk(2, -1).values
        gaps += (top2[:, 0] - top2[:, 1]).tolist()
        same = logits.argmax(-1) == chosen
        agree += same.tolist()
        margins += (logits.max(-1).values - logits.gather(-1, chosen[:, None])[:, 0])[~same].tolist()
    return {"agreement": float(np.mean(agree)), "disagreements": len(margins),
            "margin_median": float(np.median(margins)) if margins else 0.0,
            "margin_max": float(np.max(margins)) if margins else 0.0, "gap_median": float(np.median(gaps))}  # fmt: skip


def main() -> None:
    import slimquant as sq
    from slimquant.data import calibration_windows
    from slimquant.formats.gguf import export_gguf, gguf_recipe

    torch.set_num_threads(2)
    wo.OUT.mkdir(parents=True, exist_ok=True)
    py = llama_python()
    work = wo.OUT / "gguf-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    lm = sq.load_model(wo.LLM)
    windows = wo.eval_windows(lm.tokenizer, wo.WINDOWS_PER_TEXT)
    prompts = windows[:: wo.WINDOWS_PER_TEXT, :64].contiguous()  # the start of each play's first window
    np.save(work / "ids.npy", windows.numpy())
    np.save(work / "prompts.npy", prompts.numpy())
    calib = calibration_windows(lm.tokenizer, corpus.read(list(corpus.CALIB_FILES[:2])).split("\n\n"), 64, 256, seed=0)
    ref = our_logits(lm.model, windows)
    rows: dict[str, dict] = {}
    t_all = time.perf_counter()

    def in_llama(path: Path, name: str) -> tuple[torch.Tensor, dict, np.ndarray]:
        prefix = str(work / name)
        llama(py, "run", str(path), str(work / "ids.npy"), str(work / "prompts.npy"), prefix)
        logits = torch.from_numpy(np.load(f"{prefix}.logits.npy"))
        info = json.loads(Path(f"{prefix}.json").read_text())
        return logits, info, np.load(f"{prefix}.greedy.npy")

    float_ref = {}
    for ft in ("F32", "F16"):
        d = work / f"float-{ft}"
        export_gguf(lm.model, d, lm.tokenizer, ft)
        logits, info, _ = in_llama(d / "model.gguf", f"float-{ft}")
        float_ref[ft] = d / "model.gguf"
        rows[f"float {ft}"] = {"bytes": (d / "model.gguf").stat().st_size, "llama_vs_float": metrics(ref, logits, windows),
                               **info}  # fmt: skip
        print(f"float {ft}", json.dumps(rows[f"float {ft}"]), flush=True)
    rows["float (slimquant)"] = {"llama_vs_float": metrics(ref, ref, windows)}
    for ft, code in FILE_TYPES.items():
        theirs = work / f"llamacpp-{ft}.gguf"
        t0 = time.perf_counter()
        llama(py, "quantize", str(float_ref["F16"]), str(theirs), str(code))
        q_s = time.perf_counter() - t0
        logits, info, _ = in_llama(theirs, f"llamacpp-{ft}")
        rows[f"{ft} llama.cpp"] = {"bytes": theirs.stat().st_size, "quantize_s": q_s,
                                   "llama_vs_float": metrics(ref, logits, windows), **info}  # fmt: skip
        print(f"{ft} llama.cpp", json.dumps(rows[f"{ft} llama.cpp"]), flush=True)
        for name, flags in OURS.items():
            model = sq.load_model(wo.LLM).model
            recipe = gguf_recipe(sq.Recipe.from_flags(flags), model, ft)
            t0 = time.perf_counter()
            res = sq.quantize(model, recipe, calib_data=calib if recipe.needs_calibration else None)
            q_s = time.perf_counter() - t0
            sim = our_logits(res.model, windows)
            greedy_ours = our_greedy(res.model, prompts)
            d = work / f"ours-{ft}-{name.replace('+', '_')}"
            ex = export_gguf(res.model, d, lm.tokenizer, None)
            logits, info, greedy = in_llama(d / "model.gguf", d.name)
            agree = float((greedy == greedy_ours).mean())
            forced = teacher_forced(res.model, prompts, greedy)
            first_diff = [int(np.argmax(a != b)) if (a != b).any() else len(a) for a, b in zip(greedy, greedy_ours)]
            types: dict[str, int] = {}
            for r in ex.tensors:
                types[r.type] = types.get(r.type, 0) + 1
            rows[f"{ft} slimquant {name}"] = {
                "flags": f"--gguf_type {ft} {flags}".strip(), "bytes": (d / "model.gguf").stat().st_size,
                "quantize_s": q_s, "llama_vs_float": metrics(ref, logits, windows),
                "slimquant_vs_float": metrics(ref, sim, windows), "llama_vs_slimquant": metrics(sim, logits, windows),
                "greedy_token_agreement": agree, "greedy_first_difference": first_diff, "teacher_forced": forced,
                "tensor_types": types,
                "exact": all(r.how in ("exact", "float") for r in ex.tensors),
                "max_weight_diff": max(r.max_abs_diff for r in ex.tensors), **info}  # fmt: skip
            print(f"{ft} slimquant {name}", json.dumps(rows[f"{ft} slimquant {name}"]), flush=True)
            del res, model, sim
    import gguf

    meta = {"seconds": time.perf_counter() - t_all, "torch": torch.__version__, "gguf": gguf.__version__ if hasattr(gguf, "__version__") else "?",
            "llama_cpp_python": LLAMA_CPP_PYTHON, "cmake_args": CMAKE_ARGS, "windows": len(windows),
            "tokens": int(windows.numel()), "machine": platform.machine()}  # fmt: skip
    ROWS.write_text(json.dumps({"rows": rows, "meta": meta}, indent=1))
    text = render(rows, meta)
    print(text)
    wo.write_section(text, "gguf")
    shutil.rmtree(work, ignore_errors=True)


def render(rows: dict, meta: dict) -> str:
    lines = ["## GGUF in llama.cpp", "",
             f"Command: `.venv/bin/python benchmarks/gguf_llama.py`. Machine: 2 threads, {meta['machine']}; llama.cpp from "
             f"`{meta['llama_cpp_python']}` built with `CMAKE_ARGS=\"{meta['cmake_args']}\"` (a portable AVX2 build: "
             "pip's default native build segfaults in llama_decode on the AVX512/AMX machines of this kind). smollm2-135m; "
             f"text: {meta['windows']} held-out windows x 512 tokens (Romeo and Juliet, Julius Caesar, A Midsummer "
             "Night's Dream), all positions; KL per token from slimquant's float model. Decode: greedy, 64 tokens "
             "after each of 3 prompts, median tokens/s. llama.cpp's own files: `llama_model_quantize` of "
             "slimquant's F16 export (no importance matrix). Ours: `slimquant quantize --gguf_type T [...] "
             "--save_format gguf`, GPTQ+AWQ calibrated on 64 x 256 tokens of The Merchant of Venice / As You Like It.",
             "",
             "| file | MiB | KL from float | perplexity | top-1 vs float | decode tok/s | KL llama.cpp vs slimquant (same "
             "weights) | greedy tokens equal (first difference per prompt) | same next token on llama.cpp's "
             "continuation (differing steps: our logit margin median / max; our top-1/top-2 gap median) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in rows.items():
        m = r["llama_vs_float"]
        mib = f"{r['bytes'] / 2**20:.1f}" if "bytes" in r else ""
        tok_s = f"{r['decode_tok_s']:.0f}" if "decode_tok_s" in r else ""
        same = f"{r['llama_vs_slimquant']['kl']:.4f}" if "llama_vs_slimquant" in r else ""
        greedy = (f"{r['greedy_token_agreement']:.3f} ({', '.join(map(str, r['greedy_first_difference']))})"
                  if "greedy_token_agreement" in r else "")  # fmt: skip
        tf = r.get("teacher_forced")
        forced = (f"{tf['agreement']:.3f} ({tf['disagreements']} steps: {tf['margin_median']:.2f} / "
                  f"{tf['margin_max']:.2f}; gap {tf['gap_median']:.2f})" if tf else "")  # fmt: skip
        lines.append(f"| {name} | {mib} | {m['kl']:.4f} | {m['ppl']:.2f} | {m['top1']:.4f} | {tok_s} | {same} | {greedy} | "
                     f"{forced} |")
    lines.append("")
    lines.append("Greedy generation: a whole-sequence comparison counts every token after the first difference as "
                 "different, so it is read per step instead: slimquant's model is fed llama.cpp's own greedy "
                 "continuation, and at each step its argmax is compared with the token llama.cpp chose from the "
                 "same prefix. Where they differ, the margin (our top-1 logit minus our logit of llama.cpp's token) "
                 "is set beside our typical top-1/top-2 gap: differences at margins far below that gap are near-ties "
                 "that llama.cpp's 8-bit activations (its Q4_0 / Q4_K dot products quantize each activation block "
                 "to int8) tip the other way, not a different model.")
    lines.append("")
    for ft in FILE_TYPES:
        theirs = rows[f"{ft} llama.cpp"]
        ours = rows[f"{ft} slimquant GPTQ+AWQ"]
        ratio = ours["llama_vs_float"]["kl"] / theirs["llama_vs_float"]["kl"]
        size = ours["bytes"] / theirs["bytes"]
        lines.append(f"- {ft}: slimquant GPTQ+AWQ / llama.cpp KL from float **{ratio:.2f}x** (target <= 0.7x) at "
                     f"{size:.3f}x the file size; slimquant's own model of its file: KL from float "
                     f"{ours['slimquant_vs_float']['kl']:.4f}; file exact ({ours['exact']}), tensor types "
                     f"{ours['tensor_types']}.")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
