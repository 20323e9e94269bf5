"""The conversion loop on tiny models: which layers are quantized, which stay float, and why."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimquant
from slimquant import Granularity, QuantSpec, Recipe, SlimquantError
from slimquant.nn.modules import QConv2d, QLinear
from slimquant.pipeline.convert import convert, plan
from slimquant.types.steps import RTN

G = Granularity
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def _types(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, QLinear, nn.Embedding))}


def test_plan_does_not_change_the_model(llama):
    before = _types(llama)
    layers, report = plan(llama, Recipe(disable_names=("model.layers.0",)))
    assert _types(llama) == before
    planned = {lp.name for lp in layers}
    assert planned == {f"model.layers.1.{s}" for s in LINEARS}
    assert report.skipped["lm_head"] == "disable_last_linear"
    assert all(report.skipped[f"model.layers.0.{s}"] == "disable_names" for s in LINEARS)


def test_disable_names_exact_glob_and_regex_keep_layers_float(llama, input_ids, tmp_path):
    patterns = (
        "model.layers.0.mlp.down_proj",  # exact
        "model.layers.1.self_attn.*",  # glob
        r"re:model\.layers\.\d+\.mlp\.up_proj",  # regex
        "model.layers.9.mlp",  # matches nothing
        "re:nothing_\\d+",  # matches nothing
    )
    llama_q = slimquant.quantize(llama, Recipe(disable_names=patterns), show_progress=False)
    report = llama_q.report
    assert report.unmatched_patterns == ("model.layers.9.mlp", "re:nothing_\\d+")

    float_names = {"model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"}
    float_names |= {f"model.layers.1.self_attn.{p}_proj" for p in "qkvo"}
    for name, cls in _types(llama).items():
        if name in float_names:
            assert cls is nn.Linear, name
            assert report.skipped[name] == "disable_names"
        elif name.startswith("model.layers."):
            assert cls is QLinear, name
    assert {row.name for row in report.layers} == {
        f"model.layers.{i}.{s}" for i in (0, 1) for s in LINEARS
    } - float_names

    # The float layers survive save -> load as float, and outputs stay bit-identical.
    loaded = slimquant.load(slimquant.save(llama_q, tmp_path / "out")).model
    assert _types(loaded) == _types(llama)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, llama(input_ids=input_ids).logits)


def test_parent_name_covers_its_children(llama):
    llama_q = slimquant.quantize(llama, Recipe(disable_names=("model.layers.1.mlp",)), show_progress=False)
    for s in ("gate_proj", "up_proj", "down_proj"):
        assert type(llama.get_submodule(f"model.layers.1.mlp.{s}")) is nn.Linear
    assert isinstance(llama.model.layers[0].mlp.gate_proj, QLinear)
    assert llama_q.report.unmatched_patterns == ()


def test_invalid_regex_is_refused(llama):
    with pytest.raises(SlimquantError, match=r"invalid regex 're:\('"):
        slimquant.quantize(llama, Recipe(disable_names=("re:(",)), show_progress=False)


@pytest.mark.parametrize("disable_last_linear", [True, False])
def test_disable_last_linear(disable_last_linear, llama, input_ids, tmp_path):
    llama_q = slimquant.quantize(llama, Recipe(disable_last_linear=disable_last_linear), show_progress=False)
    if disable_last_linear:
        assert type(llama.lm_head) is nn.Linear
        assert llama_q.report.skipped == {"lm_head": "disable_last_linear"}
    else:
        assert isinstance(llama.lm_head, QLinear) and llama.lm_head.weight.dtype == torch.int8
        assert "lm_head" in {r.name for r in llama_q.report.layers}
        assert llama_q.report.skipped == {}
    # The (float) embedding is untouched either way.
    assert type(llama.model.embed_tokens) is nn.Embedding
    loaded = slimquant.load(slimquant.save(llama_q, tmp_path / "out")).model
    assert type(loaded.lm_head) is type(llama.lm_head)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, llama(input_ids=input_ids).logits)


def test_disable_last_linear_on_plain_module_is_the_last_linear(mlp):
    mlp_q = slimquant.quantize(mlp, Recipe(), show_progress=False)
    assert [type(m) for m in mlp if not isinstance(m, nn.ReLU)] == [QLinear, QLinear, nn.Linear]
    assert mlp_q.report.skipped == {"4": "disable_last_linear"}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_names_the_layer_and_changes_nothing(bad, llama):
    with torch.no_grad():
        llama.model.layers[1].mlp.up_proj.weight[3, 5] = bad
    before = _types(llama)
    with pytest.raises(SlimquantError, match=r"layer model\.layers\.1\.mlp\.up_proj: weight has 1 NaN/Inf"):
        slimquant.quantize(llama, Recipe(), show_progress=False)
    # Validation happens before any swap: the model is still fully float and not marked quantized.
    assert _types(llama) == before
    assert getattr(llama, "slimquant_recipe", None) is None


def test_non_finite_weight_in_a_disabled_layer_is_fine(llama):
    with torch.no_grad():
        llama.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    slimquant.quantize(llama, Recipe(disable_names=("model.layers.0.self_attn.q_proj",)), show_progress=False)
    assert type(llama.model.layers[0].self_attn.q_proj) is nn.Linear


def test_group_size_that_does_not_divide_names_the_layer(factories):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 4))
    recipe = Recipe(weight=QuantSpec("int4", G.PER_GROUP, 32, True))
    with pytest.raises(SlimquantError, match=r"layer 2: in_features 48 is not divisible by group_size 32") as ei:
        convert(model, recipe, show_progress=False)
    assert "disable_names" in str(ei.value)  # tells the user the way out
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    # Excluding the culprit makes it work.
    convert(model, Recipe(weight=recipe.weight, disable_names=("2",)), show_progress=False)
    assert [type(m) for m in model] == [QLinear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]


def test_conv_layers_follow_include_conv(cnn):
    cnn_q = slimquant.quantize(cnn, Recipe(include_conv=False), show_progress=False)
    assert [type(m) for m in cnn if isinstance(m, (nn.Conv2d, QConv2d))] == [nn.Conv2d] * 3
    # the last linear is disabled too, so nothing at all was quantized
    assert cnn_q.report.layers == []


def test_conv_layers_are_quantized_by_default(cnn):
    slimquant.quantize(cnn, Recipe(weight=QuantSpec("int8", G.PER_CHANNEL)), show_progress=False)
    convs = [m for m in cnn if isinstance(m, QConv2d)]
    assert len(convs) == 3
    assert [c.weight.shape for c in convs] == [(16, 27), (32, 36), (32, 32)]


def test_report_rows_have_sqnr_ordered_by_bits(factories):
    rows = {}
    for bits in ("int8", "int4", "int2"):
        model = factories["mlp"](seed=0)
        model_q = slimquant.quantize(model, Recipe(weight=QuantSpec(bits, G.PER_CHANNEL)), show_progress=False)
        rows[bits] = model_q.report.layers[0]
        assert rows[bits].name == "0" and rows[bits].kind == "linear"
        assert rows[bits].spec == f"{bits} per-channel sym"
    # More bits, less error (observed 48.2 / 23.1 / 6.2 dB on this layer).
    assert rows["int8"].sqnr_db > rows["int4"].sqnr_db + 15 > rows["int2"].sqnr_db + 15


def test_clip_search_changes_the_scales_and_reduces_error(factories):
    spec = QuantSpec("int2", G.PER_GROUP, 32, False)
    plain, clipped = factories["mlp"](seed=0), factories["mlp"](seed=0)
    plain_q = slimquant.quantize(plain, Recipe(weight=spec), show_progress=False)
    clipped_q = slimquant.quantize(clipped, Recipe(weight=spec, steps=(RTN(clip_search=True),)), show_progress=False)
    assert not torch.equal(plain[0].weight_scale, clipped[0].weight_scale)
    # observed 10.3 dB with the search vs 9.6 dB without
    assert clipped_q.report.layers[0].sqnr_db > plain_q.report.layers[0].sqnr_db
    assert clipped[0].method == {"algorithm": "rtn", "clip_search": True}
