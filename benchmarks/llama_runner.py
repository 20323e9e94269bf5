"""Runs inside the llama-cpp-python environment (benchmarks/out/llama-venv, no torch): llama.cpp's side of
benchmarks/gguf_llama.py.

    python llama_runner.py quantize SRC.gguf DST.gguf FTYPE_NUMBER
    python llama_runner.py run MODEL.gguf IDS.npy PROMPTS.npy OUT_PREFIX

``run`` writes OUT_PREFIX.logits.npy (float32 [windows, tokens, vocab]: llama.cpp's logits on each window),
OUT_PREFIX.greedy.npy (greedy continuations of each prompt) and OUT_PREFIX.json (decode tokens/s, medians).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np


def quantize(src: str, dst: str, ftype: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed with {rc}")


def _greedy(llm, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    llm.reset()
    llm.eval(prompt)
    out, times = [], []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        t0 = time.perf_counter()
        llm.eval([tok])
        times.append(time.perf_counter() - t0)
    return out, times


def run(model: str, ids_path: str, prompts_path: str, prefix: str) -> None:
    from llama_cpp import Llama

    ids = np.load(ids_path)
    prompts = np.load(prompts_path)
    n_new = 64
    llm = Llama(model_path=model, n_ctx=max(ids.shape[1], prompts.shape[1] + n_new) + 8, logits_all=True, n_threads=2,
                n_threads_batch=2, n_batch=512, verbose=False)  # fmt: skip
    logits = []
    t0 = time.perf_counter()
    for row in ids:
        llm.reset()
        llm.eval([int(t) for t in row])
        logits.append(np.array(llm.scores[: len(row)], dtype=np.float32))
    prefill_s = time.perf_counter() - t0
    np.save(f"{prefix}.logits.npy", np.stack(logits))
    greedy, speeds = [], []
    for p in prompts:
        toks, times = _greedy(llm, [int(t) for t in p], n_new)
        greedy.append(toks)
        speeds.append(len(times) / sum(times))
    np.save(f"{prefix}.greedy.npy", np.array(greedy, dtype=np.int64))
    with open(f"{prefix}.json", "w") as f:
        json.dump({"decode_tok_s": statistics.median(speeds), "decode_tok_s_all": speeds,
                   "prefill_tok_s": ids.size / prefill_s}, f)  # fmt: skip


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "quantize":
        quantize(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif cmd == "run":
        run(*sys.argv[2:6])
    else:
        raise SystemExit(f"unknown command {cmd}")
