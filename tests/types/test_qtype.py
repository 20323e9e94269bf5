"""QType value objects: grids, storage dtypes, packing flags, lookup errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from slimquant.errors import SlimquantError
from slimquant.types import QTYPES, QType, int_qtype_for_bits, qtype


@pytest.mark.parametrize(
    ("name", "bits", "signed", "qmin", "qmax"),
    [
        ("int2", 2, True, -2, 1),
        ("int3", 3, True, -4, 3),
        ("int4", 4, True, -8, 7),
        ("int8", 8, True, -128, 127),
        ("uint4", 4, False, 0, 15),
        ("uint8", 8, False, 0, 255),
    ],
)
def test_integer_grids(name: str, bits: int, signed: bool, qmin: int, qmax: int) -> None:
    qt = QTYPES[name]
    assert (qt.bits, qt.signed, qt.is_float) == (bits, signed, False)
    assert (qt.qmin, qt.qmax) == (float(qmin), float(qmax))
    assert qt.qmax - qt.qmin + 1 == 2**bits
    assert qt.torch_dtype == (torch.int8 if signed else torch.uint8)
    assert qt.packed == (bits < 8)
    assert str(qt) == name


@pytest.mark.parametrize(
    ("name", "dtype"), [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)]
)
def test_fp8_types_carry_their_torch_dtype_and_largest_finite_value(name: str, dtype: torch.dtype) -> None:
    qt = QTYPES[name]
    assert qt.is_float and not qt.packed and qt.bits == 8
    assert qt.torch_dtype == dtype
    assert qt.qmax == torch.finfo(dtype).max
    assert qt.qmin == -torch.finfo(dtype).max


def test_lookup_by_name_and_passthrough() -> None:
    assert qtype("int4") is QTYPES["int4"]
    assert qtype(QTYPES["uint8"]) is QTYPES["uint8"]


def test_unknown_name_lists_every_valid_name() -> None:
    with pytest.raises(SlimquantError, match="unknown qtype 'int7'") as ei:
        qtype("int7")
    for name in QTYPES:
        assert name in str(ei.value)


def test_qtype_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        QTYPES["int8"].bits = 7  # type: ignore[misc]
    assert QTYPES["int8"] == QType("int8", 8, False, True, -128.0, 127.0)


@pytest.mark.parametrize(("bits", "name"), [(2, "int2"), (3, "int3"), (4, "int4"), (5, "int5"), (6, "int6"), (8, "int8")])
def test_int_qtype_for_bits(bits: int, name: str) -> None:
    assert int_qtype_for_bits(bits) is QTYPES[name]


@pytest.mark.parametrize("bits", [1, 7, 16])
def test_int_qtype_for_bits_rejects_unsupported_widths(bits: int) -> None:
    with pytest.raises(SlimquantError, match=f"unsupported weight bit width {bits}; valid: 2, 3, 4, 5, 6, 8"):
        int_qtype_for_bits(bits)
