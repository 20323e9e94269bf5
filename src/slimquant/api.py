"""The public Python API: quantize, save, load, load_model, evaluate."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable

from torch import nn

from slimquant.errors import SlimquantError
from slimquant.formats.codec import get_codec
from slimquant.models.loading import LoadedModel, load_checkpoint
from slimquant.types.result import QuantizationResult
from slimquant.types.spec import Recipe

log = logging.getLogger(__name__)


def quantize(model: nn.Module, recipe: Recipe | None = None, calib_data: Any = None, show_progress: bool = True,
             stream: Any = None, work_dir: str | os.PathLike | None = None,
             max_activation_gb: float | None = None, sensitivity: Any = None,
             sensitivity_cache: str | os.PathLike | None = None) -> QuantizationResult:  # fmt: skip
    """Quantize ``model`` in place with ``recipe`` (default: W8A16 per-channel RTN).

    Returns a :class:`QuantizationResult`: ``.model`` (``model`` itself, quantized), ``.recipe``, ``.report``
    (:class:`slimquant.types.report.ConversionReport`: a typed row per layer and per step) and, for streamed
    blocks, ``.tensor_source``. Pass the result to :func:`save`, :func:`evaluate` and :func:`kv_cache`.
    W8A8 layers of known architectures get their norm / gated-MLP producers fused with their int8 input
    quantization (:mod:`slimquant.nn.fused`; same state dict, used with the default ``"fast"`` kernels).
    ``calib_data``: what static activation quantization, smoothing and attention quantization calibrate on: a ``[N, L]`` tensor of token
    windows (see :func:`slimquant.data.calibration_data`) or an iterable of model inputs (tensors,
    dicts of keyword arguments, or tuples). Weight-only RTN is data-free and does not use it.

    ``work_dir``: the block-by-block pipeline (GPTQ, AWQ, streaming) persists every finished block there and,
    given the same recipe, model and calibration data again, resumes after the last finished block (a
    different setup is refused with the difference). ``stream``: a
    :class:`slimquant.models.streaming.StreamingModel` (from :func:`slimquant.models.streaming.open_streaming`)
    whose ``.model`` is ``model``: its blocks are read from disk one at a time and written to ``work_dir``.
    ``max_activation_gb``: block-by-block runs keep the calibration hidden states in files past this size.

    ``recipe.disable_level`` n > 0 (msModelSlim ``--disable_level Ln``): the n planned Linear layers whose
    quantization alone costs the model most (exact ablation on the first calibration items, after smoothing)
    stay float; the report's ``skipped`` says so with each one's score. ``sensitivity``: a
    :class:`slimquant.search.Sensitivity` to rank by instead (measured on this model and recipe);
    ``sensitivity_cache``: a directory where the ranking is kept and reused (:func:`slimquant.search.layer_sensitivity`).
    """
    from slimquant.search.fallback import quantize_model

    return quantize_model(model, recipe or Recipe(), calib_data, show_progress, stream=stream, work_dir=work_dir,
                          max_activation_gb=max_activation_gb, sensitivity=sensitivity,
                          sensitivity_cache=sensitivity_cache)  # fmt: skip


def prepare_qat(model: nn.Module, recipe: Recipe | None = None, calib_data: Any = None,
                show_progress: bool = True) -> nn.Module:  # fmt: skip
    """Quantization-aware training, step 1: swap ``model``'s Linear / Conv2d layers (in place) for fake-quantized
    ones (:mod:`slimquant.nn.qat`; Conv2d -> BatchNorm2d pairs trained folded) and return ``model``.

    ``recipe``: the weight / input specs, overrides and layer selection as for :func:`quantize`, with a
    :class:`slimquant.QAT` weight step (``ranges`` "observer" = SimQAT, "lsq", "lsq+"; BN folding and freezing);
    ``Recipe.from_flags("--w_bit 4 --a_bit 8")`` works too. Default: W8A8 (int8 per-channel weights, int8
    per-tensor static inputs). ``calib_data``: batches that start the static input ranges (else the first training
    batch does). Then train with any optimizer and loop, and call :func:`convert`."""
    from slimquant.pipeline.qat import prepare_qat as _prepare

    return _prepare(model, recipe, calib_data, show_progress)


def convert(model: nn.Module, recipe: Recipe | None = None) -> QuantizationResult:
    """Quantization-aware training, step 3 (optimum-quanto's ``freeze``): swap the fake-quantized layers of a model
    from :func:`prepare_qat` (in place) for the real quantized modules post-training quantization makes, with the
    trained ranges; returns the :class:`QuantizationResult` that :func:`save` writes in any format that holds its
    layers. Outputs equal the trained fake-quantized model's up to float32 rounding. The converted layers refuse
    further training (train before converting)."""
    from slimquant.pipeline.qat import convert_qat

    return convert_qat(model, recipe)


def distill(result: QuantizationResult, teacher: nn.Module, calib_data: Any, steps: int = 100, lr: float = 1e-3,
            holdout: int = 2, eval_every: int = 10, show_progress: bool = True) -> Any:  # fmt: skip
    """After :func:`quantize`: tune the scales of ``result``'s weight-only integer layers (in place, integers
    frozen) against ``teacher``'s (the float model's) outputs, KL per token on ``calib_data``; returns a
    :class:`slimquant.pipeline.distill.DistillReport` (held-out KL before / after, steps, time). The model stays a
    plain quantized model: save and export it as before."""
    from slimquant.pipeline.distill import distill as _distill

    return _distill(result, teacher, calib_data, steps, lr, holdout, eval_every, show_progress)


def prepare_scop(model: nn.Module, example: Any, layers: list[str] | tuple[str, ...] | None = None,
                 knockoff: Any = None) -> Any:  # fmt: skip
    """SCOP structured pruning, step 1: knockoff mixes on every prunable Conv2d -> BatchNorm2d of ``model`` (in
    place; ``example``: one input batch; ``layers``: names / globs to limit it to; ``knockoff(x)``: the knockoff
    batch, default the batch shuffled). Returns a :class:`slimquant.pipeline.prune.ScopModel`: train its
    ``kf_parameters()`` with any loop and the task's loss, then call :func:`prune_scop`."""
    from slimquant.pipeline.prune import prepare_scop as _prepare

    return _prepare(model, example, layers, knockoff)


