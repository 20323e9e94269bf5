"""Bit packing: exact round trips, the documented byte layout, fast paths vs a bit-by-bit reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimquant.math import pack, packed_size, unpack
from slimquant.math import packing as packing_mod


def reference_unpack(packed: torch.Tensor, bits: int, qmin: int, k: int) -> torch.Tensor:
    """Bit-by-bit reading of the documented layout, in pure Python (one row at a time).

    Each row is a little-endian bit stream: byte j holds stream bits [8j, 8j + 8), lowest first;
    value i occupies stream bits [bits*i, bits*(i+1)), lowest first.
    """
    rows = packed.reshape(-1, packed.shape[-1]).tolist()
    out = []
    for row in rows:
        stream = [(byte >> b) & 1 for byte in row for b in range(8)]
        vals = []
        for i in range(k):
            u = sum(stream[bits * i + j] << j for j in range(bits))
            vals.append(u + qmin)
        out.append(vals)
    return torch.tensor(out, dtype=torch.int8).reshape(*packed.shape[:-1], k)


def _random_q(shape: tuple[int, ...], bits: int, qmin: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(qmin, qmin + 2**bits, shape, generator=g).to(torch.int8)


# -- exact layout ---------------------------------------------------------------------------------


def test_four_bit_is_two_per_byte_low_nibble_first() -> None:
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.uint8)
    p = pack(q, 4, 0)
    assert p.dtype == torch.uint8
    assert p.tolist() == [[0x21, 0x43, 0x65, 0xF7]]


def test_four_bit_signed_values_are_offset_by_qmin() -> None:
    q = torch.tensor([[-8, 7, 0, -1, 0, 0, 0, 0]], dtype=torch.int8)
    # u = q + 8 -> [0, 15, 8, 7, 8, 8, 8, 8]
    assert pack(q, 4, -8).tolist() == [[0xF0, 0x78, 0x88, 0x88]]


def test_two_bit_is_four_per_byte_lowest_bits_first() -> None:
    q = torch.tensor([[0, 1, 2, 3, 3, 2, 1, 0]], dtype=torch.int8) - 2  # int2 grid [-2, 1]
    # u = [0, 1, 2, 3 | 3, 2, 1, 0]
    assert pack(q, 2, -2).tolist() == [[0b11100100, 0b00011011]]


def test_three_bit_is_a_24_bit_little_endian_word() -> None:
    u = [1, 2, 3, 4, 5, 6, 7, 0]
    word = sum(v << (3 * i) for i, v in enumerate(u))
    expected = [(word >> (8 * j)) & 0xFF for j in range(3)]
    assert pack(torch.tensor([u]) - 4, 3, -4).tolist() == [expected]


def test_last_dim_is_zero_padded_to_a_multiple_of_8() -> None:
    q = torch.tensor([[15, 15, 15]], dtype=torch.uint8)
    assert pack(q, 4, 0).tolist() == [[0xFF, 0x0F, 0x00, 0x00]]
    # padding is u = 0, i.e. value qmin for a signed grid
    assert pack(torch.tensor([[1]]), 2, -2).tolist() == [[0b11, 0x00]]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("k", [1, 7, 8, 9, 15, 16, 17, 33, 100])
def test_packed_size(bits: int, k: int) -> None:
    expected = -(-k // 8) * bits
    assert packed_size(k, bits) == expected
    assert pack(_random_q((3, k), bits, 0, k), bits, 0).shape == (3, expected)


# -- round trips ----------------------------------------------------------------------------------


@settings(deadline=None, max_examples=50)
@given(
    bits=st.sampled_from([2, 3, 4]),
    signed=st.booleans(),
    shape=st.lists(st.integers(1, 5), min_size=0, max_size=2).map(tuple),
    k=st.integers(1, 70),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip_is_exact(bits: int, signed: bool, shape: tuple[int, ...], k: int, seed: int) -> None:
    qmin = -(2 ** (bits - 1)) if signed else 0
    q = _random_q((*shape, k), bits, qmin, seed)
    p = pack(q, bits, qmin)
    assert p.shape == (*shape, packed_size(k, bits)) and p.dtype == torch.uint8
    back = unpack(p, bits, qmin, k)
    assert back.dtype == torch.int8
    assert torch.equal(back, q)


@pytest.mark.parametrize("bits", [1, 5, 6, 7])
def test_other_widths_round_trip_through_the_generic_path(bits: int) -> None:
    q = _random_q((4, 21), bits, 0, bits)
    assert torch.equal(unpack(pack(q, bits, 0), bits, 0, 21), q)


def test_extreme_values_round_trip() -> None:
    for bits in (2, 3, 4):
        qmin = -(2 ** (bits - 1))
        q = torch.tensor([[qmin, qmin + 2**bits - 1] * 5], dtype=torch.int8)
        assert torch.equal(unpack(pack(q, bits, qmin), bits, qmin, 10), q)


# -- fast paths vs reference ----------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("qmin_kind", ["signed", "unsigned"])
def test_unpack_matches_bit_by_bit_reference(bits: int, qmin_kind: str) -> None:
    qmin = -(2 ** (bits - 1)) if qmin_kind == "signed" else 0
    for k in (5, 8, 13, 24):
        q = _random_q((2, 3, k), bits, qmin, 100 + k)
        p = pack(q, bits, qmin)
        ref = reference_unpack(p, bits, qmin, k)
        assert torch.equal(ref, q)  # the reference reads pack()'s layout back
        assert torch.equal(unpack(p, bits, qmin, k), ref)


class _NoFastPath(int):
    """An int that is never ``== 2`` or ``== 4``, so unpack() takes its generic word-shift path."""

    def __eq__(self, other: object) -> bool:
        return False

    __hash__ = int.__hash__


def _generic_unpack(packed: torch.Tensor, bits: int, qmin: int, k: int) -> torch.Tensor:
    return unpack(packed, _NoFastPath(bits), qmin, k)


def test_generic_path_helper_really_bypasses_the_fast_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> torch.Tensor:
        raise AssertionError("fast path taken")

    monkeypatch.setattr(packing_mod, "_unpack4", boom)
    monkeypatch.setattr(packing_mod, "_unpack2", boom)
    p = pack(torch.tensor([[1, 2, 3]]), 4, 0)
    assert _generic_unpack(p, 4, 0, 3).tolist() == [[1, 2, 3]]
    with pytest.raises(AssertionError, match="fast path taken"):
        unpack(p, 4, 0, 3)


@pytest.mark.parametrize("bits", [2, 4])
def test_fast_paths_equal_the_generic_path_on_every_byte(bits: int) -> None:
    # Every possible byte value, in every position of a run, signed and unsigned grids.
    every_byte = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    packed = every_byte.reshape(-1, bits * 4)  # rows of 4 runs of 8 values
    k = packed.shape[-1] // bits * 8
    for qmin in (0, -(2 ** (bits - 1))):
        fast = unpack(packed, bits, qmin, k)
        assert torch.equal(fast, _generic_unpack(packed, bits, qmin, k))
        assert torch.equal(fast, reference_unpack(packed, bits, qmin, k))
        assert torch.equal(unpack(packed, bits, qmin, k - 3), fast[..., : k - 3])  # truncation


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "bits", "qmin"),
    [([0, 16], 4, 0), ([-1, 0], 4, 0), ([-9, 0], 4, -8), ([0, 8], 4, -8), ([2], 2, -2), ([-3], 2, -2), ([4], 3, -4)],
)
def test_out_of_range_values_raise(values: list[int], bits: int, qmin: int) -> None:
    with pytest.raises(ValueError, match=f"values out of range for {bits}-bit packing with qmin={qmin}"):
        pack(torch.tensor([values]), bits, qmin)


@pytest.mark.parametrize("bits", [0, 8, 16])
def test_unsupported_widths_raise(bits: int) -> None:
    with pytest.raises(ValueError, match=f"packing supports 1..7 bits, got {bits}"):
        pack(torch.zeros(1, 8, dtype=torch.int8), bits, 0)
