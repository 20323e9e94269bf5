"""The weight-algorithm registry: what the pipeline looks algorithms up in instead of naming them."""

from __future__ import annotations

import pytest
import torch

from slimquant.algorithms import WeightAlgorithm, register_weight_algorithm, weight_algorithm, weight_solver
from slimquant.algorithms import _REGISTRY
from slimquant.errors import SlimquantError
from slimquant.math.weights import quantize_weight
from slimquant.types.spec import ALGORITHMS, QuantSpec, Recipe

W4 = QuantSpec("int4", "per_group", 32, symmetric=False)


def test_the_registry_holds_every_algorithm_a_recipe_accepts():
    assert set(_REGISTRY) == set(ALGORITHMS)
    assert not weight_algorithm("rtn").needs_hessian and weight_algorithm("gptq").needs_hessian
    assert weight_algorithm("gptq").data_free() is weight_algorithm("rtn")


def test_data_free_solvers():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    expect = quantize_weight(w, W4, clip_search=True)
    for name in ALGORITHMS:  # gptq's layers outside the blocks are rounded to nearest
        got = weight_solver(name)(w, W4, Recipe(weight=W4, clip_search=True))
        assert torch.equal(got.q, expect.q) and torch.equal(got.scale, expect.scale)
    with pytest.raises(SlimquantError, match="needs calibration inputs"):
        weight_algorithm("gptq").solver()


def test_gptq_solve_reports_its_dampening_and_falls_back_to_rtn():
    torch.manual_seed(0)
    w, x = torch.randn(8, 64), torch.randn(256, 64)
    qw, info = weight_algorithm("gptq").solve("layer", w, 2 * x.T @ x / 256, W4, Recipe(weight=W4, algorithm="gptq"))
    assert info["algorithm"] == "gptq" and info["damp"] == 0.01 and info["dead_columns"] == 0
    nan_h = torch.full((64, 64), float("nan"))
    qw, info = weight_algorithm("gptq").solve("layer", w, nan_h, W4, Recipe(weight=W4, algorithm="gptq"))
    assert info["algorithm"] == "rtn" and "fallback" in info
    assert torch.equal(qw.q, quantize_weight(w, W4).q)


def test_registration_is_checked(monkeypatch):
    monkeypatch.setattr("slimquant.algorithms._REGISTRY", dict(_REGISTRY))
    toy = WeightAlgorithm("toy", lambda layer, w, h, spec, recipe: (quantize_weight(w * 0.5, spec), {"algorithm": "toy"}))
    register_weight_algorithm(toy)
    assert weight_algorithm("toy") is toy and weight_solver("toy") is not None
    with pytest.raises(SlimquantError, match="already registered"):
        register_weight_algorithm(toy)
    with pytest.raises(SlimquantError, match="needs a data-free outside_blocks"):
        register_weight_algorithm(WeightAlgorithm("calibrated", toy.solve, needs_hessian=True))
    with pytest.raises(SlimquantError, match=r"unknown weight algorithm 'nope'; valid: rtn, gptq, toy"):
        weight_algorithm("nope")
