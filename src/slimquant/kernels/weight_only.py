"""The in-module tensors of a quantized weight and their reference dequantization.

A quantized weight module (:mod:`slimquant.nn.modules`) holds its weight as logical tensors:
    ``weight``            int8 / uint8 qtypes -> ``[n, k]`` int8 / uint8, values on the grid
                          2/3/4-bit qtypes    -> ``[n, ceil(k/8)*bits]`` uint8, packed by :mod:`slimquant.math.packing`
                          fp8 qtypes          -> ``[n, k]`` float8
    ``weight_scale``      ``[n, G]`` float32
    ``weight_zero_point`` ``[n, G]`` float32 holding the zero point (an integer, or a float for
                          ``zero_point="float"`` specs); asymmetric integer specs only
with ``W ~= (q - weight_zero_point) * weight_scale``. How a checkpoint format stores them (msModelSlim's
``weight_offset = -zero_point``, say) is the format codec's business (:mod:`slimquant.formats`).
"""

from __future__ import annotations

import torch

from slimquant.math.packing import pack, packed_size, unpack
from slimquant.math.weights import QuantizedWeight, grouped
from slimquant.types.qtype import qtype as lookup_qtype
from slimquant.types.spec import Granularity, QuantSpec


def has_zero_point(spec: QuantSpec) -> bool:
    """Whether weights of ``spec`` carry a zero point (asymmetric integer specs)."""
    return not spec.symmetric and not lookup_qtype(spec.qtype).is_float


def weight_layout(n: int, k: int, spec: QuantSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of the module tensors of an ``[n, k]`` weight: name -> (shape, dtype)."""
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
    if has_zero_point(spec):
        out["weight_zero_point"] = (g_shape, torch.float32)
    return out


def weight_tensors(qw: QuantizedWeight, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """The module tensors (see module doc) of a :class:`QuantizedWeight`."""
    qt = lookup_qtype(spec.qtype)
    weight = pack(qw.q, qt.bits, int(qt.qmin)) if qt.packed else qw.q.contiguous()
    out = {"weight": weight, "weight_scale": qw.scale.float().contiguous()}
    if has_zero_point(spec):
        zp = qw.zero_point if qw.zero_point is not None else torch.zeros_like(qw.scale)
        out["weight_zero_point"] = zp.float().contiguous()
    elif qw.zero_point is not None and bool((qw.zero_point != 0).any()):
        raise ValueError(f"a {spec.describe()} weight has no zero point, but this one has non-zero zero points")
    return out


def unpacked(weight: torch.Tensor, spec: QuantSpec, k: int) -> torch.Tensor:
    """The ``[n, k]`` grid values of a module's ``weight`` (unpacks 2/3/4-bit weights)."""
    qt = lookup_qtype(spec.qtype)
    return unpack(weight, qt.bits, int(qt.qmin), k) if qt.packed else weight


def dequantize_weight_tensors(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    spec: QuantSpec,
    k: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Reference dequantization of a module's weight tensors to a float ``[n, k]`` tensor of ``dtype``.

    Works on any leading row subset (an embedding gathers rows first, then calls this).
    """
    q = unpacked(weight, spec, k)
    n = q.shape[0]
    if spec.granularity is Granularity.PER_TENSOR:
        w = q.float() if zero_point is None else q.float() - zero_point.reshape(())
        return (w * scale.reshape(())).to(dtype)
    qg = grouped(q, spec) if spec.granularity is Granularity.PER_GROUP else q.reshape(n, 1, k)
    w = qg.float()
    if zero_point is not None:
        w = w - zero_point.unsqueeze(-1)
    return (w * scale.unsqueeze(-1)).reshape(n, k).to(dtype)


def linear_w4a16_reference(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The reference of :func:`slimquant.kernels.native.w4a16`: ``F.linear`` with the float weight
    ``(unpack(packed) - zero_point) * scale`` (per group of ``k / G`` columns; ``scale`` / ``zero_point``
    ``[n, G]``), computed in ``x``'s dtype from the float32 dequantization."""
    k, n = x.shape[-1], packed.shape[0]

    def rows(t: torch.Tensor) -> torch.Tensor:  # [n, G], [1, G], [n] or [1] -> [n, G, 1]
        t = t if t.dim() == 2 else t.reshape(-1, 1)
        return t.float().expand(n, t.shape[1]).unsqueeze(-1)

    s = rows(scale)
    q = unpack(packed, 4, int(qmin), k).float().reshape(n, s.shape[1], -1)
    if zero_point is not None:
        q = q - rows(zero_point)
    w = (q * s).reshape(n, k)
    return torch.nn.functional.linear(x, w.to(x.dtype), bias)
