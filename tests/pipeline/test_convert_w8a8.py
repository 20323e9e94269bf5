"""W8A8 end to end on tiny models: calibrate, convert, save in the seed's layout, reload bit-identically."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import slimquant
from slimquant import Granularity, QuantSpec, Recipe, SlimquantError
from slimquant.data import calibration_windows
from slimquant.formats.msmodelslim import read_manifest
from slimquant.nn.w8a8 import QLinearW8A8

G = Granularity
W8 = QuantSpec("int8", G.PER_CHANNEL)
STATIC = QuantSpec("int8", G.PER_TENSOR, symmetric=False)
DYNAMIC = QuantSpec("int8", G.PER_TOKEN, dynamic=True)


@pytest.fixture
def calib(tokenizer, eval_text) -> torch.Tensor:
    return calibration_windows(tokenizer, eval_text.split("\n"), 4, 16)


def _kl(ref: torch.Tensor, out: torch.Tensor) -> float:
    lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(out, -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@pytest.mark.parametrize("act_observer", ["minmax", "histogram", "histogram_mse", "auto"])
def test_static_w8a8_llama_round_trip(llama, calib, input_ids, tmp_path, act_observer):
    with torch.no_grad():
        ref = llama(input_ids).logits
    recipe = Recipe(weight=W8, input=STATIC, act_observer=act_observer)
    llama_q = slimquant.quantize(llama, recipe, calib_data=calib, show_progress=False)
    qlayers = {n: m for n, m in llama.named_modules() if isinstance(m, QLinearW8A8)}
    assert len(qlayers) == 14 and isinstance(llama.lm_head, nn.Linear)  # lm_head: disable_last_linear
    rows = {r.name: r for r in llama_q.report.layers}
    assert all(rows[n].details["input_rule"] in ("minmax", "histogram", "histogram_mse") for n in qlayers)
    if act_observer != "auto":
        assert {rows[n].details["input_rule"] for n in qlayers} == {act_observer}
    with torch.no_grad():
        out = llama(input_ids).logits
    assert _kl(ref, out) < 1e-4  # observed 2.7e-6 on the random tiny model
    slimquant.save(llama_q, tmp_path / "w8a8")
    names = {p.name for p in (tmp_path / "w8a8").iterdir()}
    assert {"quant_model_weight_w8a8.safetensors", "quant_model_description_w8a8.json"} <= names
    desc = json.loads((tmp_path / "w8a8" / "quant_model_description_w8a8.json").read_text())
    assert desc["model_quant_type"] == "W8A8"
    layer = "model.layers.0.self_attn.q_proj"
    for t in ("weight", "input_scale", "input_offset", "quant_bias", "deq_scale"):
        assert desc[f"{layer}.{t}"] == "W8A8"
    assert desc["model.embed_tokens.weight"] == "FLOAT"
    assert json.loads((tmp_path / "w8a8" / "config.json").read_text())["quantize"] == "w8a8"
    back = slimquant.load(tmp_path / "w8a8").model
    with torch.no_grad():
        assert torch.equal(back(input_ids).logits, out)


def test_dynamic_w8a8_needs_no_calibration_and_reloads(llama, input_ids, tmp_path):
    with torch.no_grad():
        ref = llama(input_ids).logits
    llama_q = slimquant.quantize(llama, Recipe(weight=W8, input=DYNAMIC), show_progress=False)
    with torch.no_grad():
        out = llama(input_ids).logits
    assert _kl(ref, out) < 1e-4  # observed 1.4e-6
    slimquant.save(llama_q, tmp_path / "dyn")
    desc = json.loads((tmp_path / "dyn" / "quant_model_description_w8a8_dynamic.json").read_text())
    assert desc["model_quant_type"] == "W8A8_DYNAMIC"
    assert desc["model.layers.1.mlp.down_proj.weight_scale"] == "W8A8_DYNAMIC"
    assert json.loads((tmp_path / "dyn" / "config.json").read_text())["quantize"] == "w8a8_dynamic"
    back = slimquant.load(tmp_path / "dyn").model
    with torch.no_grad():
        assert torch.equal(back(input_ids).logits, out)


def test_static_without_calibration_data_is_refused(llama):
    with pytest.raises(SlimquantError, match="needs calibration data"):
        slimquant.quantize(llama, Recipe(weight=W8, input=STATIC), show_progress=False)
    assert not any(isinstance(m, QLinearW8A8) for m in llama.modules())


def test_mlp_calibrates_on_plain_tensors_and_keeps_no_hooks(mlp):
    batches = [torch.randn(8, 64) for _ in range(3)]
    with torch.no_grad():
        ref = mlp(batches[0])
    slimquant.quantize(mlp, Recipe(weight=W8, input=STATIC, disable_last_linear=False), calib_data=batches,
                       show_progress=False)  # fmt: skip
    assert all(isinstance(mlp[i], QLinearW8A8) for i in (0, 2, 4))
    assert all(not m._forward_pre_hooks for m in mlp.modules())
    with torch.no_grad():
        out = mlp(batches[0])
    assert float((out - ref).norm() / ref.norm()) < 0.03  # observed 0.012


def test_calibration_that_never_reaches_a_layer_names_it(mlp):
    class Partial(nn.Module):
        def __init__(self, seq: nn.Sequential) -> None:
            super().__init__()
            self.seq = seq
            self.unused = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.seq(x)

    model = Partial(mlp)
    with pytest.raises(SlimquantError, match="layer unused: no calibration statistics"):
        slimquant.quantize(model, Recipe(weight=W8, input=STATIC, disable_last_linear=False),
                           calib_data=[torch.randn(2, 64)], show_progress=False)  # fmt: skip
    assert not any(isinstance(m, QLinearW8A8) for m in model.modules())


def test_nan_activations_name_the_layer(mlp):
    with pytest.raises(SlimquantError, match=r"layer 0: .*NaN"):
        slimquant.quantize(mlp, Recipe(weight=W8, input=STATIC), calib_data=[torch.full((2, 64), float("nan"))],
                           show_progress=False)  # fmt: skip


def test_sigma_clipping_narrows_the_static_range(mlp):
    x = torch.randn(64, 64)
    x[0, 0] = 40.0  # one outlier
    plain, sigma = copy.deepcopy(mlp), copy.deepcopy(mlp)
    plain_q = slimquant.quantize(plain, Recipe(weight=W8, input=STATIC), calib_data=[x], show_progress=False)
    sigma_q = slimquant.quantize(sigma, Recipe(weight=W8, input=STATIC, sigma_factor=3.0), calib_data=[x], show_progress=False)
    r_plain = {r.name: r.details["input_range"] for r in plain_q.report.layers}["0"]
    r_sigma = {r.name: r.details["input_range"] for r in sigma_q.report.layers}["0"]
    assert r_plain[1] == pytest.approx(40.0)
    assert r_sigma[1] < 5.0  # mean + 3 std of this data is about 3.3


def test_conv_layers_stay_float_under_w8a8(cnn):
    cnn_q = slimquant.quantize(cnn, Recipe(weight=W8, input=DYNAMIC), show_progress=False)
    report = cnn_q.report
    assert any("Conv2d stays float" in why for why in report.skipped.values())
    assert isinstance(cnn[0], nn.Conv2d)


def test_manifest_records_the_input_spec(llama, calib, tmp_path):
    llama_q = slimquant.quantize(llama, Recipe(weight=W8, input=STATIC), calib_data=calib, show_progress=False)
    slimquant.save(llama_q, tmp_path / "m")
    entry = read_manifest(tmp_path / "m")["layers"]["model.layers.0.mlp.up_proj"]
    assert entry["module"] == "QLinearW8A8"
    assert QuantSpec.from_dict(entry["args"]["input_spec"]) == STATIC


def test_input_sample_is_uniform_over_all_batches():
    from slimquant.pipeline.calibrate import InputStats

    st = InputStats({}, sample_rows=500)
    g = torch.Generator().manual_seed(0)
    for b in range(10):
        st.update(torch.full((1, 250, 4), float(b)), g)
    counts = torch.bincount(st.sample()[:, 0].long(), minlength=10)
    assert st.sample().shape == (500, 4)
    assert int(counts.min()) > 25 and int(counts.max()) < 80  # 50 expected from each batch
