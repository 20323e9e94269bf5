"""Checkpoint formats as codecs over the modules' logical tensors, plus a manifest. Imports without transformers.

:mod:`slimquant.formats.codec` registers codecs by name (``msmodelslim`` built in);
:mod:`slimquant.formats.checkpoint` is what they share.
"""

from slimquant.formats.atomic import atomic_directory, check_target
from slimquant.formats.checkpoint import (
    MANIFEST,
    LogicalState,
    describe_checkpoint,
    is_checkpoint,
    logical_state,
    read_manifest,
    read_tensors,
)
from slimquant.formats.codec import Codec, codec_names, get_codec, register_codec
from slimquant.formats.msmodelslim import description_file, export_state, load_into, save, weight_file

__all__ = [
    "MANIFEST",
    "Codec",
    "LogicalState",
    "register_codec",
    "get_codec",
    "codec_names",
    "logical_state",
    "save",
    "export_state",
    "read_manifest",
    "read_tensors",
    "load_into",
    "is_checkpoint",
    "weight_file",
    "description_file",
    "describe_checkpoint",
    "atomic_directory",
    "check_target",
]
