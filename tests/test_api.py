"""End to end through the public API: quantize -> save -> load gives the same outputs, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import slimquant
from slimquant import Granularity, QuantSpec, Recipe, SlimquantError
from slimquant.eval.size import model_bytes
from slimquant.nn.modules import QConv2d, QEmbedding, QLinear, _QWeight
from slimquant.types.steps import RTN

G = Granularity

LLAMA_RECIPES = {
    "w8a16_per_channel": Recipe(weight=QuantSpec("int8", G.PER_CHANNEL)),
    "w4a16_g32_sym": Recipe(weight=QuantSpec("int4", G.PER_GROUP, 32, True)),
    "w4a16_g32_asym": Recipe(weight=QuantSpec("int4", G.PER_GROUP, 32, False)),
    "w3a16_g32": Recipe(weight=QuantSpec("int3", G.PER_GROUP, 32, True)),
    "w2a16_g32_clip": Recipe(weight=QuantSpec("int2", G.PER_GROUP, 32, False), steps=(RTN(clip_search=True),)),
    "w8a16_int8_embedding": Recipe(embedding=QuantSpec("int8", G.PER_CHANNEL)),
}


def _weight_file(directory) -> str:
    (f,) = [p.name for p in directory.glob("quant_model_weight_*.safetensors")]
    return f


def _keys(path) -> set[str]:
    with safe_open(str(path), framework="pt") as fh:
        return set(fh.keys())


@pytest.mark.parametrize("name", list(LLAMA_RECIPES))
def test_llama_quantize_save_load_is_bit_identical(name, llama, tokenizer, input_ids, tmp_path):
    recipe = LLAMA_RECIPES[name]
    with torch.no_grad():
        float_logits = llama(input_ids=input_ids).logits
    llama_q = slimquant.quantize(llama, recipe, show_progress=False)
    assert isinstance(llama.model.layers[0].self_attn.q_proj, QLinear)
    with torch.no_grad():
        q_logits = llama(input_ids=input_ids).logits
    # Quantization really changed the model (otherwise "bit identical" below proves nothing).
    assert not torch.equal(q_logits, float_logits)

    out = slimquant.save(llama_q, tmp_path / "out", tokenizer=tokenizer)
    assert (out / f"quant_model_weight_{recipe.quant_type}.safetensors").is_file()
    loaded = slimquant.load(out).model
    assert type(loaded) is type(llama)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, q_logits)
    # Same stored tensors and same specs after the round trip.
    want, got = llama.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert want[k].dtype == got[k].dtype, k
        assert torch.equal(want[k], got[k]), k
    assert loaded.model.layers[1].mlp.down_proj.spec == recipe.weight
    assert slimquant.load(out).recipe == recipe


def test_tied_lm_head_shares_quantized_embedding(llama, tokenizer, input_ids, tmp_path):
    recipe = Recipe(embedding=QuantSpec("int8", G.PER_CHANNEL))
    llama_q = slimquant.quantize(llama, recipe, show_progress=False)
    report = llama_q.report
    assert report.tied == {"lm_head": "model.embed_tokens"}
    assert "lm_head" not in report.skipped
    assert isinstance(llama.model.embed_tokens, QEmbedding)
    assert isinstance(llama.lm_head, QLinear)
    assert llama.lm_head.weight is llama.model.embed_tokens.weight

    out = slimquant.save(llama_q, tmp_path / "out", tokenizer=tokenizer)
    manifest = json.loads((out / "slimquant_manifest.json").read_text())
    assert manifest["aliases"] == {
        "lm_head.weight": "model.embed_tokens.weight",
        "lm_head.weight_scale": "model.embed_tokens.weight_scale",
        "lm_head.weight_offset": "model.embed_tokens.weight_offset",
    }
    keys = _keys(out / _weight_file(out))
    assert {"model.embed_tokens.weight", "model.embed_tokens.weight_scale"} <= keys
    assert not any(k.startswith("lm_head.") for k in keys)  # stored once, under the embedding

    loaded = slimquant.load(out).model
    emb = loaded.model.embed_tokens
    assert isinstance(emb, QEmbedding) and emb.weight.dtype == torch.int8
    assert emb.weight.shape == (len(tokenizer), 64)
    assert loaded.lm_head.weight.data_ptr() == emb.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, llama(input_ids=input_ids).logits)


def test_float_tied_lm_head_is_stored_once(llama, tmp_path):
    llama_q = slimquant.quantize(llama, Recipe(), show_progress=False)
    out = slimquant.save(llama_q, tmp_path / "out")
    manifest = json.loads((out / "slimquant_manifest.json").read_text())
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in _keys(out / _weight_file(out))
    loaded = slimquant.load(out).model
    assert type(loaded.lm_head) is nn.Linear
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_load_holds_no_float_weights_for_quantized_layers(llama, tmp_path):
    float_bytes = model_bytes(llama)
    llama_q = slimquant.quantize(llama, Recipe(weight=QuantSpec("int4", G.PER_GROUP, 32, False)), show_progress=False)
    loaded = slimquant.load(slimquant.save(llama_q, tmp_path / "out")).model
    qlayers = {n: m for n, m in loaded.named_modules() if isinstance(m, _QWeight)}
    assert len(qlayers) == 14  # 7 linears x 2 blocks; lm_head stays float
    for name, m in qlayers.items():
        assert m.weight.dtype in (torch.uint8, torch.int8), name
        assert m.weight_scale.dtype == torch.float32
    plain = [n for n, m in loaded.named_modules() if type(m) is nn.Linear]
    assert plain == ["lm_head"]
    for name, t in list(loaded.named_parameters()) + list(loaded.named_buffers()):
        assert t.device.type == "cpu", name
    # The in-memory model is a fraction of the float one (embedding float, linears 4-bit).
    assert model_bytes(loaded) < 0.6 * float_bytes


def test_loaded_model_generates_like_the_quantized_one(llama, tokenizer, input_ids, tmp_path):
    llama_q = slimquant.quantize(llama, Recipe(weight=QuantSpec("int4", G.PER_GROUP, 32, True)), show_progress=False)
    loaded = slimquant.load(slimquant.save(llama_q, tmp_path / "out", tokenizer=tokenizer)).model
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        got = loaded.generate(input_ids, **kw)
        want = llama.generate(input_ids, **kw)
    assert got.shape == (2, 16)
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "recipe",
    [Recipe(weight=QuantSpec("int8", G.PER_CHANNEL)), Recipe(weight=QuantSpec("int4", G.PER_GROUP, 32, False))],
    ids=["w8", "w4g32asym"],
)
def test_bert_encoder_round_trip_is_bit_identical(recipe, bert, tokenizer, tmp_path):
    enc = tokenizer(["the quick brown fox jumps", "weights are stored"], padding=True, return_tensors="pt")
    with torch.no_grad():
        float_hidden = bert(**enc).last_hidden_state
    bert_q = slimquant.quantize(bert, recipe, show_progress=False)
    assert bert_q.report.skipped == {"pooler.dense": "disable_last_linear"}
    with torch.no_grad():
        q_hidden = bert(**enc).last_hidden_state
    assert not torch.equal(q_hidden, float_hidden)
    out = slimquant.save(bert_q, tmp_path / "out", tokenizer=tokenizer)
    lm = slimquant.load_model(str(out))
    assert lm.kind == "encoder" and lm.tokenizer is not None
    assert isinstance(lm.model.encoder.layer[0].attention.self.query, QLinear)
    with torch.no_grad():
        assert torch.equal(lm.model(**enc).last_hidden_state, q_hidden)


@pytest.mark.parametrize(
    "kind, x_shape, recipe, qcls",
    [
        ("mlp", (4, 64), Recipe(weight=QuantSpec("int4", G.PER_GROUP, 32, False)), QLinear),
        ("mlp", (4, 64), Recipe(weight=QuantSpec("int8", G.PER_CHANNEL), disable_last_linear=False), QLinear),
        ("cnn", (2, 3, 4, 4), Recipe(weight=QuantSpec("int8", G.PER_CHANNEL)), QConv2d),
        ("cnn", (2, 3, 4, 4), Recipe(weight=QuantSpec("int4", G.PER_CHANNEL, None, False)), QConv2d),
    ],
    ids=["mlp-w4g32", "mlp-w8-all", "cnn-w8", "cnn-w4asym"],
)
def test_plain_module_round_trip_onto_fresh_instance(kind, x_shape, recipe, qcls, factories, tmp_path):
    factory = factories[kind]
    model = factory(seed=0)
    x = torch.randn(*x_shape, generator=torch.Generator().manual_seed(7))
    model_q = slimquant.quantize(model, recipe, show_progress=False)
    assert isinstance(model[0], qcls) and isinstance(model[2], qcls)
    with torch.no_grad():
        want = model(x)
    out = slimquant.save(model_q, tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg == {"quantize": recipe.quant_type}

    fresh = factory(seed=1)  # different float weights: the checkpoint must replace all of them
    with torch.no_grad():
        assert not torch.equal(fresh(x), want)
    loaded = slimquant.load(out, model=fresh).model
    assert isinstance(loaded[0], qcls)
    last = loaded[-1]
    assert isinstance(last, QLinear) == (not recipe.disable_last_linear)
    with torch.no_grad():
        assert torch.equal(loaded(x), want)

    # Deploy mode: a skeleton on the meta device works too (no float weights ever allocated).
    with torch.device("meta"):
        skeleton = factory()
    loaded_meta = slimquant.load(out, model=skeleton).model
    with torch.no_grad():
        assert torch.equal(loaded_meta(x), want)


def test_grouped_conv_keeps_groups(cnn, factories, tmp_path):
    model = cnn
    model_q = slimquant.quantize(model, Recipe(weight=QuantSpec("int8", G.PER_CHANNEL)), show_progress=False)
    loaded = slimquant.load(slimquant.save(model_q, tmp_path / "out"), model=factories["cnn"](seed=3)).model
    conv = loaded[2]
    assert isinstance(conv, QConv2d) and conv.groups == 4
    assert conv.weight.shape == (32, 16 // 4 * 3 * 3)


def test_plain_module_checkpoint_needs_model_argument(mlp, tmp_path):
    mlp_q = slimquant.quantize(mlp, Recipe(), show_progress=False)
    out = slimquant.save(mlp_q, tmp_path / "out")
    with pytest.raises(SlimquantError, match=r"Sequential.*pass model="):
        slimquant.load(out).model


def test_quantizing_twice_is_refused(mlp):
    mlp_q = slimquant.quantize(mlp, Recipe(), show_progress=False)
    with pytest.raises(SlimquantError, match=r"already quantized by slimquant \(layer 0 is a QLinear\)"):
        slimquant.quantize(mlp, Recipe(), show_progress=False)
    with pytest.raises(SlimquantError, match="pass its .model"):
        slimquant.quantize(mlp_q, Recipe(), show_progress=False)


def test_saving_a_bare_model_is_refused_saying_what_to_pass(mlp, tmp_path):
    with pytest.raises(SlimquantError, match=r"save takes the QuantizationResult .* not the bare Sequential"):
        slimquant.save(mlp, tmp_path / "out")
    result = slimquant.quantize(mlp, Recipe(), show_progress=False)
    with pytest.raises(SlimquantError, match="not the bare Sequential"):  # quantized in place, still no recipe on it
        slimquant.save(mlp, tmp_path / "out")
    with pytest.raises(SlimquantError, match="kv_cache takes the QuantizationResult"):
        slimquant.kv_cache(mlp)
    assert not (tmp_path / "out").exists()
    slimquant.save(result, tmp_path / "out")
    assert (tmp_path / "out" / "slimquant_manifest.json").is_file()


def test_default_recipe_is_w8a16_per_channel(mlp):
    result = slimquant.quantize(mlp, show_progress=False)
    assert result.recipe.quant_type == "w8a16" and result.model is mlp
    assert mlp[0].weight.dtype == torch.int8 and mlp[0].weight_scale.shape == (128, 1)


def test_evaluate_api_on_loaded_model_against_float(llama_dir, eval_text, tmp_path):
    float_lm = slimquant.load_model(str(llama_dir))
    q = slimquant.load_model(str(llama_dir))
    q_q = slimquant.quantize(q.model, Recipe(weight=QuantSpec("int4", G.PER_GROUP, 32, True)), show_progress=False)
    loaded = slimquant.load_model(str(slimquant.save(q_q, tmp_path / "out", tokenizer=q.tokenizer)))
    res = slimquant.evaluate(loaded, text=eval_text, reference=float_lm, windows=2, seq_len=16)
    assert res["windows"] == 2 and res["tokens"] == 2 * 15
    assert res["kl"] > 0  # 4-bit weights change the distribution
    assert 0.0 <= res["top1"] <= 1.0
    assert res["perplexity"] > 1.0 and res["reference_perplexity"] > 1.0


def test_evaluate_without_tokenizer_is_refused(mlp):
    with pytest.raises(SlimquantError, match="tokenizer"):
        slimquant.evaluate(mlp, text="some text here")
