"""``slimquant sensitivity``: per-layer sensitivity of a model under one or more candidate recipes."""

from __future__ import annotations

import argparse
import logging
import shlex
import time

from slimquant.cli.args import add_calibration_args, positive_int
from slimquant.errors import SlimquantError
from slimquant.types import Recipe
from slimquant.types.flags import add_recipe_flags, check_not_built, flag_default, flag_names, recipe_from_flags

log = logging.getLogger("slimquant.cli")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from slimquant.search.sensitivity import LOSSES, METRICS

    p = sub.add_parser(
        "sensitivity",
        help="how much each layer costs when it alone is quantized (exact ablation and cheap proxies)",
        description="Quantize one layer at a time and measure the model-level loss against the float model "
        "(KL per token for language models), with cheap proxies and their rank correlation with it. Writes "
        "sensitivity.json, sensitivity.md and sensitivity.png to --output.",
    )
    p.add_argument("--model_path", default="smollm2-135m",
                   help="embedded model name (smollm2-135m, minilm-l6), HF directory or .gguf file")  # fmt: skip
    p.add_argument("--output", required=True, help="directory for sensitivity.json / .md / .png")
    p.add_argument("--overwrite", action="store_true", help="replace sensitivity files already in --output")
    p.add_argument("--recipe", help="a recipe .json/.yaml file as the candidate; replaces the weight flags below")
    add_recipe_flags(p)
    p.add_argument("--candidates", nargs="+", default=None, metavar="FLAGS",
                   help='several candidates, each a quoted msModelSlim flag string (e.g. "--w_bit 4 --group_size 64" '
                   '"--w_bit 8 --a_bit 8 --mm_tensor False"); replaces the flags above')  # fmt: skip
    p.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS),
                   help="what to measure (default all; 'ablation' is the exact one, the others are proxies)")  # fmt: skip
    p.add_argument("--loss", choices=LOSSES, default="auto",
                   help="model-level loss: kl (logits), mse (relative squared error), auto (kl for language models)")  # fmt: skip
    p.add_argument("--layers", nargs="+", default=None, help="only these layer names (default: every planned layer)")
    p.add_argument("--top", type=positive_int, default=20, help="layers in the printed table and the plot (default 20)")
    p.add_argument("--cache_dir", default=None,
                   help="where finished layers are kept so a rerun resumes or reuses them (default: "
                   "$SLIMQUANT_CACHE_DIR or ~/.cache/slimquant, subdirectory sensitivity; 'none': no cache)")  # fmt: skip
    p.add_argument("--trust_remote_code", action="store_true", help="run custom modeling code in the model directory")
    add_calibration_args(p, 4, "default 4: every layer runs them once more")
    p.set_defaults(func=run)


def candidates_from_args(args: argparse.Namespace) -> dict[str, Recipe] | Recipe:
    """The candidate recipes: ``--candidates`` flag strings (labelled by their flags), else ``--recipe``, else the
    recipe flags."""
    values = {name: getattr(args, name) for name in flag_names()}
    check_not_built(values)
    changed = [f"--{k}" for k, v in values.items() if v != flag_default(k)]
    if args.candidates:
        if args.recipe or changed:
            raise SlimquantError("--candidates replaces --recipe and the recipe flags; remove "
                                 f"{', '.join((['--recipe'] if args.recipe else []) + changed)}")  # fmt: skip
        out: dict[str, Recipe] = {}
        for flags in args.candidates:
            try:
                recipe = recipe_from_flags(flags)
            except SlimquantError as e:
                raise SlimquantError(f"--candidates {flags!r}: {e}") from None
            except SystemExit:  # argparse already printed what is wrong
                raise SlimquantError(f"--candidates {flags!r}: not a valid msModelSlim flag string") from None
            label = " ".join(shlex.split(flags)) or "(defaults)"
            if label in out:
                raise SlimquantError(f"--candidates {flags!r} is given twice")
            out[label] = recipe
        return out
    if args.recipe:
        if changed:
            raise SlimquantError(f"--recipe replaces the weight flags; remove {', '.join(changed)} or put them in the recipe")
        return Recipe.from_file(args.recipe)
    return recipe_from_flags(values)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from slimquant.formats.atomic import absolute_path
    from slimquant.models.loading import load_model
    from slimquant.search.sensitivity import default_cache_dir, layer_sensitivity

    cands = candidates_from_args(args)
    out = absolute_path(args.output)
    if out.exists() and not out.is_dir():
        raise SlimquantError(f"--output {args.output} is a file, not a directory")
    there = [f for f in ("sensitivity.json", "sensitivity.md", "sensitivity.png") if (out / f).exists()]
    if there and not args.overwrite:
        raise SlimquantError(f"--output {args.output} already holds {', '.join(there)}; pass --overwrite to replace them")
    if args.calib_file:
        from slimquant.data.calibration import read_calib_file

        read_calib_file(args.calib_file)  # checked before loading the model
    if args.cache_dir is None:
        cache: Path | None = default_cache_dir()
    else:
        cache = None if args.cache_dir.lower() == "none" else Path(args.cache_dir)
    t0 = time.perf_counter()
    lm = load_model(args.model_path, trust_remote_code=args.trust_remote_code)
    if lm.tokenizer is None:
        raise SlimquantError(f"{args.model_path} has no tokenizer; the sensitivity CLI calibrates on text")
    from slimquant.data import calibration_data

    calib = calibration_data(lm.model, lm.tokenizer, args.calib_file or None, args.calib_texts or None,
                             num_windows=args.calib_size, seq_len=args.calib_seq_len)  # fmt: skip
    result = layer_sensitivity(lm.model, cands, calib, metrics=args.metrics, loss=args.loss, layers=args.layers,
                               cache_dir=cache)  # fmt: skip
    files = result.save(out, top=args.top, overwrite=args.overwrite)
    key = "ablation" if "ablation" in result.metrics else result.metrics[0]
    for label in result.candidates:
        print(f"{label}: most sensitive by {key} ({result.loss}, {result.calibration['positions']} positions):")
        for i, (name, v) in enumerate(result.ranking(key, label)[: args.top], 1):
            print(f"  {i:3d}. {name:<48s} {v:.4g}")
        if key == "ablation" and len(result.metrics) > 1:
            rho = result.spearman(label)
            print("  Spearman with the exact ablation: " + ", ".join(f"{m} {v:+.3f}" for m, v in rho.items()))
    print(f"wrote {', '.join(str(f) for f in files)} in {time.perf_counter() - t0:.0f}s")
    return 0