def prune_scop(scop: nn.Module, rate: float | dict[str, float]) -> Any:
    """SCOP, step 2: remove each knockoff layer's ``rate`` (in (0, 1)) lowest-scoring output channels physically
    and return a :class:`slimquant.pipeline.prune.PruneResult` (``.model`` pruned and trainable: fine-tune it;
    ``.plan``; ``.save(dir)`` / :func:`load_pruned`). Quantize or train with quantization afterwards."""
    from slimquant.pipeline.prune import prune_scop as _prune

    return _prune(scop, rate)  # type: ignore[arg-type]


def prune_mlp(model: nn.Module, calib_data: Any, rate: float, show_progress: bool = True) -> Any:
    """Structured pruning of an LLM's gated-MLP intermediate channels (in place): the ``rate`` (in (0, 1)) of each
    layer's channels with the lowest activation-norm x output-weight-norm on ``calib_data`` go; the model stays a
    transformers model (``config.intermediate_size`` updated). Returns a
    :class:`slimquant.pipeline.prune.PruneResult`."""
    from slimquant.pipeline.prune import prune_mlp as _prune

    return _prune(model, calib_data, rate, show_progress)


def load_pruned(directory: str | os.PathLike, model: nn.Module, example: Any = None) -> nn.Module:
    """A pruned model saved with ``PruneResult.save``: ``model`` (a fresh instance of the original architecture) is
    shrunk by the saved plan (``example``: an input batch, for convolution plans) and loaded with its tensors."""
    from slimquant.pipeline.prune import load_pruned as _load

    return _load(directory, model, example)


def apply_pruning(model: nn.Module, plan: dict, example: Any = None) -> nn.Module:
    """Shrink ``model`` (a fresh instance of the original architecture) by a pruning ``plan`` (``PruneResult.plan``),
    in place: the skeleton to :func:`load` a checkpoint of a pruned, then quantized plain ``nn.Module`` into."""
    from slimquant.surgery.prune import apply_plan

    return apply_plan(model, plan, example)


def as_result(obj: Any, what: str) -> QuantizationResult:
    """``obj`` as a :class:`QuantizationResult`: a result as it is, a loaded slimquant checkpoint
    (:class:`LoadedModel`) with its recipe; anything else (a bare module) refused saying what to pass."""
    if isinstance(obj, QuantizationResult):
        return obj
    if isinstance(obj, LoadedModel):
        return obj.as_result()
    if isinstance(obj, nn.Module):
        raise SlimquantError(f"{what} takes the QuantizationResult that slimquant.quantize (or slimquant.load) "
                             f"returned, not the bare {type(obj).__name__}: the recipe and report travel in the "
                             "result, not on the model (result = slimquant.quantize(model, recipe); "
                             "slimquant.save(result, dir))")  # fmt: skip
    raise SlimquantError(f"{what} takes a QuantizationResult, got {type(obj).__name__}")


