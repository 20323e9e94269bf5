"""Import of llm-compressor's own output (issue 14 item 2): slimquant loads the compressed-tensors checkpoint that
llm-compressor's GPTQModifier saved (``save_compressed=True``, W4A16 g64 asymmetric, pack-quantized with integer
zero points), computes llm-compressor's model, and converts it to msModelSlim and to the transformers layout
without changing a logit.

Usage:
    python benchmarks/llmc_import.py      # rewrites the llmc-import section of BENCHMARKS.md

llm-compressor runs in its own virtual environment (benchmarks/gptq.py's ``ensure_llmc``: benchmarks/out/llmc-venv,
built on first use) on the float export and calibration windows of benchmarks/gptq.py. It writes two things: its
compressed checkpoint, and (benchmarks/llmc_gptq.py) a float checkpoint holding the weights its own fake
quantization computes with (compressed-tensors' ``forward_quantize`` with GPTQ's scales and zero points), which is
the reference: llm-compressor's model as llm-compressor computes it. Both are evaluated here with slimquant's
evaluation code on the held-out windows of benchmarks/weight_only.py.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gptq  # noqa: E402
import weight_only as wo  # noqa: E402
from export import compare, logits_of  # noqa: E402  (lists of per-window logits; max |diff|, KL, top-1)

WORK = wo.OUT / "llmc-import"


def main() -> None:
    import slimquant as sq
    from slimquant.cli.main import main as cli
    from slimquant.eval.size import checkpoint_bytes
    from slimquant.nn import QModule

    torch.set_num_threads(2)
    t_all = time.perf_counter()
    gptq.export_float_and_calibration()
    py = gptq.ensure_llmc()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    comp, deq = WORK / "llmc-compressed", WORK / "llmc-fake-quant-float"
    cmd = [str(py), str(HERE / "llmc_gptq.py"), "--model", str(gptq.FLOAT_EXPORT), "--calib", str(gptq.CALIB_EXPORT),
           "--out", str(deq), "--group", "64", "--threads", "2", "--compressed_out", str(comp)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"llm-compressor run failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    info = json.loads(res.stdout.strip().splitlines()[-1])
    qconfig = json.loads((comp / "config.json").read_text())["quantization_config"]

    lm = sq.load_model(wo.LLM)
    windows = wo.eval_windows(lm.tokenizer, wo.WINDOWS_PER_TEXT)
    ref_float = logits_of(lm.model, windows)
    theirs = logits_of(sq.load_model(str(deq)).model, windows)
    t0 = time.perf_counter()
    imported = sq.load_model(str(comp))
    load_s = time.perf_counter() - t0
    ours = logits_of(imported.model, windows)
    layers = sum(1 for m in imported.model.modules() if isinstance(m, QModule))
    rows = {"imported vs llm-compressor's own model": compare(theirs, ours),
            "llm-compressor's model vs float": compare(ref_float, theirs),
            "imported vs float": compare(ref_float, ours)}
    for fmt in ("msmodelslim", "transformers"):
        out = WORK / f"export-{fmt}"
        rc = cli(["export", "--model", str(comp), "--format", fmt, "--save_directory", str(out)])
        if rc != 0:
            raise SystemExit(f"slimquant export --format {fmt} failed ({rc})")
        again = logits_of(sq.load(out).model, windows)
        equal = all(torch.equal(a, b) for a, b in zip(ours, again))
        rows[f"export {fmt}, reloaded, vs imported"] = {**compare(ours, again), "bits_equal": equal,
                                                        "bytes": checkpoint_bytes(out)}  # fmt: skip
    meta = {"seconds": time.perf_counter() - t_all, "load_s": load_s, "windows": int(windows.shape[0]),
            "seq_len": int(windows.shape[1]), "llmc": info, "format": qconfig.get("format"),
            "groups": {k: v.get("weights") for k, v in qconfig.get("config_groups", {}).items()},
            "compressed_bytes": checkpoint_bytes(comp), "layers": layers, "machine": platform.machine()}  # fmt: skip
    text = render(rows, meta)
    print(text)
    wo.write_section(text, "llmc-import")
    shutil.rmtree(WORK, ignore_errors=True)


def render(rows: dict, meta: dict) -> str:
    llmc = meta["llmc"]
    lines = ["## Importing llm-compressor's checkpoint (issue 14 item 2)", "",
             f"Command: `.venv/bin/python benchmarks/llmc_import.py`. llm-compressor {llmc['llmcompressor']} "
             f"(compressed-tensors {llmc['compressed_tensors']}, transformers {llmc['transformers']}, torch "
             f"{llmc['torch']}; its own venv) runs GPTQModifier (W4A16 g64 asymmetric, integer zero points, lm_head "
             f"ignored, the calibration windows of benchmarks/gptq.py) on smollm2-135m and saves its compressed "
             f"checkpoint: format `{meta['format']}`, {meta['compressed_bytes'] / 2**20:.1f} MiB, {meta['layers']} quantized layers. slimquant loads it "
             f"with `slimquant.load_model(dir)` ({meta['load_s']:.1f} s; no manifest: the layers come from "
             "config.json's quantization_config) and computes with its own modules and kernels. The reference is "
             "llm-compressor's model as llm-compressor computes it: its weights through compressed-tensors' own "
             f"fake quantization, saved as float. Text: {meta['windows']} held-out windows x {meta['seq_len']} "
             "tokens (Romeo and Juliet, Julius Caesar, A Midsummer Night's Dream); KL per token.", "",
             "| comparison | max abs logit diff | KL | top-1 agreement | bits equal | MiB |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        eq = str(r["bits_equal"]) if "bits_equal" in r else ""
        mib = f"{r['bytes'] / 2**20:.1f}" if "bytes" in r else ""
        lines.append(f"| {name} | {r['max_abs_diff']:.3g} | {r['kl']:.3g} | {r['top1']:.4f} | {eq} | {mib} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
