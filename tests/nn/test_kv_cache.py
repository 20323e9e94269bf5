"""The int8 KV cache: int8 storage plus per-token scales, Hugging Face generate, recipe round trip."""

from __future__ import annotations

import json

import pytest
import torch

import slimquant
from slimquant import Granularity, QuantSpec, Recipe
from slimquant.eval.lm import evaluate_lm
from slimquant.nn.kv_cache import Int8KVCache, StaticInt8KVLayer, dequantize_kv, quantize_kv, quantize_kv_static, static_kv_scales

KV = QuantSpec("int8", Granularity.PER_TOKEN, dynamic=True)
KV_STATIC = QuantSpec("int8", Granularity.PER_CHANNEL)


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
    llama_q = slimquant.quantize(llama, Recipe(kv=KV), show_progress=False)
    assert slimquant.kv_cache(llama_q) is not None
    with_kv = slimquant.evaluate(llama_q, tokenizer, eval_text, windows=2, seq_len=16)
    base = evaluate_lm(llama, tokenizer, eval_text, None, windows=2, seq_len=16, show_progress=False)
    assert with_kv == evaluate_lm(llama, tokenizer, eval_text, None, windows=2, seq_len=16, show_progress=False, kv=KV)
    assert with_kv["perplexity"] != base["perplexity"]  # the cache was used ...
    assert abs(with_kv["perplexity"] / base["perplexity"] - 1) < 0.002  # ... and costs little (observed 7e-5)
    slimquant.save(llama_q, tmp_path / "kv")
    assert json.loads((tmp_path / "kv" / "slimquant_manifest.json").read_text())["recipe"]["kv"]["dynamic"] is True
    back = slimquant.load(tmp_path / "kv")
    assert isinstance(slimquant.kv_cache(back), Int8KVCache) and back.recipe.kv == KV
    assert slimquant.evaluate(back, tokenizer, eval_text, windows=2, seq_len=16) == with_kv


def test_no_kv_recipe_no_cache(llama):
    llama_q = slimquant.quantize(llama, Recipe(), show_progress=False)
    assert slimquant.kv_cache(llama_q) is None


# -- static per-channel scales (C8) ------------------------------------------------------------------


@pytest.fixture
def calib(tokenizer, eval_text) -> torch.Tensor:
    from slimquant.data import calibration_windows

    return calibration_windows(tokenizer, eval_text.split("\n"), 4, 16)


def test_static_kv_cache_calibrates_per_channel_and_round_trips(llama, calib, input_ids, tmp_path):
    with torch.no_grad():
        ref = llama(input_ids).logits
    llama_q = slimquant.quantize(llama, Recipe(weight=None, kv=KV_STATIC), calib_data=calib, show_progress=False)
    k = llama.model.layers[0].self_attn.k_proj
    assert k.kv_cache_scale.shape == (2 * 16,) and k.kv_cache_offset.abs().sum() == 0  # 2 kv heads x head_dim 16
    scales = static_kv_scales(llama)
    assert len(scales) == 2 and scales[0][0].shape == (1, 2, 1, 16)
    cache = slimquant.kv_cache(llama_q)
    with torch.no_grad():
        out = llama(input_ids, past_key_values=cache, use_cache=True).logits
    layer = cache.layers[0]
    assert isinstance(layer, StaticInt8KVLayer) and layer.keys.dtype == torch.int8
    assert cache.nbytes() == sum(2 * lay.keys.numel() for lay in cache.layers)  # 1 byte per element, no scales
    assert not torch.equal(out, ref) and float((out - ref).abs().max()) < 0.05
    slimquant.save(llama_q, tmp_path / "q")
    desc = json.loads((tmp_path / "q" / "quant_model_description_float.json").read_text())
    assert desc["kv_quant_type"] == "C8" and desc["model.layers.1.self_attn.v_proj.kv_cache_offset"] == "C8"
    loaded = slimquant.load(tmp_path / "q")
    with torch.no_grad():
        again = loaded.model(input_ids, past_key_values=slimquant.kv_cache(loaded), use_cache=True).logits
    assert torch.equal(again, out)


def test_static_kv_values_outside_the_calibrated_range_clamp(llama, calib):
    slimquant.quantize(llama, Recipe(weight=None, kv=KV_STATIC), calib_data=calib, show_progress=False)
    k_scale, _ = static_kv_scales(llama)[0]
    x = torch.randn(1, 2, 3, 16) * 1e3
    q = quantize_kv_static(x, k_scale)
    assert q.dtype == torch.int8 and int(q.abs().max()) in (127, 128)


def test_static_kv_with_w8a16_generates(llama, calib, input_ids):
    llama_q = slimquant.quantize(llama, Recipe(kv=KV_STATIC), calib_data=calib, show_progress=False)
    out = llama.generate(input_ids[:1, :4], max_new_tokens=5, min_new_tokens=5, do_sample=False,
                         past_key_values=slimquant.kv_cache(llama_q))  # fmt: skip
    assert out.shape == (1, 9)


def test_static_kv_needs_data_and_k_v_projections(llama, factories):
    with pytest.raises(slimquant.errors.SlimquantError, match="needs calibration data"):
        slimquant.quantize(llama, Recipe(kv=KV_STATIC))
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)).eval()
    with pytest.raises(slimquant.errors.SlimquantError, match="k_proj/v_proj"):
        slimquant.quantize(gpt2, Recipe(kv=KV_STATIC), calib_data=torch.randint(0, 50, (2, 8)), show_progress=False)
