"""``slimquant quantize``: msModelSlim-compatible flags -> Recipe -> quantize -> save."""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

from slimquant.cli.args import add_calibration_args, positive_float, str2bool
from slimquant.errors import NotSupportedYet, SlimquantError
from slimquant.types import Recipe
from slimquant.types.flags import add_recipe_flags, check_not_built, flag_default, flag_names, recipe_from_flags

log = logging.getLogger("slimquant.cli")



def _calibration(args: argparse.Namespace, lm: Any) -> Any:
    """The calibration items of the flags: token windows of text (the tokenizer set by --tokenizer_args), or the
    entries of a pre-tokenised --calib_file (--input_ids_name / --attention_mask_name)."""
    from slimquant.data import apply_tokenizer_args, calibration_data, is_tokenized_file, read_tokenized_file

    renamed = args.input_ids_name != "input_ids" or args.attention_mask_name != "attention_mask"
    if args.calib_file and is_tokenized_file(args.calib_file, args.input_ids_name):
        if args.calib_texts or args.calib_generate:
            raise SlimquantError(f"--calib_file {args.calib_file} is already tokenised; it cannot be combined with "
                                 "--calib_texts or --calib_generate")  # fmt: skip
        emb = lm.model.get_input_embeddings() if hasattr(lm.model, "get_input_embeddings") else None
        vocab = getattr(emb, "num_embeddings", None)
        items = read_tokenized_file(args.calib_file, args.input_ids_name, args.attention_mask_name, vocab,
                                    limit=args.calib_size)  # fmt: skip
        log.info("calibration: %d pre-tokenised entries of %s (keys %s / %s)", len(items), args.calib_file,
                 args.input_ids_name, args.attention_mask_name)  # fmt: skip
        return items
    if renamed:
        flags = f"--input_ids_name {args.input_ids_name} / --attention_mask_name {args.attention_mask_name}"
        if not args.calib_file:
            raise SlimquantError(f"{flags} name the keys of a pre-tokenised .jsonl/.json --calib_file; none was given")
        raise SlimquantError(f"{flags}: --calib_file {args.calib_file} has no entries holding {args.input_ids_name!r} "
                             "(a pre-tokenised .jsonl/.json file is read only when its first entry does)")  # fmt: skip
    if args.tokenizer_args not in ("", "{}"):
        apply_tokenizer_args(lm.tokenizer, args.tokenizer_args)
        log.info("--tokenizer_args applied to the tokenizer (calibration windows are cut from unpadded text: padding "
                 "settings do not change them)")  # fmt: skip
    return calibration_data(lm.model, lm.tokenizer, args.calib_file or None, args.calib_texts or None,
                            num_windows=args.calib_size, seq_len=args.calib_seq_len, generate=args.calib_generate)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a model and save it (msModelSlim-compatible flags)",
        description="Quantize a model and save it in the msModelSlim layout (see docs/format.md).",
    )
    p.add_argument("--model_path", default="smollm2-135m",
                   help="embedded model name (smollm2-135m, minilm-l6), HF directory or .gguf file")  # fmt: skip
    p.add_argument("--save_directory", required=True, help="output directory (written atomically)")
    p.add_argument("--recipe", help="a recipe .json/.yaml file; replaces the weight flags below")
    add_recipe_flags(p)
    p.add_argument("--device_type", choices=("cpu", "cuda", "npu"), default="cpu")
    p.add_argument("--part_file_size", type=positive_float, default=None, help="shard size in GB (default: one file)")
    p.add_argument("--save_format", choices=("msmodelslim", "compressed-tensors", "gguf", "transformers"),
                   default="msmodelslim",
                   help="checkpoint layout: msmodelslim (MindIE; default), compressed-tensors (vLLM, transformers), "
                   "gguf (llama.cpp; needs --gguf_type) or transformers (slimquant's modules through "
                   "from_pretrained after slimquant.register_transformers())")  # fmt: skip
    p.add_argument("--gguf_type", default=None,
                   help="quantize every weight onto the grid llama.cpp gives it in a GGUF file of this type (Q4_0, Q4_1, "
                   "Q5_0, Q8_0, Q6_K, Q4_K_M): the weight flags' algorithm (--w_method, --anti_method m3...) solves "
                   "on exactly that grid, so the GGUF export is exact; replaces --w_bit / --group_size / --w_sym")  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing slimquant checkpoint in --save_directory (never another directory)")  # fmt: skip
    p.add_argument("--force_overwrite", action="store_true",
                   help="replace --save_directory whatever it holds: everything in it is deleted")  # fmt: skip
    p.add_argument("--stream", type=str2bool, default=False,
                   help="keep the model's blocks on disk and quantize them one at a time (HF safetensors directories, "
                   "weight-only recipes): peak memory ~ one block + the embeddings + calibration activations")  # fmt: skip
    p.add_argument("--max_activation_gb", type=positive_float, default=None,
                   help="block-by-block runs (gptq, autoround, m3, --stream): keep the calibration activations "
                   "between blocks in files once they pass this many GB (default: in memory)")  # fmt: skip
    p.add_argument("--trust_remote_code", action="store_true", help="run custom modeling code in the model directory")
    # Calibration inputs (static W8A8, smoothing, GPTQ, AWQ, KV/attention). Without any, slimquant's default set.
    add_calibration_args(p, 64, "default 64")
    p.add_argument("--calib_generate", type=str2bool, default=False,
                   help="True: sample the calibration texts from the float model itself instead of the default set "
                   "(causal LMs; minutes on a CPU)")  # fmt: skip
    p.add_argument("--tokenizer_args", default="{}",
                   help="JSON object of tokenizer settings applied before tokenising calibration text, e.g. "
                   "'{\"padding_side\": \"left\", \"pad_token\": \"<unk>\"}' (calibration windows are cut from "
                   "unpadded text, so padding settings do not change them)")  # fmt: skip
    p.add_argument("--input_ids_name", default="input_ids",
                   help="a .jsonl/.json --calib_file whose entries are already tokenised: the key of the token ids "
                   "(used as given, up to --calib_size entries)")  # fmt: skip
    p.add_argument("--attention_mask_name", default="attention_mask",
                   help="the key of the attention mask in a pre-tokenised --calib_file (optional in the entries)")
    p.set_defaults(func=run)


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The Recipe the parsed flags describe (:func:`slimquant.types.flags.recipe_from_flags`, the one mapping
    :meth:`Recipe.from_flags` uses too), or the ``--recipe`` file; unsupported combinations raise naming the flag."""
    if args.device_type == "npu":
        raise SlimquantError("--device_type npu: Ascend NPUs are not supported; use cpu or cuda")
    values = {name: getattr(args, name) for name in flag_names()}
    check_not_built(values)
    if args.recipe:
        clash = [f"--{k}" for k, v in values.items() if v != flag_default(k)]
        if clash:
            raise SlimquantError(f"--recipe replaces the weight flags; remove {', '.join(clash)} or put them in the recipe")
        return Recipe.from_file(args.recipe)
    return recipe_from_flags(values)


def work_dir_of(save_directory: str | os.PathLike) -> Path:
    """Where block-by-block runs keep their finished blocks: ``<save_directory>.partial`` beside it."""
    from slimquant.formats.atomic import absolute_path

    target = absolute_path(save_directory)
    return target.with_name(target.name + ".partial")


def input_paths(model_path: str, *files: str | None) -> list[Path]:
    """The files a run reads, which its output must never replace: the model (an embedded model's file too),
    the given files and slimquant's default calibration set (read when no calibration file is given)."""
    from slimquant.data.calibration import DEFAULT_CALIB_FILE
    from slimquant.models.loading import EMBEDDED, resolve_embedded

    out = [resolve_embedded(model_path)] if model_path in EMBEDDED else [Path(model_path)]
    return out + [Path(f) for f in files if f] + [DEFAULT_CALIB_FILE]


def run(args: argparse.Namespace) -> int:
    from slimquant.formats.atomic import target_lock

    recipe = recipe_from_args(args)
    protect = input_paths(args.model_path, args.calib_file, args.recipe)
    target = _checked_target(args, recipe, protect)
    with target_lock(target):  # a second run to the same target is refused at once
        return _run(args, recipe, protect, target)


def _checked_target(args: argparse.Namespace, recipe: Recipe, protect: list[Path]) -> Path:
    """Everything that can be checked before loading the model; returns the target's absolute path."""
    import torch

    from slimquant.formats.atomic import check_target

    target = check_target(args.save_directory, args.overwrite, protect, args.force_overwrite)
    _check_gguf_flags(args, recipe)
    if args.save_format == "compressed-tensors":
        from slimquant.formats.compressed_tensors import check_recipe

        check_recipe(recipe)  # what the format cannot hold is refused before the model is loaded
    if args.max_activation_gb is not None and not (args.stream or recipe.block_by_block):
        raise SlimquantError("--max_activation_gb applies to block-by-block runs (--w_method gptq or autoround, --anti_method m3, --stream)")
    if args.device_type == "cuda" and not torch.cuda.is_available():
        raise SlimquantError("--device_type cuda: no CUDA device is available")
    if args.stream and recipe.disable_level:
        raise NotSupportedYet("--disable_level with --stream is not supported yet: ranking the layers runs the whole "
                              "model in memory")  # fmt: skip
    if args.stream and args.device_type == "cuda":
        raise NotSupportedYet("--stream with --device_type cuda is not supported yet")
    if args.calib_generate and (args.calib_file or args.calib_texts):
        raise SlimquantError("--calib_generate True samples calibration text from the model; remove --calib_file / "
                             "--calib_texts, or drop --calib_generate")  # fmt: skip
    if args.stream and recipe.needs_calibration and args.calib_generate:
        raise SlimquantError("--stream with --calib_generate True: generating calibration text needs the whole model "
                             "in memory; give --calib_file / --calib_texts or use the default set")  # fmt: skip
    if args.calib_file and recipe.needs_calibration:
        from slimquant.data.calibration import is_tokenized_file, read_calib_file, read_tokenized_file

        # its contents are checked now, not after loading the model
        if is_tokenized_file(args.calib_file, args.input_ids_name):
            read_tokenized_file(args.calib_file, args.input_ids_name, args.attention_mask_name)
        else:
            read_calib_file(args.calib_file)
    return target


_GRID_FLAGS = ("w_bit", "group_size", "w_sym", "w_zero_point", "mm_tensor")


def _check_gguf_flags(args: argparse.Namespace, recipe: Recipe) -> None:
    if args.gguf_type is None:
        if args.save_format == "gguf":
            raise SlimquantError("--save_format gguf needs --gguf_type (Q4_0, Q4_K_M, ...): it sets the grid the weights "
                                 "are solved on")  # fmt: skip
        return
    from slimquant.formats.gguf import FILE_TYPES, check_file_type

    ft = check_file_type(args.gguf_type)
    if ft in ("F16", "F32"):
        raise SlimquantError(f"--gguf_type {ft} is a float type: write the float model with `slimquant export --model "
                             f"{args.model_path} --format gguf --gguf_type {ft} --save_directory ...`")  # fmt: skip
    clash = [f"--{k}" for k in _GRID_FLAGS if getattr(args, k) != flag_default(k)]
    if args.recipe or clash:
        raise SlimquantError(f"--gguf_type {ft} sets the weight grid; remove {', '.join(clash) or '--recipe'}")
    if args.save_format == "gguf" and args.stream:
        raise SlimquantError("--stream with --save_format gguf: write the checkpoint (--save_format msmodelslim), then "
                             "`slimquant export --model <it> --format gguf`")  # fmt: skip
    if args.save_format == "gguf" and args.part_file_size is not None:
        raise SlimquantError("--part_file_size: a GGUF export is one file; remove it")
    assert ft in FILE_TYPES
    if recipe.input is not None or recipe.kv is not None or recipe.fa is not None:
        raise SlimquantError(f"--gguf_type {ft}: GGUF files hold weight-only layers; remove the activation (--a_bit), "
                             "KV-cache and attention quantization flags")  # fmt: skip


def _run(args: argparse.Namespace, recipe: Recipe, protect: list[Path], target: Path) -> int:
    from slimquant import api
    from slimquant.eval.size import model_bytes
    from slimquant.models.loading import load_model

    needs_data = recipe.needs_calibration
    if (args.calib_file or args.calib_texts or args.calib_generate) and not needs_data:
        log.warning("calibration data given, but %s is data-free: it is not used", recipe.quant_type)
    t0 = time.perf_counter()
    stream = None
    if args.stream:
        from slimquant.models.streaming import open_streaming

        stream = open_streaming(args.model_path, trust_remote_code=args.trust_remote_code)
        lm = stream
    else:
        lm = load_model(args.model_path, trust_remote_code=args.trust_remote_code)
    float_bytes = model_bytes(lm.model)
    log.info("loaded %s in %.1fs", args.model_path, time.perf_counter() - t0)
    if args.gguf_type is not None:
        from slimquant.formats.gguf import gguf_recipe

        recipe = gguf_recipe(recipe, lm.model, args.gguf_type)
    if args.device_type == "cuda":
        lm.model.to("cuda")
    calib = None
    if not needs_data and (args.tokenizer_args not in ("", "{}") or args.input_ids_name != "input_ids"
                           or args.attention_mask_name != "attention_mask"):  # fmt: skip
        log.info("this recipe needs no calibration data: --tokenizer_args / --input_ids_name / --attention_mask_name "
                 "are not used")  # fmt: skip
    if needs_data:
        from slimquant.data import calibration_data

        if lm.tokenizer is None:
            raise SlimquantError(f"{args.model_path} has no tokenizer; calibration needs one")
        if lm.kind != "causal_lm" and args.calib_generate:
            raise SlimquantError(f"--calib_generate True: {args.model_path} is an {lm.kind}, it cannot generate its own "
                                 "calibration text; give --calib_file or --calib_texts, or use the default set")  # fmt: skip
        calib = _calibration(args, lm)
    t1 = time.perf_counter()
    # the block-by-block pipeline persists finished blocks next to the output and resumes from there
    work_dir = work_dir_of(target)
    blockwise = stream is not None or recipe.block_by_block
    if blockwise:
        log.info("finished blocks are kept in %s until the checkpoint is written (rerun the same command to resume)",
                 work_dir)  # fmt: skip
    cache = None
    if recipe.disable_level:
        from slimquant.search.sensitivity import default_cache_dir

        cache = default_cache_dir()  # another --disable_level on the same model and data reuses the ranking
    result = api.quantize(lm.model, recipe, calib_data=calib, stream=stream, work_dir=work_dir if blockwise else None,
                          max_activation_gb=args.max_activation_gb, sensitivity_cache=cache)  # fmt: skip
    qtime = time.perf_counter() - t1
    if stream is None:
        lm.model.to("cpu")
    report = result.report
    assert report is not None
    api.save(result, target, tokenizer=lm.tokenizer, part_file_size=args.part_file_size, format=args.save_format,
             overwrite=args.overwrite, force_overwrite=args.force_overwrite, protect=protect)  # fmt: skip
    if (work_dir / "state.json").is_file():  # ours, and no longer needed: the checkpoint is complete
        import shutil

        shutil.rmtree(work_dir, ignore_errors=True)
        if not blockwise:
            log.warning("removed %s, the finished blocks of an earlier unfinished run to this output (it now holds "
                        "this run's checkpoint)", work_dir)  # fmt: skip
    from slimquant.eval.size import checkpoint_bytes

    size = checkpoint_bytes(target)
    what = recipe.weight.describe() if recipe.weight else "float"
    if recipe.input is not None:
        mode = "dynamic" if recipe.input.dynamic else f"static, {recipe.act_observer}"
        what = f"weights {what}, inputs {recipe.input.describe()} {mode}"
    print(f"quantized {len(report.layers)} layer(s) of {args.model_path} to {recipe.quant_type} ({what}) in {qtime:.1f}s")
    if report.kv_cache:
        print(f"  KV cache: int8 with static per-channel scales in {report.kv_cache['layers']} layer(s)")
    if report.attention:
        fl = report.attention["float"]
        print(f"  attention Q/K/V int8 per head in {len(report.attention['quantized'])} layer(s)"
              + (f"; float (fa_amp): {', '.join(fl)}" if fl else ""))  # fmt: skip
    awq = [r.values for r in report.steps_of("awq")]
    smoothed = [r.values for r in report.steps if "alpha" in r.values]
    if awq:
        ratios = [r["ratio"] for r in awq]
        gain = sum(r["output_error_unscaled"] for r in awq) / max(sum(r["output_error"] for r in awq), 1e-30)
        print(f"  AWQ scales on {len(ratios)} group(s): ratio {min(ratios):.2f}..{max(ratios):.2f}, calibration "
              f"output error {gain:.2f}x lower than unscaled")  # fmt: skip
    if smoothed:
        alphas = sorted({str(r["alpha"]) for r in smoothed})
        steps = ", ".join(s.TYPE for s in recipe.steps_of("model"))
        print(f"  smoothed {len(smoothed)} group(s) with {steps} (alpha: {', '.join(alphas)})")
    for name, why in sorted(report.skipped.items()):
        print(f"  kept float: {name} ({why})")
    for name, emb in report.tied.items():
        print(f"  tied: {name} shares the quantized {emb}")
    for p in report.unmatched_patterns:
        print(f"  warning: --disable_names pattern {p!r} matched no layer")
    errs = [r for r in report.layers if r.output_error is not None]
    if errs:
        worst = sorted(errs, key=lambda r: r.output_error, reverse=True)[:5]  # type: ignore[arg-type,return-value]
        print("  largest relative output errors on the calibration data: "
              + ", ".join(f"{r.name} {r.output_error:.2e}" for r in worst))  # fmt: skip
    print(f"checkpoint: {args.save_directory} {size / 2**20:.1f} MiB (float model {float_bytes / 2**20:.1f} MiB, "
          f"{size / float_bytes:.3f}x); per-layer report: quantize_report.md / .json there")  # fmt: skip
    return 0
