"""The streaming safetensors writer and the lazy reader: files safetensors itself reads back bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from slimquant.errors import SlimquantError
from slimquant.formats.safetensors_io import TensorSource, write_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "f16": torch.randn(2, 2, generator=g).half(),
        "i8": torch.randint(-128, 128, (4, 3), dtype=torch.int8, generator=g),
        "u8": torch.randint(0, 256, (9,), dtype=torch.uint8, generator=g),
        "i32": torch.randint(-(2**31), 2**31 - 1, (3,), dtype=torch.int32, generator=g),
        "i64": torch.tensor([2**40, -1]),
        "fp8": torch.randn(5, generator=g).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(1.5),
        "strided": torch.arange(12.0).reshape(3, 4).T,  # not contiguous
    }


def test_round_trip_through_safetensors(tmp_path) -> None:
    ts = _tensors()
    calls: list[str] = []

    def produce(name: str):
        def f() -> torch.Tensor:
            calls.append(name)
            return ts[name]

        return f

    path = tmp_path / "a.safetensors"
    write_safetensors(path, [(n, tuple(t.shape), t.dtype, produce(n)) for n, t in ts.items()], {"format": "pt"})
    assert calls == list(ts)  # each produced once, in order
    back = load_file(str(path))
    assert back.keys() == ts.keys()
    for n, t in ts.items():  # same dtype, shape and bits
        assert back[n].dtype == t.dtype and back[n].shape == t.shape, n
        assert torch.equal(back[n].reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8)), n
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_announced_shape_must_match(tmp_path) -> None:
    with pytest.raises(SlimquantError, match="produced"):
        write_safetensors(tmp_path / "b.safetensors", [("x", (2,), torch.float32, lambda: torch.zeros(3))])


def test_tensor_source_reads_lazily_and_names_missing(tmp_path) -> None:
    save_file({"a": torch.ones(2), "b": torch.zeros(3)}, str(tmp_path / "one.safetensors"))
    save_file({"c": torch.full((1,), 7.0)}, str(tmp_path / "two.safetensors"))
    src = TensorSource.from_directory(tmp_path)
    assert "c" in src and "z" not in src
    assert torch.equal(src.get("c"), torch.full((1,), 7.0)) and torch.equal(src.get("a"), torch.ones(2))
    with pytest.raises(SlimquantError, match="tensor z is not in"):
        src.get("z")
    (tmp_path / "three.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(SlimquantError, match="three.safetensors"):
        TensorSource.from_directory(tmp_path)
