"""CBQ (--anti_method m5): coarse-to-fine outlier detection, LoRA-Rounding, input fake quantization as deployed,
the cross-block window on the block pipeline, the pre-processing step, flags."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils import parametrize

import slimquant
from slimquant import CBQ, RTN, CBQPreprocess, QuantSpec, Recipe
from slimquant.algorithms.cbq import InputFakeQuant, LoRARoundingWeight, rectified_sigmoid, window_distance
from slimquant.math.outliers import coarse_outliers, coarse_to_fine_outliers
from slimquant.errors import NotSupportedYet, SlimquantError
from slimquant.math.qparams import qparams_from_minmax
from slimquant.math.weights import dequantize_weight, quantize_weight
from slimquant.nn.w8a8 import QLinearW8A8
from slimquant.types.flags import recipe_from_flags
from slimquant.types.spec import Granularity
from slimquant.types.steps import step_from_dict

INT8_STATIC = QuantSpec("int8", Granularity.PER_TENSOR, symmetric=False)
W8 = QuantSpec("int8", Granularity.PER_CHANNEL, symmetric=True)
SPECS = [
    QuantSpec("int4", Granularity.PER_GROUP, 32, symmetric=False),
    QuantSpec("int3", Granularity.PER_CHANNEL, symmetric=True),
    QuantSpec("int4", Granularity.PER_GROUP, 32, symmetric=False, zero_point="float"),
    W8,
]


def test_coarse_to_fine_flags_the_extreme_values_only() -> None:
    g = torch.Generator().manual_seed(0)
    bulk = 1.0 + 0.1 * torch.randn(200, generator=g).abs()
    v = torch.cat([bulk, torch.tensor([2.5, 2.6, 40.0, 42.0])])
    mask = coarse_to_fine_outliers(v)
    assert mask.nonzero().squeeze(1).tolist() == [202, 203]  # the moderate candidates go back to the bulk
    # a half-normal bulk alone: of the 6 coarse candidates in its tail, only the one standing apart is kept
    tail = coarse_to_fine_outliers(bulk)
    assert int(coarse_outliers(bulk).sum()) == 6 and int(tail.sum()) == 1
    assert float(bulk[tail].min()) > float(bulk[~tail].max())
    assert not coarse_to_fine_outliers(torch.ones(50)).any()
    m2 = coarse_to_fine_outliers(v.reshape(2, -1))  # any shape
    assert m2.shape == (2, 102) and m2.sum() == 2
    # lambda trades the gap between the sets' means against their spread: on spread-out candidates it moves the split
    spread = torch.cat([bulk, torch.tensor([20.0, 30.0, 45.0, 46.0])])
    assert coarse_to_fine_outliers(spread, fine_lambda=0.0).nonzero().squeeze(1).tolist() == [202, 203]
    assert coarse_to_fine_outliers(spread, fine_lambda=100.0).nonzero().squeeze(1).tolist() == [201, 202, 203]


def test_rectified_sigmoid() -> None:
    assert float(rectified_sigmoid(torch.tensor(0.0))) == 0.5
    assert float(rectified_sigmoid(torch.tensor(50.0))) == 1.0 and float(rectified_sigmoid(torch.tensor(-50.0))) == 0.0


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_lora_rounding_starts_at_round_to_nearest_and_deploys_what_it_trains(spec: QuantSpec) -> None:
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(0)) * 0.05
    lr = LoRARoundingWeight(w, spec, rank=4, generator=torch.Generator().manual_seed(1))
    assert lr.a1.shape == (24, 4) and lr.a2.shape == (4, 64)
    torch.testing.assert_close(lr(w), dequantize_weight(quantize_weight(w, spec), spec), rtol=0, atol=0)
    with torch.no_grad():
        lr.a1.normal_(0, 1.0, generator=torch.Generator().manual_seed(2))
        lr.min_scale.mul_(0.9)
    w_hat = lr(w)
    qw = lr.result(w)
    assert torch.equal(dequantize_weight(qw, spec), w_hat)
    assert not torch.equal(qw.q, quantize_weight(w, spec).q)
    (w_hat.sum()).backward()
    assert lr.a1.grad is not None and lr.a1.grad.abs().sum() > 0 and lr.max_scale.grad is not None


def test_static_input_quantization_is_the_deployed_layers() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16)
    x = torch.randn(5, 32) * 3
    fq = InputFakeQuant(INT8_STATIC, float(x.min()), float(x.max()), learn=True)
    with torch.no_grad():
        fq.lo.fill_(0.7)
        fq.hi.fill_(0.8)
    rng = fq.range()
    assert rng is not None and rng["rule"].startswith("cbq")
    scale, zp = qparams_from_minmax(torch.tensor(rng["rmin"]), torch.tensor(rng["rmax"]), fq.qt, False)
    torch.testing.assert_close(fq.qparams()[0], scale, rtol=0, atol=0)
    qw = quantize_weight(lin.weight.detach(), W8)
    deployed = QLinearW8A8.from_float(lin, qw.q, qw.scale.reshape(-1), W8, INT8_STATIC, float(scale), float(zp))
    simulated = torch.nn.functional.linear(fq(x), dequantize_weight(qw, W8), lin.bias)
    torch.testing.assert_close(deployed(x), simulated, rtol=1e-4, atol=1e-4)
    y = fq(x)
    y.sum().backward()
    assert fq.lo.grad is not None and fq.hi.grad is not None
    dyn = InputFakeQuant(QuantSpec("int8", "per_token", dynamic=True), None, None, learn=True)
    assert dyn.tuned() == [] and dyn.range() is None
    assert torch.allclose(dyn(x), x, atol=float(x.abs().max()) / 100)


def test_window_distance_is_mse_plus_kl() -> None:
    a = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    assert float(window_distance(a, a, 1.0)) == pytest.approx(0.0, abs=1e-6)
    b = a + 0.1
    assert float(window_distance(b, a, 0.0)) == pytest.approx(0.01, rel=1e-4)  # a shift changes no softmax
    c = a * 2
    assert float(window_distance(c, a, 1.0)) > float(window_distance(c, a, 0.0))


def _calib():
    torch.manual_seed(0)
    return [torch.randint(0, 30, (1, 32)) for _ in range(6)]


def _kl(model, ref, ids) -> float:
    with torch.no_grad():
        logits = model(ids).logits
    return float(torch.nn.functional.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                            reduction="batchmean"))  # fmt: skip


def test_windows_overlap_and_warm_start_on_a_three_block_llama(tokenizer, tmp_path) -> None:
    from conftest import make_llama

    llama = make_llama(len(tokenizer), layers=3)
    calib = _calib()
    spec = QuantSpec("int3", Granularity.PER_GROUP, 16, symmetric=False)
    res = slimquant.quantize(copy.deepcopy(llama), Recipe(weight=spec, steps=(CBQ(iters=6, batch_size=2, rank=2),)),
                             calib_data=calib, show_progress=False)  # fmt: skip
    info = {r.name.split(".")[2]: r.details["cbq"] for r in res.report.layers if r.name.endswith("q_proj")}
    assert info["0"]["window"] == ["model.layers.0", "model.layers.1"] and not info["0"]["warm_start"]
    assert info["1"]["window"] == ["model.layers.1", "model.layers.2"] and info["1"]["warm_start"]
    assert info["2"]["window"] == ["model.layers.2"] and info["2"]["warm_start"]
    # every window's training moved off round to nearest and lowered its loss (observed 0.74 / 0.76 / 0.90)
    assert all(i["steps"] == 6 and i["best_step"] >= 0 and i["best_rel_loss"] < 0.97 for i in info.values())
    # the float model's modules are left untouched by the window's parametrizations
    assert not any(parametrize.is_parametrized(m) for m in res.model.modules())
    ids = torch.randint(0, 30, (2, 24))
    slimquant.save(res, tmp_path / "ckpt")
    loaded = slimquant.load(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, res.model(ids).logits, rtol=0, atol=1e-5)
    one = slimquant.quantize(copy.deepcopy(llama), Recipe(weight=spec, steps=(CBQ(iters=6, batch_size=2, rank=2, window=1),)),
                             calib_data=calib, show_progress=False)  # fmt: skip
    assert all(r.details["cbq"]["window"] == [r.name.rsplit(".", 2)[0]] for r in one.report.layers
               if r.name.endswith("q_proj"))  # fmt: skip


def test_w8a8_static_tunes_and_deploys_the_input_ranges(llama, tmp_path) -> None:
    calib = _calib()
    ids = torch.randint(0, 30, (2, 24))
    with torch.no_grad():
        ref = llama(ids).logits
    recipe = recipe_from_flags("--a_bit 8 --mm_tensor False --anti_method m5 --iters 8 --batch_size 2")
    assert [s.TYPE for s in recipe.steps] == ["cbq_preprocess", "cbq"] and recipe.weight_step.iters == 8
    res = slimquant.quantize(copy.deepcopy(llama), recipe, calib_data=calib, show_progress=False)
    rows = {r.name: r for r in res.report.layers if ".layers." in r.name}
    assert rows and all(r.algorithm == "cbq" for r in rows.values())
    name, row = next(iter(rows.items()))
    assert row.details["input_rule"].startswith("cbq")
    layer = res.model.get_submodule(name)
    assert isinstance(layer, QLinearW8A8)
    rmin, rmax = row.details["input_range"]
    scale, _ = qparams_from_minmax(torch.tensor(rmin), torch.tensor(rmax), layer_qtype(), False)
    assert float(layer.input_scale) == pytest.approx(float(scale), rel=1e-5)
    assert layer.method["algorithm"] == "cbq" and layer.method["window"] == 2 and layer.method["rank"] == 8
    assert res.report.steps_of("cbq_preprocess")
    # q/k/v read one tensor: one tuned input range, so the fused norm still quantizes it once for all three
    attn = res.model.model.layers[0].self_attn
    assert attn.q_proj.input_key() == attn.k_proj.input_key() == attn.v_proj.input_key()
    assert _kl(res.model, ref, ids) < 0.05
    slimquant.save(res, tmp_path / "w8a8")
    loaded = slimquant.load(tmp_path / "w8a8").model
    assert type(loaded.model.layers[0].input_layernorm).__name__ == "FusedRMSNorm"
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, res.model(ids).logits, rtol=0, atol=1e-4)


def layer_qtype():
    from slimquant.types.qtype import qtype

    return qtype("int8")


def test_preprocessing_scales_an_outlier_channel_down(llama) -> None:
    model = copy.deepcopy(llama)
    with torch.no_grad():  # one massive input channel into q/k/v of block 0
        model.model.layers[0].input_layernorm.weight[5] = 80.0
    calib = _calib()
    ids = torch.randint(0, 30, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
    base = recipe_from_flags("--a_bit 8 --mm_tensor False")
    pre = Recipe(weight=base.weight, input=base.input, steps=(CBQPreprocess(), RTN()))
    plain = slimquant.quantize(copy.deepcopy(model), base, calib_data=calib, show_progress=False)
    res = slimquant.quantize(copy.deepcopy(model), pre, calib_data=calib, show_progress=False)
    row = next(r for r in res.report.steps_of("cbq_preprocess") if r.prev.endswith("layers.0.input_layernorm"))
    assert row.values["outlier_channels"] >= 1 and row.values["alpha"] is not None
    assert row.values["outliers"] in ("fine", "coarse") and "coarse 1.0" in row.values["errors"]
    assert row.values["act_absmax_after"] < row.values["act_absmax_before"] / 2
    assert _kl(res.model, ref, ids) < _kl(plain.model, ref, ids)


def test_preprocessing_alone_keeps_the_float_function(llama) -> None:
    from slimquant.pipeline.model_steps import run_model_steps

    model = copy.deepcopy(llama)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[3] = 60.0
    ids = torch.randint(0, 30, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
    recipe = Recipe(weight=W8, input=INT8_STATIC, steps=(CBQPreprocess(truncate_weights=False), RTN()))
    rows = run_model_steps(model, recipe, _calib(), False)
    assert any(r.values["alpha"] is not None for r in rows)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_steps_validate_and_round_trip() -> None:
    for bad in ({"window": 0}, {"rank": 0}, {"iters": 1.5}, {"lr": 0}, {"kl_weight": -1}, {"homologous": 1}):
        with pytest.raises(SlimquantError, match="cbq"):
            CBQ(**bad)
    for bad in ({"alphas": ()}, {"alphas": (0.0,)}, {"iqr_factor": -1}, {"sample_rows": 0}):
        with pytest.raises(SlimquantError, match="cbq_preprocess"):
            CBQPreprocess(**bad)
    step = CBQ(window=3, rank=4, homologous=False)
    assert step_from_dict(step.to_dict()) == step
    assert step_from_dict(CBQPreprocess(alphas=(0.5,)).to_dict()) == CBQPreprocess(alphas=(0.5,))
    with pytest.raises(NotSupportedYet, match="W8A8S"):
        CBQ().check(recipe_from_flags("--co_sparse True --w_bit 4 --a_bit 8").weight, INT8_STATIC)
    with pytest.raises(NotSupportedYet, match="fp8"):
        CBQ().check(W8, QuantSpec("fp8_e4m3", Granularity.PER_TENSOR, symmetric=True))
    assert isinstance(CBQ().outside_blocks(), RTN)


def test_weight_only_m5_and_calibration_needed(llama) -> None:
    recipe = recipe_from_flags("--w_bit 4 --w_sym False --anti_method m5 --iters 3")
    assert recipe.input is None and isinstance(recipe.weight_step, CBQ)
    with pytest.raises(SlimquantError, match="needs calibration data"):
        slimquant.quantize(copy.deepcopy(llama), recipe, show_progress=False)
    res = slimquant.quantize(copy.deepcopy(llama), recipe, calib_data=_calib(), show_progress=False)
    assert all(r.algorithm == "cbq" for r in res.report.layers if ".layers." in r.name)
