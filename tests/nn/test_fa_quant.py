"""Attention quantization (use_fa_quant): per-head int8 Q/K/V, calibration, fa_amp, save/load, generate."""

from __future__ import annotations

import json

import pytest
import torch

import slimquant
from slimquant import Recipe
from slimquant.data import calibration_windows
from slimquant.errors import SlimquantError
from slimquant.formats.msmodelslim import read_manifest
from slimquant.nn import fa_quant
from slimquant.nn.fa_quant import FAQuant
from slimquant.nn.kv_cache import Int8KVCache
from slimquant.types.spec import FA_INT8_PER_HEAD, QuantSpec

FA = Recipe(weight=None, fa=FA_INT8_PER_HEAD)


@pytest.fixture
def calib(tokenizer, eval_text) -> torch.Tensor:
    return calibration_windows(tokenizer, eval_text.split("\n"), 4, 16)


def test_faquant_is_per_head_symmetric_int8():
    x = torch.randn(2, 3, 7, 8) * torch.tensor([0.01, 1.0, 30.0])[None, :, None, None]
    fq = FAQuant(3)
    with fa_quant.observing([fq]):
        assert fq(x) is x  # observing passes through
    assert not fq.observing
    fq.set_range_from_observed()
    absmax = x.abs().amax(dim=(0, 2, 3))
    torch.testing.assert_close(fq.scale[:, 0], absmax / 127)
    assert fq.offset.dtype == torch.int8 and not fq.offset.any()
    y = fq(x)
    steps = y / fq.scale.reshape(1, -1, 1, 1)
    torch.testing.assert_close(steps, steps.round(), atol=1e-4, rtol=0)  # on the grid (up to the division)
    assert bool(((y - x).abs() <= fq.scale.reshape(1, -1, 1, 1) / 2 * 1.0001).all())
    with pytest.raises(SlimquantError, match=r"expects \[batch, 3, tokens, head_dim\]"):
        fq(torch.randn(1, 4, 2, 8))


def test_faquant_without_calibration_fails_clearly():
    with pytest.raises(SlimquantError, match="saw no calibration data"):
        FAQuant(2).set_range_from_observed()


def test_attention_implementation_alone_changes_nothing(llama, input_ids):
    with torch.no_grad():
        ref = llama(input_ids).logits
        fa_quant.attach(llama, fa_quant.attention_modules(llama))
        for m in llama.modules():
            if isinstance(m, FAQuant):
                m.observing = True  # pass-through: the registered implementation must equal SDPA bit for bit
        out = llama(input_ids).logits
    assert llama.config._attn_implementation == fa_quant.ATTENTION
    assert torch.equal(out, ref)


def test_quantize_calibrates_every_attention_and_round_trips(llama, calib, input_ids, tmp_path):
    with torch.no_grad():
        ref = llama(input_ids).logits
    llama_q = slimquant.quantize(llama, FA, calib_data=calib, show_progress=False)
    report = llama_q.report.attention
    assert report["quantized"] == ["model.layers.0.self_attn", "model.layers.1.self_attn"] and report["float"] == []
    attn = llama.model.layers[0].self_attn
    assert attn.fa_q.scale.shape == (4, 1) and attn.fa_k.scale.shape == (2, 1) and attn.fa_v.scale.shape == (2, 1)
    with torch.no_grad():
        out = llama(input_ids).logits
    assert not torch.equal(out, ref)
    assert float((out - ref).abs().max()) < 0.05  # observed ~0.003 on the tiny model
    slimquant.save(llama_q, tmp_path / "q")
    desc = json.loads((tmp_path / "q" / "quant_model_description_float.json").read_text())
    assert desc["fa_quant_type"] == "FAQuant"
    assert desc["model.layers.1.self_attn.fa_k.scale"] == "FAQuant" and desc["model.layers.1.self_attn.fa_k.offset"] == "FAQuant"
    assert desc["model.layers.1.self_attn.q_proj.weight"] == "FLOAT"
    loaded = slimquant.load(tmp_path / "q").model
    assert loaded.model.layers[1].self_attn.fa_v.offset.dtype == torch.int8
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, out)
    # a plain transformers config: the attention implementation is not written into config.json
    assert "slimquant" not in (tmp_path / "q" / "config.json").read_text()


