"""The compressed-tensors codec: packing bit-exact against the compressed-tensors package, slimquant's own reload,
transformers' loader (``from_pretrained`` with the compressed-tensors package) against slimquant's logits, the
fields vLLM's config parser reads, import of a checkpoint without slimquant's manifest, ``slimquant export``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import slimquant as sq
from slimquant.errors import SlimquantError
from slimquant.formats import compressed_tensors as ct
from slimquant.types import Granularity, QuantSpec

PG, PC, PT, TOK = Granularity.PER_GROUP, Granularity.PER_CHANNEL, Granularity.PER_TENSOR, Granularity.PER_TOKEN

RECIPES = {
    "w4a16_g32": lambda: sq.Recipe.from_flags("--w_bit 4 --group_size 32"),
    "w4a16_g32_asym": lambda: sq.Recipe.from_flags("--w_bit 4 --group_size 32 --w_sym False"),
    "w8a16": lambda: sq.Recipe.from_flags("--w_bit 8"),
    "w3a16_channel": lambda: sq.Recipe.from_flags("--w_bit 3"),
    "w4a16_gptq": lambda: sq.Recipe.from_flags("--w_bit 4 --group_size 32 --w_method gptq"),
    "w8a8_dynamic": lambda: sq.Recipe.from_flags("--w_bit 8 --a_bit 8 --is_dynamic True"),
    "w8a8_static": lambda: sq.Recipe.from_flags("--w_bit 8 --a_bit 8 --mm_tensor False"),
    "fp8_static": lambda: sq.Recipe(weight=QuantSpec("fp8_e4m3", PC), input=QuantSpec("fp8_e4m3", PT)),
    "fp8_weight_only": lambda: sq.Recipe(weight=QuantSpec("fp8_e4m3", PC)),
    "uint4_asym": lambda: sq.Recipe(weight=QuantSpec("uint4", PG, 32, symmetric=False)),
    "w4a16_g32_2of4": lambda: sq.Recipe.from_flags("--w_bit 4 --group_size 32 --sparsity_pattern 2:4"),
    "w8a8_static_wanda": lambda: sq.Recipe.from_flags("--w_bit 8 --a_bit 8 --mm_tensor False --sparsity 0.5 "
                                                      "--sparse_method wanda"),
    "mixed": lambda: sq.Recipe(weight=QuantSpec("int4", PG, 32), overrides=(
        ("model.layers.0.mlp.*", sq.LayerOverride(weight=QuantSpec("int8", PC))),
        ("model.layers.1.self_attn.v_proj", sq.LayerOverride(weight=None)))),
}  # fmt: skip


def _quantized(tokenizer, name: str, seed: int = 0):
    from conftest import make_llama

    recipe = RECIPES[name]()
    calib = torch.randint(0, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(1))
    return sq.quantize(make_llama(len(tokenizer), seed=seed), recipe,
                       calib_data=calib if recipe.needs_calibration else None, show_progress=False)  # fmt: skip


@pytest.fixture
def ids(tokenizer):
    return torch.randint(0, len(tokenizer), (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_int32_bit_streams_round_trip(bits):
    for cols in (1, 7, 32, 45, 64):
        u = torch.randint(0, 2**bits, (5, cols), generator=torch.Generator().manual_seed(cols))
        p = ct.pack_int32(u, bits)
        assert p.dtype == torch.int32 and p.shape == (5, -(-cols * bits // 32))
        assert torch.equal(ct.unpack_int32(p, bits, cols), u)
    with pytest.raises(ValueError, match="out of range"):
        ct.pack_int32(torch.tensor([[2**bits]]), bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packing_is_bit_exact_with_the_compressed_tensors_package(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    for cols in (1, 45, 64):
        q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (6, cols), dtype=torch.int8,
                          generator=torch.Generator().manual_seed(cols))  # fmt: skip
        half = 2 ** (bits - 1)
        assert torch.equal(ct.pack_int32(q.long() + half, bits), helpers.pack_to_int32(q, bits))
        # zero points: packed along the output dimension
        zp = q  # [out, groups]: packed along the output dimension
        assert torch.equal(ct.pack_int32(zp.T.long() + half, bits).T, helpers.pack_to_int32(zp, bits, packed_dim=0))


@pytest.mark.parametrize("name", list(RECIPES))
def test_export_reloads_bit_identical_in_slimquant(tokenizer, ids, tmp_path, name):
    res = _quantized(tokenizer, name)
    sq.save(res, tmp_path / "ct", format="compressed-tensors")
    back = sq.load(tmp_path / "ct")
    with torch.no_grad():
        assert torch.equal(back.model(input_ids=ids).logits, res.model(input_ids=ids).logits)
    # and saved again: the same files
    sq.save(back, tmp_path / "again", format="compressed-tensors")
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "ct" / f).read_bytes() == (tmp_path / "again" / f).read_bytes(), f


def _config(d) -> dict:
    return json.loads((d / "config.json").read_text())["quantization_config"]


def test_config_and_tensors_have_what_vllm_and_transformers_read(tokenizer, tmp_path):
    """The fields vLLM's compressed-tensors parser requires (quant_method, format, quantization_status
    compressed, config_groups with targets / weights / input_activations / format, ignore naming lm_head) and the
    tensor names, dtypes and shapes its WNA16 / W8A8 schemes create."""
    from safetensors import safe_open

    res = _quantized(tokenizer, "w4a16_gptq")
    sq.save(res, tmp_path / "w4", format="compressed-tensors")
    q = _config(tmp_path / "w4")
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert q["quantization_status"] == "compressed" and q["ignore"] == ["lm_head"]
    (group,) = q["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["format"] == "pack-quantized" and group["input_activations"] is None
    w = group["weights"]
    assert (w["num_bits"], w["type"], w["symmetric"], w["strategy"], w["group_size"], w["dynamic"]) == (
        4, "int", True, "group", 32, False)
    assert w["actorder"] == "weight"  # GPTQ act-order, static groups: columns in order, no g_idx
    with safe_open(str(tmp_path / "w4" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        p = "model.layers.0.self_attn.q_proj"
        assert {f"{p}.weight_packed", f"{p}.weight_scale", f"{p}.weight_shape"} <= keys and f"{p}.weight" not in keys
        assert not any(k.endswith(("weight_g_idx", "weight_zero_point")) for k in keys)
        assert f.get_tensor(f"{p}.weight_packed").dtype == torch.int32
        assert f.get_tensor(f"{p}.weight_packed").shape == (64, 64 * 4 // 32)
        assert f.get_tensor(f"{p}.weight_scale").shape == (64, 2)
        assert f.get_tensor(f"{p}.weight_shape").tolist() == [64, 64]
        assert f.get_tensor(f"{p}.weight_shape").dtype == torch.int64
        assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # tied: written once
    res = _quantized(tokenizer, "w8a8_static")
    sq.save(res, tmp_path / "w8a8", format="compressed-tensors")
    q = _config(tmp_path / "w8a8")
    (group,) = q["config_groups"].values()
    assert q["format"] == group["format"] == "int-quantized"
    assert group["weights"]["strategy"] == "channel" and group["weights"]["symmetric"] is True
    inp = group["input_activations"]
    assert (inp["strategy"], inp["dynamic"], inp["num_bits"], inp["type"]) == ("tensor", False, 8, "int")
    with safe_open(str(tmp_path / "w8a8" / "model.safetensors"), "pt") as f:
        p = "model.layers.0.mlp.down_proj"
        assert f.get_tensor(f"{p}.weight").dtype == torch.int8 and f.get_tensor(f"{p}.weight_scale").shape == (64, 1)
        assert f.get_tensor(f"{p}.input_scale").shape == (1,)
        if not inp["symmetric"]:
            assert f.get_tensor(f"{p}.input_zero_point").dtype == torch.int8
    # the package's own schema accepts what we wrote (extra keys inside groups would be fatal there)
    cfg = pytest.importorskip("compressed_tensors")
    for d in ("w4", "w8a8"):
        cfg.QuantizationConfig.model_validate(_config(tmp_path / d))


def test_mixed_precision_has_a_group_per_scheme_naming_its_layers(tokenizer, tmp_path):
    res = _quantized(tokenizer, "mixed")
    sq.save(res, tmp_path / "m", format="compressed-tensors")
    q = _config(tmp_path / "m")
    assert q["format"] == "pack-quantized" and len(q["config_groups"]) == 2
    targets = {g["weights"]["num_bits"]: g["targets"] for g in q["config_groups"].values()}
    assert targets[8] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    assert "model.layers.1.self_attn.v_proj" in q["ignore"] and "lm_head" in q["ignore"]
    assert "model.layers.1.self_attn.v_proj" not in targets[4]


@pytest.mark.parametrize("name", ["w4a16_g32", "w8a16", "w3a16_channel", "w4a16_gptq", "w8a8_static", "fp8_static",
                                  "fp8_weight_only", "mixed", "w4a16_g32_asym", "uint4_asym", "w4a16_g32_2of4",
                                  "w8a8_static_wanda"])  # fmt: skip
def test_transformers_loads_it_and_computes_slimquants_logits(tokenizer, ids, tmp_path, name):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    res = _quantized(tokenizer, name)
    sq.save(res, tmp_path / "ct", format="compressed-tensors")
    kw = {}
    if name in ("w4a16_g32_asym", "uint4_asym"):
        # transformers' default path builds the zero points unpacked and refuses the packed ones
        # (compressed-tensors 0.20 / transformers 5.25); its dequantize path reads them
        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    tf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), **kw).eval()
    with torch.no_grad():
        ours = res.model(input_ids=ids).logits
        theirs = tf(input_ids=ids).logits
    assert (ours - theirs).abs().max() <= 1e-5 * ours.abs().max()


def test_transformers_w8a8_dynamic_differs_only_by_its_token_scale_convention(tokenizer, ids, tmp_path):
    """compressed-tensors' per-token scale is absmax / 127.5, slimquant's (and vLLM's kernels') absmax / 127: with
    that convention put into slimquant's own arithmetic, the logits agree up to float rounding."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    res = _quantized(tokenizer, "w8a8_dynamic")
    sq.save(res, tmp_path / "ct", format="compressed-tensors")
    tf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct")).eval()
    ref = res.model
    emulated = {}

    def forward(m, x):  # slimquant's dynamic W8A8 with a token scale of absmax / 127.5, in float32
        s = x.abs().amax(-1, keepdim=True).float() / 127.5
        xq = torch.clamp(torch.round(x.float() / s), -128, 127)
        y = (xq @ m.weight.float().T) * s * m.weight_scale.float().T
        return (y + m.bias if m.bias is not None else y).to(x.dtype)

    from slimquant.nn import QLinearW8A8

    for n, m in ref.named_modules():
        if isinstance(m, QLinearW8A8):
            emulated[n] = m.kernel
            m.kernel = "reference"  # no fused producers: every layer's own forward runs (the one patched here)
            m.forward = (lambda m: lambda x: forward(m, x))(m)
    with torch.no_grad():
        theirs = tf(input_ids=ids).logits
        mine = ref(input_ids=ids).logits
    for n, k in emulated.items():
        m = ref.get_submodule(n)
        m.kernel = k
        del m.forward
    with torch.no_grad():
        ours = ref(input_ids=ids).logits
    # float rounding (an int8 rounding flip at a .5 boundary moves a few logits by ~1e-4), against the
    # convention's effect: over 10x larger
    emulated_diff, diff = float((mine - theirs).abs().max()), float((ours - theirs).abs().max())
    assert emulated_diff <= 2e-4 * float(ours.abs().max()) and diff > 10 * emulated_diff


