"""The sequential pipeline's work directory: every finished block persisted, so a killed run resumes.

Layout (``<save_directory>.partial`` for the CLI)::

    state.json                    {"fingerprint": {...}, "done": N}   written last, atomically (rename)
    block_00000.safetensors       every tensor of finished block 0 (quantized layers and the rest)
    block_00000.json              its quantized layers' manifest entries and report rows
    inputs.safetensors            the hidden states entering block N, one tensor per calibration item

``done`` moves only after the block's files and the next inputs are complete, so after a kill at any point a
rerun continues from block ``done`` and, the arithmetic being deterministic, writes the same checkpoint as an
uninterrupted run. A work directory from a different run (recipe, model, calibration data or layer plan) is
refused with the difference.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from slimquant.errors import SlimquantError
from slimquant.formats.safetensors_io import TensorSource, write_safetensors

log = logging.getLogger(__name__)

STATE = "state.json"
INPUTS = "inputs.safetensors"


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write_safetensors(tmp, [(n, tuple(t.shape), t.dtype, (lambda t=t: t)) for n, t in tensors.items()])
    os.replace(tmp, path)


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if a == b else [f"{path}: {a!r} -> {b!r}"]


def tensor_digest(tensors: list[torch.Tensor]) -> str:
    """A short content hash of tensors (calibration data), for the fingerprint."""
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class WorkDir:
    def __init__(self, path: str | os.PathLike, fingerprint: dict[str, Any]) -> None:
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it will read back
        state_file = self.path / STATE
        if state_file.is_file():
            try:
                state = json.loads(state_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SlimquantError(f"{state_file} is not valid JSON ({e}); remove {self.path} to start over") from None
            diff = _diff(state.get("fingerprint"), self.fingerprint)
            if diff:
                raise SlimquantError(f"{self.path} holds an unfinished run with a different setup; remove it to start "
                                     f"over, or rerun the original command. Differences: {'; '.join(diff[:8])}")  # fmt: skip
            self.done = int(state.get("done", 0))
            if self.done:
                log.info("resuming from %s: %d block(s) already done", self.path, self.done)
        else:
            if self.path.exists() and any(self.path.iterdir()):
                raise SlimquantError(f"{self.path} exists and is not a slimquant work directory; remove it")
            self.path.mkdir(parents=True, exist_ok=True)
            self.done = 0
            _atomic_json(state_file, {"fingerprint": self.fingerprint, "done": 0})

    def block_file(self, i: int) -> Path:
        return self.path / f"block_{i:05d}.safetensors"

    def save_block(self, i: int, tensors: dict[str, torch.Tensor], info: dict[str, Any],
                   next_inputs: list | None) -> None:  # fmt: skip
        """Persist finished block ``i`` (its tensors by full name, its report) and the next block's inputs."""
        if i != self.done:
            raise SlimquantError(f"work directory {self.path}: block {i} finished out of order (next is {self.done})")
        _write_tensors(self.block_file(i), tensors)
        _atomic_json(self.path / f"block_{i:05d}.json", info)
        if next_inputs is not None:  # write_safetensors entries (name, shape, dtype, producer), one tensor at a time
            tmp = self.path / (INPUTS + ".tmp")
            write_safetensors(tmp, next_inputs)
            os.replace(tmp, self.path / INPUTS)
        self.done = i + 1
        _atomic_json(self.path / STATE, {"fingerprint": self.fingerprint, "done": self.done})

    def block_info(self, i: int) -> dict[str, Any]:
        return json.loads((self.path / f"block_{i:05d}.json").read_text(encoding="utf-8"))

    def block_tensor_names(self, i: int) -> list[str]:
        from safetensors import safe_open

        with safe_open(str(self.block_file(i)), framework="pt") as f:
            return list(f.keys())

    def inputs(self, count: int):  # noqa: ANN201
        """The saved hidden states entering block ``done``, read one at a time (a generator)."""
        src = TensorSource({f"item_{j:06d}": self.path / INPUTS for j in range(count)})
        for j in range(count):
            try:
                yield src.get(f"item_{j:06d}").clone()  # a copy: the file's map is not kept alive
            except SlimquantError as e:
                raise SlimquantError(f"work directory {self.path} is incomplete ({e}); remove it to start over") from None
        src.close()

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
