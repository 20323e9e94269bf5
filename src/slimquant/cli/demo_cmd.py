"""``slimquant demo``: the main job on an embedded model, end to end."""

from __future__ import annotations

import argparse
import tempfile
import time

from slimquant.cli.args import positive_int

PROMPT = "Write one sentence about the sea."


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="quantize the default model to W4A16, save, reload, compare with float")
    p.add_argument("--model", default="smollm2-135m", help="embedded causal LM (default smollm2-135m)")
    p.add_argument("--text", required=True, help="UTF-8 text file to measure perplexity and KL on")
    p.add_argument("--group_size", type=int, default=64, help="W4A16 group size (default 64)")
    p.add_argument("--windows", type=positive_int, default=4)
    p.add_argument("--seq_len", type=positive_int, default=512)
    p.add_argument("--save_directory", default=None, help="where to save (default: a temporary directory)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier slimquant checkpoint in --save_directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import copy

    from slimquant import api
    from slimquant.cli.eval_cmd import read_text
    from slimquant.cli.quantize_cmd import input_paths
    from slimquant.errors import SlimquantError
    from slimquant.eval.lm import evaluate_lm, generate_text
    from slimquant.eval.size import checkpoint_bytes, model_bytes
    from slimquant.formats.atomic import check_target
    from slimquant.models.loading import load_model
    from slimquant.types import RTN, Granularity, QuantSpec, Recipe

    text = read_text(args.text)
    protect = input_paths(args.model, args.text)
    if args.save_directory:  # checked now, not after minutes of work
        check_target(args.save_directory, args.overwrite, protect)
    float_lm = load_model(args.model)
    if float_lm.kind != "causal_lm":
        raise SlimquantError(f"demo needs a causal LM; {args.model} is an {float_lm.kind}")
    model = copy.deepcopy(float_lm.model)
    # The most accurate data-free W4A16 we have on smollm2-135m (BENCHMARKS.md): asymmetric with a
    # float zero point and the clipping search.
    spec = QuantSpec("int4", Granularity.PER_GROUP, args.group_size, symmetric=False, zero_point="float")
    recipe = Recipe(weight=spec, steps=(RTN(clip_search=True),))
    t0 = time.perf_counter()
    result = api.quantize(model, recipe)
    qtime = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        out = args.save_directory or f"{tmp}/{args.model}-w4a16"
        api.save(result, out, tokenizer=float_lm.tokenizer, overwrite=args.overwrite, protect=protect)
        t1 = time.perf_counter()
        q = load_model(out)
        load_time = time.perf_counter() - t1
        ckpt = checkpoint_bytes(out)
        fl = evaluate_lm(float_lm.model, float_lm.tokenizer, text, None, args.windows, args.seq_len)
        qu = evaluate_lm(q.model, q.tokenizer, text, float_lm.model, args.windows, args.seq_len, kv=q.recipe.kv)
        float_gen = generate_text(float_lm.model, float_lm.tokenizer, PROMPT)
        quant_gen = generate_text(q.model, q.tokenizer, PROMPT, kv=q.recipe.kv)
    fbytes = model_bytes(float_lm.model)
    mib = 2**20
    print()
    print(f"slimquant demo: {args.model}, W4A16 ({spec.describe()}), RTN + clipping search")
    print(f"  quantize {qtime:.1f}s, reload from disk {load_time:.1f}s")
    print(f"  size      float32 {fbytes / mib:7.1f} MiB   quantized checkpoint {ckpt / mib:7.1f} MiB  ({ckpt / fbytes:.3f}x)")
    print(f"  text      {args.text}: {qu['windows']} windows x {args.seq_len} tokens")
    print(f"  perplexity float {fl['perplexity']:.3f}   quantized {qu['perplexity']:.3f}")
    print(f"  KL(float || quantized) per token {qu['kl']:.5f} nats, top-1 agreement {qu['top1']:.4f}")
    print(f"  prompt    {PROMPT!r}")
    print(f"  float     {float_gen!r}")
    print(f"  quantized {quant_gen!r}")
    return 0
