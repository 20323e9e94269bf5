"""The search space's assembled configurations (slimquant.search.space) and Pareto fronts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimquant as sq
from slimquant.errors import SlimquantError
from slimquant.nn.modules import QModule
from slimquant.search.pareto import dominates, pareto_front
from slimquant.search.space import FLOAT, Assembly, Option, bit_options


def test_bit_options_follow_the_seed_candidates():
    opts = bit_options([4, 8, 16], group_size=32)
    assert [o.label for o in opts] == ["w4g32", "w8", FLOAT]
    assert opts[0].weight == sq.QuantSpec("int4", "per_group", 32, True) and opts[2].is_float
    assert [o.label for o in bit_options([8, 32])] == ["w8", FLOAT]
    assert [o.label for o in bit_options([5, 6], group_size=64)] == ["w5g64", "w6g64"]
    with pytest.raises(SlimquantError, match="bit candidate 7: valid are 2, 3, 4, 5, 6, 8 and 16 / 32"):
        bit_options([7])
    with pytest.raises(SlimquantError, match="bit candidate 32 is given twice"):
        bit_options([16, 32])


def test_an_assembled_configuration_equals_quantizing_it(llama, tokenizer):
    from conftest import make_llama

    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    space = Assembly(llama, bit_options([4, 8, 16], group_size=32), show_progress=False)
    names = [lp.name for lp in space.layers]
    choice = {n: ["w4g32", "w8", FLOAT][i % 3] for i, n in enumerate(names)}
    with torch.no_grad():
        before = llama(input_ids=ids).logits
        with space.configured(choice) as m:
            mixed = m(input_ids=ids).logits
            assert sum(isinstance(x, QModule) for x in m.modules()) == sum(v != FLOAT for v in choice.values())
        assert torch.equal(llama(input_ids=ids).logits, before)  # the float modules are back
    assert not any(isinstance(x, QModule) for x in llama.modules())
    # the same configuration quantized for real, from its recipe
    ref = make_llama(len(tokenizer))
    result = sq.quantize(ref, space.recipe(choice), show_progress=False)
    with torch.no_grad():
        assert torch.equal(result.model(input_ids=ids).logits, mixed)
    assert {r.name for r in result.report.layers} == {n for n, v in choice.items() if v != FLOAT}


def test_int5_and_int6_layers_save_and_load_bit_identical(llama, tokenizer, tmp_path):
    from conftest import make_llama

    ids = torch.randint(0, len(tokenizer), (1, 16), generator=torch.Generator().manual_seed(0))
    space = Assembly(llama, bit_options([5, 6, 4], group_size=32), show_progress=False)
    names = [lp.name for lp in space.layers]
    choice = {n: ["w5g32", "w6g32", "w4g32"][i % 3] for i, n in enumerate(names)}
    result = sq.quantize(make_llama(len(tokenizer)), space.recipe(choice), show_progress=False)
    sizes = {lab: space.layer_bytes(names[0], lab) for lab in ("w5g32", "w6g32", "w4g32")}
    assert sizes["w4g32"] < sizes["w5g32"] < sizes["w6g32"]  # packed at their width
    sq.save(result, tmp_path / "q")
    back = sq.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(back.model(input_ids=ids).logits, result.model(input_ids=ids).logits)


def test_sizes_and_ratio(mlp):
    space = Assembly(mlp, bit_options([4, 8, 32]), base=sq.Recipe(disable_last_linear=False), show_progress=False)
    w4, w8, fl = (space.uniform(x) for x in ("w4", "w8", FLOAT))
    assert space.bytes(fl) == space.float_bytes() == sum(p.numel() * 4 for p in mlp.parameters())
    # int4 weights packed (half a byte), float32 per-channel scales and biases
    n_w = sum(m.weight.numel() for m in mlp if isinstance(m, nn.Linear))
    n_out = sum(m.out_features for m in mlp if isinstance(m, nn.Linear))
    assert space.bytes(w4) == n_w // 2 + n_out * 4 + n_out * 4
    assert space.bytes(w8) == n_w + n_out * 4 + n_out * 4
    assert space.compress_ratio(fl) == 1.0 and 6.5 < space.compress_ratio(w4) < 7.0  # observed 6.80: scales, biases fp32


def test_gptq_options_come_from_whole_model_runs(llama, tokenizer):
    calib = torch.randint(0, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(1))
    base = sq.Recipe(steps=(sq.GPTQ(),))
    space = Assembly(llama, bit_options([4, 16], group_size=32), base=base, calib_data=calib, show_progress=False)
    assert space.approximate
    uniform = space.uniform("w4g32")
    from conftest import make_llama

    ref = sq.quantize(make_llama(len(tokenizer)), sq.Recipe(weight=sq.QuantSpec("int4", "per_group", 32, True),
                                                            steps=(sq.GPTQ(),)), calib_data=calib, show_progress=False)  # fmt: skip
    with torch.no_grad(), space.configured(uniform) as m:
        mine, theirs = m.state_dict(), ref.model.state_dict()
        assert list(mine) == list(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
        # quantize() fused ref's 4-bit gated MLPs (slimquant.nn.fused): float32 rounding apart
        a, b = m(input_ids=calib).logits, ref.model(input_ids=calib).logits
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    with pytest.raises(SlimquantError, match="needs calib_data"):
        Assembly(llama, bit_options([4], group_size=32), base=base, show_progress=False)


def test_bad_configurations(mlp):
    space = Assembly(mlp, [Option("w8", sq.QuantSpec("int8", "per_channel")), Option(FLOAT, None)], show_progress=False)
    with pytest.raises(SlimquantError, match="the configuration gives no option for layer 2"):
        space.check({"0": "w8"})
    with pytest.raises(SlimquantError, match="layer 9 is not in the search space"):
        space.check({"9": "w8"})
    with pytest.raises(SlimquantError, match="layer 0: unknown option 'w3'; valid: w8, float"):
        space.check({"0": "w3", "2": "w8"})
    with pytest.raises(SlimquantError, match="layer 4 is not a Linear / Conv2d layer the base recipe quantizes"):
        Assembly(mlp, [Option(FLOAT, None)], layers=["4"])  # the last linear stays float by default
    with pytest.raises(SlimquantError, match="option labels must be unique"):
        Assembly(mlp, [Option("a", None), Option("a", None)])
    with pytest.raises(SlimquantError, match="base recipe may hold a weight step only"):
        Assembly(mlp, [Option(FLOAT, None)], base=sq.Recipe.from_flags("--w_bit 8 --a_bit 8 --anti_method m1"))


def test_pareto_front():
    pts = [{"acc": 0.9, "size": 10}, {"acc": 0.8, "size": 5}, {"acc": 0.85, "size": 12}, {"acc": 0.9, "size": 10},
           {"acc": float("nan"), "size": 1}, {"acc": 0.7, "size": 5}]  # fmt: skip
    up = {"acc": True, "size": False}
    assert pareto_front(pts, up) == [0, 1, 3]  # 2: worse than 0 in both; 5: same size as 1, less accurate
    assert dominates(pts[0], pts[2], up) and not dominates(pts[0], pts[3], up)
    with pytest.raises(ValueError):
        pareto_front(pts, {})
