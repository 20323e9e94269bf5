"""The msModelSlim / MindIE directory layout (seed 002 tables) written by slimquant.save."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import slimquant
from slimquant import Granularity, QuantSpec, Recipe, SlimquantError
from slimquant.formats import msmodelslim as ms
from slimquant.formats.msmodelslim import MANIFEST, describe_checkpoint, read_manifest
from slimquant.kernels.weight_only import dequantize_weight_tensors

G = Granularity
W4G32 = Recipe(weight=QuantSpec("int4", G.PER_GROUP, 32, False))
# [n, k] of the tiny Llama's linears (hidden 64, intermediate 128, 2 kv heads of 16).
SHAPES = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
          "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
          "mlp.down_proj": (64, 128)}  # fmt: skip


def _save(model, path: Path, recipe: Recipe, **kw) -> Path:
    model_q = slimquant.quantize(model, recipe, show_progress=False)
    return slimquant.save(model_q, path, **kw)


@pytest.fixture
def w8_dir(llama, tokenizer, tmp_path) -> tuple[Path, dict]:
    float_state = {k: v.clone() for k, v in llama.state_dict().items()}
    return _save(llama, tmp_path / "w8", Recipe(), tokenizer=tokenizer), float_state


def test_w8a16_directory_layout(w8_dir):
    out, _ = w8_dir
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "quant_model_weight_w8a16.safetensors", "quant_model_description_w8a16.json",
            MANIFEST, "tokenizer.json", "tokenizer_config.json"} <= names  # fmt: skip
    assert not any(n.endswith((".bin", ".pt")) for n in names)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantize"] == "w8a16"
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["hidden_size"] == 64 and "quantization_config" not in cfg


def test_w8a16_description_labels(w8_dir):
    out, _ = w8_dir
    desc = json.loads((out / "quant_model_description_w8a16.json").read_text())
    tensors = load_file(str(out / "quant_model_weight_w8a16.safetensors"))
    assert desc["model_quant_type"] == "W8A16"
    assert set(desc) - {"model_quant_type"} == set(tensors)  # one label per stored tensor
    assert desc["model.embed_tokens.weight"] == "FLOAT"
    assert desc["model.norm.weight"] == "FLOAT"
    for i in (0, 1):
        assert desc[f"model.layers.{i}.input_layernorm.weight"] == "FLOAT"
        assert desc[f"model.layers.{i}.post_attention_layernorm.weight"] == "FLOAT"
        for lin in SHAPES:
            for t in ("weight", "weight_scale", "weight_offset"):
                assert desc[f"model.layers.{i}.{lin}.{t}"] == "W8A16"


def test_w8a16_tensor_dtypes_shapes_and_values(w8_dir):
    out, float_state = w8_dir
    tensors = load_file(str(out / "quant_model_weight_w8a16.safetensors"))
    for i in (0, 1):
        for lin, (n, k) in SHAPES.items():
            p = f"model.layers.{i}.{lin}"
            w, s, o = tensors[f"{p}.weight"], tensors[f"{p}.weight_scale"], tensors[f"{p}.weight_offset"]
            assert (w.dtype, tuple(w.shape)) == (torch.int8, (n, k)), p
            assert (s.dtype, tuple(s.shape)) == (torch.float32, (n, 1)), p
            assert (o.dtype, tuple(o.shape)) == (torch.float32, (n, 1)), p
            assert torch.equal(o, torch.zeros(n, 1))  # symmetric: offset 0
            # W ~= (weight + weight_offset) * weight_scale within half a step (symmetric int8, no clipping).
            err = (float_state[f"{p}.weight"] - (w.float() + o) * s).abs()
            assert (err <= s * 0.5 + 1e-7).all(), p
            assert int(w.abs().max()) == 127, p  # the largest weight of some row sits on the grid end
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32
    assert "lm_head.weight" not in tensors  # tied: stored once


def test_w4a16_g32_packed_layout_and_smaller_file(w8_dir, factories, tokenizer, tmp_path):
    w8, _ = w8_dir
    llama = factories["llama"](len(tokenizer))
    float_state = {k: v.clone() for k, v in llama.state_dict().items()}
    out = _save(llama, tmp_path / "w4", W4G32)
    assert json.loads((out / "config.json").read_text())["quantize"] == "w4a16"
    desc = json.loads((out / "quant_model_description_w4a16.json").read_text())
    assert desc["model_quant_type"] == "W4A16"
    assert desc["model.layers.0.mlp.down_proj.weight_offset"] == "W4A16"
    tensors = load_file(str(out / "quant_model_weight_w4a16.safetensors"))
    spec = W4G32.weight
    for lin, (n, k) in SHAPES.items():
        p = f"model.layers.1.{lin}"
        w, s, o = tensors[f"{p}.weight"], tensors[f"{p}.weight_scale"], tensors[f"{p}.weight_offset"]
        assert (w.dtype, tuple(w.shape)) == (torch.uint8, (n, k // 2)), p  # two 4-bit values per byte
        assert (s.dtype, tuple(s.shape)) == (torch.float32, (n, k // 32)), p
        assert (o.dtype, tuple(o.shape)) == (torch.float32, (n, k // 32)), p
        assert not torch.equal(o, torch.zeros_like(o))  # asymmetric: real offsets
        assert not bool(torch.signbit(o[o == 0]).any())  # no -0.0 on disk
        deq = dequantize_weight_tensors(w, s, -o, spec, k, torch.float32)  # offset = -zero_point
        # the file's convention, Ascend antiquant: W = (weight + weight_offset) * weight_scale
        from slimquant.math.packing import unpack
        assert torch.equal(deq, ((unpack(w, 4, -8, k).float().reshape(n, -1, 32) + o.unsqueeze(-1))
                                 * s.unsqueeze(-1)).reshape(n, k))  # fmt: skip
        err = (float_state[f"{p}.weight"] - deq).abs().reshape(n, k // 32, 32)
        assert (err <= s.unsqueeze(-1) + 1e-6).all(), p
    w4_size = (out / "quant_model_weight_w4a16.safetensors").stat().st_size
    w8_size = (w8 / "quant_model_weight_w8a16.safetensors").stat().st_size
    assert w4_size < w8_size


def test_bias_is_kept_float_beside_the_quantized_weight(bert, tmp_path):
    out = _save(bert, tmp_path / "bert", Recipe())
    tensors = load_file(str(out / "quant_model_weight_w8a16.safetensors"))
    b = tensors["encoder.layer.0.attention.self.query.bias"]
    assert (b.dtype, tuple(b.shape)) == (torch.float32, (32,))
    assert tensors["encoder.layer.0.intermediate.dense.weight"].shape == (64, 32)
    assert tensors["pooler.dense.weight"].dtype == torch.float32  # last linear kept float
    desc = json.loads((out / "quant_model_description_w8a16.json").read_text())
    assert desc["pooler.dense.weight"] == "FLOAT"
    assert desc["encoder.layer.0.attention.self.query.weight"] == "W8A16"


def test_part_file_size_shards_and_loads_bit_identically(llama, input_ids, tmp_path):
    out = _save(llama, tmp_path / "sharded", Recipe(), part_file_size=0.00002)  # 20 kB shards
    shards = sorted(out.glob("quant_model_weight_w8a16-*-of-*.safetensors"))
    assert len(shards) >= 3
    assert not (out / "quant_model_weight_w8a16.safetensors").exists()
    assert shards[0].name == f"quant_model_weight_w8a16-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "quant_model_weight_w8a16.safetensors.index.json").read_text())
    stored = {}
    for f in shards:
        part = load_file(str(f))
        assert not set(part) & set(stored)  # each tensor in exactly one shard
        stored.update(part)
        assert {n for n, v in index["weight_map"].items() if v == f.name} == set(part)
    assert set(index["weight_map"]) == set(stored)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    assert read_manifest(out)["files"] == [f.name for f in shards]

    loaded = slimquant.load(out).model
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, llama(input_ids=input_ids).logits)
    info = describe_checkpoint(out)
    assert info["total_bytes"] == index["metadata"]["total_size"]


def test_non_positive_part_file_size_is_refused(mlp, tmp_path):
    mlp_q = slimquant.quantize(mlp, Recipe(), show_progress=False)
    with pytest.raises(SlimquantError, match="part_file_size .*must be a positive number"):
        slimquant.save(mlp_q, tmp_path / "out", part_file_size=0)
    assert not (tmp_path / "out").exists()


def test_describe_checkpoint(llama, tmp_path):
    out = _save(llama, tmp_path / "w4", Recipe(weight=QuantSpec("int4", G.PER_GROUP, 32, False),
                                               embedding=QuantSpec("int8", G.PER_CHANNEL)))  # fmt: skip
    info = describe_checkpoint(out)
    assert info["quant_type"] == "w4a16"
    rows = {r["name"]: r for r in info["layers"]}
    assert len(rows) == 16  # 14 linears + embedding + tied lm_head
    q = rows["model.layers.0.self_attn.q_proj"]
    assert (q["qtype"], q["bits"], q["granularity"], q["group_size"], q["symmetric"]) == ("int4", 4, "per_group", 32, False)
    # 64 x 64 int4 = 2048 bytes + scale and offset [64, 2] float32 = 1024 bytes
    assert q["bytes"] == 64 * 32 + 2 * 64 * 2 * 4
    emb = rows["model.embed_tokens"]
    assert (emb["qtype"], emb["bits"], emb["module"]) == ("int8", 8, "QEmbedding")
    assert rows["lm_head"]["tied_to"] == "model.embed_tokens" and rows["lm_head"]["bytes"] == 0
    assert info["quantized_bytes"] + info["float_bytes"] == info["total_bytes"]
    assert info["float_bytes"] == 5 * 64 * 4  # the five RMSNorm weights


def test_fp8_weights_round_trip(mlp, factories, tmp_path):
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    out = _save(mlp, tmp_path / "fp8", Recipe(weight=QuantSpec("fp8_e4m3", G.PER_CHANNEL)))
    desc = json.loads(next(out.glob("quant_model_description_*.json")).read_text())
    assert desc["0.weight"] == "WFP8A16" and "0.weight_offset" not in desc
    loaded = slimquant.load(out, model=factories["mlp"](seed=1)).model
    assert loaded[0].weight.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        assert torch.equal(loaded(x), mlp(x))


# -- reading broken checkpoints -----------------------------------------------------------------


@pytest.fixture
def mlp_ckpt(mlp, tmp_path) -> Path:
    return _save(mlp, tmp_path / "ckpt", Recipe())


def test_truncated_checkpoint_weight_file_is_named(mlp_ckpt, factories):
    f = mlp_ckpt / "quant_model_weight_w8a16.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlimquantError, match=r"quant_model_weight_w8a16\.safetensors.*truncated"):
        slimquant.load(mlp_ckpt, model=factories["mlp"]()).model


def test_missing_checkpoint_weight_file_is_named(mlp_ckpt, factories):
    (mlp_ckpt / "quant_model_weight_w8a16.safetensors").unlink()
    with pytest.raises(SlimquantError, match=r"quant_model_weight_w8a16\.safetensors is missing"):
        slimquant.load(mlp_ckpt, model=factories["mlp"]()).model


def test_manifest_problems(mlp_ckpt, tmp_path):
    m = mlp_ckpt / MANIFEST
    data = json.loads(m.read_text())
    m.write_text(json.dumps(dict(data, format_version=99)))
    with pytest.raises(SlimquantError, match="unsupported format"):
        read_manifest(mlp_ckpt)
    m.write_text("{not json")
    with pytest.raises(SlimquantError, match=f"{MANIFEST} is not valid JSON"):
        read_manifest(mlp_ckpt)
    m.unlink()
    with pytest.raises(SlimquantError, match=f"{MANIFEST} is missing"):
        read_manifest(mlp_ckpt)
    with pytest.raises(SlimquantError, match="is not a directory"):
        read_manifest(tmp_path / "nope")


def test_checkpoint_onto_wrong_architecture_is_refused(mlp_ckpt, cnn):
    with pytest.raises(SlimquantError, match="does not exist in the model skeleton|does not match the model"):
        slimquant.load(mlp_ckpt, model=cnn).model


def test_checkpoint_onto_wrong_shapes_is_refused(mlp_ckpt):
    wrong = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64),
                                torch.nn.ReLU(), torch.nn.Linear(64, 7))  # fmt: skip
    with pytest.raises(SlimquantError, match="does not match the model"):
        slimquant.load(mlp_ckpt, model=wrong).model


def test_deq_scale_int64_round_trip_is_bit_exact() -> None:
    specials = torch.tensor([1.0, 2.0**-126, 1e-45, 3.0e38, -1.0, 0.0, -0.0, float("inf")])
    d = torch.cat([torch.rand(64, generator=torch.Generator().manual_seed(6)) * 1e-3, specials])
    t = ms.deq_scale_to_int64(d)
    assert t.dtype == torch.int64 and t.shape == d.shape
    assert int(t[64]) == 0x3F800000 and int(t[68]) == 0xBF800000  # zero-extended, non-negative
    assert bool((t >= 0).all()) and bool((t < 2**32).all())
    back = ms.deq_scale_from_int64(t)
    assert back.dtype == torch.float32 and torch.equal(back.view(torch.int32), d.view(torch.int32))
    sign_extended = d.view(torch.int32).to(torch.int64)  # the other int64 convention reads back the same
    assert torch.equal(ms.deq_scale_from_int64(sign_extended).view(torch.int32), d.view(torch.int32))
