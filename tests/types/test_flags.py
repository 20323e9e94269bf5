"""Recipe.from_flags: the recipe the command line builds from the same flags, through the one mapping."""

from __future__ import annotations

import shlex

import pytest

from slimquant import Granularity, QuantSpec, Recipe
from slimquant.cli.main import build_parser
from slimquant.cli.quantize_cmd import recipe_from_args
from slimquant.errors import NotSupportedYet, SlimquantError
from slimquant.types.flags import flag_default, flag_names
from slimquant.types.steps import AWQ, GPTQ, RTN, OutlierSuppression, SmoothQuant, SmoothQuantSearch

FLAG_SETS = [
    "",
    "--w_bit 4 --group_size 64 --w_method gptq",
    "--w_bit 4 --a_bit 16 --group_size 64 --w_sym False --w_zero_point float --w_clip_search True",
    "--w_bit 8 --disable_names lm_head model.layers.0.* re:.*down_proj",
    "--w_bit 8 --a_bit 8 --is_dynamic True --anti_method m1 --mm_tensor False",
    "--w_bit 8 --a_bit 8 --act_method 3 --anti_method m4 --mm_tensor False",
    "--w_bit 4 --group_size 64 --w_sym False --w_zero_point float --w_method gptq --desc_act True --percdamp 0.05",
    "--w_bit 3 --group_size 64 --w_sym False --w_zero_point float --anti_method m3",
    "--w_bit 8 --a_bit 8 --is_dynamic True --anti_method m4 --mm_tensor False --use_kvcache_quant True --use_fa_quant True",
    "--w_bit 8 --a_bit 8 --anti_method m2 --use_sigma True --sigma_factor 2.5",
    "--w_bit 8 --a_bit 8 --do_smooth True --smooth_alpha 0.7 --embedding_bit 8 --disable_last_linear False",
    "--use_kvcache_quant True --kv_dynamic True --w_bit 2 --group_size 32",
    "--use_fa_quant True --fa_amp 2 --w_bit 8 --a_bit 8 --is_dynamic true",
]


def _cli_recipe(flags: str) -> Recipe:
    args = build_parser().parse_args(["quantize", "--save_directory", "unused", *shlex.split(flags)])
    return recipe_from_args(args)


@pytest.mark.parametrize("flags", FLAG_SETS)
def test_from_flags_is_what_the_command_line_builds(flags):
    recipe = Recipe.from_flags(flags)
    assert recipe == _cli_recipe(flags)
    assert Recipe.from_flags(shlex.split(flags)) == recipe  # a list works too
    assert Recipe.from_json(recipe.to_json()) == recipe


def test_from_flags_values():
    r = Recipe.from_flags("--w_bit 4 --group_size 64 --w_method gptq --desc_act True")
    assert r.weight == QuantSpec("int4", Granularity.PER_GROUP, 64, True) and r.algorithm == "gptq"
    assert r.steps == (GPTQ(act_order=True),) and r.input is None
    # the bare command gets the robust GPTQ (act-order, static groups); --desc_act False keeps static groups
    assert Recipe.from_flags("--w_bit 4 --group_size 64 --w_method gptq").steps == (GPTQ(act_order=True, static_groups=True),)
    assert Recipe.from_flags("--w_bit 4 --w_method gptq --desc_act False").steps == (GPTQ(act_order=False, static_groups=True),)
    w8a8 = Recipe.from_flags("--w_bit 8 --a_bit 8 --is_dynamic True --mm_tensor False --anti_method m1")
    assert w8a8.input == QuantSpec("int8", Granularity.PER_TOKEN, None, True, dynamic=True)
    assert w8a8.weight.granularity is Granularity.PER_CHANNEL and w8a8.steps == (SmoothQuant(alpha=0.5), RTN())
    # msModelSlim's anti_method codes exist only in the flag mapping
    assert [Recipe.from_flags(f"--w_bit 8 --a_bit 8 --anti_method {m}").steps[0] for m in ("m1", "m2", "m4")] == [
        SmoothQuant(), OutlierSuppression(), SmoothQuantSearch()]
    assert Recipe.from_flags("--w_bit 4 --anti_method m3 --w_method gptq").steps == (AWQ(), GPTQ())


def test_from_flags_takes_parsed_values_by_name():
    assert Recipe.from_flags({"w_bit": 4, "group_size": 32}) == Recipe.from_flags("--w_bit 4 --group_size 32")
    with pytest.raises(SlimquantError, match=r"unknown recipe flag\(s\) \['save_directory'\]"):
        Recipe.from_flags({"save_directory": "x"})


@pytest.mark.parametrize("flags, exc, words", [
    ("--w_bit 5", SlimquantError, "--w_bit: invalid choice: 5"),
    ("--save_directory out", SlimquantError, "unrecognized arguments: --save_directory out"),
    ("--w_sym maybe", SlimquantError, "expected a boolean"),
    ("--sigma_factor inf --use_sigma True --a_bit 8", SlimquantError, "positive finite"),
    ("--group_size 96 --w_bit 4", SlimquantError, "--group_size 96: valid values are 32, 64, 128, 256"),
    ("--w_zero_point float", SlimquantError, "add --w_sym False"),
    ("--a_bit 8 --w_bit 4 --w_method gptq", SlimquantError, "--a_bit 8 needs symmetric 8-bit weights"),
    ("--a_bit 4 --is_dynamic True", SlimquantError, "--is_dynamic quantizes inputs to int8 per token"),
    ("--a_bit 8 --w_bit 4 --act_method 2", SlimquantError, "QAT observes or learns them"),
    ("--a_bit 8 --w_bit 4 --w_clip_search True", SlimquantError, "QAT (--w_method qat) trains the ranges"),
    ("--use_reduce_quant True", NotSupportedYet, "--use_reduce_quant True: lccl reduce quantization is not supported yet"),
    ("--disable_level 2", SlimquantError, "expected L<n> (L0 none, L1 .. L5 or any L<n>"),
    ("--disable_level L-1", SlimquantError, "expected L<n>"),
    ("--anti_method m5 --a_bit 8 --w_method gptq", SlimquantError, "--anti_method m5 (CBQ) solves the weights itself"),
    ("--anti_method m5 --a_bit 8 --w_clip_search True", SlimquantError, "leave --w_clip_search out"),
    ("--anti_method m5 --sparsity 0.5", SlimquantError, "leave --sparsity out"),
    ("--iters 5", SlimquantError, "add --w_method autoround (or --anti_method m5)"),
])  # fmt: skip
def test_bad_flags_name_the_flag(flags, exc, words):
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        Recipe.from_flags(flags)


def test_the_recipe_file_clash_check_uses_the_flag_defaults(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(Recipe().to_json())
    args = build_parser().parse_args(["quantize", "--save_directory", "x", "--recipe", str(path)])
    assert recipe_from_args(args) == Recipe()
    for name in flag_names():  # every flag at its default passes; each default is what the parser gives
        assert getattr(args, name) == flag_default(name)
    args = build_parser().parse_args(["quantize", "--save_directory", "x", "--recipe", str(path), "--w_bit", "4"])
    with pytest.raises(SlimquantError, match="--recipe replaces the weight flags; remove --w_bit"):
        recipe_from_args(args)
