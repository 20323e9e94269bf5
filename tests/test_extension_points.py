"""Extension points, used the way someone else's code would: this file adds an algorithm (a new step type and its
implementation) and tests/toy_codec.py a checkpoint format, without editing the library, and each runs
quantize -> save -> load, the load in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import slimquant
from slimquant import QuantSpec, Recipe
from slimquant.algorithms import WeightAlgorithm, register_algorithm
from slimquant.math.weights import dequantize_weight, quantize_weight
from slimquant.types import Step, register_step_type, steps
from slimquant.types.steps import HESSIAN, RTN

W4 = QuantSpec("int4", "per_group", 32, symmetric=False)


@dataclass(frozen=True)
class HessianClip(Step):
    """Toy calibrated algorithm: per layer, shrink every group's range by one of ``ratios`` and keep the ratio
    whose quantized weight has the lowest output error ``tr(D H D^T)`` on the calibration inputs (1.0 = RTN)."""

    TYPE: ClassVar[str] = "hessian_clip"
    STAGE: ClassVar[str] = "weight"
    NEEDS: ClassVar[frozenset[str]] = frozenset({steps.BLOCK_INPUTS, HESSIAN})
    ratios: tuple[float, ...] = (1.0, 0.97, 0.94, 0.9)

    def outside_blocks(self) -> Step:
        return RTN()


def _solve(layer: str, w: torch.Tensor, h: torch.Tensor | None, spec: QuantSpec, step: Step):
    assert h is not None and h.shape == (w.shape[1], w.shape[1])  # the pipeline provides what NEEDS says
    best = None
    g = w.reshape(w.shape[0], -1, spec.group_size)
    for r in step.ratios:
        lo, hi = g.amin(-1, keepdim=True) * r, g.amax(-1, keepdim=True) * r
        qw = quantize_weight(torch.minimum(torch.maximum(g, lo), hi).reshape(w.shape), spec)
        d = dequantize_weight(qw, spec) - w
        err = float(torch.einsum("ij,jk,ik->", d, h, d))
        if best is None or err < best[0]:
            best = (err, r, qw)
    return best[2], {"ratio": best[1]}


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setattr(steps, "_STEP_TYPES", dict(steps._STEP_TYPES))
    monkeypatch.setattr("slimquant.algorithms._REGISTRY", dict(slimquant.algorithms._REGISTRY))
    register_step_type(HessianClip)
    register_algorithm(WeightAlgorithm(HessianClip, solve=_solve))


def _rows(result):
    return {r.name: r for r in result.report.layers}


def test_a_toy_calibrated_algorithm_quantizes_saves_and_loads_elsewhere(toy_registered, tokenizer, eval_text,
                                                                        input_ids, tmp_path):  # fmt: skip
    from conftest import make_llama

    from slimquant.data import calibration_windows

    calib = calibration_windows(tokenizer, eval_text.split("\n"), 4, 16)
    recipe = Recipe(weight=W4, steps=(HessianClip(),))
    assert recipe.block_by_block and Recipe.from_json(recipe.to_json()) == recipe
    toy = make_llama(len(tokenizer))
    toy_q = slimquant.quantize(toy, recipe, calib_data=calib, show_progress=False)
    rtn = make_llama(len(tokenizer))
    rtn_q = slimquant.quantize(rtn, Recipe(weight=W4, steps=(HessianClip(ratios=(1.0,)),)), calib_data=calib,
                               show_progress=False)  # fmt: skip
    toy_rows, rtn_rows = _rows(toy_q), _rows(rtn_q)
    inside = [n for n, r in toy_rows.items() if r.output_error is not None]
    assert len(inside) == 14  # 7 linears x 2 blocks ran the toy, with Hessians from the block pass
    assert {toy_rows[n].algorithm for n in inside} == {"hessian_clip"}
    first = [n for n in inside if n.startswith("model.layers.0.")]  # same inputs in both runs (later blocks: not)
    assert all(toy_rows[n].output_error <= rtn_rows[n].output_error * (1 + 1e-6) for n in first)
    ratio = sum(toy_rows[n].output_error for n in first) / sum(rtn_rows[n].output_error for n in first)
    assert ratio < 0.99  # observed 0.925
    assert any(toy_rows[n].details["ratio"] < 1.0 for n in inside)  # it chose something RTN would not
    q = toy.model.layers[0].self_attn.q_proj
    assert q.method["algorithm"] == "hessian_clip"

    slimquant.save(toy_q, tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / "slimquant_manifest.json").read_text())
    assert manifest["recipe"]["steps"] == [{"type": "hessian_clip", "stage": "weight", "ratios": [1.0, 0.97, 0.94, 0.9]}]
    with torch.no_grad():
        expect = toy(input_ids).logits
        assert torch.equal(slimquant.load(tmp_path / "ckpt").model(input_ids).logits, expect)
    torch.save(input_ids, tmp_path / "ids.pt")
    code = (  # the same thread count as this process: float reductions split across threads round differently
        f"import sys, torch, slimquant\ntorch.set_num_threads({torch.get_num_threads()})\n"
        "from slimquant.types.steps import step_types\n"
        "assert 'hessian_clip' not in step_types()\n"
        "r = slimquant.load(sys.argv[1])\n"
        "with torch.no_grad():\n"
        "    torch.save(r.model(torch.load(sys.argv[2])).logits, sys.argv[3])\n"
        "print(r.recipe.algorithm)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ckpt"), str(tmp_path / "ids.pt"),
                          str(tmp_path / "logits.pt")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hessian_clip"  # the record of how it was made survives, unrun
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expect)


def test_an_unregistered_step_cannot_run(tokenizer):
    from conftest import make_llama

    r = Recipe.from_dict({**Recipe(weight=W4).to_dict(),
                          "steps": [{"type": "theirs", "stage": "weight"}]}, unregistered_steps=True)  # fmt: skip
    with pytest.raises(slimquant.SlimquantError, match="step type 'theirs' has no registered implementation"):
        slimquant.quantize(make_llama(len(tokenizer)), r, show_progress=False)


# -- a toy checkpoint format (tests/toy_codec.py) ---------------------------------------------------


@pytest.fixture
def toy_codec(monkeypatch):
    import toy_codec as module

    from slimquant.formats import codec as registry

    monkeypatch.setattr(registry, "_CODECS", dict(registry._CODECS))
    registry.register_codec(module.ToyCodec)
    return module


def test_a_toy_codec_saves_and_loads_without_editing_the_library(toy_codec, tokenizer, eval_text, input_ids, tmp_path):
    from pathlib import Path

    from conftest import fresh_process_logits, make_llama
    from safetensors.torch import load_file

    from slimquant import LayerOverride
    from slimquant.data import calibration_windows

    assert "toy" in slimquant.formats.codec_names()
    calib = calibration_windows(tokenizer, eval_text.split("\n"), 4, 16)
    recipe = Recipe(weight=W4, embedding=QuantSpec("int8", "per_channel", symmetric=False), overrides=(
        ("model.layers.0.mlp.gate_proj", LayerOverride(weight=QuantSpec("int8", "per_channel"),
                                                       input=QuantSpec("int8", "per_tensor", symmetric=False))),
    ))  # fmt: skip
    model = make_llama(len(tokenizer))
    model_q = slimquant.quantize(model, recipe, calib_data=calib, show_progress=False)
    with torch.no_grad():
        expect = model(input_ids).logits
    out = slimquant.save(model_q, tmp_path / "toy", format="toy")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "slimquant_manifest.json", "toy.safetensors"]
    manifest = json.loads((out / "slimquant_manifest.json").read_text())
    assert manifest["format"] == "slimquant/toy"
    assert manifest["aliases"]["lm_head.zp16"] == "model.embed_tokens.zp16"  # the tied head, written once
    stored = load_file(str(out / "toy.safetensors"))
    zp = stored["model.layers.1.self_attn.q_proj.zp16"]
    assert zp.dtype == torch.int16 and torch.equal(zp.float(), model.model.layers[1].self_attn.q_proj.weight_zero_point)
    assert "model.layers.0.mlp.gate_proj.acc_bias" in stored  # logical tensors, not msModelSlim's folded ones
    assert slimquant.formats.describe_checkpoint(out)["format"] == "toy"
    with torch.no_grad():
        assert torch.equal(slimquant.load(out).model(input_ids).logits, expect)
    tests = str(Path(__file__).parent)
    loader = f"(sys.path.insert(0, {tests!r}), __import__('toy_codec'), slimquant.load(d).model)[2]"
    assert torch.equal(fresh_process_logits(out, input_ids, tmp_path, loader=loader), expect)
    p = subprocess.run([sys.executable, "-c", "import sys, slimquant; slimquant.load(sys.argv[1]).model", str(out)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode != 0
    assert "written in the 'toy' format, which no codec of this process reads" in p.stderr
    assert "import the module that registers it first" in p.stderr


def test_a_codec_refuses_what_it_cannot_hold_before_writing(toy_codec, tokenizer, tmp_path):
    from conftest import make_llama

    model = make_llama(len(tokenizer))
    model_q = slimquant.quantize(model, Recipe(weight=QuantSpec("int4", "per_group", 32, symmetric=False, zero_point="float")),
                                 show_progress=False)  # fmt: skip
    with pytest.raises(slimquant.SlimquantError, match="integer zero points only: layer model.layers.0.self_attn.q_proj"):
        slimquant.save(model_q, tmp_path / "toy", format="toy")
    assert not (tmp_path / "toy").exists()
    with pytest.raises(slimquant.SlimquantError, match="the toy format has no option part_file_size"):
        slimquant.save(model_q, tmp_path / "toy", format="toy", part_file_size=1.0)
    with pytest.raises(slimquant.SlimquantError, match=r"unknown checkpoint format 'onnx' \(registered: compressed-tensors, gguf, msmodelslim, toy, transformers, w8a8sc\)"):
        slimquant.save(model_q, tmp_path / "g", format="onnx")
    with pytest.raises(slimquant.SlimquantError, match="the msmodelslim format has no option colour"):
        slimquant.save(model_q, tmp_path / "m", colour="red")
    assert not (tmp_path / "g").exists() and not (tmp_path / "m").exists()


@dataclass(frozen=True)
class PeekAhead(Step):
    """Toy windowed block solver: rounds to nearest, records what the pipeline handed it (the block ahead and its
    layers, the carry left by the previous block, each layer's input quantization) and narrows every static input
    range by ``shrink``."""

    TYPE: ClassVar[str] = "peek_ahead"
    STAGE: ClassVar[str] = "weight"
    NEEDS: ClassVar[frozenset[str]] = frozenset({steps.BLOCK_INPUTS, steps.BLOCK_TARGETS})
    shrink: float = 0.5

    def outside_blocks(self) -> Step:
        return RTN()


SEEN: list[dict] = []


def _peek(block, layers, data, step, show_progress):
    SEEN.append({"prefix": data.prefix, "ahead": [(p, sorted(lays)) for p, _, lays in data.ahead],
                 "carry": sorted(data.carry), "float_item": data.float_item(0)[0][0].shape})  # fmt: skip
    data.carry.clear()
    data.carry[f"{data.prefix}note"] = torch.ones(1)
    out = {}
    for name, (module, spec) in layers.items():
        spec_in, rmin, rmax = data.input_quant(data.prefix + name)
        rng = None if rmin is None else {"rmin": rmin * step.shrink, "rmax": rmax * step.shrink, "rule": "peek"}
        out[name] = (quantize_weight(module.weight.detach().float(), spec), {}, rng)
    return out


def test_a_windowed_block_solver_sees_the_blocks_ahead_and_sets_input_ranges(monkeypatch, tokenizer, eval_text):
    from conftest import make_llama
    from slimquant.algorithms import BlockWeightAlgorithm
    from slimquant.data import calibration_windows
    from slimquant.nn.w8a8 import QLinearW8A8
    from slimquant.types.spec import Granularity

    monkeypatch.setattr(steps, "_STEP_TYPES", dict(steps._STEP_TYPES))
    monkeypatch.setattr("slimquant.algorithms._REGISTRY", dict(slimquant.algorithms._REGISTRY))
    register_step_type(PeekAhead)
    register_algorithm(BlockWeightAlgorithm(PeekAhead, solve_block=_peek, lookahead=lambda step: 1))
    SEEN.clear()
    model = make_llama(len(tokenizer), layers=3)
    recipe = Recipe(weight=QuantSpec("int8", Granularity.PER_CHANNEL, symmetric=True),
                    input=QuantSpec("int8", Granularity.PER_TENSOR, symmetric=False), steps=(PeekAhead(),),
                    disable_names=("model.layers.2.mlp.down_proj",))  # fmt: skip
    calib = calibration_windows(tokenizer, eval_text.split("\n"), 4, 16)
    res = slimquant.quantize(model, recipe, calib_data=calib, show_progress=False)
    assert [s["prefix"] for s in SEEN] == ["model.layers.0.", "model.layers.1.", "model.layers.2."]
    assert SEEN[0]["ahead"][0][0] == "model.layers.1." and "self_attn.q_proj" in SEEN[0]["ahead"][0][1]
    assert "mlp.down_proj" not in SEEN[1]["ahead"][0][1]  # kept float: not handed over as a layer to solve
    assert SEEN[2]["ahead"] == []  # the last block has none ahead
    assert SEEN[0]["carry"] == [] and SEEN[1]["carry"] == ["model.layers.0.note"]
    rows = {r.name: r for r in res.report.layers}
    q = res.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q, QLinearW8A8) and rows["model.layers.0.self_attn.q_proj"].details["input_rule"] == "peek"
