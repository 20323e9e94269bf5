"""Quantization-aware training (slimquant.prepare_qat / convert, slimquant.nn.qat): which layers are swapped,
BN folding, observer / LSQ / LSQ+ ranges and their gradients, training, conversion to the real quantized modules
with the fake-quantized outputs kept, save / load in deploy mode, the recipe from flags, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimquant as sq
from slimquant.errors import SlimquantError
from slimquant.math.quant import learned_fake_quantize
from slimquant.nn import QConv2d, QConv2dInputQuant, QLinear, QLinearInputQuant, QLinearW8A8
from slimquant.nn.qat import FakeQuantizer, QATConv2d, QATConvBn2d, QATLinear, freeze_bn, freeze_observers
from slimquant.types.spec import Granularity, LayerOverride, QuantSpec, Recipe

W8 = QuantSpec("int8", "per_channel")
W4 = QuantSpec("int4", "per_channel")
A8 = QuantSpec("int8", "per_tensor", symmetric=False)
A4 = QuantSpec("uint4", "per_tensor", symmetric=False)
A8_DYN = QuantSpec("int8", "per_token", dynamic=True)


class Net(nn.Module):
    """Conv-BN-ReLU twice (one inside a Sequential, one called from forward), a pool and two Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _net() -> Net:
    torch.manual_seed(0)
    net = Net()
    x, _ = _data()
    net.train()
    with torch.no_grad():
        net(x)  # BN running statistics away from their init
    return net.eval()