def test_a_checkpoint_without_slimquants_manifest_loads_and_converts(tokenizer, ids, tmp_path, capsys):
    """As llm-compressor writes it: config.json + safetensors only, bf16 scales, weight-only int8 one value per
    byte (int-quantized). slimquant loads it quantized; ``slimquant export --format msmodelslim`` converts it."""
    from safetensors.torch import load_file, save_file

    from slimquant.cli.main import main

    for name in ("w4a16_gptq", "w8a8_dynamic", "w8a16"):
        res = _quantized(tokenizer, name)
        d = tmp_path / f"foreign_{name}"
        sq.save(res, d, format="compressed-tensors")
        (d / "slimquant_manifest.json").unlink()
        for f in ("quantize_report.json", "quantize_report.md"):
            (d / f).unlink(missing_ok=True)
        t = load_file(str(d / "model.safetensors"))
        t = {k: v.to(torch.bfloat16) if k.endswith("weight_scale") else v for k, v in t.items()}
        if name == "w8a16":  # the older weight-only layout: one int8 per value, format int-quantized
            cfg = json.loads((d / "config.json").read_text())
            for g in cfg["quantization_config"]["config_groups"].values():
                g["format"] = "int-quantized"
            cfg["quantization_config"]["format"] = "int-quantized"
            (d / "config.json").write_text(json.dumps(cfg))
            for k in [k for k in t if k.endswith("weight_packed")]:
                p = k.removesuffix("_packed")
                n, kk = t[p + "_shape"].tolist()
                t[p] = (ct.unpack_int32(t.pop(k), 8, kk) - 128).to(torch.int8)
                del t[p + "_shape"]
        save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
        lm = sq.load_model(str(d))
        with torch.no_grad():
            ref = res.model(input_ids=ids).logits
            got = lm.model(input_ids=ids).logits
        # bf16 scales: the weights differ by the scale rounding only
        assert (got - ref).abs().max() <= 0.02 * ref.abs().max(), name
        out = tmp_path / f"ms_{name}"
        assert main(["export", "--model", str(d), "--format", "msmodelslim", "--save_directory", str(out)]) == 0
        assert "to msmodelslim" in capsys.readouterr().out
        with torch.no_grad():
            assert torch.equal(sq.load(out).model(input_ids=ids).logits, got)


