"""The sequential pipeline's work directory: every finished block persisted, so a killed run resumes.

Layout (``<save_directory>.partial`` for the CLI)::

    state.json                    {"fingerprint": {...}, "done": N}   written last, atomically (rename)
    block_00000.safetensors       every tensor of finished block 0 (quantized layers and the rest)
    block_00000.json              its quantized layers' manifest entries and report rows
    inputs_0000N.safetensors      the hidden states entering block N, one tensor per calibration item
    float_inputs_0000N.safetensors  the float model's hidden states entering block N (steps that fit block
                                  outputs to the float model's: AutoRound, CBQ)
    carry_0000N.safetensors       what a windowed block solver hands to block N (CBQ: the tuned state of the
                                  layers its previous window overlapped), when there is any

``done`` moves only after the block's files and the next inputs are complete (the inputs files are named by the
block they enter, so a kill between writing them and moving ``done`` cannot feed a block the next one's inputs),
so after a kill at any point a rerun continues from block ``done`` and, the arithmetic being deterministic, writes
the same checkpoint as an uninterrupted run. A work directory from a different run (recipe, model, calibration data or layer plan) is
refused with the difference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from slimquant.errors import SlimquantError
from slimquant.formats.atomic import fsync_dir, write_file_atomic
from slimquant.formats.safetensors_io import TensorSource, read_header, write_safetensors

log = logging.getLogger(__name__)

STATE = "state.json"


def _atomic_json(path: Path, data: Any) -> None:
    write_file_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write_safetensors(tmp, [(n, tuple(t.shape), t.dtype, (lambda t=t: t)) for n, t in tensors.items()], fsync=True)
    os.replace(tmp, path)


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in [*b, *(k for k in a if k not in b)]:  # in the current fingerprint's order: recipe first
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} -> {b!r}"]


def _update(h: Any, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def tensor_digest(tensors: list[torch.Tensor]) -> str:
    """A short content hash of tensors (calibration data), for the fingerprint."""
    h = hashlib.sha256()
    for t in tensors:
        _update(h, t)
    return h.hexdigest()[:16]


# Files up to this size are hashed whole; larger ones by their header and evenly spaced samples of their data.
FULL_HASH_BYTES = 2 * 2**30
_SAMPLES, _SAMPLE_BYTES = 4096, 4096


def file_digest(path: Path) -> dict[str, Any]:
    """Size and content hash of one weights file: whole up to :data:`FULL_HASH_BYTES`, else its safetensors header
    plus :data:`_SAMPLES` slices of its bytes spread over the file (any replaced file changes them)."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            while chunk := f.read(16 * 2**20):
                h.update(chunk)
            return {"bytes": size, "sha256": h.hexdigest()[:16]}
        n = int.from_bytes(f.read(8), "little")
        h.update(f.read(min(n, 100_000_000)))
        for i in range(_SAMPLES):
            f.seek(i * (size - _SAMPLE_BYTES) // (_SAMPLES - 1))
            h.update(f.read(_SAMPLE_BYTES))
    return {"bytes": size, "sha256_sampled": h.hexdigest()[:16]}


def weights_digest(model: torch.nn.Module, lazy_files: list[Path] = ()) -> dict[str, Any]:
    """What identifies a model's weights: a hash of every tensor it holds in memory and, for tensors still on
    disk (streamed blocks on the meta device), :func:`file_digest` of their files (by file name, not path, so
    the same model under another spelling of its path matches)."""
    h = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=True).items():
        if t.device.type != "meta":
            h.update(name.encode())
            _update(h, t)
    out: dict[str, Any] = {"in_memory": h.hexdigest()[:16]}
    if lazy_files:
        out["files"] = {p.name: file_digest(p) for p in sorted(set(map(Path, lazy_files)))}
    return out


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
            if not isinstance(state, dict) or not isinstance(state.get("done"), int) or state["done"] < 0:
                raise SlimquantError(f"{state_file} is not a slimquant work state; remove {self.path} to start over")
            diff = _diff(state.get("fingerprint"), self.fingerprint)
            if diff:
                raise SlimquantError(f"{self.path} holds an unfinished run with a different setup; remove it to start "
                                     f"over, or rerun the original command. Differences: {'; '.join(diff[:8])}")  # fmt: skip
            self.done = state["done"]
            keep = (self.inputs_file(self.done), self.inputs_file(self.done, True), self.carry_file(self.done))
            for pattern in ("*inputs_*.safetensors", "carry_*.safetensors"):  # a kill between moving `done` and removing them
                for stale in self.path.glob(pattern):
                    if stale not in keep:
                        stale.unlink(missing_ok=True)
            self._check_files()
            if self.done:
                log.info("resuming from %s: %d block(s) already done", self.path, self.done)
        else:
            if self.path.exists() and any(self.path.iterdir()):
                raise SlimquantError(f"{self.path} exists and is not a slimquant work directory; remove it")
            self.path.mkdir(parents=True, exist_ok=True)
            self.done = 0
            _atomic_json(state_file, {"fingerprint": self.fingerprint, "done": 0})

    def _check_files(self) -> None:
        """Every finished block's files (and the saved inputs) readable and complete, or an error naming the file."""
        files = [self.block_file(i) for i in range(self.done)]
        files += [f for f in (self.inputs_file(self.done), self.inputs_file(self.done, True), self.carry_file(self.done))
                  if f.exists()]
        for f in files:
            if not f.is_file():
                raise SlimquantError(f"work directory {self.path} is damaged: {f.name} is missing; remove it to start over")
            try:
                read_header(f)
            except SlimquantError as e:
                raise SlimquantError(f"work directory {self.path} is damaged ({e}); remove it to start over") from None
        for i in range(self.done):
            self.block_info(i)

    def block_file(self, i: int) -> Path:
        return self.path / f"block_{i:05d}.safetensors"

    def inputs_file(self, i: int, float_model: bool = False) -> Path:
        """The hidden states entering block ``i`` (``float_model``: the float model's)."""
        return self.path / f"{'float_' if float_model else ''}inputs_{i:05d}.safetensors"

    def carry_file(self, i: int) -> Path:
        """What a windowed block solver hands to block ``i`` (``data.carry``)."""
        return self.path / f"carry_{i:05d}.safetensors"

    def save_block(self, i: int, tensors: dict[str, torch.Tensor], info: dict[str, Any],
                   next_inputs: list | None, next_float_inputs: list | None = None,
                   carry: dict[str, torch.Tensor] | None = None) -> None:  # fmt: skip
        """Persist finished block ``i`` (its tensors by full name, its report), the next block's inputs and, when
        the run carries them, the float model's inputs to the next block and the block solver's ``carry``."""
        if i != self.done:
            raise SlimquantError(f"work directory {self.path}: block {i} finished out of order (next is {self.done})")
        _write_tensors(self.block_file(i), tensors)
        _atomic_json(self.path / f"block_{i:05d}.json", info)
        # write_safetensors entries (name, shape, dtype, producer), one tensor at a time
        for float_model, entries in ((False, next_inputs), (True, next_float_inputs)):
            if entries is not None:
                target = self.inputs_file(i + 1, float_model)
                tmp = target.with_name(target.name + ".tmp")
                write_safetensors(tmp, entries, fsync=True)
                os.replace(tmp, target)
        if carry:
            _write_tensors(self.carry_file(i + 1), carry)
        self.done = i + 1
        _atomic_json(self.path / STATE, {"fingerprint": self.fingerprint, "done": self.done})
        for float_model in (False, True):  # this block's inputs are no longer needed
            self.inputs_file(i, float_model).unlink(missing_ok=True)
        self.carry_file(i).unlink(missing_ok=True)

    def carry(self) -> dict[str, torch.Tensor]:
        """The saved ``carry`` handed to block ``done`` (empty when there is none)."""
        path = self.carry_file(self.done)
        if not path.is_file():
            return {}
        from safetensors.torch import load_file

        return {k: v.clone() for k, v in load_file(str(path)).items()}

    def block_info(self, i: int) -> dict[str, Any]:
        f = self.path / f"block_{i:05d}.json"
        try:
            info = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SlimquantError(f"work directory {self.path} is damaged: {f.name} cannot be read ({e}); remove it to "
                                 "start over") from None  # fmt: skip
        if not (isinstance(info, dict) and isinstance(info.get("layers"), list) and isinstance(info.get("block_steps"), list)
                and isinstance(info.get("modules"), dict)):  # fmt: skip
            raise SlimquantError(f"work directory {self.path} is damaged: {f.name} is not a block record; remove it "
                                 "to start over")  # fmt: skip
        return info

    def block_tensor_names(self, i: int) -> list[str]:
        from safetensors import safe_open

        with safe_open(str(self.block_file(i)), framework="pt") as f:
            return list(f.keys())

    def inputs(self, count: int, float_model: bool = False):  # noqa: ANN201
        """The saved hidden states entering block ``done`` (``float_model``: the float model's), read one at a time
        (a generator)."""
        path = self.inputs_file(self.done, float_model)
        if not path.is_file():
            raise SlimquantError(f"work directory {self.path} is damaged: {path.name} is missing; remove it to start over")
        src = TensorSource({f"item_{j:06d}": path for j in range(count)})
        for j in range(count):
            try:
                yield src.get(f"item_{j:06d}").clone()  # a copy: the file's map is not kept alive
            except SlimquantError as e:
                raise SlimquantError(f"work directory {self.path} is incomplete ({e}); remove it to start over") from None
        src.close()

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
