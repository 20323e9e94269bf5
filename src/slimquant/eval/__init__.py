"""Accuracy and size measurements: perplexity, KL vs float, top-1 agreement, embedding cosine."""

from slimquant.eval.lm import (
    evaluate_encoder,
    evaluate_lm,
    generate_text,
    mean_pooled_embeddings,
    sentences_from_text,
    token_windows,
)
from slimquant.eval.size import checkpoint_bytes, model_bytes

__all__ = [
    "evaluate_lm",
    "evaluate_encoder",
    "token_windows",
    "sentences_from_text",
    "mean_pooled_embeddings",
    "generate_text",
    "checkpoint_bytes",
    "model_bytes",
]
