"""fp8 W8A8 (e4m3 weights and inputs): kernels against their reference, convert, save/load."""

from __future__ import annotations

import json

import pytest
import torch

import slimquant
from slimquant import Granularity, QuantSpec, Recipe
from slimquant.data import calibration_windows
from slimquant.kernels import fp8 as kf
from slimquant.nn import QLinearFP8

W = QuantSpec("fp8_e4m3", Granularity.PER_CHANNEL)
DYN = QuantSpec("fp8_e4m3", Granularity.PER_TOKEN, dynamic=True)
STATIC = QuantSpec("fp8_e4m3", Granularity.PER_TENSOR)


def test_quantize_fp8_per_token_uses_the_full_range():
    x = torch.randn(5, 32) * torch.logspace(-2, 2, 5)[:, None]
    q, s = kf.quantize_fp8_per_token(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 1)
    torch.testing.assert_close(s, x.abs().amax(-1, keepdim=True) / 448)
    assert torch.equal(q.float().abs().amax(-1), torch.full((5,), 448.0))
    rel = ((q.float() * s - x).abs() / x.abs().clamp_min(1e-3 * s)).max()
    assert rel < 0.07  # e4m3: 3 mantissa bits -> at most 1/16 relative rounding error (normal range)


@pytest.mark.parametrize("op", ["linear_fp8_dynamic", "linear_fp8_static"])
@pytest.mark.parametrize("shape", [(3, 7, 96), (1, 96), (0, 96)])
def test_fast_kernel_matches_the_reference(op, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    w = (torch.randn(40, 96) * 100).to(torch.float8_e4m3fn)
    ws, bias = torch.rand(40) * 0.01 + 1e-3, torch.randn(40)
    args = (x, w, ws, bias) if op.endswith("dynamic") else (x, torch.tensor([0.02]), w, ws, bias)
    ref = kf.get_kernel(op, "reference")(*args)
    fast = kf.get_kernel(op, "fast")(*args)
    assert ref.shape == (*shape[:-1], 40)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="unknown implementation 'nope'"):
        kf.get_kernel(op, "nope")


@pytest.mark.parametrize("input_spec", [DYN, STATIC], ids=["dynamic", "static"])
def test_fp8_llama_quantizes_saves_and_reloads(llama, tokenizer, eval_text, input_ids, tmp_path, input_spec):
    with torch.no_grad():
        ref = llama(input_ids).logits
    calib = calibration_windows(tokenizer, eval_text.split("\n"), 4, 16)
    recipe = Recipe(weight=W, input=input_spec)
    llama_q = slimquant.quantize(llama, recipe, calib_data=calib, show_progress=False)
    q = llama.model.layers[0].self_attn.q_proj
    assert isinstance(q, QLinearFP8) and q.weight.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        out = llama(input_ids).logits
        q.kernel = "reference"
        assert float((llama(input_ids).logits - out).abs().max()) < 1e-4
        q.kernel = "fast"
    assert float((out - ref).abs().max()) < 0.1 and not torch.equal(out, ref)
    slimquant.save(llama_q, tmp_path / "q")
    qt = recipe.quant_type
    assert qt == ("wfp8afp8_dynamic" if input_spec.dynamic else "wfp8afp8")
    desc = json.loads((tmp_path / "q" / f"quant_model_description_{qt}.json").read_text())
    label = "WFP8AFP8_DYNAMIC" if input_spec.dynamic else "WFP8AFP8"
    assert desc["model.layers.0.self_attn.q_proj.weight"] == label
    assert ("model.layers.0.self_attn.q_proj.input_scale" in desc) == (not input_spec.dynamic)
    with torch.no_grad():
        assert torch.equal(slimquant.load(tmp_path / "q").model(input_ids).logits, out)


def test_fp8_inputs_need_fp8_weights():
    with pytest.raises(Exception, match="fp8 weights"):
        Recipe(weight=QuantSpec("int8", Granularity.PER_CHANNEL), input=DYN)
