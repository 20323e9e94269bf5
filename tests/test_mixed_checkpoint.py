"""One checkpoint mixing W8A8 (dynamic and static), W4A16 g64 GPTQ, W8A16 RTN and float layers, from per-layer
overrides: quantize -> save -> load in a fresh process gives bit-identical logits, every tensor carries its own
layer's label, and ``slimquant inspect`` shows each layer's type. The smollm2-135m version is in
tests/test_real_models.py."""

from __future__ import annotations

import json

import pytest
import torch

import slimquant
from slimquant import GPTQ, RTN, LayerOverride, QuantSpec, Recipe
from slimquant.cli.main import main
from slimquant.formats.checkpoint import layer_type

W4G64 = QuantSpec("int4", "per_group", 64, symmetric=False)
W8 = QuantSpec("int8", "per_channel")
DYN = QuantSpec("int8", "per_token", dynamic=True)
STATIC = QuantSpec("int8", "per_tensor", symmetric=False)


def mixed_recipe() -> Recipe:
    """W4A16 g64 GPTQ by default; q/k/v W8A8 dynamic (GPTQ int8 weights), layer 0's gate_proj W8A8 static,
    down_proj W8A16 rounded to nearest, layer 1's o_proj float."""
    return Recipe(weight=W4G64, steps=(GPTQ(),), overrides=(
        (r"re:.*self_attn\.(q|k|v)_proj", LayerOverride(weight=W8, input=DYN)),
        ("model.layers.0.mlp.gate_proj", LayerOverride(weight=W8, input=STATIC)),
        ("*.mlp.down_proj", LayerOverride(weight=W8, weight_step=RTN())),
        ("model.layers.1.self_attn.o_proj", LayerOverride(weight=None)),
    ))  # fmt: skip


EXPECTED = {
    "model.layers.0.self_attn.q_proj": ("W8A8_DYNAMIC", "QLinearW8A8", "gptq"),
    "model.layers.1.self_attn.v_proj": ("W8A8_DYNAMIC", "QLinearW8A8", "gptq"),
    "model.layers.0.mlp.gate_proj": ("W8A8", "QLinearW8A8", "gptq"),
    "model.layers.1.mlp.gate_proj": ("W4A16", "QLinear", "gptq"),
    "model.layers.0.mlp.down_proj": ("W8A16", "QLinear", "rtn"),
    "model.layers.0.self_attn.o_proj": ("W4A16", "QLinear", "gptq"),
}


def test_recipe_round_trips_with_its_overrides():
    r = mixed_recipe()
    assert Recipe.from_json(r.to_json()) == r and Recipe.from_yaml(r.to_yaml()) == r
    assert r.block_by_block and r.needs_calibration and r.has_activation_quantization
    d = r.to_dict()["overrides"]
    assert d[2] == ["*.mlp.down_proj", {"weight": W8.to_dict(), "weight_step": {"type": "rtn", "stage": "weight",
                                                                              "clip_search": False}}]  # fmt: skip
    assert d[3] == ["model.layers.1.self_attn.o_proj", {"weight": None}]


def test_bad_per_layer_combinations_name_the_override():
    with pytest.raises(slimquant.SlimquantError, match=r"override re:.*: W8A8 needs symmetric 8-bit int8 weights"):
        Recipe(weight=W4G64, overrides=(("re:.*q_proj", LayerOverride(input=DYN)),))
    with pytest.raises(slimquant.NotSupportedYet, match="override x: awq with activation quantization"):
        Recipe(weight=W4G64, steps=(slimquant.AWQ(), GPTQ()), overrides=(("x", LayerOverride(weight=W8, input=DYN)),))
    with pytest.raises(slimquant.SlimquantError, match="weight_step must be a weight step"):
        LayerOverride(weight_step=slimquant.SmoothQuant())


def test_mixed_checkpoint_reloads_bit_identical_in_a_fresh_process(tokenizer, eval_text, input_ids, tmp_path, capsys):
    from conftest import make_llama

    from slimquant.data import calibration_windows

    calib = calibration_windows(tokenizer, eval_text.split("\n"), 4, 16)
    model = make_llama(len(tokenizer))
    model_q = slimquant.quantize(model, mixed_recipe(), calib_data=calib, show_progress=False)
    for name, (label, cls, algo) in EXPECTED.items():
        m = model.get_submodule(name)
        assert (layer_type(m.manifest_entry()), type(m).__name__, m.method["algorithm"]) == (label, cls, algo), name
    assert isinstance(model.model.layers[1].self_attn.o_proj, torch.nn.Linear)
    assert model_q.report.skipped["model.layers.1.self_attn.o_proj"] == "override model.layers.1.self_attn.o_proj: float"
    rows = {r.name: r for r in model_q.report.layers}
    assert "input_range" in rows["model.layers.0.mlp.gate_proj"].details  # the static layer was calibrated
    assert rows["model.layers.0.self_attn.q_proj"].output_error is not None  # GPTQ on its block inputs

    slimquant.save(model_q, tmp_path / "mixed")
    with torch.no_grad():
        expect = model(input_ids).logits
    files = sorted(p.name for p in (tmp_path / "mixed").iterdir())
    # W4A16 holds the most weight elements (up_proj of both layers, gate_proj of layer 1, o_proj of layer 0)
    assert "quant_model_weight_w4a16.safetensors" in files, files
    desc = json.loads((tmp_path / "mixed" / "quant_model_description_w4a16.json").read_text())
    assert desc["model_quant_type"] == "W4A16"
    for name, (label, _, _) in EXPECTED.items():
        assert desc[f"{name}.weight"] == label
    assert desc["model.layers.1.self_attn.o_proj.weight"] == "FLOAT"

    from conftest import fresh_process_logits

    assert torch.equal(fresh_process_logits(tmp_path / "mixed", input_ids, tmp_path), expect)

    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "mixed")]) == 0
    text = capsys.readouterr().out
    lines = {ln.split()[0]: ln.split() for ln in text.splitlines() if ln.startswith("model.")}
    for name, (label, cls, _) in EXPECTED.items():
        assert lines[name][1:3] == [label, cls], lines[name]
    assert lines["model.layers.1.self_attn.o_proj"][1] == "FLOAT"
    assert "inputs: int8 per-token sym dynamic" in " ".join(lines["model.layers.0.self_attn.q_proj"])
    assert "layer types: W8A8_DYNAMIC x 6, W4A16 x 4, W8A8 x 1, W8A16 x 2, FLOAT x 2" in text  # FLOAT: o_proj, lm_head
