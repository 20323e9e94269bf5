"""Packing slimquant's logical weights into GGUF (ggml) block layouts, and reading them back (pure).

A weight ``[n, k]`` becomes ``[n, k / block * block_bytes]`` bytes, one row per output channel, each row a run
of blocks laid out as ggml's ``block_q*`` structs (little-endian, fp16 ``d`` / ``m``):

``Q8_0``  ``d``, 32 x int8 ``q``
``Q4_0``  ``d``, 16 bytes: byte ``j`` = ``(q[j] + 8) | (q[j + 16] + 8) << 4``
``Q5_0``  ``d``, ``qh`` uint32 (bit ``j`` = bit 4 of ``q[j] + 16``), 16 bytes of low nibbles as Q4_0
``Q4_1``  ``d``, ``m``, 16 bytes of nibbles (``q`` unsigned) as Q4_0
``Q4_K``  ``d``, ``dmin``, 12 bytes of eight 6-bit ``sc`` / ``mn`` (``get_scale_min_k4``'s layout), 128 bytes:
          64-value chunk ``c`` holds group ``2c`` in the low and ``2c + 1`` in the high nibbles
``Q6_K``  128 bytes ``ql`` (low 4 bits), 64 bytes ``qh`` (high 2 bits), 16 x int8 ``sc``, ``d``; within each
          128-value half, value ``l + 32 i`` (``l < 32``) sits in ``ql[l + 32 (i & 1)]``'s nibble ``i >> 1`` and
          ``qh[l]``'s bits ``2i .. 2i+1``

:func:`pack` takes the grid values (``q``, as :class:`slimquant.math.weights.QuantizedWeight` holds them) and
the :class:`~slimquant.math.gguf_grid.BlockParams` found for them; :func:`unpack` inverts it (used to check
every packed tensor, and by tests against the ``gguf`` package's own dequantization).
"""

from __future__ import annotations

import numpy as np
import torch

from slimquant.math.gguf_grid import BlockParams
from slimquant.types.gguf_types import GGUFType


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    """``[..., 1]`` float32 holding fp16 values -> ``[..., 2]`` uint8 (little-endian fp16)."""
    return x.half().numpy().astype("<f2").view(np.uint8).reshape(*x.shape[:-1], 2 * x.shape[-1])


def _nibbles(u: np.ndarray) -> np.ndarray:
    """``[..., 32]`` values < 16 -> ``[..., 16]`` bytes: low nibble value ``j``, high nibble value ``j + 16``."""
    return (u[..., :16] | (u[..., 16:] << 4)).astype(np.uint8)


def pack(q: torch.Tensor, p: BlockParams, t: GGUFType) -> np.ndarray:
    """Grid values ``q`` ``[n, k]`` and their block parameters -> ``[n, k / t.block * t.block_bytes]`` uint8."""
    n, k = q.shape
    nb = k // t.block
    qi = q.to(torch.int32).numpy()
    if t.name == "Q8_0":
        blocks = [_f16_bytes(p.d.reshape(n, nb, 1)), qi.reshape(n, nb, 32).astype(np.int8).view(np.uint8)]
    elif t.name in ("Q4_0", "Q4_1"):
        u = (qi + (8 if t.name == "Q4_0" else 0)).reshape(n, nb, 32)
        heads = [_f16_bytes(p.d.reshape(n, nb, 1))]
        if t.name == "Q4_1":
            assert p.m is not None
            heads.append(_f16_bytes(p.m.reshape(n, nb, 1)))
        blocks = [*heads, _nibbles(u)]
    elif t.name == "Q5_0":
        u = (qi + 16).reshape(n, nb, 32).astype(np.uint32)
        qh = (((u >> 4) & 1) << np.arange(32, dtype=np.uint32)).sum(-1, dtype=np.uint32)
        blocks = [_f16_bytes(p.d.reshape(n, nb, 1)), qh.astype("<u4").view(np.uint8).reshape(n, nb, 4), _nibbles(u & 15)]
    elif t.name == "Q4_K":
        assert p.m is not None and p.sc is not None and p.mn is not None
        u = qi.reshape(n, nb, 4, 2, 32)
        qs = (u[:, :, :, 0] | (u[:, :, :, 1] << 4)).reshape(n, nb, 128).astype(np.uint8)
        blocks = [_f16_bytes(p.d.reshape(n, nb, 1)), _f16_bytes(p.m.reshape(n, nb, 1)),
                  _scales_k4(p.sc.to(torch.int32).numpy().reshape(n, nb, 8), p.mn.to(torch.int32).numpy().reshape(n, nb, 8)), qs]  # fmt: skip
    elif t.name == "Q6_K":
        assert p.sc is not None
        u = (qi + 32).reshape(n, nb, 2, 4, 32)  # [half, i, l]: value l + 32 i of the half
        lo, hi = u & 15, u >> 4
        ql = np.concatenate([lo[:, :, :, 0] | (lo[:, :, :, 2] << 4), lo[:, :, :, 1] | (lo[:, :, :, 3] << 4)], axis=-1)
        qh = hi[:, :, :, 0] | (hi[:, :, :, 1] << 2) | (hi[:, :, :, 2] << 4) | (hi[:, :, :, 3] << 6)
        blocks = [ql.reshape(n, nb, 128).astype(np.uint8), qh.reshape(n, nb, 64).astype(np.uint8),
                  p.sc.to(torch.int32).numpy().reshape(n, nb, 16).astype(np.int8).view(np.uint8),
                  _f16_bytes(p.d.reshape(n, nb, 1))]  # fmt: skip
    else:
        raise ValueError(f"no packer for GGUF type {t.name}")
    out = np.concatenate(blocks, axis=-1)
    assert out.shape[-1] == t.block_bytes, (t.name, out.shape)
    return np.ascontiguousarray(out.reshape(n, nb * t.block_bytes))


