"""Typed descriptions of what to quantize and how: qtypes, granularity, QuantSpec, the recipe steps, Recipe."""

from slimquant.types.qtype import QTYPES, QType, int_qtype_for_bits, qtype
from slimquant.types.spec import GROUP_SIZES, INHERIT, Granularity, LayerOverride, QuantSpec, Recipe
from slimquant.types.steps import (AWQ, CBQ, GPTQ, QAT, RTN, AutoRound, CBQPreprocess, GammaMigration,
                                   OutlierSuppression, SmoothQuant, SmoothQuantSearch, SparseGPT, Step, Wanda,
                                   register_step_type)  # fmt: skip

__all__ = ["QTYPES", "QType", "qtype", "int_qtype_for_bits", "Granularity", "QuantSpec", "Recipe", "GROUP_SIZES",
           "LayerOverride", "INHERIT",
           "Step", "RTN", "GPTQ", "AutoRound", "QAT", "AWQ", "SmoothQuant", "SmoothQuantSearch", "GammaMigration",
           "OutlierSuppression", "SparseGPT", "Wanda", "CBQ", "CBQPreprocess", "register_step_type"]