def save(
    result: QuantizationResult | LoadedModel,
    directory: str | os.PathLike,
    tokenizer: Any = None,
    part_file_size: float | None = None,
    overwrite: bool = False,
    force_overwrite: bool = False,
    protect: Iterable[str | os.PathLike] = (),
    format: str = "msmodelslim",
    **options: Any,
) -> Path:
    """Save a quantized model (``result``: what :func:`quantize` or :func:`load` returned) atomically in ``format``
    (a registered codec: :func:`slimquant.formats.codec_names`; default the msModelSlim layout + manifest, see
    docs/format.md). :func:`load` finds the format again. ``tokenizer``: default the result's (a loaded one's).

    Missing parent directories are created. ``overwrite`` replaces an earlier slimquant checkpoint there;
    ``force_overwrite`` replaces any directory (everything in it is deleted). The output may not be, contain or
    lie inside the model's own source directory or any ``protect`` path (the inputs). ``part_file_size`` (GB)
    shards the weight files (msmodelslim); other ``options`` go to the codec, which refuses ones it lacks.
    """
    result = as_result(result, "save")
    if part_file_size is not None:
        options["part_file_size"] = part_file_size
    tokenizer = tokenizer if tokenizer is not None else result.tokenizer
    return get_codec(format).save(result, directory, tokenizer=tokenizer, overwrite=overwrite,
                                  force_overwrite=force_overwrite, protect=protect, **options)  # fmt: skip


def load(directory: str | os.PathLike, model: nn.Module | None = None,
         trust_remote_code: bool = False) -> QuantizationResult:  # fmt: skip
    """Deploy-mode load: rebuild the quantized model from its manifest and load the tensors.

    For Hugging Face models the structure comes from config.json (the tokenizer, when saved, is loaded too); for
    a plain ``nn.Module`` pass ``model``, an instance of the original architecture. Returns a
    :class:`QuantizationResult` (``.model``, ``.recipe`` from the manifest, ``.tokenizer``, ``.report`` from its
    ``quantize_report.json``), which saves again to the same files.
    """
    return load_checkpoint(directory, model=model, trust_remote_code=trust_remote_code).as_result()


def register_transformers() -> None:
    """Teach transformers to load slimquant checkpoints saved in the ``transformers`` format (``quant_method:
    slimquant`` in config.json): afterwards ``AutoModelForCausalLM.from_pretrained(d)`` returns the quantized
    model with slimquant's modules (deploy mode) and ``save_pretrained`` writes the same layout. Idempotent; call
    it once per process before ``from_pretrained``."""
    from slimquant.models.hf_quantizer import register

    register()


def kv_cache(result: QuantizationResult | LoadedModel) -> Any:
    """A fresh int8 KV cache for the quantized model if its recipe quantizes the KV cache, else None.

    Pass it to Hugging Face: ``result.model.generate(ids, past_key_values=slimquant.kv_cache(result))``.
    """
    from slimquant.eval.lm import kv_cache_kwargs

    result = as_result(result, "kv_cache")
    return kv_cache_kwargs(result.model, result.recipe.kv).get("past_key_values")


def evaluate(
    model: QuantizationResult | LoadedModel | nn.Module,
    tokenizer: Any = None,
    text: str = "",
    reference: nn.Module | LoadedModel | None = None,
    windows: int = 8,
    seq_len: int = 512,
    kind: str | None = None,
) -> dict[str, Any]:
    """Accuracy on ``text``: perplexity/KL/top-1 for causal LMs, embedding cosine for encoders.

    ``model``: a :class:`QuantizationResult` or a loaded model (its recipe's KV-cache mode is used), or any
    module (a float model; a bare quantized module runs without the int8 KV cache its recipe may ask for).
    """
    from slimquant.eval.lm import evaluate_encoder, evaluate_lm

    kv = None
    if isinstance(model, LoadedModel):
        tokenizer = tokenizer or model.tokenizer
        kind = kind or model.kind
        kv = model.recipe.kv if model.recipe is not None else None
        model = model.model
    elif isinstance(model, QuantizationResult):
        tokenizer = tokenizer or model.tokenizer
        kv = model.recipe.kv
        model = model.model
    if isinstance(reference, (LoadedModel, QuantizationResult)):
        reference = reference.model
    if tokenizer is None:
        raise SlimquantError("evaluate needs a tokenizer")
    kind = kind or ("encoder" if not hasattr(model, "generate") else "causal_lm")
    if kind == "encoder":
        return evaluate_encoder(model, tokenizer, text, reference, sentences=windows * 32)
    return evaluate_lm(model, tokenizer, text, reference, windows=windows, seq_len=seq_len, kv=kv)
