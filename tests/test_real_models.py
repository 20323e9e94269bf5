"""End-to-end on the real embedded models (slow: run with `make test-slow` / `pytest -m slow`)."""

from __future__ import annotations

import copy

import pytest
import torch

import slimquant as sq
from slimquant import Granularity, QuantSpec, Recipe
from slimquant.eval.lm import evaluate_encoder, evaluate_lm
from slimquant.types.steps import RTN

pytestmark = pytest.mark.slow

# Plain English text of our own, long enough for a few 128-token windows.
TEXT = " ".join(
    [
        "The harbour was quiet in the early morning, and the fishing boats rocked gently at their moorings.",
        "A few gulls circled above the market, where traders were already setting out baskets of bread and fruit.",
        "Along the sea wall an old man repaired his nets, pulling each knot tight with practised hands.",
        "By noon the town had filled with visitors who came to watch the ships return with the tide.",
        "Children ran between the stalls, and the smell of salt and smoke drifted through the narrow streets.",
        "In the evening the lamps were lit one by one, and the sound of music carried across the water.",
    ]
    * 6
)


@pytest.fixture(scope="module")
def smollm():
    return sq.load_model("smollm2-135m")


def test_smollm2_w4a16_g64_roundtrip_and_accuracy(smollm, tmp_path):
    model = copy.deepcopy(smollm.model)
    recipe = Recipe(weight=QuantSpec("int4", Granularity.PER_GROUP, 64, False), steps=(RTN(clip_search=True),))
    model_q = sq.quantize(model, recipe)
    ids = smollm.tokenizer(TEXT, return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    sq.save(model_q, tmp_path / "q", tokenizer=smollm.tokenizer)
    loaded = sq.load_model(str(tmp_path / "q"))
    with torch.no_grad():
        after = loaded.model(input_ids=ids).logits
    assert torch.equal(before, after)
    res = evaluate_lm(loaded.model, loaded.tokenizer, TEXT, smollm.model, windows=3, seq_len=128, show_progress=False)
    # observed on the Shakespeare benchmark: KL ~0.2-0.3 for W4 g64 asym + clip on this Q4_1-derived model
    assert res["kl"] < 0.6
    assert res["top1"] > 0.6
    size = sum(f.stat().st_size for f in (tmp_path / "q").glob("*.safetensors"))
    assert size < 0.35 * 538_090_408  # fp32 checkpoint of this model


def test_smollm2_w8a16_is_close(smollm):
    model = copy.deepcopy(smollm.model)
    sq.quantize(model, Recipe(weight=QuantSpec("int8", Granularity.PER_CHANNEL)))
    res = evaluate_lm(model, smollm.tokenizer, TEXT, smollm.model, windows=3, seq_len=128, show_progress=False)
    assert res["kl"] < 0.02  # observed ~0.003-0.008 depending on the text
    assert res["top1"] > 0.9


def test_smollm2_int4_g32_asym_float_zero_point_is_lossless(smollm):
    """The GGUF stores Q4_1 blocks of 32 (min + d*q): the float-zero-point grid reproduces them."""
    model = copy.deepcopy(smollm.model)
    spec = QuantSpec("int4", Granularity.PER_GROUP, 32, False, zero_point="float")
    sq.quantize(model, Recipe(weight=spec))
    res = evaluate_lm(model, smollm.tokenizer, TEXT, smollm.model, windows=2, seq_len=128, show_progress=False)
    assert res["kl"] < 1e-6


def test_minilm_w8a16_embeddings(tmp_path):
    ref = sq.load_model("minilm-l6")
    model = copy.deepcopy(ref.model)
    model_q = sq.quantize(model, Recipe(weight=QuantSpec("int8", Granularity.PER_CHANNEL)))
    sq.save(model_q, tmp_path / "m", tokenizer=ref.tokenizer)
    loaded = sq.load_model(str(tmp_path / "m"))
    assert loaded.kind == "encoder"
    res = evaluate_encoder(loaded.model, loaded.tokenizer, TEXT.replace(". ", ".\n"), ref.model, sentences=32)
    assert res["cosine_mean"] > 0.99


def test_smollm2_mixed_checkpoint_reloads_bit_identical_in_a_fresh_process(smollm, tmp_path):
    """W8A8 dynamic / static, W4A16 g64 GPTQ, W8A16 RTN and float layers in one checkpoint (per-layer overrides)."""
    import json

    from slimquant import GPTQ, LayerOverride
    from slimquant.cli.main import main
    from slimquant.data import calibration_windows

    w8 = QuantSpec("int8", Granularity.PER_CHANNEL)
    recipe = Recipe(weight=QuantSpec("int4", Granularity.PER_GROUP, 64, False), steps=(GPTQ(),), overrides=(
        (r"re:.*self_attn\.(q|k|v)_proj", LayerOverride(weight=w8, input=QuantSpec("int8", "per_token", dynamic=True))),
        ("re:model\\.layers\\.[0-4]\\.mlp\\.gate_proj", LayerOverride(weight=w8, input=QuantSpec("int8", "per_tensor", symmetric=False))),
        ("*.mlp.down_proj", LayerOverride(weight=w8, weight_step=RTN())),
        ("model.layers.29.*", LayerOverride(weight=None)),
    ))  # fmt: skip
    model = copy.deepcopy(smollm.model)
    calib = calibration_windows(smollm.tokenizer, [TEXT], 4, 128)
    model_q = sq.quantize(model, recipe, calib_data=calib, show_progress=False)
    sq.save(model_q, tmp_path / "mixed")
    ids = smollm.tokenizer(TEXT, return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        expect = model(ids).logits
        kl = evaluate_lm(model, smollm.tokenizer, TEXT, smollm.model, windows=2, seq_len=128, show_progress=False)["kl"]
    assert kl < 0.1  # observed 0.028 on this text (2 x 128 tokens)
    from conftest import fresh_process_logits

    got = fresh_process_logits(tmp_path / "mixed", ids, tmp_path, loader="slimquant.load_model(d).model")
    assert torch.equal(got, expect)
    desc = json.loads(next((tmp_path / "mixed").glob("quant_model_description_*.json")).read_text())
    labels = {k: v for k, v in desc.items() if k.endswith("_proj.weight")}
    assert {labels[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"} == {"W8A8_DYNAMIC"}
    assert labels["model.layers.0.mlp.gate_proj.weight"] == "W8A8" and labels["model.layers.5.mlp.gate_proj.weight"] == "W4A16"
    assert labels["model.layers.3.mlp.down_proj.weight"] == "W8A16" and labels["model.layers.29.mlp.up_proj.weight"] == "FLOAT"
    assert main(["inspect", str(tmp_path / "mixed")]) == 0
