"""The step registry: the implementations the pipeline looks steps up in instead of naming algorithms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from slimquant.algorithms import (
    BlockTransform,
    BlockWeightAlgorithm,
    ModelTransform,
    WeightAlgorithm,
    _REGISTRY,
    data_free_solver,
    implementation,
    outside_blocks,
    register_algorithm,
    solve_weight,
)
from slimquant.errors import SlimquantError
from slimquant.math.weights import quantize_weight
from slimquant.types import steps as st
from slimquant.types.spec import QuantSpec
from slimquant.types.steps import GPTQ, RTN

W4 = QuantSpec("int4", "per_group", 32, symmetric=False)


def test_every_built_in_step_type_has_an_implementation_of_its_stage():
    assert set(_REGISTRY) == set(st.step_types())
    kinds = {"weight": (WeightAlgorithm, BlockWeightAlgorithm), "model": ModelTransform, "block": BlockTransform}
    for tag, cls in st.step_types().items():
        assert isinstance(_REGISTRY[tag], kinds[cls.STAGE])


def test_layers_outside_the_blocks_get_the_data_free_form():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    expect = quantize_weight(w, W4, clip_search=True)
    assert outside_blocks(GPTQ(clip_search=True)) == RTN(clip_search=True)
    for step in (RTN(clip_search=True), GPTQ(clip_search=True)):
        got = data_free_solver(step)(w, W4)
        assert torch.equal(got.q, expect.q) and torch.equal(got.scale, expect.scale)


def test_gptq_solve_reports_its_dampening_and_falls_back_to_rtn():
    torch.manual_seed(0)
    w, x = torch.randn(8, 64), torch.randn(256, 64)
    qw, info = solve_weight("layer", w, 2 * x.T @ x / 256, W4, GPTQ())
    assert info["algorithm"] == "gptq" and info["damp"] == 0.01 and info["dead_columns"] == 0
    nan_h = torch.full((64, 64), float("nan"))
    qw, info = solve_weight("layer", w, nan_h, W4, GPTQ())
    assert info["algorithm"] == "rtn" and "fallback" in info
    assert torch.equal(qw.q, quantize_weight(w, W4).q)


def test_registration_is_checked(monkeypatch):
    monkeypatch.setattr(st, "_STEP_TYPES", dict(st._STEP_TYPES))
    monkeypatch.setattr("slimquant.algorithms._REGISTRY", dict(_REGISTRY))

    @st.register_step_type
    @dataclass(frozen=True)
    class Toy(st.Step):
        TYPE: ClassVar[str] = "toy"
        STAGE: ClassVar[str] = "weight"

    @dataclass(frozen=True)
    class Unregistered(st.Step):
        TYPE: ClassVar[str] = "unregistered"
        STAGE: ClassVar[str] = "weight"

    with pytest.raises(SlimquantError, match="has no registered implementation"):
        implementation(Toy())
    with pytest.raises(SlimquantError, match="its implementation must be a WeightAlgorithm or BlockWeightAlgorithm, not ModelTransform"):
        register_algorithm(ModelTransform(Toy, observe=lambda *a: None, apply=lambda *a: []))
    with pytest.raises(SlimquantError, match="lacks solve"):
        register_algorithm(WeightAlgorithm(Toy))
    with pytest.raises(SlimquantError, match="'unregistered' is not registered"):
        register_algorithm(WeightAlgorithm(Unregistered, solve=lambda *a: None))
    toy = register_algorithm(WeightAlgorithm(Toy, solve=lambda layer, w, h, spec, step: (quantize_weight(w, spec), {})))
    assert implementation(Toy()) is toy
    with pytest.raises(SlimquantError, match="already has an implementation"):
        register_algorithm(toy)
    _, info = solve_weight("x", torch.randn(4, 32), None, W4, Toy())
    assert info == {"algorithm": "toy"}  # the step's type, unless the solver names another (a fallback)
