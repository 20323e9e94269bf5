"""``slimquant demo``: the main job on an embedded model, end to end.

What a newcomer sees first is what slimquant does best in a few minutes on a CPU: W4A16 with AWQ scales and
GPTQ (act-order), calibrated on slimquant's default calibration set, saved, reloaded from disk and compared
with the float model and with data-free round-to-nearest of the same format.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from slimquant.cli.args import positive_int

PROMPT = "Write one sentence about the sea."


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="quantize the default model to W4A16 (AWQ + GPTQ), save, reload, compare with float "
                       "and with round-to-nearest")  # fmt: skip
    p.add_argument("--model", default="smollm2-135m", help="embedded causal LM (default smollm2-135m)")
    p.add_argument("--text", required=True, help="UTF-8 text file to measure perplexity and KL on")
    p.add_argument("--group_size", type=int, default=64, help="W4A16 group size (default 64)")
    p.add_argument("--windows", type=positive_int, default=4)
    p.add_argument("--seq_len", type=positive_int, default=512)
    p.add_argument("--calib_file", default=None,
                   help="calibration file (default: slimquant's own general-purpose set, shipped with the package)")  # fmt: skip
    p.add_argument("--calib_size", type=positive_int, default=64, help="calibration windows (default 64)")
    p.add_argument("--calib_seq_len", type=positive_int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--save_directory", default=None, help="where to save (default: a temporary directory)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier slimquant checkpoint in --save_directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import copy

    from slimquant import api
    from slimquant.cli.eval_cmd import read_text
    from slimquant.cli.quantize_cmd import input_paths
    from slimquant.data import calibration_data, read_calib_file
    from slimquant.errors import SlimquantError
    from slimquant.eval.lm import evaluate_lm, generate_text
    from slimquant.eval.size import checkpoint_bytes, model_bytes
    from slimquant.formats.atomic import check_target
    from slimquant.models.loading import load_model
    from slimquant.types import AWQ, GPTQ, RTN, Granularity, QuantSpec, Recipe

    text = read_text(args.text)
    protect = input_paths(args.model, args.text, args.calib_file)
    if args.save_directory:  # checked now, not after minutes of work
        check_target(args.save_directory, args.overwrite, protect)
    if args.calib_file:
        read_calib_file(args.calib_file)
    float_lm = load_model(args.model)
    if float_lm.kind != "causal_lm":
        raise SlimquantError(f"demo needs a causal LM; {args.model} is an {float_lm.kind}")
    # Asymmetric 4-bit groups with a float zero point: the most accurate W4A16 kind on smollm2-135m (BENCHMARKS.md).
    spec = QuantSpec("int4", Granularity.PER_GROUP, args.group_size, symmetric=False, zero_point="float")
    best = Recipe(weight=spec, steps=(AWQ(), GPTQ(act_order=True)))
    baseline = Recipe(weight=spec, steps=(RTN(clip_search=True),))  # the most accurate data-free W4A16 we have

    t0 = time.perf_counter()
    rtn = api.quantize(copy.deepcopy(float_lm.model), baseline, show_progress=False)
    rtn_time = time.perf_counter() - t0
    t0 = time.perf_counter()
    calib = calibration_data(float_lm.model, float_lm.tokenizer, args.calib_file, num_windows=args.calib_size,
                             seq_len=args.calib_seq_len)  # fmt: skip
    result = api.quantize(copy.deepcopy(float_lm.model), best, calib_data=calib)
    qtime = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        out = args.save_directory or f"{tmp}/{args.model}-w4a16"
        api.save(result, out, tokenizer=float_lm.tokenizer, overwrite=args.overwrite, protect=protect)
        t1 = time.perf_counter()
        q = load_model(out)
        load_time = time.perf_counter() - t1
        ckpt = checkpoint_bytes(out)
        fl = evaluate_lm(float_lm.model, float_lm.tokenizer, text, None, args.windows, args.seq_len)
        base = evaluate_lm(rtn.model, float_lm.tokenizer, text, float_lm.model, args.windows, args.seq_len)
        qu = evaluate_lm(q.model, q.tokenizer, text, float_lm.model, args.windows, args.seq_len, kv=q.recipe.kv)
        float_gen = generate_text(float_lm.model, float_lm.tokenizer, PROMPT)
        quant_gen = generate_text(q.model, q.tokenizer, PROMPT, kv=q.recipe.kv)
    fbytes = model_bytes(float_lm.model)
    mib = 2**20
    source = args.calib_file or "slimquant's default calibration set"
    print()
    print(f"slimquant demo: {args.model} to W4A16 ({spec.describe()})")
    print(f"  calibrated: AWQ scales + GPTQ act-order on {source} ({calib.shape[0]} x {calib.shape[1]} tokens), "
          f"{qtime:.1f}s; reload from disk {load_time:.1f}s")  # fmt: skip
    print(f"  size      float32 {fbytes / mib:7.1f} MiB   quantized checkpoint {ckpt / mib:7.1f} MiB  ({ckpt / fbytes:.3f}x)")
    print(f"  text      {args.text}: {qu['windows']} windows x {args.seq_len} tokens")
    rows = [("float32", fl, "-"), ("round-to-nearest + clip search", base, f"{rtn_time:.1f}s, no data"),
            ("AWQ + GPTQ, reloaded", qu, f"{qtime:.1f}s")]  # fmt: skip
    print(f"  {'':32} {'perplexity':>10} {'KL/token':>9} {'top-1':>6}   quantize")
    for label, r, how in rows:
        kl, top1 = ("-", "-") if r is fl else (f"{r['kl']:.5f}", f"{r['top1']:.4f}")
        print(f"  {label:32} {r['perplexity']:10.3f} {kl:>9} {top1:>6}   {how}")
    if base["kl"] > 0:
        print(f"  KL(float || quantized) per token: AWQ + GPTQ has {qu['kl'] / base['kl']:.2f}x the data-free one's")
    print(f"  prompt    {PROMPT!r}")
    print(f"  float     {float_gen!r}")
    print(f"  quantized {quant_gen!r}")
    return 0
