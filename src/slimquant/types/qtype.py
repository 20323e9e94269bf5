"""Quantized data types as small immutable value objects."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimquant.errors import SlimquantError


@dataclass(frozen=True)
class QType:
    """A quantized storage type.

    Integer types have an inclusive grid ``[qmin, qmax]``; float8 types carry the torch dtype that
    rounds to them and their largest finite value as ``qmax``.
    """

    name: str
    bits: int
    is_float: bool
    signed: bool
    qmin: float
    qmax: float

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype that holds unpacked values (int8/uint8/float8)."""
        if self.is_float:
            return torch.float8_e4m3fn if self.name == "fp8_e4m3" else torch.float8_e5m2
        return torch.int8 if self.signed else torch.uint8

    @property
    def packed(self) -> bool:
        """True when values are bit-packed into bytes on disk (fewer than 8 bits)."""
        return not self.is_float and self.bits < 8

    def __str__(self) -> str:
        return self.name


def _int(name: str, bits: int, signed: bool) -> QType:
    if signed:
        return QType(name, bits, False, True, float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1))
    return QType(name, bits, False, False, 0.0, float(2**bits - 1))


QTYPES: dict[str, QType] = {
    q.name: q
    for q in (
        _int("int2", 2, True),
        _int("int3", 3, True),
        _int("int4", 4, True),
        _int("int5", 5, True),
        _int("int6", 6, True),
        _int("int8", 8, True),
        _int("uint4", 4, False),
        _int("uint8", 8, False),
        QType("fp8_e4m3", 8, True, True, -448.0, 448.0),
        QType("fp8_e5m2", 8, True, True, -57344.0, 57344.0),
    )
}


def qtype(name: str | QType) -> QType:
    """Look a qtype up by name; unknown names list the valid ones."""
    if isinstance(name, QType):
        return name
    try:
        return QTYPES[name]
    except KeyError:
        raise SlimquantError(f"unknown qtype {name!r}; valid: {', '.join(QTYPES)}") from None


def int_qtype_for_bits(bits: int) -> QType:
    """The signed integer qtype of a bit width (2, 3, 4, 5, 6 or 8)."""
    names = {2: "int2", 3: "int3", 4: "int4", 5: "int5", 6: "int6", 8: "int8"}
    if bits not in names:
        raise SlimquantError(f"unsupported weight bit width {bits}; valid: 2, 3, 4, 5, 6, 8")
    return QTYPES[names[bits]]