def test_fa_amp_leaves_the_most_sensitive_layers_float(llama, calib, tmp_path, input_ids):
    recipe = Recipe(fa=FA_INT8_PER_HEAD, fa_amp=1)  # with W8A16 weights
    llama_q = slimquant.quantize(llama, recipe, calib_data=calib, show_progress=False)
    rep = llama_q.report.attention
    errs = rep["relative_error"]
    assert len(rep["float"]) == 1 and rep["float"][0] == max(errs, key=errs.get)
    assert all(e > 0 for e in errs.values())
    assert not hasattr(llama.get_submodule(rep["float"][0]), "fa_q")
    assert fa_quant.quantized_attention(llama) == rep["quantized"]
    slimquant.save(llama_q, tmp_path / "q")
    assert read_manifest(tmp_path / "q")["attention"]["modules"] == rep["quantized"]
    loaded = slimquant.load(tmp_path / "q").model
    assert fa_quant.quantized_attention(loaded) == rep["quantized"]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, llama(input_ids).logits)


def test_generate_with_fa_quant_and_int8_kv_cache(llama, calib, input_ids):
    slimquant.quantize(llama, Recipe(fa=FA_INT8_PER_HEAD), calib_data=calib, show_progress=False)
    out = llama.generate(input_ids[:1, :5], max_new_tokens=4, min_new_tokens=4, do_sample=False,
                         past_key_values=Int8KVCache())  # fmt: skip
    assert out.shape == (1, 9)


def test_bad_fa_recipes():
    with pytest.raises(SlimquantError, match="not supported yet"):
        Recipe(fa=QuantSpec("int8", "per_tensor"))
    with pytest.raises(SlimquantError, match="needs fa"):
        Recipe(fa_amp=2)
    with pytest.raises(SlimquantError, match="non-negative"):
        Recipe(fa=FA_INT8_PER_HEAD, fa_amp=-1)
    assert Recipe.from_dict(Recipe(fa=FA_INT8_PER_HEAD, fa_amp=3).to_dict()) == Recipe(fa=FA_INT8_PER_HEAD, fa_amp=3)


def test_fa_needs_data_a_transformers_model_and_enough_layers(llama, mlp, calib):
    with pytest.raises(SlimquantError, match="needs calibration data"):
        llama_q = slimquant.quantize(llama, FA)
    with pytest.raises(SlimquantError, match="needs a Hugging Face transformers model"):
        slimquant.quantize(mlp, FA, calib_data=[torch.randn(2, 64)])
    assert not any(isinstance(m, slimquant.nn.QLinear) for m in mlp.modules())  # refused before any change
    with pytest.raises(SlimquantError, match="fa_amp 3: the model has only 2 attention layer"):
        slimquant.quantize(llama, Recipe(weight=None, fa=FA_INT8_PER_HEAD, fa_amp=3), calib_data=calib, show_progress=False)


def test_encoder_attention_quantizes_and_reloads(bert, tokenizer, input_ids, tmp_path):
    with torch.no_grad():
        ref = bert(input_ids).last_hidden_state
    bert_q = slimquant.quantize(bert, Recipe(fa=FA_INT8_PER_HEAD), calib_data=input_ids, show_progress=False)
    assert bert_q.report.attention["quantized"] == ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    with torch.no_grad():
        out = bert(input_ids).last_hidden_state
    assert float((out - ref).abs().max()) < 0.1  # W8A16 weights + int8 Q/K/V
    slimquant.save(bert_q, tmp_path / "q", tokenizer=tokenizer)
    with torch.no_grad():
        assert torch.equal(slimquant.load(tmp_path / "q").model(input_ids).last_hidden_state, out)


def test_observation_modes_are_restored_even_on_errors(llama, calib):
    slimquant.quantize(llama, FA, calib_data=calib, show_progress=False)
    modules = {n: llama.get_submodule(n) for n in fa_quant.attention_modules(llama)}
    quantizers = [m.fa_q for m in modules.values()]
    with pytest.raises(RuntimeError, match="boom"):
        with fa_quant.observing(quantizers), fa_quant.measuring_error(modules) as measured:
            assert all(q.observing for q in quantizers) and all(m.fa_q.error is measured[n] for n, m in modules.items())
            raise RuntimeError("boom")
    assert not any(q.observing for q in quantizers) and all(m.fa_q.error is None for m in modules.values())
    with fa_quant.measuring_error(modules) as measured, torch.no_grad():
        llama(calib[:1])
    assert all(e["ref"] > 0 for e in measured.values())
