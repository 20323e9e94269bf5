"""The loops that drive algorithms over a model."""

from slimquant.pipeline.convert import ConversionReport, LayerPlan, convert, plan

__all__ = ["convert", "plan", "ConversionReport", "LayerPlan"]
