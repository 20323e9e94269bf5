"""Checkpoint formats as state-dict codecs plus a manifest. Imports without transformers."""

from slimquant.formats.atomic import atomic_directory, check_target
from slimquant.formats.msmodelslim import (
    MANIFEST,
    describe_checkpoint,
    description_file,
    export_state,
    is_checkpoint,
    load_into,
    read_manifest,
    read_tensors,
    save,
    weight_file,
)

__all__ = [
    "MANIFEST",
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
