"""The result object: what quantize and load return, what save / evaluate / kv_cache read; typed report rows that
round-trip their JSON; observation modes owned by context managers; method records given at construction."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import slimquant
from slimquant import AWQ, GPTQ, QuantSpec, Recipe, SlimquantError, SmoothQuant
from slimquant.nn import fa_quant
from slimquant.nn.modules import QLinear
from slimquant.types.report import ConversionReport, LayerRow, StepRow
from slimquant.types.result import QuantizationResult
from slimquant.types.spec import KV_INT8_DYNAMIC

W4 = QuantSpec("int4", "per_group", 32, symmetric=False)
DYN = QuantSpec("int8", "per_token", dynamic=True)


@pytest.fixture
def calib(tokenizer, eval_text):
    from slimquant.data import calibration_windows

    return calibration_windows(tokenizer, eval_text.split("\n"), 4, 16)


def test_quantize_returns_the_typed_result_and_attaches_nothing(llama, calib):
    before = set(vars(llama))
    recipe = Recipe(weight=W4, steps=(AWQ(grid=4), GPTQ()))
    result = slimquant.quantize(llama, recipe, calib_data=calib, show_progress=False)
    assert isinstance(result, QuantizationResult) and result.model is llama and result.recipe is recipe
    assert set(vars(llama)) == before  # no attribute added to the model
    assert result.tensor_source is None  # nothing streamed
    rows = result.report.layers
    assert rows and all(isinstance(r, LayerRow) for r in rows)
    q = result.report.layer("model.layers.1.mlp.down_proj")
    assert q.algorithm == "gptq" and q.block_solved and q.samples == 4 * 16 and 0 < q.output_error < 1
    assert q.kind == "linear" and q.spec == W4.describe() and q.sqnr_db > 0 and "damp" in q.details
    with pytest.raises(KeyError, match="lm_head is not in the report"):
        result.report.layer("lm_head")  # kept float (the last linear)
    awq = result.report.steps_of("awq")
    assert len(awq) == 6 and all(isinstance(r, StepRow) and r.prev and r.linears for r in awq)
    assert all(0 <= r.values["output_error"] <= r.values["output_error_unscaled"] for r in awq)


def test_the_report_round_trips_its_json_and_reads_the_earlier_layout(llama, calib, tmp_path):
    recipe = Recipe(weight=QuantSpec("int8", "per_channel"), input=DYN, steps=(SmoothQuant(), GPTQ()))
    result = slimquant.quantize(llama, recipe, calib_data=calib, show_progress=False)
    slimquant.save(result, tmp_path / "q")
    on_disk = json.loads((tmp_path / "q" / "quantize_report.json").read_text())
    assert ConversionReport.from_dict(on_disk) == result.report
    assert on_disk["steps"][0]["step"] == "smoothquant" and "alpha" in on_disk["steps"][0]
    # the layout before the typed rows: "smoothing" rows, AWQ rows naming themselves with "method"
    old = {"layers": [{"name": "a", "kind": "linear", "spec": "int4", "algorithm": "rtn", "sqnr_db": 9.5, "damp": 0.01}],
           "smoothing": [{"prev": "n", "linears": ["a"], "alpha": 0.5}, {"method": "awq", "prev": "n", "linears": ["a"],
                                                                          "ratio": 0.3}]}  # fmt: skip
    rep = ConversionReport.from_dict(old)
    assert rep.layers == [LayerRow("a", "linear", "int4", "rtn", 9.5, details={"damp": 0.01})]
    assert [(r.step, r.values) for r in rep.steps] == [("smoothing", {"alpha": 0.5}), ("awq", {"ratio": 0.3})]
    with pytest.raises(ValueError, match="needs 'name' and 'algorithm'"):
        LayerRow.from_dict({"name": "a"})


def test_load_returns_a_result_that_saves_evaluates_and_keeps_the_kv_mode(llama, tokenizer, eval_text, tmp_path,
                                                                          caplog):  # fmt: skip
    result = slimquant.quantize(llama, Recipe(kv=KV_INT8_DYNAMIC), show_progress=False)
    slimquant.save(result, tmp_path / "a", tokenizer=tokenizer)
    back = slimquant.load(tmp_path / "a")
    assert isinstance(back, QuantizationResult) and back.report == result.report and back.tokenizer is not None
    assert back.recipe == result.recipe and isinstance(slimquant.kv_cache(back), slimquant.nn.kv_cache.Int8KVCache)
    ev = slimquant.evaluate(back, text=eval_text, windows=2, seq_len=16)  # its own tokenizer, its int8 KV cache
    assert ev == slimquant.evaluate(result, tokenizer, eval_text, windows=2, seq_len=16)
    plain = slimquant.evaluate(back.model, tokenizer, eval_text, windows=2, seq_len=16)  # a bare module: float cache
    assert plain["perplexity"] != ev["perplexity"]
    slimquant.save(back, tmp_path / "b")  # re-saving a loaded checkpoint: its tokenizer and report by default
    assert (tmp_path / "b" / "tokenizer_config.json").is_file()
    for f in ("quant_model_weight_w8a16.safetensors", "slimquant_manifest.json", "quant_model_description_w8a16.json",
              "quantize_report.json", "quantize_report.md", "config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    (tmp_path / "b" / "quantize_report.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        again = slimquant.load(tmp_path / "b")  # a report is for people: a broken one never stops a load
    assert again.report is None and "quantize_report.json: not read" in caplog.text
    lm = slimquant.load_model(str(tmp_path / "b"))
    assert lm.recipe == result.recipe and slimquant.kv_cache(lm) is not None


def test_a_result_checks_its_fields():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        QuantizationResult("model", Recipe())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="recipe must be a Recipe"):
        QuantizationResult(torch.nn.Linear(2, 2), {"weight": None})  # type: ignore[arg-type]


def test_float_model_from_load_model_is_no_result(llama_dir):
    lm = slimquant.load_model(str(llama_dir))
    assert lm.recipe is None
    with pytest.raises(SlimquantError, match="is a float model, not a slimquant checkpoint"):
        slimquant.kv_cache(lm)


def test_method_records_are_given_where_modules_are_built(llama, tmp_path):
    result = slimquant.quantize(llama, Recipe(weight=W4), show_progress=False)
    q = llama.model.layers[0].self_attn.q_proj
    assert q.method == {"algorithm": "rtn", "clip_search": False}
    lin = torch.nn.Linear(32, 8)
    from slimquant.algorithms import rtn

    built = QLinear.from_float(lin, rtn(lin.weight.detach(), W4), W4, method={"algorithm": "mine", "k": 1})
    assert built.method == {"algorithm": "mine", "k": 1}
    assert QLinear.from_float(lin, rtn(lin.weight.detach(), W4), W4).method == {}
    slimquant.save(result, tmp_path / "q")
    manifest = json.loads((tmp_path / "q" / "slimquant_manifest.json").read_text())
    entry = manifest["layers"]["model.layers.0.self_attn.q_proj"]
    rebuilt = QLinear.from_entry(entry)
    assert rebuilt.method == q.method and rebuilt.weight.is_meta
    with pytest.raises(TypeError, match="method must be a JSON object"):
        QLinear.from_entry({**entry, "method": ["rtn"]})


def test_observation_modes_give_each_module_back_the_mode_it_had():
    a, b = fa_quant.FAQuant(2), fa_quant.FAQuant(2)
    with fa_quant.observing([a]):
        with fa_quant.observing([a, b]):
            assert a.observing and b.observing
        assert a.observing and not b.observing  # the outer block still observes a
    assert not a.observing and not b.observing
    with pytest.raises(RuntimeError):
        with fa_quant.observing([a]):
            raise RuntimeError("boom")
    assert not a.observing
