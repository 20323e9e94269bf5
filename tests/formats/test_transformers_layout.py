"""The transformers layout and slimquant's transformers quantizer: ``from_pretrained`` of a slimquant checkpoint
returns slimquant's quantized modules (deploy mode) computing slimquant's logits, ``save_pretrained`` round-trips,
``slimquant.load`` reads both the codec's output and ``save_pretrained``'s, and bad input is refused by name."""

from __future__ import annotations

import json

import pytest
import torch

import slimquant as sq
from slimquant.errors import SlimquantError
from slimquant.formats import transformers_layout as tl
from slimquant.nn import QModule
from slimquant.types import Granularity, QuantSpec

PG, PC, PT = Granularity.PER_GROUP, Granularity.PER_CHANNEL, Granularity.PER_TENSOR

RECIPES = {
    "w4a16_g32_asym": lambda: sq.Recipe.from_flags("--w_bit 4 --group_size 32 --w_sym False"),
    "w8a16": lambda: sq.Recipe.from_flags("--w_bit 8"),
    "w3a16_channel": lambda: sq.Recipe.from_flags("--w_bit 3"),
    "w8a8_dynamic": lambda: sq.Recipe.from_flags("--w_bit 8 --a_bit 8 --is_dynamic True"),
    "w8a8_static": lambda: sq.Recipe.from_flags("--w_bit 8 --a_bit 8 --mm_tensor False"),
    "fp8_weight_only": lambda: sq.Recipe(weight=QuantSpec("fp8_e4m3", PC)),
    "int8_embedding_untied": lambda: sq.Recipe(weight=QuantSpec("int4", PG, 32), disable_last_linear=False),
}


def _quantized(tokenizer, name: str, tie: bool = True):
    from conftest import make_llama

    recipe = RECIPES[name]()
    calib = torch.randint(0, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(1))
    return sq.quantize(make_llama(len(tokenizer), tie=tie), recipe,
                       calib_data=calib if recipe.needs_calibration else None, show_progress=False)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def registered():
    sq.register_transformers()
    sq.register_transformers()  # idempotent


@pytest.fixture
def ids(tokenizer):
    return torch.randint(0, len(tokenizer), (2, 20), generator=torch.Generator().manual_seed(0))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", list(RECIPES))
def test_from_pretrained_and_save_pretrained_round_trip(tokenizer, ids, tmp_path, name):
    from transformers import AutoModelForCausalLM

    res = _quantized(tokenizer, name, tie=name != "int8_embedding_untied")
    ref = _logits(res.model, ids)
    sq.save(res, tmp_path / "ck", format="transformers", tokenizer=tokenizer)
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "slimquant"
    assert set(config["quantization_config"]["layers"]) == {n for n, m in res.model.named_modules() if isinstance(m, QModule)}

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    layers = {n: type(m) for n, m in hf.named_modules() if isinstance(m, QModule)}
    assert layers == {n: type(m) for n, m in res.model.named_modules() if isinstance(m, QModule)}
    assert not any(p.is_meta for p in list(hf.parameters()) + list(hf.buffers()))
    q = hf.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(q, QModule) and (q.spec.qtype.startswith("fp8") or not q.weight.is_floating_point())
    assert torch.equal(_logits(hf, ids), ref)  # the same modules and kernels: the same bits
    # deploy mode: the loaded model holds exactly slimquant's tensors (no float copy of a quantized weight)
    assert {k: (v.dtype, v.shape) for k, v in hf.state_dict().items()} == {
        k: (v.dtype, v.shape) for k, v in res.model.state_dict().items()}

    hf.save_pretrained(tmp_path / "again")
    assert not (tmp_path / "again" / "slimquant_manifest.json").exists()  # transformers' own writer
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(_logits(again, ids), ref)
    for d in ("ck", "again"):  # slimquant reads both: the codec's output (manifest) and save_pretrained's (config)
        loaded = sq.load(tmp_path / d)
        assert torch.equal(_logits(loaded.model, ids), ref)


def test_export_cli_and_codec_agree(tokenizer, ids, tmp_path, capsys):
    from slimquant.cli.main import main

    res = _quantized(tokenizer, "w4a16_g32_asym")
    sq.save(res, tmp_path / "ms", tokenizer=tokenizer)  # msmodelslim
    assert main(["export", "--model", str(tmp_path / "ms"), "--format", "transformers",
                 "--save_directory", str(tmp_path / "hf")]) == 0  # fmt: skip
    from transformers import AutoModelForCausalLM

    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), ids), _logits(res.model, ids))
    assert main(["export", "--model", str(tmp_path / "ms"), "--format", "transformers", "--save_directory",
                 str(tmp_path / "hf")]) != 0  # fmt: skip
    assert "pass --overwrite" in capsys.readouterr().err


