"""Structured pruning: channel tracing through the graph, physical shrinking that keeps what it keeps exactly,
SCOP's knockoff phase and scores, LLM MLP channel pruning, save / reload, and pruning then quantizing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimquant
from slimquant import QuantSpec, Recipe
from slimquant.errors import SlimquantError
from slimquant.nn.knockoff import KnockoffConv2d
from slimquant.surgery.prune import channel_groups, shrink_channels


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.bn1(self.conv1(x)) + self.conv2(x))


def _cnn(seed: int = 0) -> CNN:
    torch.manual_seed(seed)
    m = CNN().eval()
    with torch.no_grad():  # non-trivial BN statistics
        for bn in (m.bn1, m.bn2, m.bn3):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
    return m


X = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_channel_groups_follow_the_graph() -> None:
    groups, refused = channel_groups(_cnn(), X[:2])
    assert set(groups) == {"conv1", "conv2", "conv3"} and not refused
    assert groups["conv1"].bn == "bn1" and groups["conv1"].convs == ["conv2"]
    assert groups["conv2"].convs == ["conv3"] and groups["conv3"].linears == {"fc1": 16}
    _, refused = channel_groups(Residual(), torch.randn(1, 4, 6, 6))
    assert "add" in refused["conv1"] and "grouped" in refused["conv2"] and "output" in refused["head"]


def test_shrinking_dead_channels_changes_nothing() -> None:
    model = _cnn()
    with torch.no_grad():  # channels whose BN output is exactly 0 for every input: removable without a trace
        for bn, dead in ((model.bn1, [1, 4]), (model.bn2, [0, 5, 7]), (model.bn3, [2])):
            bn.weight[dead] = 0.0
            bn.bias[dead] = 0.0
        ref = model(X)
    groups, _ = channel_groups(model, X[:2])
    before = sum(p.numel() for p in model.parameters())
    for name, dead in (("conv1", [1, 4]), ("conv2", [0, 5, 7]), ("conv3", [2])):
        g = groups[name]
        shrink_channels(model, g, torch.tensor([c for c in range(g.channels) if c not in dead]))
    assert model.conv2.in_channels == 4 and model.conv3.weight.shape == (7, 5, 3, 3) and model.fc1.in_features == 7 * 16
    assert sum(p.numel() for p in model.parameters()) < before
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(SlimquantError, match="indices"):
        shrink_channels(model, groups["conv1"], torch.tensor([9]))


def _train_kf(scop: nn.Module, steps: int = 30) -> None:
    torch.manual_seed(1)
    y = torch.randint(0, 10, (16,))
    opt = torch.optim.Adam(scop.kf_parameters(), lr=0.05)
    scop.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(scop(X), y).backward()
        opt.step()


def test_scop_trains_only_the_knockoff_mix_then_prunes_physically(tmp_path) -> None:
    model = _cnn()
    bn_stats = model.bn2.running_mean.clone()
    scop = slimquant.prepare_scop(model, X[:2])
    assert sorted(scop.knockoffs()) == ["conv1", "conv2", "conv3"]
    assert [p for p in scop.parameters() if p.requires_grad] == scop.kf_parameters()
    _train_kf(scop)
    kf = torch.cat([p.detach() for p in scop.kf_parameters()])
    assert not torch.allclose(kf, torch.full_like(kf, 0.5))  # the mixes moved
    assert torch.equal(model.bn2.running_mean, bn_stats)  # BN statistics frozen (real data only)
    scop.eval()
    with torch.no_grad():
        plain = scop(X)  # eval: the plain network
    res = slimquant.prune_scop(scop, 0.5)
    assert res.model is model and not any(isinstance(m, KnockoffConv2d) for m in model.modules())
    assert [r["kept"] for r in res.layers] == [3, 4, 4] and res.params_after < res.params_before
    assert res.params_before == sum(p.numel() for p in _cnn().parameters())
    assert all(p.requires_grad for p in model.parameters())  # ready for fine-tuning
    assert model(X).shape == plain.shape
    # kept = highest |gamma| * (2 kf - 1)
    kept = res.plan["conv"]["conv1"]
    assert len(kept) == 3 and kept == sorted(kept)
    res.save(tmp_path / "pruned")
    with pytest.raises(SlimquantError, match="not empty"):
        res.save(tmp_path / "pruned")
    res.save(tmp_path / "pruned", overwrite=True)  # its own output: replaceable on request
    back = slimquant.load_pruned(tmp_path / "pruned", CNN(), X[:2]).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(X), model.eval()(X), rtol=0, atol=0)


def test_prune_then_quantize_a_cnn_and_reload(tmp_path) -> None:
    scop = slimquant.prepare_scop(_cnn(), X[:2])
    _train_kf(scop, 5)
    res = slimquant.prune_scop(scop, {"conv2": 0.25})
    assert [r["kept"] for r in res.layers if r["name"] == "conv2"] == [6] and res.model.conv1.out_channels == 6
    q = slimquant.quantize(res.model.eval(), Recipe(weight=QuantSpec("int8", "per_channel")), show_progress=False)
    slimquant.save(q, tmp_path / "q")
    skeleton = slimquant.apply_pruning(CNN(), res.plan, X[:2])
    loaded = slimquant.load(tmp_path / "q", model=skeleton)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(X), q.model(X), rtol=0, atol=1e-6)


@pytest.mark.parametrize("rate", [0, 1, 1.0, -0.1, 1.5, True, "0.5", float("nan")])
def test_rates_outside_zero_one_are_refused(rate, llama) -> None:
    scop = slimquant.prepare_scop(_cnn(), X[:2])
    with pytest.raises(SlimquantError, match=r"in \(0, 1\)"):
        slimquant.prune_scop(scop, rate)
    with pytest.raises(SlimquantError, match=r"in \(0, 1\)"):
        slimquant.prune_mlp(llama, torch.randint(0, 30, (2, 8)), rate, show_progress=False)


def test_scop_refusals() -> None:
    with pytest.raises(SlimquantError, match="no convolution SCOP can prune"):
        slimquant.prepare_scop(Residual(), torch.randn(1, 4, 6, 6))
    with pytest.raises(SlimquantError, match="no convolution SCOP can prune"):
        slimquant.prepare_scop(nn.Sequential(nn.Linear(4, 4)), torch.randn(2, 4))
    with pytest.raises(SlimquantError, match="match no convolution"):
        slimquant.prepare_scop(_cnn(), X[:2], layers=["conv9"])
    scop = slimquant.prepare_scop(_cnn(), X[:2], layers=["conv2"])
    assert list(scop.knockoffs()) == ["conv2"] and scop.skipped["conv1"] == "not selected"
    with pytest.raises(SlimquantError, match="not a knockoff layer"):
        slimquant.prune_scop(scop, {"conv1": 0.5})
    with pytest.raises(SlimquantError, match="prepare_scop returned"):
        slimquant.prune_scop(_cnn(), 0.5)
    with pytest.raises(SlimquantError, match="no architecture description"):
        slimquant.prune_mlp(_cnn(), X, 0.5, show_progress=False)


def test_mlp_pruning_removes_the_channels_that_do_nothing_first(llama, tmp_path) -> None:
    model = copy.deepcopy(llama)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, :16] = 0.0  # 16 of 128 channels write nothing
    ids = torch.randint(0, 30, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
    res = slimquant.prune_mlp(model, torch.randint(0, 30, (4, 16)), 16 / 128, show_progress=False)
    assert model.config.intermediate_size == 112 and all(r["kept"] == 112 for r in res.layers)
    assert all(min(k) == 16 for k in res.plan["mlp"].values())  # exactly the idle channels went
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
    # a transformers model still: save_pretrained / from_pretrained, and quantize -> save -> load
    model.save_pretrained(tmp_path / "hf")
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    spec = QuantSpec("int4", "per_group", 16, symmetric=False)
    q = slimquant.quantize(model, Recipe(weight=spec, steps=(slimquant.GPTQ(),)), calib_data=torch.randint(0, 30, (4, 16)),
                           show_progress=False)  # fmt: skip
    slimquant.save(q, tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(slimquant.load(tmp_path / "q").model(ids).logits, q.model(ids).logits, rtol=0, atol=1e-5)


def test_sequential_cnns_with_flatten_modules_and_a_dropout_classifier() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Dropout(0.1), nn.Linear(6 * 16, 10)).eval()  # fmt: skip
    model[1].train()  # a mixed mode survives the tracing
    groups, refused = channel_groups(model, X[:2])
    assert groups["0"].linears == {"6": 16} and groups["0"].bn == "1" and not refused
    assert model[1].training and not model[0].training
    with torch.no_grad():
        model[1].weight[[2, 3]] = 0.0
        model[1].bias[[2, 3]] = 0.0
        model.eval()
        ref = model(X)
    shrink_channels(model, groups["0"], torch.tensor([0, 1, 4, 5]))
    assert model[6].in_features == 4 * 16
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref, rtol=1e-5, atol=1e-6)
    partial = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(1, 2), nn.Flatten(), nn.Linear(4 * 64, 2))
    assert "flattened" in channel_groups(partial, X[:2])[1]["0"]
    with pytest.raises(SlimquantError, match="distinct"):
        shrink_channels(model, groups["0"], torch.tensor([0, 0, 1]))


def test_scop_details(tmp_path, llama, factories) -> None:
    with pytest.raises(SlimquantError, match=r"conv2 cannot be pruned \(no affine"):
        m = _cnn()
        m.bn2 = nn.BatchNorm2d(8, affine=False)
        slimquant.prepare_scop(m, X[:2], layers=["conv2"])
    scop = slimquant.prepare_scop(_cnn(), X[:2])
    scop.train()
    y = torch.randint(0, 10, (16,))
    loss = F.cross_entropy(scop(X), y) + F.cross_entropy(scop(X), y)  # two forwards, then one backward
    loss.backward()
    assert all(p.grad is not None for p in scop.kf_parameters())
    res = slimquant.prune_scop(scop, 0.29)
    assert [r["kept"] for r in res.layers] == [5, 6, 6]  # floor(0.29 * 6) = 1, floor(0.29 * 8) = 2
    assert all(m.training for m in res.model.modules())  # the BNs follow the model's mode again
    with pytest.raises(SlimquantError, match="already pruned"):
        slimquant.prune_scop(scop, 0.5)
    # MLP pruning of a tied-embedding LLM saves and reloads (the tied tensors stored once)
    model = copy.deepcopy(llama)
    pruned = slimquant.prune_mlp(model, torch.randint(0, 30, (2, 16)), 0.5, show_progress=False)
    pruned.save(tmp_path / "mlp")
    fresh = factories["llama"](llama.config.vocab_size, seed=3)
    back = slimquant.load_pruned(tmp_path / "mlp", fresh)
    ids = torch.randint(0, 30, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)
