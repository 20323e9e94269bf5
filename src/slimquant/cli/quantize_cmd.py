"""``slimquant quantize``: msModelSlim-compatible flags -> Recipe -> quantize -> save."""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from slimquant.cli.args import positive_float, positive_int, str2bool
from slimquant.errors import NotSupportedYet, SlimquantError
from slimquant.types import Granularity, QuantSpec, Recipe, int_qtype_for_bits
from slimquant.types.spec import FA_INT8_PER_HEAD, GROUP_SIZES, KV_INT8_DYNAMIC, KV_INT8_STATIC

log = logging.getLogger("slimquant.cli")

# Seed flags accepted by the parser whose non-default values are not built yet: flag -> (default, issue).
_LATER = {
    "co_sparse": (False, "sparse quantization"),
    "fraction": (0.01, "sparse quantization"),
    "disable_level": ("L0", "automatic fallback"),
    "use_reduce_quant": (False, "lccl reduce quantization"),
    "tp_size": (1, "lccl reduce quantization"),
    "is_lowbit": (False, "lowbit sparse quantization"),
    "open_outlier": (True, "lowbit sparse quantization"),
    "tokenizer_args": ("{}", "custom tokenizer arguments for calibration"),
    "input_ids_name": ("input_ids", "renaming the calibration inputs"),
    "attention_mask_name": ("attention_mask", "renaming the calibration inputs"),
}


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
    p.add_argument("--w_bit", type=int, choices=(2, 3, 4, 8), default=8, help="weight bits (default 8)")
    p.add_argument("--a_bit", type=int, choices=(8, 16), default=16,
                   help="activation bits: 16 = weight-only (default), 8 = W8A8 (int8 inputs; needs --w_bit 8)")  # fmt: skip
    p.add_argument("--group_size", type=int, default=0,
                   help="per-group size (32, 64, 128, 256); 0 = per-channel (default)")  # fmt: skip
    p.add_argument("--w_sym", type=str2bool, default=True, help="symmetric weights (default True)")
    p.add_argument("--w_zero_point", choices=("int", "float"), default="int",
                   help="asymmetric weights: integer zero point (seed 003, default) or float (as quanto; "
                   "fits the float32 weight_offset and is often more accurate)")  # fmt: skip
    p.add_argument("--w_method", choices=("rtn", "gptq"), default="rtn",
                   help="weight algorithm: rtn (round to nearest, default) or gptq (calibrated, block by block)")  # fmt: skip
    p.add_argument("--percdamp", type=float, default=0.01, help="gptq: Hessian dampening, fraction of its mean diagonal")
    p.add_argument("--desc_act", type=str2bool, default=False,
                   help="gptq: quantize columns by decreasing Hessian diagonal (act-order; static groups)")  # fmt: skip
    p.add_argument("--w_clip_search", type=str2bool, default=False,
                   help="MSE-optimal clipping search per channel/group (default False)")  # fmt: skip
    p.add_argument("--embedding_bit", type=int, choices=(8, 16), default=16,
                   help="8: quantize embeddings int8 per row (a tied lm_head shares them); 16: keep float")  # fmt: skip
    p.add_argument("--disable_names", nargs="*", default=[],
                   help="layers to keep float: names, globs, or re:REGEX")  # fmt: skip
    p.add_argument("--disable_last_linear", type=str2bool, default=True, help="keep the output layer float (default True)")
    p.add_argument("--device_type", choices=("cpu", "cuda", "npu"), default="cpu")
    p.add_argument("--part_file_size", type=positive_float, default=None, help="shard size in GB (default: one file)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing slimquant checkpoint in --save_directory (never another directory)")  # fmt: skip
    p.add_argument("--force_overwrite", action="store_true",
                   help="replace --save_directory whatever it holds: everything in it is deleted")  # fmt: skip
    p.add_argument("--stream", type=str2bool, default=False,
                   help="keep the model's blocks on disk and quantize them one at a time (HF safetensors directories, "
                   "weight-only recipes): peak memory ~ one block + the embeddings + calibration activations")  # fmt: skip
    p.add_argument("--max_activation_gb", type=positive_float, default=None,
                   help="block-by-block runs (gptq, m3, --stream): keep the calibration activations between blocks in "
                   "files once they pass this many GB (default: in memory)")  # fmt: skip
    p.add_argument("--trust_remote_code", action="store_true", help="run custom modeling code in the model directory")
    # Calibration inputs (static W8A8). Without any, texts are sampled from the float model itself.
    p.add_argument("--calib_texts", nargs="*", default=None, help="calibration texts")
    p.add_argument("--calib_file", default=None,
                   help="calibration file: .jsonl/.json (a 'text' field per line) or plain text")  # fmt: skip
    p.add_argument("--calib_size", type=positive_int, default=64, help="calibration windows (default 64)")
    p.add_argument("--calib_seq_len", type=positive_int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--tokenizer_args", default="{}", help="JSON tokenizer arguments for calibration")
    p.add_argument("--input_ids_name", default="input_ids")
    p.add_argument("--attention_mask_name", default="attention_mask")
    # More seed flags; those listed in _LATER fail with 'not supported yet' when changed.
    p.add_argument("--act_method", type=int, choices=(1, 2, 3), default=None,
                   help="static activation ranges: 1 min-max (default), 2 histogram percentile, "
                   "3 auto: per layer the lowest output error among min-max / histogram / histogram-MSE")  # fmt: skip
    p.add_argument("--anti_method", choices=("", "m1", "m2", "m3", "m4", "m5"), default="",
                   help="outliers before W8A8: m1 SmoothQuant (--smooth_alpha), m2 Outlier Suppression (gamma "
                   "migration + token-wise clipping of static ranges), m4 SmoothQuant with alpha searched per layer "
                   "group; m3 AWQ for weight-only --w_bit < 8 (activation-aware scales, then clipping with --w_method rtn); "
                   "m5 (CBQ) is not supported yet")  # fmt: skip
    p.add_argument("--smooth_alpha", type=float, default=None, help="SmoothQuant migration strength for m1 (default 0.5)")
    p.add_argument("--co_sparse", type=str2bool, default=False)
    p.add_argument("--fraction", type=float, default=0.01)
    p.add_argument("--disable_level", choices=tuple(f"L{i}" for i in range(6)), default="L0")
    p.add_argument("--do_smooth", type=str2bool, default=False,
                   help="smooth activations before W8A8: SmoothQuant m1 unless --anti_method names another method")  # fmt: skip
    p.add_argument("--use_sigma", type=str2bool, default=False,
                   help="clip static activation ranges at mean +- sigma_factor * std")  # fmt: skip
    p.add_argument("--sigma_factor", type=positive_float, default=None, help="with --use_sigma (default 3.0)")
    p.add_argument("--use_reduce_quant", type=str2bool, default=False)
    p.add_argument("--tp_size", type=int, default=1)
    p.add_argument("--is_lowbit", type=str2bool, default=False)
    p.add_argument("--open_outlier", type=str2bool, default=True)
    p.add_argument("--mm_tensor", type=str2bool, default=None,
                   help="W8A8 weights: True per-tensor (msModelSlim's default), False per-channel; "
                   "with a_bit 16 True makes per-channel weights per-tensor")  # fmt: skip
    p.add_argument("--use_kvcache_quant", type=str2bool, default=False,
                   help="int8 KV cache (msModelSlim C8): static scales per head and channel calibrated on "
                   "--calib_file/--calib_texts (or generated text); with --kv_dynamic True, per-token scales computed "
                   "as tokens arrive (no calibration). Used by slimquant eval and slimquant.kv_cache(model)")  # fmt: skip
    p.add_argument("--kv_dynamic", type=str2bool, default=False,
                   help="with --use_kvcache_quant: dynamic per-token KV scales instead of static per-channel ones")  # fmt: skip
    p.add_argument("--use_fa_quant", type=str2bool, default=False,
                   help="quantize attention inputs Q, K, V to int8 with static per-head scales (calibrated)")  # fmt: skip
    p.add_argument("--fa_amp", type=int, default=0,
                   help="with --use_fa_quant: this many attention layers (the most sensitive) stay float")  # fmt: skip
    p.add_argument("--is_dynamic", type=str2bool, default=False,
                   help="W8A8 with per-token activation scales computed at run time (needs --a_bit 8)")  # fmt: skip
    p.set_defaults(func=run)


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """Build the Recipe the flags describe; unsupported combinations raise with the flag's name."""
    for flag, (default, what) in _LATER.items():
        if getattr(args, flag) != default:
            raise NotSupportedYet(f"--{flag} {getattr(args, flag)}: {what} is not supported yet")
    if args.device_type == "npu":
        raise SlimquantError("--device_type npu: Ascend NPUs are not supported; use cpu or cuda")
    if args.recipe:
        defaults = {"w_bit": 8, "a_bit": 16, "group_size": 0, "w_sym": True, "w_method": "rtn", "percdamp": 0.01,
                    "desc_act": False, "w_clip_search": False,
                    "w_zero_point": "int", "embedding_bit": 16, "disable_names": [], "disable_last_linear": True,
                    "act_method": None, "use_sigma": False, "sigma_factor": None, "mm_tensor": None,
                    "is_dynamic": False, "anti_method": "", "smooth_alpha": None, "do_smooth": False,
                    "use_kvcache_quant": False, "kv_dynamic": False, "use_fa_quant": False, "fa_amp": 0}  # fmt: skip
        clash = [f"--{k}" for k, v in defaults.items() if getattr(args, k) != v]
        if clash:
            raise SlimquantError(f"--recipe replaces the weight flags; remove {', '.join(clash)} or put them in the recipe")
        return Recipe.from_file(args.recipe)
    if args.group_size < 0 or (args.group_size and args.group_size not in GROUP_SIZES):
        raise SlimquantError(f"--group_size {args.group_size}: valid values are {', '.join(map(str, GROUP_SIZES))}, or 0 "
                             "for per-channel")  # fmt: skip
    if args.group_size and args.w_bit == 8:
        log.info("--group_size with --w_bit 8: using per-group int8 weights")
    if args.w_zero_point == "float" and args.w_sym:
        raise SlimquantError("--w_zero_point float: symmetric weights have no zero point; add --w_sym False")
    qt = int_qtype_for_bits(args.w_bit).name
    if args.mm_tensor and args.group_size:
        raise SlimquantError("--mm_tensor True (per-tensor weights) conflicts with --group_size; use one of them")
    if not 0.0 < args.percdamp <= 1.0:
        raise SlimquantError(f"--percdamp {args.percdamp}: must be in (0, 1] (a fraction of the Hessian's mean diagonal)")
    if args.w_method != "gptq" and (args.percdamp != 0.01 or args.desc_act):
        raise SlimquantError("--percdamp and --desc_act tune GPTQ; add --w_method gptq")
    if args.kv_dynamic and not args.use_kvcache_quant:
        raise SlimquantError("--kv_dynamic chooses how the KV cache is quantized; it needs --use_kvcache_quant True")
    if args.fa_amp < 0:
        raise SlimquantError(f"--fa_amp {args.fa_amp}: must be 0 or a positive number of attention layers")
    if args.fa_amp and not args.use_fa_quant:
        raise SlimquantError("--fa_amp picks attention layers to leave float; it needs --use_fa_quant True")
    input_spec, act_observer, sigma = _activation_flags(args)
    smooth, alpha = _smooth_flags(args, input_spec)
    if smooth == "m2" and input_spec is not None and not input_spec.dynamic and args.act_method is None:
        act_observer = "token_clip"  # Outlier Suppression = gamma migration + token-wise clipping
    per_tensor = args.mm_tensor if args.mm_tensor is not None else input_spec is not None  # seed: W8A8 default True
    gran = Granularity.PER_GROUP if args.group_size else (Granularity.PER_TENSOR if per_tensor else Granularity.PER_CHANNEL)
    weight = QuantSpec(qt, gran, args.group_size or None, args.w_sym, zero_point=args.w_zero_point)
    embedding = QuantSpec("int8", Granularity.PER_CHANNEL, None, True) if args.embedding_bit == 8 else None
    return Recipe(
        weight=weight,
        input=input_spec,
        algorithm=args.w_method,
        gptq_percdamp=args.percdamp,
        gptq_act_order=args.desc_act,
        clip_search=args.w_clip_search,
        disable_names=tuple(args.disable_names),
        disable_last_linear=args.disable_last_linear,
        embedding=embedding,
        act_observer=act_observer,
        sigma_factor=sigma,
        smooth=smooth,
        smooth_alpha=alpha,
        kv=(KV_INT8_DYNAMIC if args.kv_dynamic else KV_INT8_STATIC) if args.use_kvcache_quant else None,
        fa=FA_INT8_PER_HEAD if args.use_fa_quant else None,
        fa_amp=args.fa_amp,
    )


def _smooth_flags(args: argparse.Namespace, input_spec: QuantSpec | None) -> tuple[str | None, float]:
    """(Recipe.smooth, smooth_alpha) from --anti_method / --do_smooth / --smooth_alpha."""
    method = args.anti_method or ("m1" if args.do_smooth else "")
    if method == "m5":
        raise NotSupportedYet("--anti_method m5: CBQ is not supported yet; m1, m2, m3 and m4 are")
    if args.smooth_alpha is not None and method != "m1":
        raise SlimquantError("--smooth_alpha sets SmoothQuant m1's strength; add --anti_method m1")
    if method == "m3" and input_spec is not None:
        raise NotSupportedYet("--anti_method m3 (AWQ) with --a_bit 8 is not supported yet; AWQ runs with weight-only "
                              "quantization (--a_bit 16); for W8A8 use m1, m2 or m4")  # fmt: skip
    if method and method != "m3" and input_spec is None:
        raise SlimquantError(f"--anti_method {method} smooths activations for quantization; add --a_bit 8")
    alpha = 0.5 if args.smooth_alpha is None else args.smooth_alpha
    if not 0.0 <= alpha <= 1.0:
        raise SlimquantError(f"--smooth_alpha {alpha}: must be in [0, 1]")
    return method or None, alpha


_ACT_METHODS = {1: "minmax", 2: "histogram", 3: "auto"}


def _activation_flags(args: argparse.Namespace) -> tuple[QuantSpec | None, str, float | None]:
    """(input spec, act_observer, sigma_factor) from --a_bit/--is_dynamic/--act_method/--use_sigma."""
    if args.sigma_factor is not None and not args.use_sigma:
        raise SlimquantError("--sigma_factor needs --use_sigma True")
    if args.a_bit == 16:
        for flag, default in (("is_dynamic", False), ("act_method", None), ("use_sigma", False)):
            if getattr(args, flag) != default:
                raise SlimquantError(f"--{flag} applies to activation quantization; add --a_bit 8")
        return None, "minmax", None
    if args.w_bit != 8 or args.group_size or not args.w_sym:
        raise SlimquantError("--a_bit 8 needs symmetric 8-bit weights per channel or per tensor: "
                             "--w_bit 8 --w_sym True and no --group_size")  # fmt: skip
    if args.is_dynamic:
        for flag, default in (("act_method", None), ("use_sigma", False)):
            if getattr(args, flag) != default:
                raise SlimquantError(f"--{flag} chooses static activation ranges; it does not apply with --is_dynamic True")
        return QuantSpec("int8", Granularity.PER_TOKEN, None, True, dynamic=True), "minmax", None
    sigma = (args.sigma_factor or 3.0) if args.use_sigma else None
    return QuantSpec("int8", Granularity.PER_TENSOR, None, False), _ACT_METHODS[args.act_method or 1], sigma


def work_dir_of(save_directory: str | os.PathLike) -> Path:
    """Where block-by-block runs keep their finished blocks: ``<save_directory>.partial`` beside it."""
    from slimquant.formats.atomic import absolute_path

    target = absolute_path(save_directory)
    return target.with_name(target.name + ".partial")


def input_paths(model_path: str, *files: str | None) -> list[Path]:
    """The files a run reads, which its output must never replace: the model (an embedded model's file too)
    and the given files."""
    from slimquant.models.loading import EMBEDDED, resolve_embedded

    out = [resolve_embedded(model_path)] if model_path in EMBEDDED else [Path(model_path)]
    return out + [Path(f) for f in files if f]


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
    if args.max_activation_gb is not None and not (args.stream or recipe.algorithm == "gptq" or recipe.smooth == "m3"):
        raise SlimquantError("--max_activation_gb applies to block-by-block runs (--w_method gptq, --anti_method m3, --stream)")
    if args.device_type == "cuda" and not torch.cuda.is_available():
        raise SlimquantError("--device_type cuda: no CUDA device is available")
    if args.stream and args.device_type == "cuda":
        raise NotSupportedYet("--stream with --device_type cuda is not supported yet")
    if args.stream and recipe.needs_calibration and not (args.calib_file or args.calib_texts):
        raise SlimquantError("--stream: give --calib_file or --calib_texts (generating calibration text needs the "
                             "whole model in memory)")  # fmt: skip
    if args.calib_file and recipe.needs_calibration:
        from slimquant.data.calibration import read_calib_file

        read_calib_file(args.calib_file)  # its contents are checked now, not after loading the model
    return target


def _run(args: argparse.Namespace, recipe: Recipe, protect: list[Path], target: Path) -> int:
    from slimquant import api
    from slimquant.eval.size import model_bytes
    from slimquant.models.loading import load_model

    needs_data = recipe.needs_calibration
    if (args.calib_file or args.calib_texts) and not needs_data:
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
    if args.device_type == "cuda":
        lm.model.to("cuda")
    calib = None
    if needs_data:
        from slimquant.data import calibration_data

        if lm.tokenizer is None:
            raise SlimquantError(f"{args.model_path} has no tokenizer; calibration needs one")
        if lm.kind != "causal_lm" and not (args.calib_file or args.calib_texts):
            raise SlimquantError(f"{args.model_path} is an {lm.kind}: it cannot generate its own calibration text; "
                                 "give --calib_file or --calib_texts")  # fmt: skip
        calib = calibration_data(lm.model, lm.tokenizer, args.calib_file or None, args.calib_texts or None,
                                 num_windows=args.calib_size, seq_len=args.calib_seq_len)  # fmt: skip
    t1 = time.perf_counter()
    # the block-by-block pipeline persists finished blocks next to the output and resumes from there
    work_dir = work_dir_of(target)
    blockwise = stream is not None or recipe.algorithm == "gptq" or recipe.smooth == "m3"
    if blockwise:
        log.info("finished blocks are kept in %s until the checkpoint is written (rerun the same command to resume)",
                 work_dir)  # fmt: skip
    api.quantize(lm.model, recipe, calib_data=calib, stream=stream, work_dir=work_dir if blockwise else None,
                 max_activation_gb=args.max_activation_gb)  # fmt: skip
    qtime = time.perf_counter() - t1
    if stream is None:
        lm.model.to("cpu")
    report = lm.model.slimquant_report
    api.save(lm.model, target, tokenizer=lm.tokenizer, part_file_size=args.part_file_size,
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
    if report.smoothing and recipe.smooth == "m3":
        ratios = [r["ratio"] for r in report.smoothing]
        gain = sum(r["output_error_unscaled"] for r in report.smoothing) / max(sum(r["output_error"] for r in report.smoothing), 1e-30)
        print(f"  AWQ (m3) scales on {len(ratios)} group(s): ratio {min(ratios):.2f}..{max(ratios):.2f}, calibration "
              f"output error {gain:.2f}x lower than unscaled")  # fmt: skip
    elif report.smoothing:
        alphas = sorted({str(r["alpha"]) for r in report.smoothing})
        print(f"  smoothed {len(report.smoothing)} group(s) with {recipe.smooth} (alpha: {', '.join(alphas)})")
    for name, why in sorted(report.skipped.items()):
        print(f"  kept float: {name} ({why})")
    for name, emb in report.tied.items():
        print(f"  tied: {name} shares the quantized {emb}")
    for p in report.unmatched_patterns:
        print(f"  warning: --disable_names pattern {p!r} matched no layer")
    errs = [r for r in report.layers if r.get("output_error") is not None]
    if errs:
        worst = sorted(errs, key=lambda r: r["output_error"], reverse=True)[:5]
        print("  largest relative output errors on the calibration data: "
              + ", ".join(f"{r['name']} {r['output_error']:.2e}" for r in worst))  # fmt: skip
    print(f"checkpoint: {args.save_directory} {size / 2**20:.1f} MiB (float model {float_bytes / 2**20:.1f} MiB, "
          f"{size / float_bytes:.3f}x); per-layer report: quantize_report.md / .json there")  # fmt: skip
    return 0
