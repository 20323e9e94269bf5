"""Safetensors reading and writing one tensor at a time.

``write_safetensors`` streams tensors into a file (header first, then each tensor's bytes as it is produced),
so writing a checkpoint never holds a second copy of it in memory (``safetensors.torch.save_file`` serialises
the whole file into a buffer first). ``TensorSource`` reads named tensors from safetensors files lazily
(memory-mapped by safetensors), one at a time. Neither ever unpickles anything.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch

from slimquant.errors import SlimquantError

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip

def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``F32``, ``U8``, ...); ``str(dtype)`` for one it cannot store."""
    return _DTYPES.get(dtype, str(dtype))


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}

# (name, shape, dtype, produce the tensor)
Entry = tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]


def write_safetensors(path: str | Path, entries: Iterable[Entry], metadata: dict[str, str] | None = None,
                      fsync: bool = False) -> None:
    """Write a safetensors file from ``entries``, calling each producer once, in order, while writing.

    ``fsync``: flush the file to disk before returning (before it is renamed into place)."""
    entries = list(entries)
    header: dict[str, object] = {}
    offset = 0
    for name, shape, dtype, _ in entries:
        if dtype not in _DTYPES:
            raise SlimquantError(f"tensor {name}: dtype {dtype} cannot be stored in safetensors")
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype, produce in entries:
            t = produce()
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise SlimquantError(f"tensor {name}: produced {tuple(t.shape)} {t.dtype}, announced {tuple(shape)} {dtype}")
            t = t.detach().to("cpu").contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def read_header(path: str | Path) -> dict[str, dict]:
    """The tensor entries of a safetensors file's header, checked against the file: ``{name: {"dtype", "shape",
    "data_offsets"}}``. A truncated, corrupt or inconsistent file raises :class:`SlimquantError` naming it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise SlimquantError(f"cannot read {path}: {size} bytes, too short for a safetensors file (truncated?)")
            n = int.from_bytes(raw, "little")
            if n > size - 8 or n > 100_000_000:
                raise SlimquantError(f"cannot read {path}: header of {n} bytes in a {size}-byte file (truncated or not "
                                     "a safetensors file?)")  # fmt: skip
            header = json.loads(fh.read(n))
    except OSError as e:
        raise SlimquantError(f"cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlimquantError(f"cannot read {path}: its header is not valid JSON ({e}; not a safetensors file?)") from None
    if not isinstance(header, dict):
        raise SlimquantError(f"cannot read {path}: its header is not a JSON object")
    header.pop("__metadata__", None)
    end = 0
    for name, v in header.items():
        try:
            dtype, shape, (a, b) = v["dtype"], [int(d) for d in v["shape"]], [int(o) for o in v["data_offsets"]]
        except (TypeError, KeyError, ValueError):
            raise SlimquantError(f"cannot read {path}: header entry of tensor {name} is malformed") from None
        if dtype not in DTYPE_BYTES:
            raise SlimquantError(f"cannot read {path}: tensor {name} has unknown dtype {dtype!r}")
        numel = 1
        for d in shape:
            numel *= d
        if b - a != numel * DTYPE_BYTES[dtype] or a < 0:
            raise SlimquantError(f"cannot read {path}: tensor {name} ({dtype} {shape}) has {b - a} bytes of data, "
                                 f"{numel * DTYPE_BYTES[dtype]} expected")  # fmt: skip
        end = max(end, b)
    if 8 + n + end != size:
        raise SlimquantError(f"cannot read {path}: file is {size} bytes, its header says {8 + n + end} (truncated?)")
    return header


class TensorSource:
    """Named tensors of safetensors files, read one at a time; ``files`` maps tensor name -> file."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self._handles: dict[Path, object] = {}

    @classmethod
    def from_directory(cls, directory: str | Path) -> "TensorSource":
        """Every ``*.safetensors`` file of a directory (a HF model directory, sharded or not)."""
        from safetensors import safe_open

        directory = Path(directory)
        files: dict[str, Path] = {}
        for f in sorted(directory.glob("*.safetensors")):
            try:
                with safe_open(str(f), framework="pt") as h:
                    for name in h.keys():
                        files[name] = f
            except Exception as e:  # noqa: BLE001
                raise SlimquantError(f"cannot read {f}: {e} (truncated or corrupt file?)") from None
        if not files:
            raise SlimquantError(f"{directory} has no .safetensors weights")
        return cls(files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        try:
            path = self.files[name]
        except KeyError:
            raise SlimquantError(f"tensor {name} is not in the safetensors files") from None
        h = self._handles.get(path)
        if h is None:
            # one file open at a time: the pages of a memory-mapped file count in the process's RSS while it is
            # mapped, so the previous file is unmapped before the next is opened
            self._handles.clear()
            h = self._handles[path] = safe_open(str(path), framework="pt")
        try:
            return h.get_tensor(name)  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001
            raise SlimquantError(f"cannot read tensor {name} from {path}: {e}") from None

    def close(self) -> None:
        """Unmap the open file (the next :meth:`get` reopens it)."""
        self._handles.clear()
