"""Evaluation on text: token windows, LM perplexity / KL / top-1, encoder cosine."""

from __future__ import annotations

import math

import pytest
import torch

import slimquant
from slimquant import Granularity, QuantSpec, Recipe, SlimquantError
from slimquant.eval.lm import (
    evaluate_encoder,
    evaluate_lm,
    generate_text,
    mean_pooled_embeddings,
    sentences_from_text,
    token_windows,
)

TEXT = " ".join(f"w{i}" for i in range(50))  # 50 tokens: every word is [UNK] but counts as one token


def test_token_windows_shapes_and_content(tokenizer, eval_text):
    ids = tokenizer(eval_text, add_special_tokens=False)["input_ids"]
    w = token_windows(tokenizer, eval_text, seq_len=16, windows=3)
    assert w.shape == (3, 16) and w.dtype == torch.int64
    assert w.flatten().tolist() == ids[:48]  # consecutive, non-overlapping, from the start


def test_token_windows_fewer_than_asked(tokenizer, caplog):
    w = token_windows(tokenizer, TEXT, seq_len=16, windows=8)
    assert w.shape == (3, 16)  # 50 // 16
    assert "only 3 windows" in caplog.text


def test_token_windows_too_short_text(tokenizer):
    with pytest.raises(SlimquantError, match="text has 50 tokens, fewer than one window of 64"):
        token_windows(tokenizer, TEXT, seq_len=64, windows=1)
    with pytest.raises(SlimquantError, match="fewer than one window"):
        token_windows(tokenizer, "", seq_len=2, windows=1)


@pytest.mark.parametrize("seq_len, windows", [(1, 4), (16, 0)])
def test_token_windows_bad_arguments(tokenizer, seq_len, windows):
    with pytest.raises(SlimquantError, match="need seq_len >= 2 and windows >= 1"):
        token_windows(tokenizer, TEXT, seq_len=seq_len, windows=windows)


def test_model_as_its_own_reference(llama, tokenizer, eval_text):
    res = evaluate_lm(llama, tokenizer, eval_text, reference=llama, windows=2, seq_len=16, show_progress=False)
    assert res["kl"] == 0.0
    assert res["top1"] == 1.0
    assert res["perplexity"] == res["reference_perplexity"]
    assert (res["windows"], res["seq_len"], res["tokens"]) == (2, 16, 30)


def test_perplexity_matches_a_direct_computation(llama, tokenizer, eval_text):
    res = evaluate_lm(llama, tokenizer, eval_text, windows=2, seq_len=16, show_progress=False)
    assert set(res) == {"windows", "seq_len", "tokens", "perplexity"}
    ids = token_windows(tokenizer, eval_text, 16, 2)
    with torch.no_grad():
        logits = llama(input_ids=ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    assert res["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-5)
    # A random model over a vocabulary of V tokens is close to uniform: perplexity near V.
    assert 0.5 * len(tokenizer) < res["perplexity"] < 2 * len(tokenizer)


def test_quantized_model_diverges_from_float(llama, factories, tokenizer, eval_text):
    q = factories["llama"](len(tokenizer))
    slimquant.quantize(q, Recipe(weight=QuantSpec("int2", Granularity.PER_GROUP, 32, False)), show_progress=False)
    res = evaluate_lm(q, tokenizer, eval_text, reference=llama, windows=2, seq_len=16, show_progress=False)
    assert res["kl"] > 0.0
    # A random-init tiny model mostly predicts its input token through the tied float
    # embedding, so argmaxes rarely flip (observed top1 1.0), but the distribution moves.
    assert 0.0 <= res["top1"] <= 1.0
    assert res["perplexity"] != res["reference_perplexity"]


def test_kl_grows_as_bits_shrink(llama, factories, tokenizer, eval_text):
    kls = {}
    for bits in ("int8", "int4", "int2"):
        q = factories["llama"](len(tokenizer))
        slimquant.quantize(q, Recipe(weight=QuantSpec(bits, Granularity.PER_CHANNEL)), show_progress=False)
        kls[bits] = evaluate_lm(q, tokenizer, eval_text, reference=llama, windows=2, seq_len=16, show_progress=False)["kl"]
    assert 0.0 < kls["int8"] < kls["int4"] < kls["int2"]


def test_sentences_from_text():
    text = "one two three four\nshort line\n\n  five six seven eight nine  \n"
    assert sentences_from_text(text, 10) == ["one two three four", "five six seven eight nine"]
    assert sentences_from_text(text, 1) == ["one two three four"]
    with pytest.raises(SlimquantError, match="no line with at least 4 words"):
        sentences_from_text("a b\nc\n", 5)


def test_mean_pooled_embeddings_ignore_padding(bert, tokenizer):
    sents = ["the quick brown fox jumps over the lazy dog", "weights are stored"]
    both = mean_pooled_embeddings(bert, tokenizer, sents)
    alone = mean_pooled_embeddings(bert, tokenizer, sents[1:])
    assert both.shape == (2, 32)
    # The short sentence is padded in the batch; masked pooling makes that invisible.
    torch.testing.assert_close(both[1], alone[0], rtol=1e-4, atol=1e-5)


def test_encoder_against_itself_and_quantized(bert, factories, tokenizer, eval_text):
    res = evaluate_encoder(bert, tokenizer, eval_text, reference=bert, sentences=5)
    assert res["sentences"] == 5
    assert res["cosine_mean"] == pytest.approx(1.0, abs=1e-12)
    q = factories["bert"](len(tokenizer))
    slimquant.quantize(q, Recipe(weight=QuantSpec("int2", Granularity.PER_CHANNEL)), show_progress=False)
    res = evaluate_encoder(q, tokenizer, eval_text, reference=bert, sentences=5)
    assert res["cosine_min"] <= res["cosine_mean"] < 1.0 - 1e-6
    assert evaluate_encoder(bert, tokenizer, eval_text) == {"sentences": 18}


def test_evaluate_api_dispatches_on_kind(bert_dir, eval_text):
    lm = slimquant.load_model(str(bert_dir))
    res = slimquant.evaluate(lm, text=eval_text, reference=lm, windows=1)
    assert res["sentences"] == 18 and res["cosine_mean"] == pytest.approx(1.0, abs=1e-12)


def test_generate_text_is_greedy_and_deterministic(llama, tokenizer):
    a = generate_text(llama, tokenizer, "the quick brown fox", max_new_tokens=5)
    b = generate_text(llama, tokenizer, "the quick brown fox", max_new_tokens=5)
    assert a == b
    assert 1 <= len(a.split()) <= 5
