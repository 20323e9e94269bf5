"""QuantSpec / Recipe: validation, labels, and exact JSON / YAML round trips."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimquant.errors import NotSupportedYet, SlimquantError
from slimquant.types import GROUP_SIZES, QTYPES, Granularity, QuantSpec, Recipe
from slimquant.types.spec import ACT_OBSERVERS
from slimquant.types.steps import RTN

# -- QuantSpec validation -------------------------------------------------------------------------


def test_defaults_are_int8_per_channel_symmetric() -> None:
    s = QuantSpec()
    assert (s.qtype, s.granularity, s.group_size, s.symmetric, s.dynamic, s.zero_point) == (
        "int8",
        Granularity.PER_CHANNEL,
        None,
        True,
        False,
        "int",
    )


def test_granularity_string_is_parsed_to_the_enum() -> None:
    s = QuantSpec("int4", "per_group", 64)  # type: ignore[arg-type]
    assert s.granularity is Granularity.PER_GROUP
    assert s == QuantSpec("int4", Granularity.PER_GROUP, 64)


def test_unknown_qtype_lists_valid_names() -> None:
    with pytest.raises(SlimquantError, match="unknown qtype 'int7'") as ei:
        QuantSpec("int7")
    for name in QTYPES:
        assert name in str(ei.value)


def test_unknown_granularity_lists_valid_ones() -> None:
    with pytest.raises(SlimquantError, match="unknown granularity 'per_row'") as ei:
        QuantSpec("int8", "per_row")  # type: ignore[arg-type]
    for g in Granularity:
        assert g.value in str(ei.value)


@pytest.mark.parametrize("group_size", [None, 0, -32, 12, 100, 64.0])
def test_per_group_needs_a_positive_multiple_of_8(group_size: object) -> None:
    with pytest.raises(SlimquantError, match="per_group needs a positive group_size"):
        QuantSpec("int4", Granularity.PER_GROUP, group_size)  # type: ignore[arg-type]


@pytest.mark.parametrize("gran", [Granularity.PER_CHANNEL, Granularity.PER_TENSOR, Granularity.PER_TOKEN])
def test_group_size_only_with_per_group(gran: Granularity) -> None:
    with pytest.raises(SlimquantError, match="group_size=64 is only valid with per_group"):
        QuantSpec("int4", gran, 64)


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_must_be_symmetric(name: str) -> None:
    with pytest.raises(SlimquantError, match=f"{name} is a float type and can only be quantized symmetrically"):
        QuantSpec(name, symmetric=False)
    assert QuantSpec(name).symmetric  # the symmetric spec is fine


def test_zero_point_must_be_int_or_float() -> None:
    with pytest.raises(SlimquantError, match="zero_point must be 'int' or 'float', got 'half'"):
        QuantSpec("int4", symmetric=False, zero_point="half")


def test_spec_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantSpec().qtype = "int4"  # type: ignore[misc]


def test_from_dict_rejects_unknown_fields_and_lists_valid_ones() -> None:
    with pytest.raises(SlimquantError, match=r"unknown QuantSpec field\(s\) \['bits'\]") as ei:
        QuantSpec.from_dict({"qtype": "int4", "bits": 4})
    for f in dataclasses.fields(QuantSpec):
        assert f.name in str(ei.value)


@pytest.mark.parametrize(
    ("spec", "label"),
    [
        (QuantSpec("int8"), "int8 per-channel sym"),
        (QuantSpec("int8", Granularity.PER_TENSOR, symmetric=False), "int8 per-tensor asym"),
        (QuantSpec("int4", Granularity.PER_GROUP, 64, symmetric=False), "int4 g64 asym"),
        (QuantSpec("int4", Granularity.PER_GROUP, 32, symmetric=False, zero_point="float"), "int4 g32 asym-fzp"),
        (QuantSpec("int8", Granularity.PER_TOKEN, dynamic=True), "int8 per-token sym"),
    ],
)
def test_describe(spec: QuantSpec, label: str) -> None:
    assert spec.describe() == label


# -- Recipe validation ----------------------------------------------------------------------------


def test_output_role_and_other_kv_specs_are_not_supported_yet() -> None:
    with pytest.raises(NotSupportedYet, match="output quantization is not supported yet"):
        Recipe(output=QuantSpec("int8", Granularity.PER_TOKEN, dynamic=True))
    with pytest.raises(NotSupportedYet, match="kv int8 per-tensor sym is not supported yet"):
        Recipe(kv=QuantSpec("int8", Granularity.PER_TENSOR))
    with pytest.raises(NotSupportedYet, match="kv int4 per-channel sym is not supported yet"):
        Recipe(kv=QuantSpec("int4", Granularity.PER_CHANNEL))
    assert issubclass(NotSupportedYet, SlimquantError)
    for kv in (QuantSpec("int8", Granularity.PER_TOKEN, dynamic=True), QuantSpec("int8", Granularity.PER_CHANNEL)):
        assert Recipe.from_json(Recipe(kv=kv).to_json()).kv == kv


W8 = QuantSpec("int8", Granularity.PER_CHANNEL)
STATIC_IN = QuantSpec("int8", Granularity.PER_TENSOR, symmetric=False)
DYNAMIC_IN = QuantSpec("int8", Granularity.PER_TOKEN, dynamic=True)


@pytest.mark.parametrize(
    ("recipe", "quant_type"),
    [
        (Recipe(weight=W8, input=STATIC_IN), "w8a8"),
        (Recipe(weight=QuantSpec("int8", Granularity.PER_TENSOR), input=STATIC_IN), "w8a8"),
        (Recipe(weight=W8, input=DYNAMIC_IN), "w8a8_dynamic"),
        (Recipe(weight=QuantSpec("fp8_e4m3", Granularity.PER_CHANNEL),
                input=QuantSpec("fp8_e4m3", Granularity.PER_TENSOR)), "wfp8afp8"),  # fmt: skip
        (Recipe(weight=QuantSpec("fp8_e4m3", Granularity.PER_CHANNEL),
                input=QuantSpec("fp8_e4m3", Granularity.PER_TOKEN, dynamic=True)), "wfp8afp8_dynamic"),  # fmt: skip
    ],
)
def test_activation_recipes_and_their_labels(recipe: Recipe, quant_type: str) -> None:
    assert recipe.quant_type == quant_type
    assert Recipe.from_json(recipe.to_json()) == recipe


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight": W8, "input": QuantSpec("int4", Granularity.PER_TENSOR)}, "int8 or fp8 only"),
        ({"weight": W8, "input": QuantSpec("int8", Granularity.PER_TOKEN)}, "per_token needs dynamic=True"),
        ({"weight": W8, "input": QuantSpec("int8", Granularity.PER_TENSOR, dynamic=True)}, "per_token and symmetric"),
        ({"weight": QuantSpec("int4", Granularity.PER_GROUP, 64), "input": STATIC_IN}, "got int4 g64 sym"),
        ({"weight": QuantSpec("int8", Granularity.PER_CHANNEL, symmetric=False), "input": STATIC_IN}, "symmetric 8-bit"),
        ({"weight": None, "input": STATIC_IN}, "needs quantized weights"),
        ({"weight": QuantSpec("fp8_e4m3", Granularity.PER_CHANNEL), "input": STATIC_IN}, "8-bit int8 weights"),
        ({"weight": W8, "input": STATIC_IN, "overrides": (("x", QuantSpec("int4", Granularity.PER_GROUP, 32)),)},
         "override x: W8A8 needs symmetric 8-bit int8 weights"),
        ({"act_observer": "percentile"}, "unknown act_observer 'percentile'; valid: minmax, moving_average"),
        ({"sigma_factor": 0.0}, "sigma_factor must be positive"),
    ],
)
def test_bad_activation_recipes(kwargs: dict, message: str) -> None:
    with pytest.raises(SlimquantError, match=re.escape(message)):
        Recipe(**kwargs)


def test_steps_must_be_steps() -> None:
    with pytest.raises(SlimquantError, match="steps\\[0\\] must be a Step"):
        Recipe(steps=("gptq",))  # type: ignore[arg-type]


def test_per_token_weights_are_rejected() -> None:
    with pytest.raises(SlimquantError, match="per_token granularity applies to activations"):
        Recipe(weight=QuantSpec("int8", Granularity.PER_TOKEN))


def test_embedding_must_be_per_row_or_per_group() -> None:
    with pytest.raises(SlimquantError, match="embedding quantization must be per_channel"):
        Recipe(embedding=QuantSpec("int8", Granularity.PER_TENSOR))
    Recipe(embedding=QuantSpec("int4", Granularity.PER_GROUP, 32))  # accepted


def test_disable_names_list_becomes_a_tuple() -> None:
    r = Recipe(disable_names=["lm_head", "re:.*gate.*"])  # type: ignore[arg-type]
    assert r.disable_names == ("lm_head", "re:.*gate.*")
    hash(r)  # frozen and hashable once normalised


@pytest.mark.parametrize(
    ("weight", "label"),
    [
        (None, "float"),
        (QuantSpec("int8"), "w8a16"),
        (QuantSpec("uint8", symmetric=False), "w8a16"),
        (QuantSpec("int4", Granularity.PER_GROUP, 128), "w4a16"),
        (QuantSpec("uint4", symmetric=False), "w4a16"),
        (QuantSpec("int3"), "w3a16"),
        (QuantSpec("int2"), "w2a16"),
        (QuantSpec("fp8_e4m3"), "wfp8a16"),
    ],
)
def test_quant_type_labels(weight: QuantSpec | None, label: str) -> None:
    assert Recipe(weight=weight).quant_type == label


# -- serialization --------------------------------------------------------------------------------

NAME_CHARS = st.sampled_from(list("abcXYZ019._-*?[]^$+:|(){}\\ "))


@st.composite
def specs(draw: st.DrawFn, roles: tuple[Granularity, ...] = tuple(Granularity)) -> QuantSpec:
    qt = draw(st.sampled_from(sorted(QTYPES)))
    gran = draw(st.sampled_from(roles))
    group_size = draw(st.sampled_from(GROUP_SIZES + (8, 96, 1024))) if gran is Granularity.PER_GROUP else None
    symmetric = True if QTYPES[qt].is_float else draw(st.booleans())
    zero_point = draw(st.sampled_from(["int", "float"]))
    return QuantSpec(qt, gran, group_size, symmetric, draw(st.booleans()), zero_point)


WEIGHT_GRANS = (Granularity.PER_TENSOR, Granularity.PER_CHANNEL, Granularity.PER_GROUP)
EMB_GRANS = (Granularity.PER_CHANNEL, Granularity.PER_GROUP)


@st.composite
def recipes(draw: st.DrawFn) -> Recipe:
    return Recipe(
        weight=draw(st.none() | specs(WEIGHT_GRANS)),
        steps=(RTN(clip_search=draw(st.booleans())),),
        disable_names=tuple(draw(st.lists(st.text(NAME_CHARS, min_size=1, max_size=12), max_size=4))),
        disable_last_linear=draw(st.booleans()),
        embedding=draw(st.none() | specs(EMB_GRANS)),
        include_conv=draw(st.booleans()),
        act_observer=draw(st.sampled_from(ACT_OBSERVERS)),
        sigma_factor=draw(st.none() | st.floats(0.5, 8.0)),
    )


@settings(deadline=None, max_examples=50)
@given(specs())
def test_spec_dict_round_trip(spec: QuantSpec) -> None:
    d = spec.to_dict()
    assert d["granularity"] == spec.granularity.value and isinstance(d["granularity"], str)
    assert QuantSpec.from_dict(json.loads(json.dumps(d))) == spec


@settings(deadline=None, max_examples=40)
@given(recipes())
def test_recipe_json_round_trip(recipe: Recipe) -> None:
    text = recipe.to_json()
    back = Recipe.from_json(text)
    assert back == recipe
    assert back.to_json() == text
    assert json.loads(text)["type"] == "slimquant.Recipe"


@settings(deadline=None, max_examples=40)
@given(recipes())
def test_recipe_yaml_round_trip(recipe: Recipe) -> None:
    text = recipe.to_yaml()
    back = Recipe.from_yaml(text)
    assert back == recipe
    assert back.to_yaml() == text


def test_default_recipe_serialises_every_field_with_a_type_tag() -> None:
    d = json.loads(Recipe().to_json())
    assert set(d) == {"type", "version"} | {f.name for f in dataclasses.fields(Recipe)}
    assert (d["type"], d["version"]) == ("slimquant.Recipe", 2)
    assert d["weight"] == {
        "qtype": "int8",
        "granularity": "per_channel",
        "group_size": None,
        "symmetric": True,
        "dynamic": False,
        "zero_point": "int",
    }
    assert (d["input"], d["output"], d["kv"], d["embedding"]) == (None, None, None, None)
    assert (d["steps"], d["disable_names"]) == ([{"type": "rtn", "stage": "weight", "clip_search": False}], [])
    assert (d["disable_last_linear"], d["include_conv"]) == (True, True)


def test_from_dict_rejects_unknown_recipe_fields() -> None:
    with pytest.raises(SlimquantError, match=r"unknown Recipe field\(s\) \['w_bit'\]"):
        Recipe.from_dict({"w_bit": 4})


def test_from_dict_rejects_unknown_spec_fields_inside_a_recipe() -> None:
    d = Recipe().to_dict()
    d["weight"]["bits"] = 8
    with pytest.raises(SlimquantError, match=r"unknown QuantSpec field\(s\) \['bits'\]"):
        Recipe.from_dict(d)


@pytest.mark.parametrize(("tag", "version"), [("other.Recipe", 1), ("other.Recipe", 2), ("slimquant.Recipe", 3)])
def test_from_dict_rejects_foreign_tags_and_versions(tag: str, version: int) -> None:
    d = Recipe().to_dict()
    d.update(type=tag, version=version)
    with pytest.raises(SlimquantError, match="not a slimquant recipe"):
        Recipe.from_dict(d)


def test_serialised_activation_role_is_refused_on_load() -> None:
    d = Recipe().to_dict()
    d["kv"] = QuantSpec("int8", Granularity.PER_TOKEN).to_dict()
    with pytest.raises(NotSupportedYet):
        Recipe.from_dict(d)


def test_bad_json_and_yaml_raise_slimquant_errors() -> None:
    with pytest.raises(SlimquantError, match="recipe is not valid JSON"):
        Recipe.from_json("{not json")
    with pytest.raises(SlimquantError, match="recipe is not valid YAML"):
        Recipe.from_yaml("weight: [unclosed")
    with pytest.raises(SlimquantError, match="recipe YAML must be a mapping"):
        Recipe.from_yaml("- just\n- a list\n")


def test_from_file_picks_the_format_by_extension(tmp_path) -> None:
    r = Recipe(weight=QuantSpec("int4", Granularity.PER_GROUP, 32, symmetric=False), disable_names=("lm_head",))
    (tmp_path / "r.yaml").write_text(r.to_yaml(), encoding="utf-8")
    (tmp_path / "r.json").write_text(r.to_json(), encoding="utf-8")
    assert Recipe.from_file(str(tmp_path / "r.yaml")) == r
    assert Recipe.from_file(str(tmp_path / "r.json")) == r
    with pytest.raises(SlimquantError, match="cannot read recipe"):
        Recipe.from_file(str(tmp_path / "missing.json"))
