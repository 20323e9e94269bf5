"""The result of quantizing a model, or of loading a quantized checkpoint: the model with what saving, evaluating
and deploying it need (its recipe, the report, where streamed tensors are), passed explicitly rather than attached
to the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import nn

from slimquant.types.report import ConversionReport
from slimquant.types.spec import Recipe


@runtime_checkable
class LazyTensors(Protocol):
    """Tensors kept in files until written (the blocks of a streamed run): ``files`` maps name -> file."""

    files: dict[str, Path]

    def __contains__(self, name: str) -> bool: ...

    def get(self, name: str) -> Any: ...


@dataclass
class QuantizationResult:
    """A model quantized by slimquant.

    ``model``: the quantized module (quantized in place: the same object that was passed in); ``recipe``: what
    it was quantized with (for a loaded checkpoint: the one its manifest records); ``report``: what the
    conversion did (for a loaded checkpoint: its ``quantize_report.json``, None when it has none or it does not
    parse); ``tensor_source``: where the tensors of blocks streamed from disk are
    until saved (None when everything is in memory); ``tokenizer``: set by loading when the checkpoint has one.

    :func:`slimquant.save` writes it, :func:`slimquant.evaluate` and :func:`slimquant.kv_cache` read its recipe
    (the KV-cache mode). Call the model as ``result.model(...)``.
    """

    model: nn.Module
    recipe: Recipe
    report: ConversionReport | None = None
    tensor_source: LazyTensors | None = None
    tokenizer: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"QuantizationResult.model must be an nn.Module, got {type(self.model).__name__}")
        if not isinstance(self.recipe, Recipe):
            raise TypeError(f"QuantizationResult.recipe must be a Recipe, got {type(self.recipe).__name__}")