def _scales_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and minima ``[..., 8]`` -> the 12 bytes ``get_scale_min_k4`` reads."""
    out = np.zeros((*sc.shape[:-1], 12), dtype=np.int32)
    out[..., 0:4] = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    out[..., 4:8] = mn[..., :4] | ((mn[..., 4:] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)
    return out.astype(np.uint8)


def _unscales_k4(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    b = b.astype(np.int32)
    sc = np.concatenate([b[..., 0:4] & 63, (b[..., 8:12] & 15) | ((b[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([b[..., 4:8] & 63, (b[..., 8:12] >> 4) | ((b[..., 4:8] >> 6) << 4)], axis=-1)
    return sc, mn


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def unpack(data: np.ndarray, t: GGUFType, k: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Bytes ``[n, row_bytes]`` -> grid values ``[n, k]`` (int32, slimquant's signed / unsigned convention) and the
    stored parameters (float32 ``d``/``m``/``dmin`` and integer ``sc``/``mn``), for checking :func:`pack`."""
    n = data.shape[0]
    nb = k // t.block
    b = data.reshape(n, nb, t.block_bytes)
    if t.name == "Q8_0":
        return b[..., 2:].view(np.int8).astype(np.int32).reshape(n, k), {"d": _f16(b[..., :2])}
    if t.name in ("Q4_0", "Q4_1", "Q5_0"):
        head = {"Q4_0": 2, "Q4_1": 4, "Q5_0": 6}[t.name]
        qs = b[..., head:].astype(np.int32)
        u = np.concatenate([qs & 15, qs >> 4], axis=-1)
        params = {"d": _f16(b[..., :2])}
        if t.name == "Q5_0":
            qh = np.ascontiguousarray(b[..., 2:6]).view("<u4").astype(np.int64)
            u = u | (((qh >> np.arange(32)) & 1) << 4).astype(np.int32)
            return (u - 16).reshape(n, k), params
        if t.name == "Q4_1":
            params["m"] = _f16(b[..., 2:4])
            return u.reshape(n, k), params
        return (u - 8).reshape(n, k), params
    if t.name == "Q4_K":
        sc, mn = _unscales_k4(b[..., 4:16])
        qs = b[..., 16:].reshape(n, nb, 4, 32).astype(np.int32)
        u = np.stack([qs & 15, qs >> 4], axis=3).reshape(n, k)
        return u, {"d": _f16(b[..., :2]), "dmin": _f16(b[..., 2:4]), "sc": sc.reshape(n, -1), "mn": mn.reshape(n, -1)}
    if t.name == "Q6_K":
        ql = b[..., :128].reshape(n, nb, 2, 64).astype(np.int32)
        qh = b[..., 128:192].reshape(n, nb, 2, 32).astype(np.int32)
        lo = np.stack([ql[..., :32] & 15, ql[..., 32:] & 15, ql[..., :32] >> 4, ql[..., 32:] >> 4], axis=3)
        hi = np.stack([(qh >> (2 * i)) & 3 for i in range(4)], axis=3)
        u = (lo | (hi << 4)).reshape(n, k)
        sc = b[..., 192:208].view(np.int8).astype(np.int32).reshape(n, -1)
        return u - 32, {"d": _f16(b[..., 208:210]), "sc": sc}
    raise ValueError(f"no unpacker for GGUF type {t.name}")


def dequantize(data: np.ndarray, t: GGUFType, k: int) -> np.ndarray:
    """Float32 ``[n, k]`` from packed bytes, with ggml's formulas and operation order (float32 throughout)."""
    q, p = unpack(data, t, k)
    n = q.shape[0]
    qf = q.astype(np.float32)
    if not t.is_k:
        qg = qf.reshape(n, -1, 32)
        y = p["d"] * qg + p["m"] if t.name == "Q4_1" else p["d"] * qg
        return y.reshape(n, k)
    per = t.group_size
    qg = qf.reshape(n, -1, per)
    d = np.repeat(p["d"].reshape(n, -1), t.block // per, axis=1)[..., None]
    scale = d * p["sc"].astype(np.float32)[..., None]
    if t.name == "Q4_K":
        dmin = np.repeat(p["dmin"].reshape(n, -1), t.block // per, axis=1)[..., None]
        return (scale * qg - dmin * p["mn"].astype(np.float32)[..., None]).reshape(n, k)
    return (scale * qg).reshape(n, k)
