"""A Hugging Face model whose repeated blocks stay on disk until the pipeline needs them.

:func:`open_streaming` builds the model's skeleton with its parameters on the meta device (buffers such as
rotary tables are computed), then loads everything outside the repeated blocks (embeddings, final norm,
lm_head) from the safetensors files. :meth:`StreamingModel.load_block` reads one block's tensors (the files
are memory-mapped by safetensors) into it; after the block is quantized and written out,
:meth:`StreamingModel.release_block` puts it back on meta. Peak memory is the non-block parameters plus
about one block, whatever the number of blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimquant.adapters import block_list
from slimquant.errors import SlimquantError
from slimquant.formats.safetensors_io import TensorSource

log = logging.getLogger(__name__)


@dataclass
class StreamingModel:
    model: nn.Module
    source: TensorSource
    blocks_path: str
    tokenizer: Any
    kind: str
    path: str
    loaded: set[int] = field(default_factory=set)  # blocks currently holding real tensors
    max_loaded: int = 0  # the most blocks ever loaded at once (tests check it stays 1)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.blocks_path)  # type: ignore[return-value]

    def load_block(self, i: int) -> nn.Module:
        """Read block ``i``'s tensors from disk into it (checked: present, right shape, finite)."""
        block = self.blocks[i]
        prefix = f"{self.blocks_path}.{i}."
        state = {}
        for local, meta in block.state_dict(keep_vars=True).items():
            name = prefix + local
            if name not in self.source:
                raise SlimquantError(f"{self.path}: tensor {name} is missing from the safetensors files")
            t = self.source.get(name)
            if tuple(t.shape) != tuple(meta.shape):
                raise SlimquantError(f"{self.path}: tensor {name} has shape {tuple(t.shape)}, the model expects {tuple(meta.shape)}")
            if meta.is_floating_point() and not t.is_floating_point():
                raise SlimquantError(f"{self.path}: tensor {name} is stored as {t.dtype}, the model expects "
                                     f"{meta.dtype} (a wrong header dtype, or not this model's weights)")  # fmt: skip
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise SlimquantError(f"{self.path}: tensor {name} has {int((~torch.isfinite(t)).sum())} NaN/Inf value(s)")
            state[local] = t.to(meta.dtype)
        self.source.close()  # unmap the file: its touched pages would otherwise stay in this process's RSS
        block.load_state_dict(state, assign=True, strict=True)
        for p in block.parameters():
            p.requires_grad_(False)
        self.loaded.add(i)
        self.max_loaded = max(self.max_loaded, len(self.loaded))
        return block

    def release_block(self, i: int) -> None:
        """Put block ``i`` back on meta (its tensors are on disk by then)."""
        self.blocks[i].to("meta")
        self.loaded.discard(i)


def open_streaming(path: str | Path, trust_remote_code: bool = False) -> StreamingModel:
    """Open a Hugging Face safetensors directory for block-by-block processing (see module doc)."""
    from slimquant.models.loading import (EMBEDDED, _check_model_type, _check_safetensors, _hf_skeleton, _load_tokenizer,
                                          _read_config, check_float_weights)  # fmt: skip

    if str(path) in EMBEDDED or str(path).endswith(".gguf"):
        raise SlimquantError(f"streaming reads a Hugging Face safetensors directory; {path} is a GGUF model (the embedded "
                             "models are), which is loaded whole: drop --stream, or save it with save_pretrained first")  # fmt: skip
    path = Path(path)
    if not path.is_dir():
        raise SlimquantError(f"streaming reads a Hugging Face model directory; {path} is not one")
    raw = _read_config(path)
    _check_model_type(path, raw, trust_remote_code)
    stored = _check_safetensors(path)
    archs = raw.get("architectures") or []
    if not archs:
        raise SlimquantError(f"{path / 'config.json'}: no \"architectures\" entry naming the transformers model class")
    model, kind = _hf_skeleton(path, archs[0], trust_remote_code)  # parameters on meta, buffers computed
    config = model.config
    model.eval()
    blocks_path = block_list(model)
    source = TensorSource.from_directory(path)
    # everything outside the blocks: from disk now
    prefix = blocks_path + "."
    outside = {n: t for n, t in model.state_dict(keep_vars=True).items() if not n.startswith(prefix)}
    state, missing = {}, []
    for name, meta in outside.items():
        if name in source:
            t = source.get(name)
            if tuple(t.shape) != tuple(meta.shape):
                raise SlimquantError(f"{path}: tensor {name} has shape {tuple(t.shape)}, the model expects "
                                     f"{tuple(meta.shape)}")  # fmt: skip
            state[name] = t.to(meta.dtype)
        elif meta.is_meta:
            missing.append(name)
    source.close()
    model.load_state_dict(state, assign=True, strict=False)
    if missing:
        tie = getattr(config, "tie_word_embeddings", False)
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if tie and out_emb is not None and out_emb.weight.is_meta:
            out_emb.weight = model.get_input_embeddings().weight
        still = [n for n, t in model.state_dict(keep_vars=True).items() if not n.startswith(prefix) and t.is_meta]
        if still:
            raise SlimquantError(f"{path}: tensors missing from the safetensors files: {', '.join(still[:5])}")
    check_float_weights(model, path, stored)  # the loaded part; each block is checked as it is read
    for p in model.parameters():
        p.requires_grad_(False)
    log.info("streaming %s: %d blocks under %s stay on disk until needed", path, len(model.get_submodule(blocks_path)),
             blocks_path)  # fmt: skip
    return StreamingModel(model, source, blocks_path, _load_tokenizer(path, trust_remote_code=trust_remote_code), kind,
                          str(path))  # fmt: skip
