"""Recipe steps: typed, self-validating, tagged; recipes of version 2 round-trip, version 1 files still load."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest

from slimquant import NotSupportedYet, QuantSpec, Recipe, SlimquantError
from slimquant.types import steps as st
from slimquant.types.steps import AWQ, GPTQ, RTN, GammaMigration, SmoothQuant, SmoothQuantSearch, UnregisteredStep

W4 = QuantSpec("int4", "per_group", 64, symmetric=False)
W8 = QuantSpec("int8", "per_channel")
DYN = QuantSpec("int8", "per_token", dynamic=True)
FP8 = QuantSpec("fp8_e4m3", "per_channel")


def test_each_step_holds_only_its_own_knobs_and_round_trips():
    for step in (RTN(clip_search=True), GPTQ(percdamp=0.05, act_order=True), AWQ(grid=7, clip=False),
                 SmoothQuant(alpha=0.8), SmoothQuantSearch(alphas=(0.2, 0.5)), GammaMigration()):  # fmt: skip
        d = json.loads(json.dumps(step.to_dict()))
        assert d["type"] == step.TYPE and d["stage"] == step.STAGE
        assert st.step_from_dict(d) == step
    assert GPTQ().describe() == "gptq" and GPTQ(act_order=False).describe() == "gptq(act_order=False)"
    assert GPTQ().act_order and GPTQ().static_groups  # the robust defaults (BENCHMARKS.md, "Bare commands")


@pytest.mark.parametrize("make, words", [
    (lambda: GPTQ(percdamp=0.0), "gptq: percdamp must be in (0, 1]"),
    (lambda: GPTQ(act_order="yes"), "gptq: act_order must be true or false"),
    (lambda: AWQ(grid=0), "awq: grid must be a positive integer"),
    (lambda: SmoothQuant(alpha=1.5), "smoothquant: alpha must be in [0, 1]"),
    (lambda: SmoothQuantSearch(alphas=()), "smoothquant_search: alphas must be a non-empty list"),
    (lambda: Recipe(steps=()), "exactly one weight step"),
    (lambda: Recipe(steps=(RTN(), GPTQ())), "exactly one weight step"),
    (lambda: Recipe(weight=W4, steps=(GPTQ(), AWQ())), "end with exactly one weight step"),
    (lambda: Recipe(weight=W8, input=DYN, steps=(AWQ(), SmoothQuant(), RTN())), "stage order model -> block -> weight"),
    (lambda: Recipe(weight=W8, input=DYN, steps=(SmoothQuant(), SmoothQuant(alpha=0.3), RTN())), "listed twice"),
    (lambda: Recipe(weight=None, steps=(GPTQ(),)), "gptq quantizes weights; the recipe has no weight spec"),
    (lambda: Recipe(weight=W8, steps=(SmoothQuant(), RTN())), "it needs an input spec"),
    (lambda: Recipe(weight=W8, steps=(GammaMigration(), RTN())), "it needs an input spec"),
])  # fmt: skip
def test_steps_validate_themselves_and_against_the_recipe(make, words):
    with pytest.raises(SlimquantError) as e:
        make()
    assert words in str(e.value)


def test_not_built_combinations_say_so():
    with pytest.raises(NotSupportedYet, match="awq with activation quantization"):
        Recipe(weight=W8, input=DYN, steps=(AWQ(), RTN()))
    with pytest.raises(NotSupportedYet, match="gptq with fp8 W8A8"):
        Recipe(weight=FP8, input=QuantSpec("fp8_e4m3", "per_token", dynamic=True), steps=(GPTQ(),))


def test_block_by_block_and_calibration_come_from_the_steps_needs():
    assert not Recipe().block_by_block and not Recipe().needs_calibration
    assert Recipe(weight=W4, steps=(GPTQ(),)).block_by_block
    assert Recipe(weight=W4, steps=(AWQ(), RTN())).block_by_block
    smooth = Recipe(weight=W8, input=DYN, steps=(SmoothQuant(), RTN()))
    assert smooth.needs_calibration and not smooth.block_by_block
    gamma = Recipe(weight=W8, input=DYN, steps=(GammaMigration(), RTN()))
    assert not gamma.needs_calibration  # gamma migration reads only weights


def test_recipe_v2_round_trip_and_the_v1_form_still_loads():
    r = Recipe(weight=W4, steps=(AWQ(grid=10), GPTQ(act_order=True, static_groups=False, clip_search=True)),
               disable_names=("lm_head",))  # fmt: skip
    d = r.to_dict()
    assert d["version"] == 2 and [s["type"] for s in d["steps"]] == ["awq", "gptq"]
    assert Recipe.from_json(r.to_json()) == r and Recipe.from_yaml(r.to_yaml()) == r
    v1 = {"type": "slimquant.Recipe", "version": 1, "weight": W4.to_dict(), "algorithm": "gptq", "smooth": "m3",
          "awq_grid": 10, "awq_clip": True, "gptq_act_order": True, "gptq_percdamp": 0.01,
          "gptq_static_groups": False, "clip_search": True, "disable_names": ["lm_head"]}  # fmt: skip
    assert Recipe.from_dict(v1) == r
    for smooth, first in (("m1", SmoothQuant(alpha=0.7)), ("m2", GammaMigration()), ("m4", SmoothQuantSearch())):
        old = {"version": 1, "weight": W8.to_dict(), "input": DYN.to_dict(), "smooth": smooth, "smooth_alpha": 0.7}
        assert Recipe.from_dict(old).steps == (first, RTN())
    # a v1 file without GPTQ knobs meant the defaults of then: natural order, groups from the error-updated weight
    bare_v1 = Recipe.from_dict({"version": 1, "weight": W4.to_dict(), "algorithm": "gptq"})
    assert bare_v1.steps == (GPTQ(act_order=False, static_groups=False),)
    with pytest.raises(SlimquantError, match="unknown algorithm 'awq'; valid: rtn, gptq"):
        Recipe.from_dict({"version": 1, "algorithm": "awq"})
    with pytest.raises(SlimquantError, match="versions 1 and 2 are read"):
        Recipe.from_dict({"version": 3})


def test_unknown_step_types_and_fields_are_named():
    d = Recipe().to_dict()
    d["steps"] = [{"type": "rtn", "clip": True}]
    with pytest.raises(SlimquantError, match=r"steps\[0\] \(rtn\): unknown field\(s\) \['clip'\]; valid: \['clip_search'\]"):
        Recipe.from_dict(d)
    d["steps"] = [{"type": "their_pruning", "stage": "weight", "sparsity": 0.5}]
    with pytest.raises(SlimquantError, match=r"unknown step type 'their_pruning'; valid: autoround, awq, cbq, cbq_preprocess, gamma_migration, gptq"):
        Recipe.from_dict(d)
    d["steps"] = [{"type": "rtn", "stage": "model"}]
    with pytest.raises(SlimquantError, match="'rtn' is a weight step, not 'model'"):
        Recipe.from_dict(d)


def test_a_checkpoint_record_keeps_steps_this_process_does_not_know():
    d = Recipe(weight=W4).to_dict()
    d["steps"] = [{"type": "their_rounding", "stage": "weight", "temperature": [1, 2]}]
    r = Recipe.from_dict(d, unregistered_steps=True)
    assert isinstance(r.weight_step, UnregisteredStep) and r.algorithm == "their_rounding"
    assert r.to_dict()["steps"] == d["steps"]


def test_new_step_types_register_and_round_trip(monkeypatch):
    monkeypatch.setattr(st, "_STEP_TYPES", dict(st._STEP_TYPES))

    @st.register_step_type
    @dataclass(frozen=True)
    class Halve(st.Step):
        TYPE: ClassVar[str] = "halve"
        STAGE: ClassVar[str] = "weight"
        factor: float = 0.5

    r = Recipe(steps=(Halve(0.25),))
    assert Recipe.from_json(r.to_json()) == r and r.algorithm == "halve"
    with pytest.raises(SlimquantError, match="already registered"):

        @st.register_step_type
        @dataclass(frozen=True)
        class Other(st.Step):
            TYPE: ClassVar[str] = "halve"
            STAGE: ClassVar[str] = "weight"

    with pytest.raises(SlimquantError, match="STAGE must be one of model, block, weight"):

        @st.register_step_type
        @dataclass(frozen=True)
        class Bad(st.Step):
            TYPE: ClassVar[str] = "bad"
            STAGE: ClassVar[str] = "everything"

    with pytest.raises(SlimquantError, match=r"unknown need\(s\) \['gradients'\]"):

        @st.register_step_type
        @dataclass(frozen=True)
        class Needy(st.Step):
            TYPE: ClassVar[str] = "needy"
            STAGE: ClassVar[str] = "weight"
            NEEDS: ClassVar[frozenset[str]] = frozenset({"gradients"})


def test_a_recipe_file_error_names_the_file_and_keeps_its_kind(tmp_path):
    bad = tmp_path / "r.json"
    d = Recipe(weight=W8, input=DYN).to_dict()
    d["steps"] = [{"type": "awq"}, {"type": "rtn"}]
    bad.write_text(json.dumps(d))
    with pytest.raises(NotSupportedYet, match=r"r\.json: awq with activation quantization"):
        Recipe.from_file(str(bad))
