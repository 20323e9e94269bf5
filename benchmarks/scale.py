"""Scale benchmark (issue 4): W4A16 GPTQ of a random-initialised Llama larger than a third of this machine's
memory, streamed block by block from its safetensors files, with the peak RSS measured.

Usage:
    python benchmarks/scale.py                # build the model once (cached in benchmarks/out/), quantize, report
    python benchmarks/scale.py --layers 2     # a small smoke run with the same code path; prints only

Steps, each in its own process so each peak RSS is that step's own (VmHWM):
1. make: a LlamaForCausalLM config (hidden 2560, intermediate 6912, 32 layers, 20 heads / 4 KV heads, SmolLM2's
   tokenizer and vocabulary) with normal(0, 0.02) weights written tensor by tensor into 2 GB float32 shards
   (never the whole model in memory);
2. quantize: ``slimquant quantize --stream True --w_method gptq`` W4A16 g64 asymmetric, calibrated on windows of the
   calibration plays, exactly as a user would run it;
3. reload: deploy-mode load of the checkpoint and one forward of 16 tokens (finite logits).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import text as corpus  # noqa: E402
import weight_only as wo  # noqa: E402

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 2560, 6912, 32, 20, 4
SHARD_BYTES = 2 * 10**9
CALIB_WINDOWS, CALIB_LEN = 8, 128
RSS_LIMIT_MIB = 4096


def model_dir(layers: int) -> Path:
    return wo.OUT / f"scale-llama-{layers}L"


def make(directory: Path, layers: int) -> dict:
    """Write the random model (config, tokenizer, sharded safetensors + index); returns its size."""
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    import slimquant as sq
    from slimquant.formats.safetensors_io import write_safetensors

    tok = sq.load_model(wo.LLM).tokenizer
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, vocab_size=len(tok), max_position_embeddings=2048,
                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"], torch_dtype="float32")  # fmt: skip
    with init_empty_weights():
        skeleton = LlamaForCausalLM(cfg)
    shapes = {n: tuple(t.shape) for n, t in skeleton.state_dict().items()}
    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    shards: list[list[str]] = [[]]
    size = 0
    for n, s in shapes.items():
        b = 4 * int(torch.Size(s).numel())
        if shards[-1] and size + b > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += b

    def produce(i: int, name: str):
        def f() -> torch.Tensor:
            if name.endswith("norm.weight"):
                return torch.ones(shapes[name])
            g = torch.Generator().manual_seed(i)
            return torch.randn(shapes[name], generator=g).mul_(0.02)

        return f

    weight_map = {}
    index = {n: i for i, n in enumerate(shapes)}
    for k, names in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(tmp / fname, [(n, shapes[n], torch.float32, produce(index[n], n)) for n in names],
                          metadata={"format": "pt"})  # fmt: skip
        weight_map.update({n: fname for n in names})
    total = sum(4 * int(torch.Size(s).numel()) for s in shapes.values())
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    os.replace(tmp, directory)
    params = sum(int(torch.Size(s).numel()) for s in shapes.values())
    return {"params": params, "bytes": total, "peak_rss_mib": wo.peak_rss_mib()}


def quantize(src: Path, out: Path, calib: Path) -> dict:
    from slimquant.cli.main import main as cli

    argv = ["--log_level", "WARNING", "quantize", "--model_path", str(src), "--save_directory", str(out), "--w_bit", "4", "--group_size", "64",
            "--w_sym", "False", "--w_zero_point", "float", "--w_method", "gptq", "--stream", "True",
            "--calib_file", str(calib), "--calib_size", str(CALIB_WINDOWS), "--calib_seq_len", str(CALIB_LEN),
            "--overwrite"]  # fmt: skip
    t0 = time.perf_counter()
    rc = cli(argv)
    return {"rc": rc, "seconds": time.perf_counter() - t0, "peak_rss_mib": wo.peak_rss_mib()}


def reload(out: Path) -> dict:
    import torch

    import slimquant as sq

    t0 = time.perf_counter()
    model = sq.load(out).model
    ids = torch.arange(16)[None] + 100
    with torch.inference_mode():
        logits = model(ids).logits
    return {"seconds": time.perf_counter() - t0, "finite": bool(torch.isfinite(logits).all()),
            "peak_rss_mib": wo.peak_rss_mib()}  # fmt: skip


def child(step: str, args: list[str]) -> dict:
    res = subprocess.run([sys.executable, __file__, "--step", step, *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"step {step} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--step", choices=("make", "quantize", "reload"))
    ap.add_argument("args", nargs="*")
    a = ap.parse_args()
    if a.step:
        res = {"make": lambda: make(Path(a.args[0]), int(a.args[1])), "quantize": lambda: quantize(*map(Path, a.args)),
               "reload": lambda: reload(Path(a.args[0]))}[a.step]()  # fmt: skip
        print(json.dumps(res))
        return
    import torch
    import transformers

    wo.OUT.mkdir(exist_ok=True)
    src = model_dir(a.layers)
    t0 = time.perf_counter()
    made = json.loads((src / "made.json").read_text()) if (src / "made.json").is_file() else None
    if made is None:
        made = child("make", [str(src), str(a.layers)])
        made["make_s"] = time.perf_counter() - t0
        (src / "made.json").write_text(json.dumps(made))
    calib = wo.OUT / "scale-calib.txt"
    calib.write_text(corpus.read(list(corpus.CALIB_FILES)), encoding="utf-8")
    out = wo.OUT / f"scale-llama-{a.layers}L-w4a16-gptq"
    q = child("quantize", [str(src), str(out), str(calib)])
    r = child("reload", [str(out)])
    ckpt = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    report = "\n".join([
        "## Scale (issue 4): W4A16 GPTQ of a model larger than a third of memory, streamed from disk",
        "",
        f"Command: `.venv/bin/python benchmarks/scale.py`. Machine: {os.cpu_count()} CPU cores, {mem_gib:.0f} GiB memory, "
        f"{platform.machine()}, torch {torch.__version__}, transformers {transformers.__version__}.",
        "",
        f"Model: random-initialised `LlamaForCausalLM` (hidden {HIDDEN}, intermediate {INTER}, {a.layers} layers, "
        f"{HEADS} heads / {KV_HEADS} KV heads, SmolLM2's vocabulary, untied lm_head), {made['params'] / 1e9:.2f} B "
        f"parameters, {made['bytes'] / 2**30:.1f} GiB of float32 safetensors ({made['bytes'] / 2**30 / mem_gib:.2f} of "
        f"memory). Command run: `slimquant quantize --stream True --w_method gptq --w_bit 4 --group_size 64 --w_sym False "
        f"--w_zero_point float --calib_size {CALIB_WINDOWS} --calib_seq_len {CALIB_LEN}` (calibration windows of "
        f"{', '.join(corpus.CALIB_FILES)}); lm_head stays float. Peak RSS = the process's VmHWM; each step runs in its "
        "own process.",
        "",
        "| step | time s | peak RSS MiB |",
        "|---|---|---|",
        f"| write the random model | {made.get('make_s', float('nan')):.0f} | {made['peak_rss_mib']:.0f} |",
        f"| quantize (stream, GPTQ W4A16 g64) | {q['seconds']:.0f} | {q['peak_rss_mib']:.0f} |",
        f"| reload + 16-token forward (finite: {r['finite']}) | {r['seconds']:.0f} | {r['peak_rss_mib']:.0f} |",
        "",
        f"Checkpoint: {ckpt / 2**30:.2f} GiB. Target: quantize peak RSS under {RSS_LIMIT_MIB} MiB: "
        f"**{'met' if q['peak_rss_mib'] < RSS_LIMIT_MIB else 'missed'}**.",
    ])
    print(report)
    if a.layers == LAYERS:
        wo.write_section(report, "scale")


if __name__ == "__main__":
    main()