def test_foreign_checkpoints_we_cannot_read_are_refused_naming_what(tokenizer, tmp_path):
    res = _quantized(tokenizer, "w4a16_g32")
    d = tmp_path / "f"
    sq.save(res, d, format="compressed-tensors")
    (d / "slimquant_manifest.json").unlink()
    cfg = json.loads((d / "config.json").read_text())

    def with_config(edit) -> str:
        c = json.loads(json.dumps(cfg))
        edit(c["quantization_config"])
        (d / "config.json").write_text(json.dumps(c))
        with pytest.raises(SlimquantError) as ei:
            sq.load_model(str(d))
        return str(ei.value)

    g = "group_0"
    assert "actorder 'group'" in with_config(lambda q: q["config_groups"][g]["weights"].update(actorder="group"))
    assert "quantization_status is 'frozen'" in with_config(lambda q: q.update(quantization_status="frozen"))
    assert "kv_cache_scheme" in with_config(lambda q: q.update(kv_cache_scheme={"num_bits": 8, "type": "float"}))
    assert "strategy 'block'" in with_config(lambda q: q["config_groups"][g]["weights"].update(strategy="block"))
    assert "format 'marlin-24'" in with_config(lambda q: q["config_groups"][g].update(format="marlin-24"))
    # a tensor we cannot map is named
    from safetensors.torch import load_file, save_file

    (d / "config.json").write_text(json.dumps(cfg))
    t = load_file(str(d / "model.safetensors"))
    t["model.layers.0.self_attn.q_proj.weight_g_idx"] = torch.zeros(64, dtype=torch.int32)
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(SlimquantError, match="model.layers.0.self_attn.q_proj.weight_g_idx"):
        sq.load_model(str(d))