def test_bad_input_is_refused_by_name(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    res = _quantized(tokenizer, "w4a16_g32_asym")
    sq.save(res, tmp_path / "ck", format="transformers", tokenizer=tokenizer)
    cfg_path = tmp_path / "ck" / "config.json"
    good = json.loads(cfg_path.read_text())

    bad = json.loads(json.dumps(good))
    bad["quantization_config"]["layers"]["model.layers.9.mlp.up_proj"] = bad["quantization_config"]["layers"][
        "model.layers.0.mlp.up_proj"]
    cfg_path.write_text(json.dumps(bad))
    (tmp_path / "ck" / "slimquant_manifest.json").unlink()
    with pytest.raises(SlimquantError, match="model.layers.9.mlp.up_proj"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    with pytest.raises(SlimquantError, match="model.layers.9.mlp.up_proj"):
        sq.load(tmp_path / "ck")

    bad = json.loads(json.dumps(good))
    bad["quantization_config"]["layers"] = {}
    cfg_path.write_text(json.dumps(bad))
    with pytest.raises(SlimquantError, match="lists no quantized layers"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    bad["quantization_config"]["layers"] = ["model.layers.0.mlp.up_proj"]
    cfg_path.write_text(json.dumps(bad))
    with pytest.raises(SlimquantError, match="'layers' must map layer names"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ck")

    # a tensor missing from the file
    from safetensors.torch import load_file, save_file

    cfg_path.write_text(json.dumps(good))
    tensors = load_file(tmp_path / "ck" / "model.safetensors")
    del tensors["model.layers.1.self_attn.o_proj.weight_scale"]
    save_file(tensors, tmp_path / "ck" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SlimquantError, match="model.layers.1.self_attn.o_proj.weight_scale"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    with pytest.raises(SlimquantError, match="model.layers.1.self_attn.o_proj.weight_scale"):
        sq.load(tmp_path / "ck")
    # one stored with another dtype
    tensors = load_file(tmp_path / "ck" / "model.safetensors")
    tensors["model.layers.1.self_attn.o_proj.weight_scale"] = torch.ones(64, 2, dtype=torch.float16)
    save_file(tensors, tmp_path / "ck" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SlimquantError, match=r"o_proj.weight_scale is F16 \[64, 2\]; the quantized layer holds F32"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ck")


def test_from_pretrained_does_not_quantize_a_float_model(llama_dir):
    from transformers import AutoModelForCausalLM

    from slimquant.models.hf_quantizer import SlimquantConfig

    with pytest.raises(ValueError, match="pre-quantized"):
        AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=SlimquantConfig())


def test_layout_detection(tmp_path, llama_dir):
    assert not tl.is_layout(llama_dir) and not tl.is_layout(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    assert not tl.is_layout(tmp_path)


def test_save_pretrained_output_inspects_and_exports(tokenizer, ids, tmp_path, capsys):
    """save_pretrained's directory (no slimquant manifest) works with inspect (headers + config only) and export."""
    from transformers import AutoModelForCausalLM

    from slimquant.cli.main import main
    from slimquant.formats.checkpoint import describe_checkpoint

    res = _quantized(tokenizer, "w4a16_g32_asym")
    sq.save(res, tmp_path / "ck", format="transformers")
    AutoModelForCausalLM.from_pretrained(tmp_path / "ck").save_pretrained(tmp_path / "again")
    info = describe_checkpoint(tmp_path / "again")
    assert info["format"] == "transformers" and info["quant_type"] == "w4a16" and len(info["layers"]) == 14
    assert info["quantized_bytes"] == describe_checkpoint(tmp_path / "ck")["quantized_bytes"]
    assert main(["inspect", str(tmp_path / "again")]) == 0
    assert "layer types: W4A16 x 14" in capsys.readouterr().out
    assert main(["export", "--model", str(tmp_path / "again"), "--format", "msmodelslim",
                 "--save_directory", str(tmp_path / "ms")]) == 0  # fmt: skip
    assert torch.equal(_logits(sq.load(tmp_path / "ms").model, ids), _logits(res.model, ids))
