"""``slimquant eval`` and ``slimquant inspect``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slimquant.cli.args import positive_int
from slimquant.errors import SlimquantError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity / KL / top-1 (LMs) or embedding cosine (encoders) on a text")
    p.add_argument("--model", required=True, help="checkpoint directory, HF directory, .gguf or embedded name")
    p.add_argument("--reference", help="float model to compare against (same forms as --model)")
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--windows", type=positive_int, default=8, help="number of windows (LMs; default 8)")
    p.add_argument("--seq_len", type=positive_int, default=512, help="tokens per window (default 512)")
    p.add_argument("--sentences", type=positive_int, default=256, help="lines to embed (encoders; default 256)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--trust_remote_code", action="store_true")
    p.set_defaults(func=run_eval)

    q = sub.add_parser("inspect", help="what a slimquant checkpoint holds, per layer")
    q.add_argument("directory")
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    q.set_defaults(func=run_inspect)


def read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise SlimquantError(f"cannot read text file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise SlimquantError(f"text file {path} is not UTF-8: {e}") from None


def run_eval(args: argparse.Namespace) -> int:
    from slimquant.eval.lm import evaluate_encoder, evaluate_lm
    from slimquant.models.loading import load_model

    text = read_text(args.text)
    lm = load_model(args.model, trust_remote_code=args.trust_remote_code)
    if lm.tokenizer is None:
        raise SlimquantError(f"{args.model} has no tokenizer files; cannot evaluate on text")
    ref = None
    if args.reference:
        ref_lm = load_model(args.reference, trust_remote_code=args.trust_remote_code)
        if ref_lm.kind != lm.kind:
            raise SlimquantError(f"--reference {args.reference} is an {ref_lm.kind}, --model {args.model} an {lm.kind}")
        if ref_lm.tokenizer is not None and ref_lm.tokenizer.get_vocab() != lm.tokenizer.get_vocab():
            raise SlimquantError(f"--reference {args.reference} has another tokenizer than --model {args.model} "
                                 f"({len(ref_lm.tokenizer)} vs {len(lm.tokenizer)} tokens): compare a model with its own "
                                 "float model")  # fmt: skip
        ref = ref_lm.model
    if lm.kind == "encoder":
        res = evaluate_encoder(lm.model, lm.tokenizer, text, ref, sentences=args.sentences)
    else:
        kv = lm.recipe.kv if lm.recipe is not None else None  # a checkpoint with an int8 KV cache runs with it
        res = evaluate_lm(lm.model, lm.tokenizer, text, ref, windows=args.windows, seq_len=args.seq_len, kv=kv)
    res = {"model": args.model, "reference": args.reference, "text": args.text, **res}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k:22s} {v:.6g}" if isinstance(v, float) else f"{k:22s} {v}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from slimquant.formats.checkpoint import describe_checkpoint

    info = describe_checkpoint(args.directory)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    mib = 2**20
    print(f"{args.directory}: {info['quant_type']}  format: {info['format']}  files: {', '.join(info['files'])}")
    print(f"{'layer':48s} {'type':14s} {'module':12s} {'qtype':8s} {'granularity':12s} {'bits':>4s} {'KiB':>10s}")
    counts: dict[str, int] = {}
    for r in info["layers"]:
        gran = f"g{r['group_size']}" if r["granularity"] == "per_group" else r["granularity"]
        gran += "" if r["symmetric"] else " asym"
        note = f"  (tied to {r['tied_to']})" if r["tied_to"] else ""
        note += f"  inputs: {r['input']}" if r.get("input") else ""
        counts[r["type"]] = counts.get(r["type"], 0) + 1
        print(f"{r['name']:48s} {r['type']:14s} {r['module']:12s} {r['qtype']:8s} {gran:12s} {r['bits']:>4d} "
              f"{r['bytes'] / 1024:>10.1f}{note}")  # fmt: skip
    for name, why in info["float_layers"].items():
        counts["FLOAT"] = counts.get("FLOAT", 0) + 1
        print(f"{name:48s} {'FLOAT':14s} kept float: {why}")
    print("layer types: " + ", ".join(f"{t} x {n}" for t, n in counts.items()))
    print(f"quantized layers: {len(info['layers'])}, {info['quantized_bytes'] / mib:.2f} MiB; "
          f"float tensors: {info['float_bytes'] / mib:.2f} MiB; total {info['total_bytes'] / mib:.2f} MiB")  # fmt: skip
    for alias, src in info["aliases"].items():
        print(f"alias: {alias} -> {src}")
    return 0