def test_what_the_format_cannot_hold_is_refused_before_writing(tokenizer, tmp_path, cnn):
    res = sq.quantize(cnn, sq.Recipe(weight=QuantSpec("int8", PC)), show_progress=False)
    with pytest.raises(SlimquantError, match="is a Hugging Face layout: Sequential has no transformers config"):
        sq.save(res, tmp_path / "c", format="compressed-tensors")
    assert not (tmp_path / "c").exists()
    from slimquant.nn import QConv2d

    name, conv = next((n, m) for n, m in res.model.named_modules() if isinstance(m, QConv2d))
    with pytest.raises(SlimquantError, match=rf"cannot hold layer {name}: a quantized Conv2d"):
        ct.layer_scheme(name, conv)
    from slimquant.formats.compressed_tensors import check_recipe

    with pytest.raises(SlimquantError, match="cannot hold the int8 KV cache"):
        check_recipe(sq.Recipe.from_flags("--w_bit 8 --a_bit 8 --use_kvcache_quant True"))
    with pytest.raises(SlimquantError, match="cannot hold a quantized embedding"):
        check_recipe(sq.Recipe.from_flags("--w_bit 8 --embedding_bit 8"))
    with pytest.raises(SlimquantError, match="stores integer zero points"):
        check_recipe(sq.Recipe.from_flags("--w_bit 4 --group_size 32 --w_sym False --w_zero_point float"))
    # a float-zero-point checkpoint whose zero points are not integers: refused naming the layer
    r = sq.quantize(_plain_llama(tokenizer), sq.Recipe.from_flags("--w_bit 4 --group_size 32 --w_sym False "
                                                                   "--w_zero_point float"), show_progress=False)  # fmt: skip
    with pytest.raises(SlimquantError, match=r"cannot hold layer model\.layers\.0\..*zero points are floats"):
        sq.save(r, tmp_path / "z", format="compressed-tensors")
    assert not (tmp_path / "z").exists()


