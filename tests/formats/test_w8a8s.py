"""W8A8S (msModelSlim's sparse quantization, seed 002): flags, the 4-bit-with-int8-outliers grid, and its
checkpoint layout (quant_model_weight_w8a8s.safetensors, W8A8S labels, quantize: w8a8s)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import slimquant
from slimquant import Granularity, QuantSpec, Recipe, SlimquantError
from slimquant.cli.main import main
from slimquant.errors import NotSupportedYet
from slimquant.formats.msmodelslim import describe_checkpoint
from slimquant.math.weights import dequantize_weight, quantize_weight, w8a8s_outliers
from slimquant.types.flags import recipe_from_flags
from slimquant.types.steps import RTN, SmoothQuant, SmoothQuantSearch

G = Granularity
STATIC = QuantSpec("int8", G.PER_TENSOR, None, False)
SHAPES = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
          "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
          "mlp.down_proj": (64, 128)}  # fmt: skip
SEED = ("--act_method 2 --do_smooth True --use_sigma True --is_lowbit True --co_sparse True --w_bit 4 "
        "--tokenizer_args {\"padding_side\":\"left\",\"pad_token\":\"<unk>\"}")  # fmt: skip


# -- the grid ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.1])
def test_outliers_per_channel_stay_within_the_fraction(fraction):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0)) ** 3  # heavy tails: many outliers
    spec = QuantSpec("int8", G.PER_CHANNEL, outlier_fraction=fraction)
    qw = quantize_weight(w, spec)
    assert qw.q.dtype == torch.int8
    per_row = ((qw.q < -8) | (qw.q > 7)).sum(dim=1)
    budget = int(fraction * 256)
    assert int(per_row.max()) <= budget  # never more than the fraction
    beyond_7 = (qw.q.abs() > 7).sum(dim=1)  # outliers plus the weights that round to -8 (still 4-bit)
    assert int(beyond_7.min()) >= budget - 1  # the budget is used: the scale is as fine as it allows
    assert w8a8s_outliers(qw.q) == int(per_row.sum())
    err = (dequantize_weight(qw, spec) - w).abs()
    s = qw.scale  # [n, 1]
    reach = w.abs() <= 127 * s  # outliers past int8's reach are clipped to +-127 (cubed normals have some)
    assert bool((err <= s * 0.5 + 1e-6)[reach].all())  # every other weight, outliers too, within half a step
    assert bool((qw.q.int().abs() >= 127)[~reach].all())


def test_no_outliers_is_4_bit_values_held_in_int8():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec("int8", G.PER_CHANNEL, outlier_fraction=0.0)
    qw = quantize_weight(w, spec)
    assert int(qw.q.abs().max()) == 7 and w8a8s_outliers(qw.q) == 0
    # finer than int4's absmax / 7 (the largest weight rounds down to 7, within half a step)
    assert bool((qw.scale < w.abs().amax(1, keepdim=True) / 7).all())
    assert bool(((dequantize_weight(qw, spec) - w).abs() <= qw.scale * 0.5 + 1e-7).all())


def test_per_tensor_w8a8s_counts_outliers_over_the_tensor():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    w[0] += 10 * w[0].sign()  # one loud row (|w| > 10, the others < 5): per tensor its 64 weights are the outliers
    qw = quantize_weight(w, QuantSpec("int8", G.PER_TENSOR, outlier_fraction=64 / w.numel()))
    assert qw.scale.shape == (1, 1)
    assert w8a8s_outliers(qw.q[:1]) == 64 and w8a8s_outliers(qw.q[1:]) == 0


def test_spec_checks_and_round_trip():
    spec = QuantSpec("int8", G.PER_CHANNEL, outlier_fraction=0.05)
    assert QuantSpec.from_dict(spec.to_dict()) == spec and spec.is_w8a8s
    assert "outlier_fraction" not in QuantSpec("int8").to_dict()  # older layouts unchanged
    for bad in (dict(qtype="int4"), dict(granularity=G.PER_GROUP, group_size=32), dict(symmetric=False),
                dict(outlier_fraction=0.7), dict(outlier_fraction=True)):  # fmt: skip
        with pytest.raises(SlimquantError, match="outlier_fraction"):
            QuantSpec(**{"qtype": "int8", "granularity": G.PER_CHANNEL, "outlier_fraction": 0.05, **bad})
    r = Recipe(weight=spec, input=STATIC)
    assert r.quant_type == "w8a8s" and Recipe.from_json(r.to_json()) == r
    with pytest.raises(SlimquantError, match="W8A8S weights .* go with static int8 inputs"):
        Recipe(weight=spec)
    with pytest.raises(SlimquantError, match="go with static int8 inputs"):
        Recipe(weight=spec, input=QuantSpec("int8", G.PER_TOKEN, None, True, dynamic=True))
    with pytest.raises(SlimquantError, match="clip_search .* does not apply to W8A8S"):
        Recipe(weight=spec, input=STATIC, steps=(RTN(clip_search=True),))


# -- flags ---------------------------------------------------------------------------------------------------


def test_seed_example_flags_make_the_lowbit_w8a8s_recipe():
    r = recipe_from_flags(SEED.replace("--tokenizer_args", "").rsplit(" ", 1)[0])
    assert r.quant_type == "w8a8s"
    assert r.weight == QuantSpec("int8", G.PER_CHANNEL, outlier_fraction=0.01)
    assert r.input == STATIC
    assert isinstance(r.steps[0], SmoothQuantSearch)  # is_lowbit's searched smoothing (do_smooth)
    assert isinstance(r.weight_step, RTN)  # GPTQ on this grid is unstable past fraction 0.01 (BENCHMARKS.md)
    assert r.act_observer == "histogram" and r.sigma_factor == 3.0


def test_co_sparse_flags():
    r = recipe_from_flags("--co_sparse True --fraction 0.05")
    assert r.weight.outlier_fraction == 0.05 and isinstance(r.weight_step, RTN) and r.input == STATIC
    assert recipe_from_flags("--co_sparse True --a_bit 8 --w_bit 4 --w_method gptq").weight_step.TYPE == "gptq"
    assert recipe_from_flags("--co_sparse True --mm_tensor True").weight.granularity is G.PER_TENSOR
    assert recipe_from_flags("--is_lowbit True --open_outlier False").weight.outlier_fraction == 0.0
    assert recipe_from_flags("--is_lowbit True --w_method gptq").weight_step.TYPE == "gptq"
    assert isinstance(recipe_from_flags("--co_sparse True --do_smooth True").steps[0], SmoothQuant)  # m1 as ever
    # the per-group low-bit form is weight-only, as msModelSlim's
    r = recipe_from_flags("--is_lowbit True --open_outlier False --group_size 64")
    assert r.quant_type == "w4a16" and r.weight.group_size == 64 and r.input is None


@pytest.mark.parametrize("flags,exc,words", [
    ("--co_sparse True --a_bit 16", SlimquantError, "--co_sparse with --a_bit 16"),
    ("--is_lowbit True --a_bit 16", SlimquantError, "--is_lowbit with --a_bit 16"),
    ("--co_sparse True --group_size 64", SlimquantError, "--co_sparse with --group_size 64"),
    ("--co_sparse True --w_bit 8", SlimquantError, "--co_sparse with --w_bit 8"),
    ("--co_sparse True --is_dynamic True", SlimquantError, "--co_sparse with --is_dynamic True"),
    ("--co_sparse True --w_sym False", SlimquantError, "--co_sparse with --w_sym False"),
    ("--co_sparse True --fraction 0.2", SlimquantError, "--fraction 0.2: must be in [0.01, 0.1]"),
    ("--co_sparse True --fraction nan", SlimquantError, "--fraction nan"),
    ("--fraction 0.05", SlimquantError, "--fraction sets the outliers of sparse quantization"),
    ("--open_outlier False", SlimquantError, "--open_outlier applies to low-bit quantization"),
    ("--is_lowbit True --group_size 64", SlimquantError, "add --open_outlier False"),
    ("--is_lowbit True --open_outlier False --fraction 0.05", SlimquantError, "no outliers are split off"),
    ("--is_lowbit True --open_outlier False --group_size 64 --a_bit 8", NotSupportedYet, "W4A8 dynamic"),
    ("--co_sparse True --w_method autoround", NotSupportedYet, "--co_sparse with --w_method autoround"),
    ("--co_sparse True --w_clip_search True", SlimquantError, "does not apply to W8A8S"),
    ("--tp_size 2", NotSupportedYet, "slimquant compress --tp_size"),
])  # fmt: skip
def test_bad_sparse_flags_name_the_flag(flags, exc, words):
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        recipe_from_flags(flags)


# -- the checkpoint ------------------------------------------------------------------------------------------


@pytest.fixture
def w8a8s_dir(llama, tokenizer, input_ids, tmp_path):
    recipe = Recipe(weight=QuantSpec("int8", G.PER_CHANNEL, outlier_fraction=0.05), input=STATIC)
    result = slimquant.quantize(llama, recipe, input_ids, show_progress=False)
    out = slimquant.save(result, tmp_path / "w8a8s", tokenizer=tokenizer)
    return out, result


def test_w8a8s_layout_labels_dtypes_and_shapes(w8a8s_dir):
    out, _ = w8a8s_dir
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "quant_model_weight_w8a8s.safetensors", "quant_model_description_w8a8s.json"} <= names
    assert json.loads((out / "config.json").read_text())["quantize"] == "w8a8s"
    desc = json.loads((out / "quant_model_description_w8a8s.json").read_text())
    tensors = load_file(str(out / "quant_model_weight_w8a8s.safetensors"))
    assert desc["model_quant_type"] == "W8A8S" and desc["model.embed_tokens.weight"] == "FLOAT"
    for i in (0, 1):
        for lin, (n, k) in SHAPES.items():
            p = f"model.layers.{i}.{lin}"
            want = {"weight": (torch.int8, (n, k)), "input_scale": (torch.float32, (1,)),
                    "input_offset": (torch.float32, (1,)), "quant_bias": (torch.int32, (n,)),
                    "deq_scale": (torch.float32, (n,))}  # fmt: skip
            for leaf, (dtype, shape) in want.items():
                t = tensors[f"{p}.{leaf}"]
                assert desc[f"{p}.{leaf}"] == "W8A8S"
                assert (t.dtype, tuple(t.shape)) == (dtype, shape), f"{p}.{leaf}"
            w = tensors[f"{p}.weight"]
            assert w8a8s_outliers(w) <= int(0.05 * k) * n, p
            assert int(w.abs().max()) > 7, p  # outliers are kept as int8 values


def test_w8a8s_loads_and_runs_like_the_quantized_model(w8a8s_dir, input_ids):
    out, result = w8a8s_dir
    with torch.no_grad():
        want = result.model(input_ids).logits
        got = slimquant.load(out).model(input_ids).logits
    assert torch.equal(got, want)
    assert describe_checkpoint(out)["quant_type"] == "w8a8s"


def test_seed_example_command_runs(llama_dir, tmp_path, text_file, capsys):
    out = tmp_path / "w8a8s_seed"
    names = " ".join(f"model.layers.{i}.mlp.down_proj" for i in range(2))
    flags = SEED.replace("--tokenizer_args", "").rsplit(" ", 1)[0].split()
    argv = ["quantize", "--model_path", str(llama_dir), "--save_directory", str(out), "--calib_file", str(text_file),
            "--calib_size", "4", "--calib_seq_len", "16", "--disable_names", *names.split(), *flags,
            "--tokenizer_args", '{"padding_side":"left","pad_token":"<unk>"}']  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    desc = json.loads((out / "quant_model_description_w8a8s.json").read_text())
    assert desc["model_quant_type"] == "W8A8S"
    assert desc["model.layers.0.self_attn.q_proj.deq_scale"] == "W8A8S"
    assert desc["model.layers.1.mlp.down_proj.weight"] == "FLOAT"  # --disable_names
    assert json.loads((out / "config.json").read_text())["quantize"] == "w8a8s"
    tensors = load_file(str(out / "quant_model_weight_w8a8s.safetensors"))
    assert tensors["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8
