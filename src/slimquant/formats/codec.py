"""Checkpoint formats as codecs, registered by name.

A codec writes a quantized model's logical tensors (:mod:`slimquant.nn`: integer values, scales, zero points,
bias) in its own file layout and reads them back. What every codec shares (the model's logical state, the
JSON manifest that rebuilds the quantized modules, the checks of loaded tensors, atomic output) is in
:mod:`slimquant.formats.checkpoint`. Adding a format is one file with a :class:`Codec` subclass and a call to
:func:`register_codec`; :func:`slimquant.save` takes it by name (``format=``) and :func:`slimquant.load` finds
it from the checkpoint's manifest (``"format": "slimquant/<name>"``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Iterable

from torch import nn

from slimquant.errors import SlimquantError
from slimquant.types.result import QuantizationResult


class Codec:
    """A checkpoint format. Subclasses set :attr:`name` and implement :meth:`save` and :meth:`load_into`."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def save(
        self,
        result: QuantizationResult,
        directory: str | os.PathLike,
        *,
        tokenizer: Any = None,
        overwrite: bool = False,
        force_overwrite: bool = False,
        protect: Iterable[str | os.PathLike] = (),
        **options: Any,
    ) -> Path:
        """Write ``result`` (what :func:`slimquant.quantize` or :func:`slimquant.load` returned: the model, its recipe,
        report and tensor source) to ``directory`` atomically; refuse options it does not know."""
        raise NotImplementedError

    def load_into(self, model: nn.Module, directory: Path, manifest: dict[str, Any]) -> nn.Module:
        """Load the checkpoint at ``directory`` (its checked ``manifest``) into ``model``, a skeleton of the float
        architecture (parameters may be on meta); returns it, quantized modules in place."""
        raise NotImplementedError

    def weight_files(self, directory: Path, manifest: dict[str, Any]) -> list[Path]:
        """The safetensors files holding the checkpoint's tensors (default: the manifest's ``"files"``)."""
        return [directory / f for f in manifest["files"]]


_CODECS: dict[str, Codec] = {}


def register_codec(codec: Codec | type[Codec], replace: bool = False) -> Codec:
    """Register a codec (an instance, or a class built without arguments) under its ``name``; returns it.

    A second codec of the same name is refused unless ``replace``.
    """
    inst = codec() if isinstance(codec, type) else codec
    if not isinstance(inst, Codec):
        raise SlimquantError(f"register_codec: {codec!r} is not a slimquant.formats.Codec")
    name = getattr(inst, "name", None)
    if not isinstance(name, str) or not name or "/" in name:
        raise SlimquantError(f"register_codec: {type(inst).__name__}.name must be a non-empty name without '/'")
    if name in _CODECS and not replace and type(_CODECS[name]) is not type(inst):
        raise SlimquantError(f"a codec named {name!r} is already registered ({type(_CODECS[name]).__name__})")
    _CODECS[name] = inst
    return inst


def codec_names() -> tuple[str, ...]:
    """Names of the registered codecs."""
    _builtins()
    return tuple(sorted(_CODECS))


def get_codec(name: str) -> Codec:
    """The codec registered as ``name``; an unknown name is refused listing the known ones."""
    _builtins()
    if name not in _CODECS:
        raise SlimquantError(f"unknown checkpoint format {name!r} (registered: {', '.join(sorted(_CODECS))})")
    return _CODECS[name]


def format_tag(name: str) -> str:
    """The manifest's ``"format"`` value of a codec."""
    return f"slimquant/{name}"


def codec_of_tag(tag: Any, where: str) -> Codec:
    """The registered codec a manifest's ``"format"`` names; an unknown one is refused naming ``where``."""
    _builtins()
    name = tag.removeprefix("slimquant/") if isinstance(tag, str) and tag.startswith("slimquant/") else None
    if name is None:
        raise SlimquantError(f"{where}: unsupported format {tag!r}")
    if name not in _CODECS:
        raise SlimquantError(
            f"{where}: written in the {name!r} format, which no codec of this process reads (registered: "
            f"{', '.join(sorted(_CODECS))}); import the module that registers it first"
        )
    return _CODECS[name]


def _builtins() -> None:
    from slimquant.formats import compressed_tensors, gguf, msmodelslim, transformers_layout, w8a8sc  # noqa: F401  (register themselves)
