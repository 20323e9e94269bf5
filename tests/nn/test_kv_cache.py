"""The int8 KV cache: int8 storage plus per-token scales, Hugging Face generate, recipe round trip."""

from __future__ import annotations

import dataclasses
import json

import torch

import slimquant
from slimquant import Granularity, QuantSpec, Recipe
from slimquant.eval.lm import evaluate_lm
from slimquant.nn.kv_cache import Int8KVCache, dequantize_kv, quantize_kv

KV = QuantSpec("int8", Granularity.PER_TOKEN, dynamic=True)


def test_quantize_kv_is_per_token_and_head():
    x = torch.randn(2, 3, 5, 16) * torch.logspace(-3, 1, 5)[None, None, :, None]
    q, s = quantize_kv(x)
    assert q.dtype == torch.int8 and s.shape == (2, 3, 5, 1)
    torch.testing.assert_close(s, x.abs().amax(-1, keepdim=True) / 127)
    err = (dequantize_kv(q, s, torch.float32) - x).abs()
    assert bool((err <= s / 2 + 1e-12).all())  # round to nearest: at most half a step per element


def test_cache_holds_int8_and_shrinks(llama, input_ids):
    cache = Int8KVCache()
    with torch.no_grad():
        ref = llama(input_ids).logits
        out = llama(input_ids, past_key_values=cache, use_cache=True).logits
    layer = cache.layers[0]
    assert layer.keys.dtype == torch.int8 and layer.values.dtype == torch.int8
    assert cache.get_seq_length() == input_ids.shape[1]
    fp32_bytes = sum(2 * lay.keys.numel() * 4 for lay in cache.layers)
    assert cache.nbytes() / fp32_bytes < 0.32  # head_dim 16: (16 + 4) / 64 = 0.3125
    assert float((out - ref).abs().max()) < 0.05  # observed 0.004 on the tiny model


def test_generate_with_the_int8_cache(llama, input_ids):
    ids = input_ids[:1]
    with torch.no_grad():
        plain = llama.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        cache = Int8KVCache()
        quant = llama.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, past_key_values=cache)
    assert quant.shape == plain.shape
    assert cache.get_seq_length() == quant.shape[1] - 1  # the last token is never fed back


def test_recipe_kv_reaches_eval_and_survives_save_load(llama, tokenizer, eval_text, tmp_path):
    slimquant.quantize(llama, Recipe(kv=KV), show_progress=False)
    assert slimquant.kv_cache(llama) is not None
    with_kv = evaluate_lm(llama, tokenizer, eval_text, None, windows=2, seq_len=16, show_progress=False)
    recipe = llama.slimquant_recipe
    llama.slimquant_recipe = dataclasses.replace(recipe, kv=None)
    base = evaluate_lm(llama, tokenizer, eval_text, None, windows=2, seq_len=16, show_progress=False)
    llama.slimquant_recipe = recipe
    assert with_kv["perplexity"] != base["perplexity"]  # the cache was used ...
    assert abs(with_kv["perplexity"] / base["perplexity"] - 1) < 0.002  # ... and costs little (observed 7e-5)
    slimquant.save(llama, tmp_path / "kv")
    assert json.loads((tmp_path / "kv" / "slimquant_manifest.json").read_text())["recipe"]["kv"]["dynamic"] is True
    back = slimquant.load(tmp_path / "kv")
    assert isinstance(slimquant.kv_cache(back), Int8KVCache)


def test_no_kv_recipe_no_cache(llama):
    slimquant.quantize(llama, Recipe(), show_progress=False)
    assert slimquant.kv_cache(llama) is None
