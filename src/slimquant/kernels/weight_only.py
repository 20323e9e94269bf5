"""Stored (on-disk / in-module) weight layout and its reference dequantization.

A stored weight is what goes into the checkpoint under ``<layer>.weight``:
    int8 / uint8 qtypes   -> ``[n, k]`` int8 / uint8, values on the grid
    2/3/4-bit qtypes      -> ``[n, ceil(k/8)*bits]`` uint8, packed by :mod:`slimquant.math.packing`
    fp8 qtypes            -> ``[n, k]`` float8
plus ``weight_scale`` ``[n, G]`` float32 and, for integer types, ``weight_offset`` ``[n, G]`` float32
with ``W ~= (q + weight_offset) * weight_scale`` (offset = -zero_point, the Ascend antiquant
convention; zeros for symmetric specs).
"""

from __future__ import annotations

import torch

from slimquant.math.packing import pack, packed_size, unpack
from slimquant.math.weights import QuantizedWeight, grouped
from slimquant.types.qtype import qtype as lookup_qtype
from slimquant.types.spec import Granularity, QuantSpec


def stored_weight_layout(n: int, k: int, spec: QuantSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of the stored tensors of an ``[n, k]`` weight: name -> (shape, dtype)."""
    qt = lookup_qtype(spec.qtype)
    if qt.packed:
        w = ((n, packed_size(k, qt.bits)), torch.uint8)
    else:
        w = ((n, k), qt.torch_dtype)
    if spec.granularity is Granularity.PER_TENSOR:
        g_shape: tuple[int, ...] = (1, 1)
    elif spec.granularity is Granularity.PER_CHANNEL:
        g_shape = (n, 1)
    else:
        g_shape = (n, k // int(spec.group_size))  # type: ignore[arg-type]
    out = {"weight": w, "weight_scale": (g_shape, torch.float32)}
    if not qt.is_float:
        out["weight_offset"] = (g_shape, torch.float32)
    return out


def to_stored(qw: QuantizedWeight, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Stored tensors (see module doc) from a :class:`QuantizedWeight`."""
    qt = lookup_qtype(spec.qtype)
    weight = pack(qw.q, qt.bits, int(qt.qmin)) if qt.packed else qw.q.contiguous()
    out = {"weight": weight, "weight_scale": qw.scale.float().contiguous()}
    if not qt.is_float:
        zp = qw.zero_point if qw.zero_point is not None else torch.zeros_like(qw.scale)
        out["weight_offset"] = (-zp).float().contiguous() + 0.0  # + 0.0 turns -0.0 into 0.0
    return out


def dequantize_stored_weight(
    weight: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    spec: QuantSpec,
    k: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Reference dequantization of a stored weight to a float ``[n, k]`` tensor of ``dtype``.

    Works on any leading row subset (an embedding gathers rows first, then calls this).
    """
    qt = lookup_qtype(spec.qtype)
    q = unpack(weight, qt.bits, int(qt.qmin), k) if qt.packed else weight
    n = q.shape[0]
    if spec.granularity is Granularity.PER_TENSOR:
        w = q.float() if offset is None else q.float() + offset.reshape(())
        return (w * scale.reshape(())).to(dtype)
    qg = grouped(q, spec) if spec.granularity is Granularity.PER_GROUP else q.reshape(n, 1, k)
    w = qg.float()
    if offset is not None:
        w = w + offset.unsqueeze(-1)
    return (w * scale.unsqueeze(-1)).reshape(n, k).to(dtype)
