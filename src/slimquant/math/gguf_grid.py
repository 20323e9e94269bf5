"""Keeping quantization parameters on a GGUF type's grid, and finding a type's block parameters again (pure).

:func:`snap` rounds a weight's per-group scales and zero points (``[n, G]``, from any range rule or clipping
search) onto what a GGUF type can store (:mod:`slimquant.types.gguf_types`): fp16 scales (and fp16 minima for
``Q4_1``; the symmetric 32-blocks keep a negative scale's sign, as llama.cpp's own ``d = max / -8``); for K-types a fp16 super-block scale times a 6-bit (``Q4_K``) or int8 (``Q6_K``) group scale, and
for ``Q4_K`` a fp16 super-block ``dmin`` times 6-bit group minima, minima never above zero. The snapped scale
``s = d * sc`` is exact in float32 (11 + 8 significant bits); the float zero point is ``z = dmin * mn / s``.

:func:`block_params` goes the other way for the export: from a module's float32 scales and zero points it finds
``d`` (and ``sc``, ``dmin``, ``mn``) such that the stored values reproduce the scales exactly and the minima to
float32 rounding, or says which rows are not on the grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimquant.types.gguf_types import GGUFType

_F16_MAX = 65504.0
_F16_TINY = 2.0**-24  # smallest positive fp16 (subnormal)


def f16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest float16 value, as float32 (clamped to fp16's finite range)."""
    return x.float().clamp(-_F16_MAX, _F16_MAX).half().float()


def _positive_f16(x: torch.Tensor) -> torch.Tensor:
    return f16(x).clamp_min(_F16_TINY)


def _nonzero_f16(x: torch.Tensor) -> torch.Tensor:
    """fp16-rounded, keeping the sign (llama.cpp's Q4_0 / Q5_0 / Q8_0 scales may be negative); never zero."""
    d = f16(x)
    return torch.where(d == 0, torch.full_like(d, _F16_TINY), d)


def check_superblocks(t: GGUFType, k: int) -> None:
    """ValueError when ``k`` input columns do not fill whole blocks of ``t``."""
    if k % t.block:
        raise ValueError(f"GGUF {t.name} stores rows in blocks of {t.block}; in_features {k} is not a multiple "
                         f"(llama.cpp falls back to {'Q5_0' if t.name == 'Q4_K' else 'Q8_0'} for such tensors)")  # fmt: skip


def snap(scale: torch.Tensor, zero_point: torch.Tensor | None, t: GGUFType) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales / zero points ``[n, G]`` moved onto the grid of ``t`` (see module doc); float32 results."""
    s = scale.float()
    if not t.is_k:
        d = _nonzero_f16(s) if t.symmetric else _positive_f16(s)
        if t.symmetric:
            return d, None
        assert zero_point is not None
        m = f16(-zero_point.float() * s)  # x = d*q + m with m = -z*s
        return d, -m / d
    n, groups = s.shape
    per = t.block // t.group_size
    sg = s.reshape(n, groups // per, per)
    smax = (1 << t.scale_bits) - 1 if not t.symmetric else 127
    d = _positive_f16(sg.amax(-1, keepdim=True) / smax)
    sc = torch.round(sg / d).clamp(1, smax)
    s_new = (d * sc).reshape(n, groups)
    if t.symmetric:
        return s_new, None
    assert zero_point is not None
    mins = (zero_point.float() * s).clamp_min(0.0).reshape(n, groups // per, per)  # -min of each group, >= 0
    mmax = (1 << t.min_bits) - 1
    dmin = f16(mins.amax(-1, keepdim=True) / mmax)
    mn = torch.where(dmin > 0, torch.round(mins / torch.where(dmin > 0, dmin, 1.0)), 0.0).clamp(0, mmax)
    z_new = (dmin * mn).reshape(n, groups) / s_new
    return s_new, z_new


@dataclass(frozen=True)
class BlockParams:
    """A weight's GGUF block parameters: ``d`` ``[n, B]`` fp16 values (B blocks or super-blocks per row); ``m``
    fp16 minima ``[n, G]`` (Q4_1) or super-block ``dmin`` ``[n, B]`` (Q4_K); ``sc`` / ``mn`` ``[n, G]`` integer
    group scales / minima (K-types)."""

    d: torch.Tensor
    m: torch.Tensor | None = None
    sc: torch.Tensor | None = None
    mn: torch.Tensor | None = None


class OffGrid(ValueError):
    """The scales / zero points are not on the GGUF type's grid."""


