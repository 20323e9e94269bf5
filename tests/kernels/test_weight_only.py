"""Stored weight layout (checkpoint tensors) and its reference dequantization."""

from __future__ import annotations

import pytest
import torch

from slimquant.kernels import dequantize_weight_tensors, weight_layout
from slimquant.kernels.weight_only import weight_tensors
from slimquant.math import dequantize_weight, quantize_weight
from slimquant.types import Granularity, QuantSpec

PT, PC, PG = Granularity.PER_TENSOR, Granularity.PER_CHANNEL, Granularity.PER_GROUP


@pytest.mark.parametrize(
    ("spec", "n", "k", "weight", "groups"),
    [
        (QuantSpec("int8", PC), 6, 40, ((6, 40), torch.int8), (6, 1)),
        (QuantSpec("uint8", PC, symmetric=False), 6, 40, ((6, 40), torch.uint8), (6, 1)),
        (QuantSpec("int8", PT), 6, 40, ((6, 40), torch.int8), (1, 1)),
        (QuantSpec("int4", PC), 6, 40, ((6, 20), torch.uint8), (6, 1)),
        (QuantSpec("int4", PC), 6, 41, ((6, 24), torch.uint8), (6, 1)),  # ceil(41 / 8) * 4
        (QuantSpec("uint4", PG, 32, symmetric=False), 6, 128, ((6, 64), torch.uint8), (6, 4)),
        (QuantSpec("int4", PG, 64), 3, 256, ((3, 128), torch.uint8), (3, 4)),
        (QuantSpec("int3", PG, 32), 6, 64, ((6, 24), torch.uint8), (6, 2)),
        (QuantSpec("int2", PC), 6, 20, ((6, 6), torch.uint8), (6, 1)),
    ],
)
def test_integer_layouts(
    spec: QuantSpec, n: int, k: int, weight: tuple[tuple[int, int], torch.dtype], groups: tuple[int, int]
) -> None:
    layout = weight_layout(n, k, spec)
    expected = {"weight": weight, "weight_scale": (groups, torch.float32)}
    if not spec.symmetric:  # symmetric weights have no zero point
        expected["weight_zero_point"] = (groups, torch.float32)
    assert layout == expected


@pytest.mark.parametrize(("name", "dtype"), [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_layout_has_no_zero_point(name: str, dtype: torch.dtype) -> None:
    assert weight_layout(5, 24, QuantSpec(name, PC)) == {
        "weight": ((5, 24), dtype),
        "weight_scale": ((5, 1), torch.float32),
    }


SPECS = [
    QuantSpec("int8", PC),
    QuantSpec("int8", PT),
    QuantSpec("int8", PC, symmetric=False),
    QuantSpec("uint8", PT, symmetric=False),
    QuantSpec("int4", PC),
    QuantSpec("int4", PG, 16, symmetric=False),
    QuantSpec("uint4", PG, 16, symmetric=False, zero_point="float"),
    QuantSpec("int3", PG, 16),
    QuantSpec("int3", PT, symmetric=False),
    QuantSpec("int5", PG, 16),
    QuantSpec("int6", PC, symmetric=False),
    QuantSpec("int2", PG, 16, symmetric=False),
    QuantSpec("fp8_e4m3", PC),
    QuantSpec("fp8_e5m2", PT),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_weight_tensors_match_the_layout_and_dequantize_exactly(spec: QuantSpec) -> None:
    torch.manual_seed(0)
    n, k = 6, 48
    w = torch.randn(n, k)
    qw = quantize_weight(w, spec)
    stored = weight_tensors(qw, spec)
    layout = weight_layout(n, k, spec)
    assert set(stored) == set(layout)
    for name, (shape, dtype) in layout.items():
        assert tuple(stored[name].shape) == shape and stored[name].dtype == dtype, name
        assert stored[name].is_contiguous()
    offset = stored.get("weight_zero_point")
    assert (offset is None) == (qw.zero_point is None)
    if offset is not None:
        assert torch.equal(offset, qw.zero_point)
    deq = dequantize_weight_tensors(stored["weight"], stored["weight_scale"], offset, spec, k, torch.float32)
    assert deq.shape == (n, k) and deq.dtype == torch.float32
    assert torch.equal(deq, dequantize_weight(qw, spec))
    assert torch.equal(
        dequantize_weight_tensors(stored["weight"], stored["weight_scale"], offset, spec, k, torch.bfloat16),
        dequantize_weight(qw, spec).bfloat16(),
    )


@pytest.mark.parametrize(
    "spec",
    [QuantSpec("int8", PC), QuantSpec("int4", PG, 16, symmetric=False), QuantSpec("int3", PC), QuantSpec("fp8_e4m3", PC)],
    ids=lambda s: s.describe(),
)
def test_row_subsets_dequantize_like_the_full_matrix(spec: QuantSpec) -> None:
    torch.manual_seed(1)
    w = torch.randn(10, 32)
    stored = weight_tensors(quantize_weight(w, spec), spec)
    full = dequantize_weight_tensors(
        stored["weight"], stored["weight_scale"], stored.get("weight_zero_point"), spec, 32, torch.float32
    )
    rows = torch.tensor([7, 0, 7, 3])
    off = stored.get("weight_zero_point")
    sub = dequantize_weight_tensors(
        stored["weight"][rows], stored["weight_scale"][rows], None if off is None else off[rows], spec, 32, torch.float32
    )
    assert torch.equal(sub, full[rows])


def test_packed_rows_with_odd_k_keep_exactly_k_columns() -> None:
    torch.manual_seed(2)
    w = torch.randn(3, 13)
    spec = QuantSpec("int4", PC, symmetric=False)
    qw = quantize_weight(w, spec)
    stored = weight_tensors(qw, spec)
    assert stored["weight"].shape == (3, 8)
    deq = dequantize_weight_tensors(stored["weight"], stored["weight_scale"], stored["weight_zero_point"], spec, 13, torch.float32)
    assert torch.equal(deq, dequantize_weight(qw, spec))


def test_the_convention_is_q_minus_zero_point_times_scale() -> None:
    # W = (q - zero_point) * scale (msModelSlim's file stores weight_offset = -zero_point: its codec's business)
    spec = QuantSpec("int8", PC, symmetric=False)
    weight = torch.tensor([[-128, 0, 127]], dtype=torch.int8)
    scale, offset = torch.tensor([[0.5]]), torch.tensor([[-10.0]])
    deq = dequantize_weight_tensors(weight, scale, offset, spec, 3, torch.float32)
    assert deq.tolist() == [[-59.0, 5.0, 68.5]]
