"""Typed descriptions of what to quantize and how: qtypes, granularity, QuantSpec, Recipe."""

from slimquant.types.qtype import QTYPES, QType, int_qtype_for_bits, qtype
from slimquant.types.spec import GROUP_SIZES, Granularity, QuantSpec, Recipe

__all__ = ["QTYPES", "QType", "qtype", "int_qtype_for_bits", "Granularity", "QuantSpec", "Recipe", "GROUP_SIZES"]
