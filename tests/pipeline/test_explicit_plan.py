"""convert with an explicit per-layer plan, and quantized(): some layers at a time on one float model, put back
afterwards (what a bit-width search or a sensitivity scan does, without copying the model)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from slimquant import GPTQ, RTN, LayerOverride, QuantSpec, Recipe, SlimquantError, SmoothQuant
from slimquant.nn import QModule
from slimquant.pipeline import LayerPlan, convert, plan, quantized

W4 = QuantSpec("int4", "per_group", 32, symmetric=False)
W8 = QuantSpec("int8", "per_channel")
DYN = QuantSpec("int8", "per_token", dynamic=True)


@pytest.fixture
def calib(tokenizer, eval_text):
    from slimquant.data import calibration_windows

    return calibration_windows(tokenizer, eval_text.split("\n"), 4, 16)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_plan_resolves_every_override(llama):
    r = Recipe(weight=W4, steps=(GPTQ(),), overrides=(("*.q_proj", LayerOverride(weight=W8, input=DYN, weight_step=RTN())),
                                                      ("*.k_proj", LayerOverride(weight=None))))  # fmt: skip
    layers, report = plan(llama, r)
    by = {lp.name: lp for lp in layers}
    q = by["model.layers.0.self_attn.q_proj"]
    assert (q.spec, q.input, q.step) == (W8, DYN, RTN())
    assert (by["model.layers.0.mlp.up_proj"].spec, by["model.layers.0.mlp.up_proj"].step) == (W4, GPTQ())
    assert "model.layers.1.self_attn.k_proj" not in by and report.skipped["model.layers.1.self_attn.k_proj"].endswith("float")


def test_quantized_layer_by_layer_restores_the_float_model(llama, calib, input_ids):
    before = _state(llama)
    with torch.no_grad():
        ref = llama(input_ids).logits
    recipe = Recipe(weight=W4)
    layers, _ = plan(llama, recipe)
    errors = {}
    for lp in layers[:4]:
        with quantized(llama, recipe, [lp]) as result:
            assert result.model is llama and result.recipe is recipe
            assert [r.name for r in result.report.layers] == [lp.name]
            assert type(llama.get_submodule(lp.name)).__name__ == "QLinear"
            with torch.no_grad():
                errors[lp.name] = float((llama(input_ids).logits - ref).abs().max())
        assert isinstance(llama.get_submodule(lp.name), torch.nn.Linear)
    assert all(e > 0 for e in errors.values())  # each one changed the output while it was quantized
    after = _state(llama)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(m, QModule) for m in llama.modules())
    with torch.no_grad():
        assert torch.equal(llama(input_ids).logits, ref)


def test_quantized_whole_plan_equals_a_converted_copy(llama, calib, input_ids):
    recipe = Recipe(weight=W4, steps=(GPTQ(),), overrides=(("*.mlp.*", LayerOverride(weight=W8, input=DYN)),))
    copy_ = copy.deepcopy(llama)
    convert(copy_, recipe, show_progress=False, calib_data=calib)
    with torch.no_grad():
        expect = copy_(input_ids).logits
    with quantized(llama, recipe, calib_data=calib):
        with torch.no_grad():
            assert torch.equal(llama(input_ids).logits, expect)


def test_explicit_plans_are_checked(llama):
    recipe = Recipe(weight=W4)
    layers, _ = plan(llama, recipe)
    lp = layers[0]
    for bad, words in [
        ([lp, lp], "planned twice"),
        ([dataclasses.replace(lp, name="model.nope")], "the model has no such module"),
        ([dataclasses.replace(lp, kind="embedding")], "planned as 'embedding', but the module is a Linear"),
        ([dataclasses.replace(lp, input=DYN)], "W8A8 needs symmetric 8-bit int8 weights"),
        ([dataclasses.replace(lp, step=SmoothQuant())], "its step must be a weight step"),
        (["model.layers.0.self_attn.q_proj"], "layers= holds LayerPlan entries"),
    ]:
        with pytest.raises(SlimquantError, match=words):
            convert(copy.deepcopy(llama), recipe, show_progress=False, layers=bad)
    with pytest.raises(SlimquantError, match="smoothquant change"):
        with quantized(llama, Recipe(weight=W8, input=DYN, steps=(SmoothQuant(), RTN()))):
            pass
    assert isinstance(LayerPlan("x", "linear", W4).step, RTN)


def test_a_plan_without_a_weight_spec_is_for_pruning_steps(llama, calib):
    from slimquant import Wanda

    q = "model.layers.0.self_attn.q_proj"
    with pytest.raises(SlimquantError, match=f"layer {q}: a plan without a weight spec is for pruning steps"):
        convert(llama, Recipe(), layers=[LayerPlan(q, "linear", None)], calib_data=calib, show_progress=False)
    res = convert(llama, Recipe(weight=None, steps=(Wanda(0.5),)), layers=[LayerPlan(q, "linear", None, None, Wanda(0.5))],
                  calib_data=calib, show_progress=False)  # fmt: skip
    assert float((llama.get_submodule(q).weight == 0).float().mean()) == 0.5
    assert [r.name for r in res.report.layers] == [q]
