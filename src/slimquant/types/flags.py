"""msModelSlim's quantization flags and the one mapping from them to a :class:`Recipe`.

The command line (``slimquant quantize``) adds these flags to its parser with :func:`add_recipe_flags` and builds
its recipe with :func:`recipe_from_flags`; :meth:`Recipe.from_flags` parses the same flags from a string or a
list, so a script and the command line given the same flags get the same recipe. msModelSlim's codes
(``--anti_method m1..m5``, ``--act_method 1..3``) are translated here and nowhere else.
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
from typing import Any, Mapping, Sequence

from slimquant.errors import NotSupportedYet, SlimquantError
from slimquant.types.qtype import int_qtype_for_bits
from slimquant.types.steps import (AWQ, CBQ, GPTQ, QAT, RTN, AutoRound, CBQPreprocess, GammaMigration,
                                   OutlierSuppression, SmoothQuant, SmoothQuantSearch, SparseGPT, Step, Wanda,
                                   parse_sparsity_pattern)  # fmt: skip
from slimquant.types.spec import (FA_INT8_PER_HEAD, GROUP_SIZES, KV_INT8_DYNAMIC, KV_INT8_STATIC, Granularity, QuantSpec,
                                  Recipe)  # fmt: skip

log = logging.getLogger("slimquant.flags")

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def str2bool(value: str) -> bool:
    """``True``/``False`` in any case (as in msModelSlim's examples), also 1/0 and yes/no."""
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {value!r}")


def positive_float(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not (math.isfinite(f) and f > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value!r}")
    return f


def positive_int(value: str) -> int:
    try:
        i = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if i <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return i


def disable_level(value: str) -> str:
    """msModelSlim's ``L<n>`` (n >= 0 layers to fall back to float), as given."""
    v = str(value).strip()
    if len(v) < 2 or v[0] not in "Ll" or not v[1:].isdigit():
        raise argparse.ArgumentTypeError(f"expected L<n> (L0 none, L1 .. L5 or any L<n>: n layers fall back to float), "
                                         f"got {value!r}")  # fmt: skip
    return "L" + str(int(v[1:]))


# Seed flags accepted whose non-default values are not built yet: flag -> (default, what).
_LATER = {
    "use_reduce_quant": (False, "lccl reduce quantization"),
    "tp_size": (1, "lccl reduce quantization (--tp_size of `slimquant quantize`; W8A8SC's split is `slimquant "
               "compress --tp_size`)"),
}
W8A8S_FRACTION = 0.01  # msModelSlim's --fraction default
W8A8S_FRACTIONS = (0.01, 0.1)  # msModelSlim's accepted range


def add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    """Add msModelSlim's recipe flags (weights, activations, smoothing, KV cache, attention) to ``parser``."""
    parser.add_argument("--w_bit", type=int, choices=(2, 3, 4, 8, 16), default=None,
                   help="weight bits (default 8; 4 with --co_sparse / --is_lowbit: W8A8S's 4-bit values; 16 keeps "
                   "the weights float: pruning alone, with --sparsity)")  # fmt: skip
    parser.add_argument("--a_bit", type=int, choices=(4, 8, 16), default=None,
                   help="activation bits: 16 = weight-only (default), 8 = W8A8 (int8 inputs; post-training with "
                   "--w_bit 8, or --w_bit 4 with --co_sparse / --is_lowbit: W8A8S), 4 or 8 with other weights = "
                   "trained (--w_method qat: slimquant.prepare_qat); default 8 with --co_sparse / --is_lowbit")  # fmt: skip
    parser.add_argument("--group_size", type=int, default=0,
                   help="per-group size (32, 64, 128, 256); 0 = per-channel (default)")  # fmt: skip
    parser.add_argument("--w_sym", type=str2bool, default=True, help="symmetric weights (default True)")
    parser.add_argument("--w_zero_point", choices=("int", "float"), default="int",
                   help="asymmetric weights: integer zero point (seed 003, default) or float (as quanto; "
                   "fits the float32 weight_offset and is often more accurate)")  # fmt: skip
    parser.add_argument("--w_method", choices=("rtn", "gptq", "autoround", "autoround-light", "qat"), default=None,
                   help="weight algorithm: rtn (round to nearest, default; gptq with --is_lowbit), gptq (calibrated, block by block), "
                   "autoround (rounding and ranges tuned per block by signed gradient descent; autoround-light: 50 "
                   "steps at lr 5e-3) or qat (quantization-aware training: slimquant.prepare_qat -> train -> "
                   "slimquant.convert; chosen by itself for the --w_bit / --a_bit pairs only training produces, e.g. "
                   "--w_bit 4 --a_bit 8)")  # fmt: skip
    parser.add_argument("--iters", type=positive_int, default=None,
                   help=f"autoround: tuning steps per block (default 200; autoround-light 50); --anti_method m5 (CBQ): "
                   f"training steps per window (default {CBQ.iters})")  # fmt: skip
    parser.add_argument("--lr", type=positive_float, default=None,
                   help="autoround: step size of the signed updates, decayed linearly to 0 (default 1 / iters; "
                   f"autoround-light 5e-3); m5 (CBQ): Adam's learning rate (default {CBQ.lr})")  # fmt: skip
    parser.add_argument("--batch_size", type=positive_int, default=None,
                   help=f"autoround / m5 (CBQ): calibration windows per tuning step (default {AutoRound.batch_size} / "
                   f"{CBQ.batch_size})")  # fmt: skip
    parser.add_argument("--percdamp", type=float, default=0.01,
                   help="gptq / sparsegpt: Hessian dampening, fraction of its mean diagonal")  # fmt: skip
    parser.add_argument("--sparsity", type=float, default=None,
                   help="prune this fraction of every block linear's weights (0-1; implied by an N:M "
                   "--sparsity_pattern), jointly with the weight quantization (--sparse_method)")  # fmt: skip
    parser.add_argument("--sparsity_pattern", default=None,
                   help="unstructured (default: per layer, any weights) or N:M (at most N nonzero weights in every M "
                   "consecutive inputs of a row, e.g. 2:4)")  # fmt: skip
    parser.add_argument("--sparse_method", choices=("sparsegpt", "wanda"), default=None,
                   help="with --sparsity: sparsegpt (default: OBS pruning with Hessian error compensation, joint with "
                   "GPTQ-style quantization) or wanda (|W| x input norm, no update, then round to nearest)")  # fmt: skip
    parser.add_argument("--desc_act", type=str2bool, default=None,
                   help="gptq: quantize columns by decreasing Hessian diagonal (act-order; static groups). Default "
                   "True; False keeps the natural column order (groups still from the float weight)")  # fmt: skip
    parser.add_argument("--w_clip_search", type=str2bool, default=False,
                   help="MSE-optimal clipping search per channel/group (default False)")  # fmt: skip
    parser.add_argument("--embedding_bit", type=int, choices=(8, 16), default=16,
                   help="8: quantize embeddings int8 per row (a tied lm_head shares them); 16: keep float")  # fmt: skip
    parser.add_argument("--disable_names", nargs="*", default=[],
                   help="layers to keep float: names, globs, or re:REGEX")  # fmt: skip
    parser.add_argument("--disable_last_linear", type=str2bool, default=True, help="keep the output layer float (default True)")
    parser.add_argument("--act_method", type=int, choices=(1, 2, 3), default=None,
                   help="static activation ranges: 1 min-max (default), 2 histogram percentile, "
                   "3 auto: per layer the lowest output error among min-max / histogram / histogram-MSE")  # fmt: skip
    parser.add_argument("--anti_method", choices=("", "m1", "m2", "m3", "m4", "m5"), default="",
                   help="outliers before W8A8: m1 SmoothQuant (--smooth_alpha), m2 Outlier Suppression (gamma "
                   "migration, OS+ channel scaling with a searched threshold, token-wise clipping of static ranges), "
                   "m4 SmoothQuant with alpha searched per layer group; m3 AWQ for weight-only --w_bit < 8 (activation-aware scales, then clipping with --w_method rtn); "
                   "m5 CBQ: coarse-to-fine outlier pre-processing, then the weights (and static input ranges) trained "
                   "over windows of 2 consecutive blocks with low-rank rounding (--iters, --lr, --batch_size; also "
                   "for weight-only --a_bit 16)")  # fmt: skip
    parser.add_argument("--smooth_alpha", type=float, default=None, help="SmoothQuant migration strength for m1 (default 0.5)")
    parser.add_argument("--co_sparse", type=str2bool, default=False,
                   help="W8A8S sparse quantization: int8 inputs (static) and int8 weights whose scale puts each "
                   "channel on the 4-bit range [-8, 7] but for --fraction outliers, which keep int8 values; "
                   "needs --w_bit 4 (the default then) and per-channel or per-tensor weights. Writes "
                   "quant_model_weight_w8a8s.safetensors; `slimquant compress` makes it W8A8SC")  # fmt: skip
    parser.add_argument("--fraction", type=float, default=None,
                   help=f"W8A8S: the share of each channel's weights kept as int8 outliers, "
                   f"{W8A8S_FRACTIONS[0]}-{W8A8S_FRACTIONS[1]} (default {W8A8S_FRACTION})")  # fmt: skip
    parser.add_argument("--disable_level", type=disable_level, default="L0",
                        help="automatic fallback: L<n> keeps the n layers whose quantization costs the model most on "
                        "the calibration data (exact ablation, KL vs float) in float; L0 (default) none")  # fmt: skip
    parser.add_argument("--do_smooth", type=str2bool, default=False,
                   help="smooth activations before W8A8: SmoothQuant m1 unless --anti_method names another method")  # fmt: skip
    parser.add_argument("--use_sigma", type=str2bool, default=False,
                   help="clip static activation ranges at mean +- sigma_factor * std")  # fmt: skip
    parser.add_argument("--sigma_factor", type=positive_float, default=None, help="with --use_sigma (default 3.0)")
    parser.add_argument("--use_reduce_quant", type=str2bool, default=False)
    parser.add_argument("--tp_size", type=int, default=1)
    parser.add_argument("--is_lowbit", type=str2bool, default=False,
                   help="low-bit sparse quantization, preferred to --co_sparse (which it overrides): W8A8S whose "
                   "--do_smooth searches the smoothing strength per layer group (m4, msModelSlim's low-bit "
                   "search_smooth). With --group_size N --open_outlier False: per-group weight-only (--a_bit 16)")  # fmt: skip
    parser.add_argument("--open_outlier", type=str2bool, default=True,
                   help="with --is_lowbit: split weight outliers off (default True, W8A8S); False: per-group "
                   "weight-only with --group_size, or W8A8S with no outliers (4-bit values in int8)")  # fmt: skip
    parser.add_argument("--mm_tensor", type=str2bool, default=None,
                   help="W8A8 weights: True per-tensor (msModelSlim's default), False per-channel; "
                   "with a_bit 16 True makes per-channel weights per-tensor")  # fmt: skip
    parser.add_argument("--use_kvcache_quant", type=str2bool, default=False,
                   help="int8 KV cache (msModelSlim C8): static scales per head and channel calibrated on "
                   "--calib_file/--calib_texts (or the default set); with --kv_dynamic True, per-token scales computed "
                   "as tokens arrive (no calibration). Used by slimquant eval and slimquant.kv_cache(model)")  # fmt: skip
    parser.add_argument("--kv_dynamic", type=str2bool, default=False,
                   help="with --use_kvcache_quant: dynamic per-token KV scales instead of static per-channel ones")  # fmt: skip
    parser.add_argument("--use_fa_quant", type=str2bool, default=False,
                   help="quantize attention inputs Q, K, V to int8 with static per-head scales (calibrated)")  # fmt: skip
    parser.add_argument("--fa_amp", type=int, default=0,
                   help="with --use_fa_quant: this many attention layers (the most sensitive) stay float")  # fmt: skip
    parser.add_argument("--is_dynamic", type=str2bool, default=False,
                   help="W8A8 with per-token activation scales computed at run time (needs --a_bit 8)")  # fmt: skip


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: ANN201 - raise instead of exiting the process
        raise SlimquantError(f"flags: {message}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="Recipe.from_flags", add_help=False)
    add_recipe_flags(parser)
    return parser


def flag_names() -> list[str]:
    """The destinations of every recipe flag (``w_bit``, ``a_bit``, ...)."""
    return [a.dest for a in _parser()._actions]


def flag_default(name: str) -> Any:
    return _parser().get_default(name)


def recipe_from_flags(flags: str | Sequence[str] | Mapping[str, Any]) -> Recipe:
    """The Recipe that ``slimquant quantize`` builds from the same flags.

    ``flags``: a command-line string (``"--w_bit 4 --group_size 64 --w_method gptq"``), a list of arguments, or
    a mapping of flag names to parsed values (missing ones take their defaults). Only recipe flags are accepted;
    an unknown flag or a bad value raises :class:`SlimquantError` naming it, a seed flag that is not built yet
    :class:`NotSupportedYet`.
    """
    parser = _parser()
    if isinstance(flags, Mapping):
        unknown = sorted(set(flags) - set(flag_names()))
        if unknown:
            raise SlimquantError(f"unknown recipe flag(s) {unknown}; valid: {flag_names()}")
        args = parser.parse_args([])
        for k, v in flags.items():
            setattr(args, k, v)
    else:
        argv = shlex.split(flags) if isinstance(flags, str) else [str(a) for a in flags]
        args = parser.parse_args(argv)
    return _recipe(args)


def check_not_built(values: Mapping[str, Any]) -> None:
    """Refuse a non-default value of a seed flag that is not built yet, naming it."""
    for flag, (default, what) in _LATER.items():
        if values.get(flag, default) != default:
            raise NotSupportedYet(f"--{flag} {values[flag]}: {what} is not supported yet")


def _recipe(args: argparse.Namespace) -> Recipe:
    """The Recipe of parsed flags (every flag of :func:`add_recipe_flags` present)."""
    check_not_built(vars(args))
    args, outliers = _resolve_sparse(args)
    prune = _sparsity_step(args, outliers)
    float_weights = args.w_bit == 16
    if float_weights:
        args.w_bit = 8  # unused: the weight spec is None
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
    if prune is not None and args.desc_act:
        raise SlimquantError("--desc_act: pruning runs in the natural column order")
    if args.w_method != "gptq" and not isinstance(prune, SparseGPT) and (args.percdamp != 0.01 or args.desc_act):
        raise SlimquantError("--percdamp and --desc_act tune GPTQ; add --w_method gptq")  # --desc_act False: fine
    if args.kv_dynamic and not args.use_kvcache_quant:
        raise SlimquantError("--kv_dynamic chooses how the KV cache is quantized; it needs --use_kvcache_quant True")
    if args.fa_amp < 0:
        raise SlimquantError(f"--fa_amp {args.fa_amp}: must be 0 or a positive number of attention layers")
    if args.fa_amp and not args.use_fa_quant:
        raise SlimquantError("--fa_amp picks attention layers to leave float; it needs --use_fa_quant True")
    input_spec, act_observer, sigma = _activation_flags(args)
    smooth = _smooth_step(args, input_spec)
    token_clip = input_spec is not None and not input_spec.dynamic and args.act_method is None
    if isinstance(smooth, (GammaMigration, OutlierSuppression)) and token_clip:
        act_observer = "token_clip"  # Outlier Suppression = gamma migration + token-wise clipping
    # seed: post-training W8A8 weights default to per-tensor (--mm_tensor True); trained pairs (QAT) per channel
    qat = args.w_method == "qat" or _trained_only(args)
    per_tensor = args.mm_tensor if args.mm_tensor is not None else (input_spec is not None and not qat
                                                                    and outliers is None)  # fmt: skip
    if args.mm_tensor is None and input_spec is not None and not qat and outliers is None:
        log.warning("W8A8 weights are per-tensor by default (msModelSlim's --mm_tensor True), which is known to cost "
                    "accuracy: one int8 scale for a whole matrix (on smollm2-135m, W8A8 dynamic + m1 has 12x "
                    "the KL of per-channel weights; BENCHMARKS.md). Add --mm_tensor False for per-channel weights "
                    "(same int8 kernels, one scale per output channel).")  # fmt: skip
    gran = Granularity.PER_GROUP if args.group_size else (Granularity.PER_TENSOR if per_tensor else Granularity.PER_CHANNEL)
    weight = None if float_weights else QuantSpec(qt, gran, args.group_size or None, args.w_sym,
                                                  zero_point=args.w_zero_point, outlier_fraction=outliers)  # fmt: skip
    embedding = QuantSpec("int8", Granularity.PER_CHANNEL, None, True) if args.embedding_bit == 8 else None
    autoround = {"iters": args.iters, "lr": args.lr, "batch_size": args.batch_size}
    cbq = isinstance(smooth, CBQPreprocess)
    if not args.w_method.startswith("autoround") and not cbq and any(v is not None for v in autoround.values()):
        flag = next(k for k, v in autoround.items() if v is not None)
        raise SlimquantError(f"--{flag} tunes AutoRound (or CBQ); add --w_method autoround (or --anti_method m5)")
    if cbq and (prune is not None or getattr(args, "w_method_given", False) or args.w_clip_search):
        flag = ("--sparsity" if prune is not None else "--w_clip_search" if args.w_clip_search
                else f"--w_method {args.w_method}")  # fmt: skip
        raise SlimquantError(f"--anti_method m5 (CBQ) solves the weights itself by cross-block reconstruction; "
                             f"leave {flag} out")  # fmt: skip
    if cbq:
        solve = CBQ(**{k: v for k, v in autoround.items() if v is not None})
    elif prune is not None:
        solve = prune
    elif args.w_method == "gptq":
        act_order = GPTQ.act_order if args.desc_act is None else args.desc_act
        solve: Step = GPTQ(percdamp=args.percdamp, act_order=act_order, clip_search=args.w_clip_search)
    elif args.w_method.startswith("autoround"):
        if args.w_clip_search:
            raise SlimquantError("--w_clip_search: AutoRound tunes each group's range itself")
        knobs = {k: v for k, v in autoround.items() if v is not None}
        solve = AutoRound.light(**knobs) if args.w_method == "autoround-light" else AutoRound(**knobs)
    elif args.w_method == "qat" or _trained_only(args):
        if args.w_method != "qat":
            log.info("--w_bit %d --a_bit %d: only quantization-aware training produces this pair; the recipe's weight "
                     "step is qat (slimquant.prepare_qat -> train -> slimquant.convert)", args.w_bit, args.a_bit)
        if args.w_clip_search:
            raise SlimquantError("--w_clip_search tunes post-training rounding; QAT (--w_method qat) trains the ranges")
        solve = QAT()
    else:
        solve = RTN(clip_search=args.w_clip_search)
    return Recipe(
        weight=weight,
        input=input_spec,
        steps=(smooth, solve) if smooth is not None else (solve,),
        disable_names=tuple(args.disable_names),
        disable_last_linear=args.disable_last_linear,
        embedding=embedding,
        act_observer=act_observer,
        sigma_factor=sigma,
        kv=(KV_INT8_DYNAMIC if args.kv_dynamic else KV_INT8_STATIC) if args.use_kvcache_quant else None,
        fa=FA_INT8_PER_HEAD if args.use_fa_quant else None,
        fa_amp=args.fa_amp,
        disable_level=int(args.disable_level[1:]),
    )


def _smooth_step(args: argparse.Namespace, input_spec: QuantSpec | None) -> Step | None:
    """The smoothing step of --anti_method / --do_smooth / --smooth_alpha (msModelSlim's m1-m4 codes)."""
    method = args.anti_method or (("m4" if args.is_lowbit else "m1") if args.do_smooth else "")
    if args.is_lowbit and args.do_smooth and not args.anti_method:
        log.info("--is_lowbit --do_smooth: the smoothing strength is searched per layer group (m4, msModelSlim's "
                 "low-bit search_smooth)")  # fmt: skip
    if args.smooth_alpha is not None and method != "m1":
        raise SlimquantError("--smooth_alpha sets SmoothQuant m1's strength; add --anti_method m1")
    if method == "m3" and input_spec is not None:
        raise NotSupportedYet("--anti_method m3 (AWQ) with --a_bit 8 is not supported yet; AWQ runs with weight-only "
                              "quantization (--a_bit 16); for W8A8 use m1, m2 or m4")  # fmt: skip
    if method and method not in ("m3", "m5") and input_spec is None:
        raise SlimquantError(f"--anti_method {method} smooths activations for quantization; add --a_bit 8")
    alpha = 0.5 if args.smooth_alpha is None else args.smooth_alpha
    if not 0.0 <= alpha <= 1.0:
        raise SlimquantError(f"--smooth_alpha {alpha}: must be in [0, 1]")
    return {"": None, "m1": SmoothQuant(alpha=alpha), "m2": OutlierSuppression(), "m3": AWQ(),
            "m4": SmoothQuantSearch(), "m5": CBQPreprocess()}[method]  # fmt: skip


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
    if _trained_only(args) and args.w_method == "gptq":
        raise SlimquantError(f"--a_bit {args.a_bit} needs symmetric 8-bit weights per channel or per tensor "
                             "(--a_bit 8 --w_bit 8 --w_sym True and no --group_size) for post-training quantization; "
                             "other pairs are trained (--w_method qat)")  # fmt: skip
    qat = _trained_only(args) or args.w_method == "qat"
    if qat and (args.act_method is not None or args.use_sigma):
        raise SlimquantError("--act_method / --use_sigma choose calibrated activation ranges; QAT observes or learns "
                             "them while training")  # fmt: skip
    if args.is_dynamic and args.a_bit != 8:
        raise SlimquantError("--is_dynamic quantizes inputs to int8 per token; it needs --a_bit 8")
    if args.is_dynamic:
        for flag, default in (("act_method", None), ("use_sigma", False)):
            if getattr(args, flag) != default:
                raise SlimquantError(f"--{flag} chooses static activation ranges; it does not apply with --is_dynamic True")
        return QuantSpec("int8", Granularity.PER_TOKEN, None, True, dynamic=True), "minmax", None
    sigma = (args.sigma_factor or 3.0) if args.use_sigma else None
    bits = "int8" if args.a_bit == 8 else "int4"
    return QuantSpec(bits, Granularity.PER_TENSOR, None, False), _ACT_METHODS[args.act_method or 1], sigma


def _resolve_sparse(args: argparse.Namespace) -> tuple[argparse.Namespace, float | None]:
    """msModelSlim's sparse-quantization flags (--co_sparse, --is_lowbit, --fraction, --open_outlier) checked,
    and the flags they imply filled in: a copy of ``args`` with --w_bit, --a_bit and --w_method resolved (None =
    not given), and the W8A8S outlier fraction (None: not W8A8S)."""
    out = argparse.Namespace(**vars(args))
    out.w_method_given = args.w_method is not None
    explicit_w, explicit_a = args.w_bit, args.a_bit
    frac = args.fraction
    if frac is not None and not (math.isfinite(frac) and W8A8S_FRACTIONS[0] <= frac <= W8A8S_FRACTIONS[1]):
        raise SlimquantError(f"--fraction {frac}: must be in [{W8A8S_FRACTIONS[0]}, {W8A8S_FRACTIONS[1]}] "
                             "(the share of each channel's weights kept as int8 outliers)")  # fmt: skip
    lowbit, co = args.is_lowbit, args.co_sparse
    flag = "--is_lowbit" if lowbit else "--co_sparse"
    outliers: float | None = None
    if not (lowbit or co):
        if frac is not None:
            raise SlimquantError("--fraction sets the outliers of sparse quantization (W8A8S); add --co_sparse True or "
                                 "--is_lowbit True")  # fmt: skip
        if not args.open_outlier:
            raise SlimquantError("--open_outlier applies to low-bit quantization; add --is_lowbit True")
    elif lowbit and args.group_size:
        if args.open_outlier:
            raise SlimquantError(f"--is_lowbit with --group_size {args.group_size}: per-group low-bit weights have no "
                                 "outlier split; add --open_outlier False (msModelSlim's per-group form)")  # fmt: skip
        if frac is not None:
            raise SlimquantError("--fraction: per-group low-bit weights (--open_outlier False) have no outliers")
        if explicit_a not in (None, 16):
            raise NotSupportedYet(f"--is_lowbit per-group with --a_bit {explicit_a} (msModelSlim's W4A8 dynamic) is not "
                                  "supported yet after training; per-group low-bit weights run weight-only (--a_bit "
                                  "16), and W4A8 comes from --w_method qat")  # fmt: skip
        out.w_bit = 4 if explicit_w is None else explicit_w
        log.info("--is_lowbit --group_size %d --open_outlier False: per-group weight-only quantization (W%dA16)",
                 args.group_size, out.w_bit)  # fmt: skip
    else:
        if lowbit and co:
            log.info("--is_lowbit overrides --co_sparse (as msModelSlim): low-bit sparse quantization")
        if args.group_size:
            raise SlimquantError(f"--co_sparse with --group_size {args.group_size}: W8A8S weights have one scale per "
                                 "channel (or per tensor); remove --group_size")  # fmt: skip
        if explicit_a is not None and explicit_a != 8:
            raise SlimquantError(f"{flag} with --a_bit {explicit_a}: W8A8S quantizes activations to int8 (static); "
                                 "use --a_bit 8 or leave it out")  # fmt: skip
        if explicit_w is not None and explicit_w != 4:
            raise SlimquantError(f"{flag} with --w_bit {explicit_w}: W8A8S weights are 4-bit values (held in int8 "
                                 "with int8 outliers); use --w_bit 4 or leave it out")  # fmt: skip
        if args.is_dynamic:
            raise SlimquantError(f"{flag} with --is_dynamic True: W8A8S has static input scales (input_scale / "
                                 "input_offset); remove --is_dynamic")  # fmt: skip
        if not args.w_sym:
            raise SlimquantError(f"{flag} with --w_sym False: W8A8S weights are symmetric")
        if args.w_method in ("autoround", "autoround-light", "qat"):
            raise NotSupportedYet(f"{flag} with --w_method {args.w_method} is not supported yet; W8A8S is solved with "
                                  "rtn or gptq")  # fmt: skip
        if lowbit and not args.open_outlier:
            if frac is not None:
                raise SlimquantError("--fraction with --open_outlier False: no outliers are split off")
            outliers = 0.0
        else:
            outliers = W8A8S_FRACTION if frac is None else frac
        out.w_bit, out.a_bit = 8, 8  # int8 storage; the 4-bit grid is the spec's outlier_fraction
    out.w_bit = 8 if out.w_bit is None else out.w_bit
    out.a_bit = 16 if out.a_bit is None else out.a_bit
    out.w_method = out.w_method or "rtn"
    return out, outliers


def _sparsity_step(args: argparse.Namespace, outliers: float | None) -> Step | None:
    """The pruning weight step of --sparsity / --sparsity_pattern / --sparse_method (None: no pruning), checked
    against the other weight flags; --w_bit 16 (float weights) only with it."""
    given = [f"--{k}" for k in ("sparsity", "sparsity_pattern", "sparse_method") if getattr(args, k) is not None]
    if not given:
        if args.w_bit == 16:
            raise SlimquantError("--w_bit 16 keeps the weights float: it goes with --sparsity (pruning alone)")
        return None
    if args.sparsity is None and args.sparsity_pattern is None:
        raise SlimquantError(f"{given[0]} chooses how to prune; add --sparsity (e.g. 0.5) or --sparsity_pattern 2:4")
    pattern = args.sparsity_pattern or "unstructured"
    try:
        nm = parse_sparsity_pattern(pattern)
    except SlimquantError as e:
        raise SlimquantError(f"--sparsity_pattern {pattern}: {str(e).split(': ', 1)[1]}") from None
    if args.sparsity is None and nm is None:
        raise SlimquantError("--sparsity_pattern unstructured needs --sparsity (the fraction of weights to prune)")
    sparsity = args.sparsity if args.sparsity is not None else 1.0 - nm[0] / nm[1]  # type: ignore[index]
    if not (math.isfinite(sparsity) and 0.0 < sparsity < 1.0):
        raise SlimquantError(f"--sparsity {sparsity}: must be a fraction in (0, 1)")
    if nm is not None and abs(sparsity - (1.0 - nm[0] / nm[1])) > 1e-9:
        raise SlimquantError(f"--sparsity {sparsity:g} with --sparsity_pattern {pattern}: {nm[0]}:{nm[1]} prunes "
                             f"{1 - nm[0] / nm[1]:g}; leave --sparsity out")  # fmt: skip
    if outliers is not None:
        raise NotSupportedYet("--sparsity with W8A8S (--co_sparse / --is_lowbit) is not supported yet")
    # --w_method rtn means no weight update: Wanda; gptq (or nothing) SparseGPT's joint sweep
    method = args.sparse_method or ("wanda" if args.w_method_given and args.w_method == "rtn" else "sparsegpt")
    fits = {"sparsegpt": "gptq", "wanda": "rtn"}[method]
    if args.w_method_given and args.w_method != fits:
        raise SlimquantError(f"--sparse_method {method} with --w_method {args.w_method}: {method} "
                             + ("solves the weights itself (GPTQ's sweep with pruning)" if method == "sparsegpt"
                                else "rounds the pruned weights to nearest") + "; leave --w_method out")  # fmt: skip
    if args.w_clip_search:
        raise SlimquantError("--w_clip_search with --sparsity is not supported yet: pruned layers are solved on their "
                             "full ranges")  # fmt: skip
    if args.w_bit == 16:
        if args.a_bit != 16:
            raise SlimquantError("--w_bit 16 (float weights, pruned) goes with --a_bit 16")
        grid = [f"--{k}" for k in ("group_size", "mm_tensor", "w_zero_point") if getattr(args, k) not in (0, None, "int")]
        grid += ["--w_sym"] if not args.w_sym else []
        grid += ["--embedding_bit"] if args.embedding_bit != 16 else []
        if grid:
            raise SlimquantError(f"--w_bit 16 keeps the weights float; remove {', '.join(grid)}")
    if method == "sparsegpt":
        block = 128 if nm is None or 128 % nm[1] == 0 else nm[1] * max(1, 128 // nm[1])  # whole N:M groups per block
        return SparseGPT(sparsity=sparsity, pattern=pattern, percdamp=args.percdamp, block_size=block)
    return Wanda(sparsity=sparsity, pattern=pattern)


def _trained_only(args: argparse.Namespace) -> bool:
    """Whether --w_bit / --a_bit / --group_size / --w_sym ask for a pair post-training quantization cannot
    produce (activations quantized with anything but symmetric int8 weights per channel or per tensor, or to 4
    bits)."""
    if args.a_bit == 16:
        return False
    return args.a_bit != 8 or args.w_bit != 8 or bool(args.group_size) or not args.w_sym
