"""Checkpoints written by earlier code still load, to the same outputs (tests/fixtures/checkpoints_v1, written once
by tests/fixtures/make_checkpoints_v1.py and never rewritten: a format change must keep reading them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import slimquant as sq
from slimquant.eval.lm import kv_cache_kwargs
from slimquant.formats.msmodelslim import describe_checkpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints_v1"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def test_the_fixtures_are_there():
    assert NAMES == ["w4a16_g32_asym", "w8a16", "w8a8_dynamic", "w8a8_static_kv_fa"]


@pytest.mark.parametrize("name", NAMES)
def test_a_version_1_checkpoint_loads_to_the_same_outputs(name):
    expected = load_file(str(FIXTURES / f"{name}.expected.safetensors"))
    loaded = sq.load(FIXTURES / name)
    with torch.inference_mode():
        logits = loaded.model(expected["ids"], **kv_cache_kwargs(loaded.model, loaded.recipe.kv)).logits
    ref = expected["logits"]
    # the same integer arithmetic; float32 rounding may differ between CPUs (the fused norm's sum of squares,
    # AVX512 vs the portable loops): observed 0 on the machine that wrote them
    assert float((logits - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95
    quant_type = {"w4a16_g32_asym": "w4a16", "w8a16": "w8a16", "w8a8_dynamic": "w8a8_dynamic", "w8a8_static_kv_fa": "w8a8"}
    assert describe_checkpoint(FIXTURES / name)["quant_type"] == quant_type[name]
