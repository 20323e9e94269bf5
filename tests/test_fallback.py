"""Automatic fallback (recipe.disable_level / --disable_level L<n>): the most sensitive Linear layers stay float."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimquant as sq
from slimquant.errors import SlimquantError
from slimquant.nn.modules import QModule
from slimquant.pipeline.convert import LayerPlan, convert
from slimquant.search import fallback as fb
from slimquant.search import sensitivity as sens
from slimquant.search.sensitivity import layer_sensitivity


def _calib(vocab: int, n: int = 6, length: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(2))


def _float_linears(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"}


def test_recipe_field_and_flags():
    assert sq.Recipe.from_dict({k: v for k, v in sq.Recipe().to_dict().items() if k != "disable_level"}) == sq.Recipe()
    r = sq.Recipe(disable_level=3)
    assert r.to_dict()["disable_level"] == 3 and sq.Recipe.from_dict(r.to_dict()) == r
    assert r.needs_calibration and not sq.Recipe().needs_calibration
    for bad in (-1, True, 1.5):
        with pytest.raises(SlimquantError, match="disable_level must be a non-negative integer"):
            sq.Recipe(disable_level=bad)
    assert sq.Recipe.from_flags("--w_bit 4 --disable_level L2").disable_level == 2
    assert sq.Recipe.from_flags("--disable_level l12").disable_level == 12  # any L<n>, as msModelSlim's L1-L5
    assert sq.Recipe.from_flags("--disable_level L0") == sq.Recipe.from_flags("")


def test_the_most_sensitive_layers_stay_float(tokenizer):
    from conftest import make_llama

    calib = _calib(len(tokenizer))
    model = make_llama(len(tokenizer), layers=3)
    recipe = sq.Recipe(weight=sq.QuantSpec("int4", "per_group", 32, True), disable_level=3)
    expected = layer_sensitivity(model, fb.without_model_steps(recipe), calib[: fb.FALLBACK_ITEMS],
                                 metrics=("ablation",), show_progress=False).most_sensitive(3)  # fmt: skip
    result = sq.quantize(model, recipe, calib_data=calib, show_progress=False)
    assert _float_linears(model) == set(expected)
    skipped = result.report.skipped
    for i, name in enumerate(expected, 1):
        assert skipped[name].startswith(f"disable_level L3: sensitivity rank {i} of 21 (ablation, kl ")
    assert len(result.report.layers) == 21 - 3


def test_smoothed_w8a8_static_equals_level_0_with_those_layers_float(tokenizer):
    from conftest import make_llama

    calib = _calib(len(tokenizer))
    flags = "--w_bit 8 --a_bit 8 --anti_method m1 --mm_tensor False"
    ref = sq.quantize(make_llama(len(tokenizer)), sq.Recipe.from_flags(flags), calib_data=calib, show_progress=False)
    model = make_llama(len(tokenizer))
    res = sq.quantize(model, sq.Recipe.from_flags(flags + " --disable_level L2"), calib_data=calib, show_progress=False)
    kept = _float_linears(model)
    assert len(kept) == 2
    assert len(res.report.steps) == len(ref.report.steps)  # smoothing ran once, as at L0
    ref_mods = dict(ref.model.named_modules())
    for name, m in model.named_modules():
        if isinstance(m, QModule):
            r = ref_mods[name]
            assert torch.equal(m.weight, r.weight) and torch.equal(m.acc_scale, r.acc_scale), name
            assert torch.equal(m.input_scale, r.input_scale), name
    for name in kept:  # the float layer holds the smoothed float weight (L0 quantized exactly that weight)
        w, r = model.get_submodule(name).weight, ref_mods[name]
        assert torch.allclose(r.dequantized_weight(torch.float32), w, atol=float(r.weight_scale_vector().max()))


def test_gptq_with_fallback_and_a_given_sensitivity(llama, tokenizer, monkeypatch):
    from conftest import make_llama

    calib = _calib(len(tokenizer))
    recipe = sq.Recipe(weight=sq.QuantSpec("int4", "per_group", 32, True), steps=(sq.GPTQ(),), disable_level=2)
    given = layer_sensitivity(make_llama(len(tokenizer)), fb.without_model_steps(recipe), calib,
                              metrics=("fisher",), show_progress=False)  # fmt: skip
    monkeypatch.setattr(fb, "layer_sensitivity", lambda *a, **k: pytest.fail("measured although given"))
    # a sensitivity without the exact ablation ranks by its first metric, and says so
    res = sq.quantize(llama, recipe, calib_data=calib, show_progress=False, sensitivity=given)
    assert _float_linears(llama) == set(given.most_sensitive(2, "fisher"))
    assert all("(fisher, kl " in why for why in res.report.skipped.values() if why.startswith("disable_level"))
    assert all(r.algorithm == "gptq" for r in res.report.layers)
    other = make_llama(len(tokenizer))
    with pytest.raises(SlimquantError, match="metric 'ablation' was not measured"):
        convert(other, recipe, calib_data=calib, show_progress=False,
                fallback=fb.fallback_chooser(recipe, sensitivity=given, metric="ablation"))
    partial = layer_sensitivity(make_llama(len(tokenizer)), fb.without_model_steps(recipe), calib, metrics=("weight_error",),
                                layers=["model.layers.0.mlp.up_proj"], show_progress=False)  # fmt: skip
    with pytest.raises(SlimquantError, match="has no weight_error score for layer model.layers.0.self_attn.q_proj"):
        fb.fallback_chooser(recipe, sensitivity=partial, metric="weight_error")(
            llama, [LayerPlan("model.layers.0.self_attn.q_proj", "linear", recipe.weight)], calib)


def test_bad_input(llama, tokenizer):
    recipe = sq.Recipe(weight=sq.QuantSpec("int4", "per_group", 32, True), disable_level=1)
    with pytest.raises(SlimquantError, match="disable_level L1 ranks the layers on calibration data"):
        sq.quantize(llama, recipe)
    with pytest.raises(SlimquantError, match="sensitivity= ranks layers for recipe.disable_level, which is 0"):
        sq.quantize(llama, sq.Recipe(), sensitivity=object())
    from slimquant.pipeline.convert import quantized

    with pytest.raises(SlimquantError, match="needs a fallback chooser"):
        convert(llama, recipe, calib_data=_calib(len(tokenizer)))
    with pytest.raises(SlimquantError, match="leave them out of layers= instead"):
        with quantized(llama, recipe):
            pass
    assert not any(isinstance(m, QModule) for m in llama.modules())


def test_cli_quantize_with_disable_level_and_inspect(llama_dir, tmp_path, capsys, monkeypatch):
    from slimquant.cli.main import main

    monkeypatch.setenv("SLIMQUANT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "q"

    def argv(target, level, *more):
        return ["quantize", "--model_path", str(llama_dir), "--save_directory", str(target), "--w_bit", "4",
                "--group_size", "32", "--disable_level", level, "--calib_size", "4", "--calib_seq_len", "16", *more]  # fmt: skip

    assert main(argv(out, "L2")) == 0
    text = capsys.readouterr().out
    assert text.count("(disable_level L2: sensitivity rank ") == 2
    assert len(list((tmp_path / "cache" / "sensitivity").glob("*.json"))) == 1
    assert main(["inspect", str(out)]) == 0
    assert capsys.readouterr().out.count("disable_level L2: sensitivity rank") == 2
    loaded = sq.load(out)
    assert len(_float_linears(loaded.model)) == 2
    # another level on the same model and data reuses the cached ranking
    calls = []
    real = sens._measure
    monkeypatch.setattr(sens, "_measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(argv(tmp_path / "q3", "L3")) == 0
    assert calls == [] and "rank 3 of" in capsys.readouterr().out
    assert main(argv(tmp_path / "s", "L1", "--stream", "True")) == 1
    assert "--disable_level with --stream is not supported yet" in capsys.readouterr().err
