"""slimquant as a transformers quantization method (``quant_method: slimquant``).

After :func:`register` (``slimquant.register_transformers()``), ``AutoModelForCausalLM.from_pretrained(d)`` of a
checkpoint in the transformers layout (:mod:`slimquant.formats.transformers_layout`: ``slimquant quantize
--save_format transformers``, ``slimquant export --format transformers``) returns the model with slimquant's
quantized modules in place, in deploy mode: the skeleton is built on the meta device, the quantized modules are
swapped in before any tensor is read, and transformers fills them from the file, so no float weight of a quantized
layer ever exists. ``model.save_pretrained(d2)`` writes the same layout again (its config keeps the
``quantization_config``), which loads both ways (``from_pretrained``, :func:`slimquant.load`).

Registration uses transformers' public hooks (``register_quantization_config`` / ``register_quantizer``), once per
process. Quantizing a float model inside ``from_pretrained`` is not offered: quantize with slimquant, then load.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from slimquant.errors import SlimquantError
from slimquant.formats.transformers_layout import QUANT_METHOD, REBUILD_KEYS, manifest_of_config


class SlimquantConfig(QuantizationConfigMixin):
    """config.json's ``quantization_config`` of a slimquant checkpoint in the transformers layout: what rebuilds
    its quantized modules (``layers``: per layer the module class, QuantSpec and constructor arguments; the
    attention / KV-cache quantizers; the recipe). Written by slimquant, read by :class:`SlimquantHfQuantizer`."""

    def __init__(self, layers: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.layers = dict(layers) if isinstance(layers, dict) else ({} if layers is None else layers)  # checked on load
        for key in REBUILD_KEYS:
            if key != "layers" and key in kwargs:
                setattr(self, key, kwargs.pop(key))
        kwargs.pop("quant_method", None)
        for key, value in kwargs.items():  # keys a newer slimquant wrote: kept, so save_pretrained writes them back
            setattr(self, key, value)

    def rebuild_manifest(self, model: torch.nn.Module) -> dict[str, Any]:
        return manifest_of_config(self.to_dict(), model)


class SlimquantHfQuantizer(HfQuantizer):
    """Loads slimquant checkpoints (transformers layout) into slimquant's quantized modules."""

    requires_calibration = True  # pre-quantized checkpoints only: from_pretrained does not quantize

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise SlimquantError("slimquant checkpoints: device_map with 'disk' offload is not supported; load on "
                                 "cpu (or one accelerator)")  # fmt: skip

    def _process_model_before_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        from slimquant.formats.checkpoint import rebuild

        manifest = self.quantization_config.rebuild_manifest(model)
        if not isinstance(manifest["layers"], dict) or not manifest["layers"]:
            raise SlimquantError("config.json quantization_config (quant_method slimquant): 'layers' must map layer "
                                 "names to their entries, and lists no quantized layers here")  # fmt: skip
        files = [str(f) for f in kwargs.get("checkpoint_files") or []]
        pickled = [f for f in files if not f.endswith(".safetensors")]
        if pickled:  # never unpickled: slimquant checkpoints are safetensors
            raise SlimquantError(f"{pickled[0]}: slimquant checkpoints load from .safetensors files only")
        rebuild(model, manifest)  # quantized modules on meta; transformers fills their tensors by name
        if files:
            _check_stored(model, manifest, files)
        return model

    def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        from slimquant.nn import QModule
        from slimquant.surgery.fuse import fuse_for_inference

        for name, module in model.named_modules():
            if isinstance(module, QModule):
                for leaf, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                    if t is not None and t.device.type == "meta":
                        raise SlimquantError(f"{name}.{leaf} is missing from the checkpoint's safetensors files")
                for p in module.parameters(recurse=False):
                    p.requires_grad_(False)
        fuse_for_inference(model)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _check_stored(model: torch.nn.Module, manifest: dict[str, Any], files: list[Any]) -> None:
    """Every tensor of the rebuilt quantized modules is in the checkpoint's safetensors files with the shape and
    dtype the module holds (read from the headers; transformers would otherwise fill a missing one with an
    uninitialised tensor)."""
    from pathlib import Path

    from slimquant.formats.checkpoint import strict_dtype_prefixes
    from slimquant.formats.safetensors_io import dtype_name, read_header

    stored: dict[str, dict] = {}
    for f in files:
        stored.update(read_header(Path(f)))
    prefixes = strict_dtype_prefixes(model, manifest)
    for name, t in model.state_dict(keep_vars=True).items():
        if name.rpartition(".")[0] not in prefixes:
            continue
        where = f"{Path(files[0]).parent}: tensor {name}"
        if name not in stored:
            raise SlimquantError(f"{where} is missing from the checkpoint's safetensors files")
        shape, dtype = tuple(stored[name]["shape"]), stored[name]["dtype"]
        if shape != tuple(t.shape) or dtype != dtype_name(t.dtype):
            raise SlimquantError(f"{where} is {dtype} {list(shape)}; the quantized layer holds "
                                 f"{dtype_name(t.dtype)} {list(t.shape)}")  # fmt: skip


def register() -> None:
    """Make transformers load ``quant_method: slimquant`` checkpoints with slimquant's modules (idempotent)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not SlimquantConfig:
        if QUANT_METHOD in AUTO_QUANTIZATION_CONFIG_MAPPING:
            raise SlimquantError(f"transformers already has a quantization config named {QUANT_METHOD!r}: "
                                 f"{AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD]}")  # fmt: skip
        register_quantization_config(QUANT_METHOD)(SlimquantConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not SlimquantHfQuantizer:
        if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
            raise SlimquantError(f"transformers already has a quantizer named {QUANT_METHOD!r}: "
                                 f"{AUTO_QUANTIZER_MAPPING[QUANT_METHOD]}")  # fmt: skip
        register_quantizer(QUANT_METHOD)(SlimquantHfQuantizer)
