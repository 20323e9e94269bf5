"""Language-model and encoder evaluation on a text."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from slimquant.errors import SlimquantError
from slimquant.math.metrics import cosine_similarity, kl_divergence, top1_agreement
from slimquant.types.spec import QuantSpec

log = logging.getLogger(__name__)


def token_windows(tokenizer: Any, text: str, seq_len: int, windows: int) -> torch.Tensor:
    """The first ``windows`` consecutive non-overlapping ``seq_len``-token windows of ``text``.

    Returns ``[W, seq_len]`` int64 with ``W <= windows``; raises when not even one window fits.
    """
    if seq_len < 2 or windows < 1:
        raise SlimquantError(f"need seq_len >= 2 and windows >= 1, got seq_len={seq_len}, windows={windows}")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    available = ids.numel() // seq_len
    if available == 0:
        raise SlimquantError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    if available < windows:
        log.warning("text holds only %d windows of %d tokens (asked for %d)", available, seq_len, windows)
    n = min(windows, available)
    return ids[: n * seq_len].reshape(n, seq_len)


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    reference: nn.Module | None = None,
    windows: int = 8,
    seq_len: int = 512,
    show_progress: bool = True,
    kv: QuantSpec | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` on ``text``; with ``reference``, also per-token KL and top-1 agreement.

    Every position of every window except the last predicts the next token (``W * (L - 1)`` tokens).
    KL is KL(P_reference || P_model) in nats, averaged over those positions. ``kv``: the recipe's KV-cache spec
    (``QuantizationResult.recipe.kv``) when the model runs with an int8 KV cache (see :func:`kv_cache_kwargs`).
    """
    batches = token_windows(tokenizer, text, seq_len, windows)
    nll = kl = agree = ref_nll = 0.0
    count = 0
    for ids in tqdm(batches, desc="eval windows", disable=not show_progress, unit="win"):
        x = ids.unsqueeze(0)
        logits = model(input_ids=x, **kv_cache_kwargs(model, kv)).logits[0, :-1].float()
        target = ids[1:]
        nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        if reference is not None:
            ref = reference(input_ids=x).logits[0, :-1].float()
            if ref.shape != logits.shape:
                raise SlimquantError(f"the reference's vocabulary ({ref.shape[-1]} logits) is not the model's "
                                     f"({logits.shape[-1]}): compare a model with its own float model")  # fmt: skip
            ref_nll += float(torch.nn.functional.cross_entropy(ref, target, reduction="sum"))
            kl += float(kl_divergence(ref, logits).sum())
            agree += float(top1_agreement(ref, logits).sum())
        count += target.numel()
    out: dict[str, Any] = {"windows": int(batches.shape[0]), "seq_len": seq_len, "tokens": count,
                           "perplexity": math.exp(nll / count)}  # fmt: skip
    if reference is not None:
        out.update(reference_perplexity=math.exp(ref_nll / count), kl=kl / count, top1=agree / count)
    return out


def sentences_from_text(text: str, count: int, min_words: int = 4) -> list[str]:
    """The first ``count`` non-empty lines with at least ``min_words`` words (deterministic)."""
    out = [ln.strip() for ln in text.splitlines() if len(ln.split()) >= min_words]
    if not out:
        raise SlimquantError(f"text has no line with at least {min_words} words")
    return out[:count]


@torch.no_grad()
def mean_pooled_embeddings(model: nn.Module, tokenizer: Any, sentences: list[str], batch_size: int = 32) -> torch.Tensor:
    """Sentence embeddings ``[N, D]``: attention-masked mean of the last hidden state (sentence-transformers style)."""
    outs = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i : i + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        outs.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.cat(outs)


def evaluate_encoder(
    model: nn.Module, tokenizer: Any, text: str, reference: nn.Module | None = None, sentences: int = 256
) -> dict[str, Any]:
    """Embedding cosine similarity vs ``reference`` on sentences (lines) of ``text``."""
    sents = sentences_from_text(text, sentences)
    emb = mean_pooled_embeddings(model, tokenizer, sents)
    out: dict[str, Any] = {"sentences": len(sents)}
    if reference is not None:
        ref = mean_pooled_embeddings(reference, tokenizer, sents)
        cos = cosine_similarity(ref, emb)
        out.update(cosine_mean=float(cos.mean()), cosine_min=float(cos.min()))
    return out


def kv_cache_kwargs(model: nn.Module, kv: QuantSpec | None) -> dict[str, Any]:
    """``{"past_key_values": Int8KVCache(...), "use_cache": True}`` (dynamic, or with ``model``'s static per-channel
    scales) when ``kv`` (the recipe's KV-cache spec) quantizes the KV cache, so prefill attention sees the quantized
    cache too; ``{}`` for None."""
    if kv is None:
        return {}
    from slimquant.nn.kv_cache import Int8KVCache, static_kv_scales
    from slimquant.types.spec import KV_INT8_DYNAMIC, KV_INT8_STATIC

    if kv not in (KV_INT8_STATIC, KV_INT8_DYNAMIC):
        raise SlimquantError(f"KV-cache spec {kv.describe()} is not one slimquant's Int8KVCache runs "
                             "(int8 per-token dynamic or per-channel static)")  # fmt: skip
    if kv == KV_INT8_STATIC:
        return {"past_key_values": Int8KVCache(static_kv_scales(model)), "use_cache": True}
    return {"past_key_values": Int8KVCache(), "use_cache": True}


@torch.no_grad()
def generate_text(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 24,
                  kv: QuantSpec | None = None) -> str:  # fmt: skip
    """Greedy continuation of ``prompt`` (the chat template is applied when the tokenizer has one); ``kv`` as in
    :func:`evaluate_lm`."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id,
                         **kv_cache_kwargs(model, kv))  # fmt: skip
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
