"""Loading float models from disk and slimquant checkpoints, and refusing what is broken or unsafe."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import slimquant
from slimquant import Granularity, QuantSpec, Recipe, SlimquantError
from slimquant.models.loading import EMBEDDED, load_checkpoint, load_model
from slimquant.nn.modules import QLinear


def test_hf_llama_directory(llama_dir, tokenizer, input_ids):
    lm = load_model(str(llama_dir))
    assert lm.kind == "causal_lm" and lm.source == str(llama_dir)
    assert type(lm.model).__name__ == "LlamaForCausalLM" and not lm.model.training
    assert lm.tokenizer is not None and len(lm.tokenizer) == len(tokenizer)
    assert lm.tokenizer("the quick fox")["input_ids"] == tokenizer("the quick fox")["input_ids"]
    # The weights on disk are the ones the fixture saved (seed 0), not a fresh random init.
    ref = load_model(str(llama_dir)).model
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=input_ids).logits, ref(input_ids=input_ids).logits)


def test_hf_bert_directory(bert_dir):
    lm = load_model(str(bert_dir))
    assert lm.kind == "encoder"
    assert type(lm.model).__name__ == "BertModel"
    assert lm.tokenizer is not None


def test_dtype_argument(llama_dir):
    lm = load_model(str(llama_dir), dtype=torch.bfloat16)
    assert lm.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


def test_directory_without_tokenizer_files(llama_dir):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (llama_dir / f).unlink()
    assert load_model(str(llama_dir)).tokenizer is None


def test_truncated_safetensors_is_named(llama_dir):
    f = llama_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(SlimquantError, match=r"cannot read .*model\.safetensors.*truncated") as ei:
        load_model(str(llama_dir))
    assert str(f) in str(ei.value)


def test_safetensors_with_garbage_header_is_named(llama_dir):
    f = llama_dir / "model.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(SlimquantError, match=r"model\.safetensors"):
        load_model(str(llama_dir))


def test_gguf_with_bad_magic(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGML" + b"\x00" * 64)
    with pytest.raises(SlimquantError, match=r"model\.gguf is not a GGUF file \(bad magic bytes\)"):
        load_model(str(f))


def test_other_single_files_are_refused(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\x80\x04N.")
    with pytest.raises(SlimquantError, match=r"weights\.bin: only \.gguf files or model directories"):
        load_model(str(f))


def test_pickled_weights_are_refused_without_unpickling(llama_dir, monkeypatch):
    (llama_dir / "model.safetensors").unlink()
    (llama_dir / "pytorch_model.bin").write_bytes(b"\x80\x04N.")  # a valid pickle (of None)
    unpickled = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: unpickled.append(a) or {})
    with pytest.raises(SlimquantError, match=r"no \.safetensors weights \(found pytorch_model\.bin: pickled weights are never loaded\)"):
        load_model(str(llama_dir))
    assert unpickled == []


def test_missing_config_json(llama_dir):
    (llama_dir / "config.json").unlink()
    with pytest.raises(SlimquantError, match=r"has no config\.json"):
        load_model(str(llama_dir))


def test_invalid_config_json(llama_dir):
    (llama_dir / "config.json").write_text("{oops")
    with pytest.raises(SlimquantError, match=r"config\.json is not valid JSON"):
        load_model(str(llama_dir))


def test_unknown_name_lists_embedded_models(tmp_path):
    with pytest.raises(SlimquantError, match="not found") as ei:
        load_model(str(tmp_path / "does-not-exist"))
    for name in EMBEDDED:
        assert name in str(ei.value)


def test_checkpoint_directory_is_loaded_in_deploy_mode(llama_dir, tmp_path, input_ids):
    lm = load_model(str(llama_dir))
    lm_q = slimquant.quantize(lm.model, Recipe(weight=QuantSpec("int4", Granularity.PER_GROUP, 32, True)), show_progress=False)
    out = slimquant.save(lm_q, tmp_path / "q", tokenizer=lm.tokenizer)
    q = load_model(str(out))
    assert q.kind == "causal_lm" and q.source == str(out)
    assert q.tokenizer is not None and len(q.tokenizer) == len(lm.tokenizer)
    assert isinstance(q.model.model.layers[0].self_attn.q_proj, QLinear)
    assert q.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8
    assert all(not p.requires_grad for p in q.model.parameters())
    with torch.no_grad():
        assert torch.equal(q.model(input_ids=input_ids).logits, lm.model(input_ids=input_ids).logits)


def test_truncated_checkpoint_is_named_by_load_model(llama, tmp_path):
    llama_q = slimquant.quantize(llama, Recipe(), show_progress=False)
    out = slimquant.save(llama_q, tmp_path / "q")
    f = out / "quant_model_weight_w8a16.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(SlimquantError, match=r"quant_model_weight_w8a16\.safetensors"):
        load_model(str(out))


def test_unknown_architecture_in_manifest(llama, tmp_path):
    llama_q = slimquant.quantize(llama, Recipe(), show_progress=False)
    out = slimquant.save(llama_q, tmp_path / "q")
    m = out / "slimquant_manifest.json"
    data = json.loads(m.read_text())
    data["model"]["architecture"] = "NoSuchModelForCausalLM"
    m.write_text(json.dumps(data))
    with pytest.raises(SlimquantError, match="architecture 'NoSuchModelForCausalLM' does not match .*config.json"):
        load_checkpoint(out)
    c = out / "config.json"
    c.write_text(json.dumps(dict(json.loads(c.read_text()), architectures=["NoSuchModelForCausalLM"])))
    with pytest.raises(SlimquantError, match="unknown transformers architecture 'NoSuchModelForCausalLM'"):
        load_checkpoint(out)


def test_copied_checkpoint_loads_anywhere(llama, tmp_path, input_ids):
    """Nothing in a checkpoint points back to where it was written."""
    llama_q = slimquant.quantize(llama, Recipe(), show_progress=False)
    out = slimquant.save(llama_q, tmp_path / "q")
    moved = tmp_path / "elsewhere"
    shutil.move(str(out), str(moved))
    loaded = load_checkpoint(moved).model
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, llama(input_ids=input_ids).logits)


def test_deploy_skeleton_has_no_float_weights(llama, tmp_path):
    from slimquant.models.loading import _hf_skeleton

    llama_q = slimquant.quantize(llama, Recipe(), show_progress=False)
    out = slimquant.save(llama_q, tmp_path / "q")
    skeleton, kind = _hf_skeleton(out, "LlamaForCausalLM", trust_remote_code=False)
    assert kind == "causal_lm"
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}
