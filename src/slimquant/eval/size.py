"""Sizes of models in memory and of checkpoints on disk."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, counting shared storage once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (id(t), -1) if t.is_meta else (t.untyped_storage().data_ptr(), t.storage_offset())  # meta: no storage
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def checkpoint_bytes(path: str | os.PathLike) -> int:
    """Bytes of the weight files (``*.safetensors``, ``*.gguf``) at ``path`` (file or directory; a W8A8SC
    directory's ``partI-of-N`` parts included)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    patterns = ("*.safetensors", "*.gguf", "part*-of-*/*.safetensors")
    return sum(f.stat().st_size for pattern in patterns for f in p.glob(pattern))