def _train(model: nn.Module, steps: int = 5, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x, y = _data()
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _recipe(weight: QuantSpec = W8, inp: QuantSpec | None = A8, cnn: bool = True, **qat) -> Recipe:  # noqa: ANN003
    overrides = ()
    if cnn and weight.granularity is Granularity.PER_GROUP:  # the first convolution has 9 columns: per channel there
        per_channel = QuantSpec(weight.qtype, "per_channel", symmetric=weight.symmetric)
        overrides = (("features.0", LayerOverride(weight=per_channel)),)
    return Recipe(weight=weight, input=inp, steps=(sq.QAT(**qat),), disable_last_linear=False, overrides=overrides)


def test_prepare_swaps_layers_and_folds_bn() -> None:
    net = _net()
    conv1, fc1_weight = net.features[0], net.fc1.weight
    sq.prepare_qat(net, _recipe())
    assert isinstance(net.features[0], QATConvBn2d) and isinstance(net.features[1], nn.Identity)
    assert isinstance(net.conv2, QATConvBn2d) and isinstance(net.bn2, nn.Identity)  # found in the traced graph
    assert isinstance(net.fc1, QATLinear) and isinstance(net.fc2, QATLinear)
    assert net.features[0].weight is conv1.weight and net.fc1.weight is fc1_weight  # same Parameters
    assert net.features[0].bn_name == "features.1" and net.conv2.bn_name == "bn2"


def test_bn_folding_off_keeps_the_bn_and_untraceable_models_fold_in_sequentials() -> None:
    net = sq.prepare_qat(_net(), _recipe(fold_bn=False))
    assert type(net.features[0]) is QATConv2d and isinstance(net.features[1], nn.BatchNorm2d)

    class Branchy(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if float(x.sum()) > 1e9:  # data-dependent control flow: torch.fx cannot trace it
                return x
            return super().forward(x)

    torch.manual_seed(0)
    b = sq.prepare_qat(Branchy().eval(), _recipe())
    assert isinstance(b.features[0], QATConvBn2d)  # neighbours in a Sequential
    assert type(b.conv2) is QATConv2d and isinstance(b.bn2, nn.BatchNorm2d)  # not provably a pair


def test_folded_eval_matches_the_float_model_before_quantization_error() -> None:
    """In eval mode the folded conv computes conv(x, fq(W*gamma/std)) + folded bias; with 8-bit grids that is the
    float model up to the quantization error."""
    net = _net()
    x, _ = _data()
    with torch.no_grad():
        ref = net(x)
    sq.prepare_qat(net, _recipe(), calib_data=[x[:32], x[32:]])
    with torch.no_grad():
        out = net(x)
    assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())  # observed ~0.01


@pytest.mark.parametrize("ranges", ["observer", "lsq", "lsq+"])
@pytest.mark.parametrize(("weight", "inp"), [(W8, A8), (W4, A8), (QuantSpec("int4", "per_group", 8), A4)],
                         ids=["w8a8", "w4a8", "w4g8a4"])
def test_train_convert_keeps_the_fake_quantized_outputs(ranges: str, weight: QuantSpec, inp: QuantSpec) -> None:
    if ranges == "lsq+":
        weight = QuantSpec(weight.qtype.replace("int", "uint") if weight.qtype.startswith("int") else weight.qtype,
                           weight.granularity, weight.group_size, symmetric=False)  # fmt: skip
    net = sq.prepare_qat(_net(), _recipe(weight, inp, ranges=ranges))
    losses = _train(net, steps=6)
    assert all(torch.isfinite(torch.tensor(losses)))
    x, _ = _data(32, seed=1)
    net.eval()
    with torch.no_grad():
        fake = net(x)
    result = sq.convert(net)
    assert isinstance(result, sq.QuantizationResult) and result.model is net
    kinds = {type(m) for m in net.modules()}
    assert not kinds & {QATLinear, QATConv2d, QATConvBn2d}
    expect_linear = QLinearW8A8 if weight == W8 and inp == A8 else QLinearInputQuant
    assert isinstance(net.fc1, expect_linear) and isinstance(net.features[0], QConv2dInputQuant)
    with torch.no_grad():
        real = net(x)
    # float32 rounding only (the folded bias, summation order; int32 bias units in the W8A8 linears)
    torch.testing.assert_close(real, fake, rtol=1e-4, atol=1e-4 * float(fake.abs().max()))
    assert {r.algorithm for r in result.report.layers} == {"qat"} and len(result.report.layers) == 4


def test_lsq_gradients_are_lsqs() -> None:
    """d out / d s: round(v) - v inside the grid, the clamped level outside; x straight through inside only."""
    x = torch.tensor([0.26, -0.74, 5.0, -9.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    out = learned_fake_quantize(x, s, None, -8.0, 7.0)
    assert torch.equal(out.detach(), torch.tensor([0.5, -0.5, 3.5, -4.0]))
    out.sum().backward()
    v = torch.tensor([0.52, -1.48])
    expect_s = float((torch.round(v) - v).sum()) + 7.0 - 8.0
    assert abs(float(s.grad) - expect_s) < 1e-5
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    z = torch.tensor(1.3, requires_grad=True)
    s2 = torch.tensor(0.5, requires_grad=True)
    out = learned_fake_quantize(torch.tensor([0.26, 9.0]), s2, z, 0.0, 15.0)
    assert torch.equal(out.detach(), torch.tensor([0.5, 7.0]))  # zero point rounded to 1: 15 - 1 = 14 steps up
    out.sum().backward()
    assert float(z.grad) == -0.5  # clamped element: -s; inside: 0


def test_observer_ranges_move_then_freeze() -> None:
    net = sq.prepare_qat(_net(), _recipe(freeze_observers_after=3, freeze_bn_after=4))
    q: FakeQuantizer = net.fc1.input_quant
    _train(net, steps=3)
    r3 = (q.rmin.clone(), q.rmax.clone())
    assert bool(q.observing) and not bool(net.conv2.bn_frozen)
    _train(net, steps=2)
    assert not bool(q.observing) and bool(net.conv2.bn_frozen)
    r5 = (q.rmin.clone(), q.rmax.clone())
    _train(net, steps=2)
    assert torch.equal(q.rmin, r5[0]) and torch.equal(q.rmax, r5[1]) and not torch.equal(r3[1], torch.zeros(1))
    mean = net.conv2.bn.running_mean.clone()
    _train(net, steps=1)
    assert torch.equal(net.conv2.bn.running_mean, mean)  # frozen BN statistics
    net2 = sq.prepare_qat(_net(), _recipe())
    assert freeze_bn(net2) == 2 and freeze_observers(net2) == 8  # 4 weight + 4 input quantizers


def test_save_load_deploy_checkpoint(tmp_path) -> None:  # noqa: ANN001
    net = sq.prepare_qat(_net(), _recipe(W4, A8, ranges="lsq"))
    _train(net, steps=4)
    result = sq.convert(net)
    x, _ = _data(16, seed=2)
    with torch.no_grad():
        out = net(x)
    sq.save(result, tmp_path / "q")
    skeleton = Net()  # the original architecture: its BNs are swapped out as the manifest records
    loaded = sq.load(tmp_path / "q", model=skeleton).model
    assert isinstance(loaded.bn2, nn.Identity) and isinstance(loaded.conv2, QConv2dInputQuant)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_weight_only_and_dynamic_inputs_convert_to_the_ptq_modules() -> None:
    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(F.relu(self.a(x)))

    torch.manual_seed(0)
    m = sq.prepare_qat(Mlp(), _recipe(QuantSpec("int4", "per_group", 8), None, cnn=False))
    _train_mlp = torch.optim.Adam(m.parameters(), 1e-2)
    x = torch.randn(8, 16)
    m(x).sum().backward()
    _train_mlp.step()
    res = sq.convert(m)
    assert type(m.a) is QLinear and res.recipe.input is None
    torch.manual_seed(0)
    d = sq.prepare_qat(Mlp(), _recipe(W8, A8_DYN))
    with torch.no_grad():
        fake = d(x)
    sq.convert(d)
    assert isinstance(d.a, QLinearW8A8) and d.a.input_spec.dynamic
    torch.testing.assert_close(d(x), fake, rtol=1e-4, atol=1e-5)


def test_recipe_from_flags_builds_the_qat_recipe() -> None:
    r = Recipe.from_flags("--w_bit 4 --a_bit 8")
    assert r.weight_step.TYPE == "qat" and r.input is not None and r.input.qtype == "int8"
    assert r.weight.granularity is Granularity.PER_CHANNEL  # msModelSlim's per-tensor default is post-training W8A8's
    assert Recipe.from_flags("--w_bit 4 --a_bit 4").input.qtype == "int4"
    r8 = Recipe.from_flags("--w_bit 8 --a_bit 8 --w_method qat --mm_tensor False")
    assert r8.weight_step.TYPE == "qat"
    net = sq.prepare_qat(_net(), r)
    assert isinstance(net.fc1, QATLinear) and net.fc1.input_quant is not None
    assert isinstance(net.fc2, nn.Linear)  # disable_last_linear (the flags' default)
    with pytest.raises(SlimquantError, match="weight step is qat"):
        sq.quantize(_net(), r, calib_data=[torch.randn(2, 1, 8, 8)], show_progress=False)
    with pytest.raises(SlimquantError, match="--w_method qat"):
        Recipe.from_flags("--w_bit 4 --a_bit 8 --w_method gptq")
    # the recipe round-trips with its QAT step
    assert Recipe.from_json(r.to_json()) == r


def test_bad_input() -> None:
    with pytest.raises(SlimquantError, match="no Linear / Conv2d layer"):
        sq.prepare_qat(nn.Sequential(nn.ReLU()), _recipe())
    net = sq.prepare_qat(_net(), _recipe())
    with pytest.raises(SlimquantError, match="already a QATConvBn2d"):
        sq.prepare_qat(net, _recipe())
    with pytest.raises(SlimquantError, match="has not been observed"):
        net.eval()(torch.randn(2, 1, 8, 8))
    with pytest.raises(SlimquantError, match="no fake-quantized layer"):
        sq.convert(_net())
    _train(net, steps=2)
    sq.convert(net)
    with pytest.raises(SlimquantError, match="cannot be trained further"):
        _train(net, steps=1)
    with pytest.raises(SlimquantError, match="ranges 'lsq\\+' learn zero points"):
        _recipe(W8, A8, ranges="lsq+")
    with pytest.raises(SlimquantError, match="unknown ranges"):
        sq.QAT(ranges="ema")
    with pytest.raises(SlimquantError, match="dynamic per-token"):
        sq.prepare_qat(_net(), Recipe(weight=W8, input=A8_DYN, steps=(sq.QAT(),), disable_last_linear=False))
    x = torch.full((2, 1, 8, 8), float("nan"))
    untouched = _net()
    with pytest.raises(SlimquantError, match="layer conv2: in_features 72 is not divisible by group_size 32"):
        sq.prepare_qat(untouched, Recipe(weight=QuantSpec("int4", "per_group", 32), steps=(sq.QAT(),),
                                         overrides=(("features.0", LayerOverride(weight=W4)),)))  # fmt: skip
    assert type(untouched.features[0]) is nn.Conv2d and type(untouched.features[1]) is nn.BatchNorm2d  # nothing swapped
    with pytest.raises(SlimquantError, match="NaN or inf"):
        sq.prepare_qat(_net(), _recipe(), calib_data=[x])


@pytest.mark.parametrize("binary", [False, True], ids=["w2", "w1"])
def test_slb_learns_levels_and_converts_to_them(binary: bool) -> None:
    from slimquant.nn.qat import SLBWeightQuantizer

    w2 = QuantSpec("int2", "per_channel")
    step = dict(ranges="slb", fold_bn=False, slb_binary=binary, slb_temperature=(1.0, 0.05), slb_anneal_steps=6)
    net = sq.prepare_qat(_net(), _recipe(w2, A8, **step))
    q = net.conv2.weight_quant
    assert isinstance(q, SLBWeightQuantizer) and isinstance(net.bn2, nn.BatchNorm2d)  # BN not folded
    assert q.logits.shape == (16, 72, 2 if binary else 4)
    t0 = q.temperature()
    losses = _train(net, steps=8)
    assert all(torch.isfinite(torch.tensor(losses))) and q.temperature() < t0 and abs(q.temperature() - 0.05) < 1e-6
    net.eval()
    x, _ = _data(16, seed=3)
    with torch.no_grad():
        fake = net(x)
    result = sq.convert(net)
    levels = net.conv2.quantized_weight().q.unique().tolist()
    assert set(levels) <= ({-1, 1} if binary else {-2, -1, 0, 1})
    with torch.no_grad():
        torch.testing.assert_close(net(x), fake, rtol=1e-4, atol=1e-4 * float(fake.abs().max()))
    assert result.report.layers[0].details["ranges"] == "slb"


def test_slb_bad_knobs() -> None:
    with pytest.raises(SlimquantError, match="fold_bn=False"):
        sq.QAT(ranges="slb")
    with pytest.raises(SlimquantError, match="slb_\\* knobs tune ranges='slb'"):
        sq.QAT(slb_binary=True)
    with pytest.raises(SlimquantError, match="search signed symmetric int2-int4"):
        _recipe(W8, A8, ranges="slb", fold_bn=False)
    with pytest.raises(SlimquantError, match="two positive numbers"):
        sq.QAT(ranges="slb", fold_bn=False, slb_temperature=(1.0, 0.0))
    r = _recipe(QuantSpec("int2", "per_channel"), A8, ranges="slb", fold_bn=False, slb_temperature=(2.0, 0.1))
    assert Recipe.from_json(r.to_json()) == r


def test_llm_qat_exports_like_post_training_quantization(llama, tokenizer, tmp_path) -> None:  # noqa: ANN001
    """A tiny Llama trained W4A16 (g32, LSQ) converts to the same QLinear modules PTQ makes: its msmodelslim and
    compressed-tensors checkpoints load back with the converted model's logits."""
    recipe = Recipe(weight=QuantSpec("int4", "per_group", 32, symmetric=False), steps=(sq.QAT(ranges="lsq"),))
    model = sq.prepare_qat(llama, recipe)
    assert isinstance(model.model.layers[0].mlp.down_proj, QATLinear) and isinstance(model.lm_head, nn.Linear)
    ids = torch.randint(0, llama.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    result = sq.convert(model)
    assert type(model.model.layers[0].self_attn.q_proj) is QLinear
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    for fmt in ("msmodelslim", "compressed-tensors"):
        sq.save(result, tmp_path / fmt, format=fmt, tokenizer=tokenizer)
        with torch.no_grad():
            torch.testing.assert_close(sq.load(tmp_path / fmt).model(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
    q4_0 = QuantSpec("int4", "per_group", 32, gguf="Q4_0")
    with pytest.raises(SlimquantError, match="learned QAT ranges leave the Q4_0 grid"):
        sq.prepare_qat(nn.Sequential(nn.Linear(64, 8)), Recipe(weight=q4_0, steps=(sq.QAT(ranges="lsq"),),
                                                               disable_last_linear=False))  # fmt: skip
    observed = sq.prepare_qat(nn.Sequential(nn.Linear(64, 8)), Recipe(weight=q4_0, steps=(sq.QAT(),),
                                                                      disable_last_linear=False))  # fmt: skip
    assert sq.convert(observed).model[0].spec.gguf == "Q4_0"  # observer ranges stay on the GGUF grid


def test_w4a8_llama_reloads_with_its_input_quantization(llama, tokenizer, tmp_path) -> None:  # noqa: ANN001
    """Loading fuses 4-bit gated MLPs for inference; an MLP whose gate / up also quantize their input (W4A8) must
    stay unfused, or the input quantization would be skipped."""
    from slimquant.nn.fused import FusedW4A16GatedMLP

    ids = torch.randint(0, llama.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    recipe = Recipe(weight=QuantSpec("int4", "per_group", 32), input=A8, steps=(sq.QAT(),))
    model = sq.prepare_qat(llama, recipe, calib_data=ids, show_progress=False)
    result = sq.convert(model)
    assert type(model.model.layers[0].mlp.gate_proj) is QLinearInputQuant
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    for fmt in ("msmodelslim", "transformers"):
        sq.save(result, tmp_path / fmt, format=fmt, tokenizer=tokenizer)
        loaded = sq.load(tmp_path / fmt).model
        assert not any(isinstance(m, FusedW4A16GatedMLP) for m in loaded.modules())
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, ref)
    with pytest.raises(SlimquantError, match="int4 g32 sym layer with int8 per-tensor asym inputs"):
        sq.save(result, tmp_path / "ct", format="compressed-tensors", tokenizer=tokenizer)
    with pytest.raises(sq.NotSupportedYet, match="activation quantization is not expressible"):
        sq.save(result, tmp_path / "gguf", format="gguf", tokenizer=tokenizer)
    assert not (tmp_path / "ct").exists() and not (tmp_path / "gguf").exists()  # refused before anything is written


def test_review_edge_cases() -> None:
    # LSQ's gradient scale reaches the step size
    x = torch.tensor([0.26, -0.74, 5.0])
    grads = []
    for factor in (1.0, 0.25):
        s = torch.tensor(0.5, requires_grad=True)
        learned_fake_quantize(x, s, None, -8.0, 7.0, factor).sum().backward()
        grads.append(float(s.grad))
    assert abs(grads[1] - 0.25 * grads[0]) < 1e-6
    # half-precision models are refused, naming the layer
    with pytest.raises(sq.NotSupportedYet, match="layer features.0: QAT trains float32 weights"):
        sq.prepare_qat(_net().half(), _recipe())
    # lsq+ with dynamic (symmetric) inputs: the learned zero points are the weights'
    uw = QuantSpec("uint4", "per_channel", symmetric=False)
    sq.prepare_qat(nn.Sequential(nn.Linear(16, 8)), Recipe(weight=uw, input=A8_DYN, steps=(sq.QAT(ranges="lsq+"),),
                                                           disable_last_linear=False))  # fmt: skip
    # a BN with gamma == 0 (zero-initialised residual branches) trains without NaN
    net = _net()
    with torch.no_grad():
        net.bn2.weight[:4] = 0.0
    sq.prepare_qat(net, _recipe())
    assert all(torch.isfinite(torch.tensor(_train(net, steps=2))))
    # errors raised while training name the layer
    fresh = sq.prepare_qat(_net(), _recipe())
    with pytest.raises(SlimquantError, match="layer features.0"):
        fresh.eval()(torch.randn(2, 1, 8, 8))