def _plain_llama(tokenizer):
    from conftest import make_llama

    return make_llama(len(tokenizer))


def test_cli_export_and_quantize_save_format(tokenizer, ids, tmp_path, make_llama_dir, capsys):
    from slimquant.cli.main import main

    src = make_llama_dir("m")
    q = tmp_path / "q"
    assert main(["quantize", "--model_path", str(src), "--save_directory", str(q), "--w_bit", "4", "--group_size",
                 "32", "--save_format", "compressed-tensors"]) == 0  # fmt: skip
    assert _config(q)["format"] == "pack-quantized"
    ms = tmp_path / "ms"
    assert main(["export", "--model", str(q), "--format", "msmodelslim", "--save_directory", str(ms)]) == 0
    back = tmp_path / "back"
    assert main(["export", "--model", str(ms), "--format", "compressed-tensors", "--save_directory", str(back)]) == 0
    assert (q / "model.safetensors").read_bytes() == (back / "model.safetensors").read_bytes()
    with torch.no_grad():
        assert torch.equal(sq.load(back).model(input_ids=ids).logits, sq.load(q).model(input_ids=ids).logits)
    capsys.readouterr()
    # an existing output is refused without --overwrite, and nothing is lost
    before = (back / "model.safetensors").read_bytes()
    assert main(["export", "--model", str(ms), "--format", "compressed-tensors", "--save_directory", str(back)]) == 1
    assert "--overwrite" in capsys.readouterr().err and (back / "model.safetensors").read_bytes() == before
    assert main(["export", "--model", str(ms), "--format", "compressed-tensors", "--save_directory", str(back),
                 "--overwrite"]) == 0  # fmt: skip
    for argv, words in [
        (["export", "--model", str(ms), "--format", "gguf", "--save_directory", str(tmp_path / "g")],
         "not a GGUF grid"),
        (["export", "--model", str(src), "--format", "compressed-tensors", "--save_directory", str(tmp_path / "x")],
         "neither a slimquant checkpoint"),
        (["quantize", "--model_path", str(src), "--save_directory", str(tmp_path / "e"), "--embedding_bit", "8",
          "--save_format", "compressed-tensors"], "cannot hold a quantized embedding"),
    ]:  # fmt: skip
        assert main(argv) == 1
        assert words in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in ("g", "x", "e"))
    shutil.rmtree(back)


@pytest.mark.parametrize("name, structure", [("w4a16_g32_2of4", "2:4"), ("w8a8_static_wanda", "unstructured")])
def test_pruned_checkpoints_state_their_sparsity(tokenizer, tmp_path, name, structure):
    res = _quantized(tokenizer, name)
    sq.save(res, tmp_path / "ct", format="compressed-tensors")
    q = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    sc = q["sparsity_config"]
    assert sc["format"] == "dense" and sc["sparsity_structure"] == structure and sc["targets"] == ["Linear"]
    assert 0.5 <= sc["global_sparsity"] < 0.55  # kept weights that round to 0 add a little
    back = sq.load(tmp_path / "ct")  # slimquant reads dense-stored sparsity back, zeros and all
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(back.model(input_ids=ids).logits, res.model(input_ids=ids).logits)
    dense = _quantized(tokenizer, "w8a16")
    sq.save(dense, tmp_path / "dense", format="compressed-tensors")
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["quantization_config"]["sparsity_config"] == {}