def block_params(scale: torch.Tensor, zero_point: torch.Tensor | None, t: GGUFType) -> BlockParams:
    """The stored parameters that reproduce ``scale`` (exactly) and ``zero_point`` (minima to float32 rounding)
    ``[n, G]``; :class:`OffGrid` names the first row and group that no parameters of ``t`` reproduce."""
    s = scale.float()
    if not t.is_k:
        d = f16(s)
        _require(d == s, "scale is not a float16 value", d, s)
        if t.symmetric:
            return BlockParams(d)
        assert zero_point is not None
        m_exact = -zero_point.float() * s
        m = f16(m_exact)
        _require(_close(m, m_exact), "minimum -zero_point*scale is not a float16 value", m, m_exact)
        return BlockParams(d, m=m)
    n, groups = s.shape
    per = t.block // t.group_size
    sg = s.reshape(n, groups // per, per)
    smax = 127 if t.symmetric else (1 << t.scale_bits) - 1
    d, sc = _factor(sg, smax, exact=True)
    _require_blocks(d, sc, f"scales are not one float16 times integers 0..{smax} per super-block")
    if t.symmetric:
        return BlockParams(d.squeeze(-1), sc=sc.reshape(n, groups))  # type: ignore[union-attr]
    assert zero_point is not None
    mins = (zero_point.float() * s).reshape(n, groups // per, per)
    mmax = (1 << t.min_bits) - 1
    dmin, mn = _factor(mins, mmax, exact=False)
    _require_blocks(dmin, mn, f"minima are not one float16 times integers 0..{mmax} per super-block")
    return BlockParams(d.squeeze(-1), m=dmin.squeeze(-1), sc=sc.reshape(n, groups), mn=mn.reshape(n, groups))  # type: ignore[union-attr]


def _close(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs() <= 4e-7 * b.abs() + 1e-30


def _factor(v: torch.Tensor, vmax: int, exact: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per super-block (last dim), a float16 ``c`` and integers ``i`` in ``[0, vmax]`` with ``c * i == v``
    (within float32 rounding unless ``exact``); returns ``(c [.., 1], i)``, or ``(None, ok mask)`` when some
    super-block has none. Tries ``c = f16(max / j)`` for ``j = vmax .. 1``, keeping each block's first fit."""
    top = v.amax(-1, keepdim=True)
    c_best = torch.zeros_like(top)
    i_best = torch.zeros_like(v)
    found = top <= 0  # all-zero blocks: c = 0, i = 0 (Q4_K minima of groups that hold no negative values)
    if bool((v < 0).any()):
        bad = (v < 0).any(-1, keepdim=True)
        return None, ~bad
    for j in range(vmax, 0, -1):
        c = f16(top / j)
        c_safe = torch.where(c > 0, c, torch.ones_like(c))
        i = torch.round(v / c_safe)
        back = c * i
        ok = (i >= 0) & (i <= vmax) & ((back == v) if exact else _close(back, v))
        fit = ok.all(-1, keepdim=True) & ~found & (c > 0)
        c_best = torch.where(fit, c, c_best)
        i_best = torch.where(fit, i, i_best)
        found = found | fit
        if bool(found.all()):
            break
    if not bool(found.all()):
        return None, found
    return c_best, i_best


def _require(cond: torch.Tensor, what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """:class:`OffGrid` naming the first row / group where ``cond`` fails (``got``: nearest on-grid value)."""
    if bool(cond.all()):
        return
    r, g = (int(i) for i in (~cond).nonzero()[0])
    raise OffGrid(f"{what} (row {r}, group {g}: {float(want[r, g])!r}, nearest {float(got[r, g])!r})")


def _require_blocks(found: torch.Tensor | None, ok: torch.Tensor, what: str) -> None:
    """:class:`OffGrid` naming the first row / super-block :func:`_factor` found no parameters for."""
    if found is not None:
        return
    bad = (~ok).reshape(ok.shape[0], -1).nonzero()
    r, b = (int(bad[0, 0]), int(bad[0, 1])) if len(bad) else (0, 0)
    raise OffGrid(f"{what} (row {r}, super-block {b})")
