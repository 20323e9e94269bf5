"""GGUF (llama.cpp) tensor types as slimquant weight grids (pure data).

Each quantized GGUF type is a block format; in slimquant terms it is a per-group weight spec whose scales
(and minima) are stored in reduced precision:

==========  ======================================================================================
``Q8_0``    int8 symmetric, blocks of 32, fp16 scale ``d``:               ``x = d * q``
``Q4_0``    int4 symmetric, blocks of 32, fp16 ``d``, stored ``q + 8``:    ``x = d * q``
``Q5_0``    int5 symmetric, blocks of 32, fp16 ``d``, stored ``q + 16``:   ``x = d * q``
``Q4_1``    uint4, blocks of 32, fp16 ``d`` and ``m``:                    ``x = d * q + m``
``Q4_K``    uint4, groups of 32 in super-blocks of 256: fp16 ``d``, ``dmin`` per super-block, 6-bit
            ``sc``, ``mn`` per group:                                     ``x = d * sc * q - dmin * mn``
``Q6_K``    int6 symmetric, groups of 16 in super-blocks of 256: fp16 ``d`` per super-block, int8
            ``sc`` per group, stored ``q + 32``:                           ``x = d * sc * q``
==========  ======================================================================================

In slimquant's logical form (``x = (q - z) * s``, :mod:`slimquant.math.quant`) a group's scale is ``s = d``
(``d * sc`` for K-types) and the asymmetric types use float zero points ``z = -m / s`` (``dmin * mn / s``).
A :class:`~slimquant.types.spec.QuantSpec` with ``gguf=`` set keeps its solver (RTN, GPTQ, AWQ) on exactly
that grid (:mod:`slimquant.math.gguf_grid`), so the export (:mod:`slimquant.formats.gguf`) is exact.
``F16`` / ``F32`` are float storage types (no grid).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GGUFType:
    """A GGUF quantized tensor type: its block geometry and the slimquant spec fields it implies."""

    name: str
    qtype: str  # slimquant qtype of the grid values
    group_size: int  # elements sharing one scale
    block: int  # elements per stored block (256 for K-types)
    block_bytes: int
    symmetric: bool
    scale_bits: int = 0  # K-types: bits of the per-group scale (6 for Q4_K, 8 signed for Q6_K)
    min_bits: int = 0  # Q4_K: bits of the per-group minimum

    @property
    def is_k(self) -> bool:
        return self.block == 256


GGUF_TYPES: dict[str, GGUFType] = {
    t.name: t
    for t in (
        GGUFType("Q8_0", "int8", 32, 32, 34, True),
        GGUFType("Q4_0", "int4", 32, 32, 18, True),
        GGUFType("Q5_0", "int5", 32, 32, 22, True),
        GGUFType("Q4_1", "uint4", 32, 32, 20, False),
        GGUFType("Q4_K", "uint4", 32, 256, 144, False, scale_bits=6, min_bits=6),
        GGUFType("Q6_K", "int6", 16, 256, 210, True, scale_bits=8),
    )
}
FLOAT_TYPES = ("F32", "F16")
# llama.cpp file types ("mixtures") whose per-tensor types slimquant assigns as llama-quantize does
MIXTURES = ("Q4_K_M",)


def gguf_type(name: str) -> GGUFType:
    """The :class:`GGUFType` called ``name`` (case-insensitive); unknown names list the valid ones."""
    from slimquant.errors import SlimquantError

    t = GGUF_TYPES.get(str(name).upper())
    if t is None:
        raise SlimquantError(f"unknown GGUF block type {name!r}; valid: {', '.join(GGUF_TYPES)}")
    return t
