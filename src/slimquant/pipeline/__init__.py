"""The loops that drive algorithms over a model."""

from slimquant.pipeline.convert import ConversionReport, LayerPlan, convert, plan, quantized

__all__ = ["convert", "plan", "quantized", "ConversionReport", "LayerPlan"]
