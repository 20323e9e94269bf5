"""A toy checkpoint format written the way another project would add one: this file only, no library edit.

``toy`` stores every logical tensor as the module holds it, except integer zero points, which it keeps as int16
under ``<layer>.zp16``; a checkpoint whose zero points are not integers (``zero_point="float"`` specs) is refused
before anything is written, naming the layer. One ``toy.safetensors`` file plus the shared manifest.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from slimquant.errors import SlimquantError
from slimquant.formats import Codec, register_codec
from slimquant.formats import checkpoint as ck
from slimquant.formats.atomic import atomic_directory

ZP, ZP16 = "weight_zero_point", "zp16"


def _file_name(name: str) -> str:
    return name.removesuffix(ZP) + ZP16 if name.endswith(ZP) else name


class ToyCodec(Codec):
    name = "toy"
    description = "logical tensors as they are, integer zero points as int16"

    def save(self, result: Any, directory: str | os.PathLike, *, tokenizer: Any = None, overwrite: bool = False,
             force_overwrite: bool = False, protect: Iterable[str | os.PathLike] = (), **options: Any) -> Path:  # fmt: skip
        if options:
            raise SlimquantError(f"the toy format has no option {', '.join(sorted(options))}")
        state = ck.logical_state(result)
        model = result.model
        entries = []
        for name in state.tensors:
            t = state.data(name)
            prefix, _, leaf = name.rpartition(".")
            if leaf == ZP:
                if not torch.equal(t, t.round()):
                    raise SlimquantError(f"the toy format stores integer zero points only: layer {prefix} has others")
                name, t = _file_name(name), t.to(torch.int16)
            entries.append((name, tuple(t.shape), t.dtype, lambda t=t: t))
        aliases = {_file_name(a): _file_name(s) for a, s in state.aliases.items()}
        manifest = ck.manifest_for(model, self.name, state, aliases)
        inputs = ck.model_sources(model, result.tensor_source) + list(protect)
        with atomic_directory(directory, overwrite, inputs, force_overwrite) as tmp:
            manifest["files"] = ck.write_tensor_files(tmp, "toy.safetensors", entries, None)
            ck.write_json(tmp / "config.json", ck.config_dict(model))
            ck.write_json(tmp / ck.MANIFEST, manifest)
        return Path(directory)

    def load_into(self, model: nn.Module, directory: Path, manifest: dict[str, Any]) -> nn.Module:
        def expected(m: nn.Module) -> dict[str, torch.Tensor]:
            out = {}
            for n, t in m.state_dict(keep_vars=True).items():
                out[_file_name(n)] = torch.empty(t.shape, dtype=torch.int16, device="meta") if n.endswith(ZP) else t
            return out

        def decode(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {n.removesuffix(ZP16) + ZP if n.endswith(ZP16) else n: t.float() if n.endswith(ZP16) else t
                    for n, t in tensors.items()}  # fmt: skip

        return ck.load_logical(model, directory, manifest, decode=decode, expected=expected)


register_codec(ToyCodec)
