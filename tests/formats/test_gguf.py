"""GGUF: block packing bit-exact against the gguf package's dequantization, solvers kept on GGUF grids, llama.cpp's
tensor types, the export (q/k head permutation, tokenizer metadata) read back by transformers' GGUF loader with
slimquant's logits, refusals, and the CLI (``quantize --gguf_type``, ``export --format gguf``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import slimquant as sq
from slimquant.errors import SlimquantError
from slimquant.formats import gguf as gg
from slimquant.formats import gguf_blocks as gb
from slimquant.math.gguf_grid import OffGrid, block_params, snap
from slimquant.math.weights import dequantize_weight, quantize_weight
from slimquant.types import QuantSpec
from slimquant.types.gguf_types import GGUF_TYPES, gguf_type
from slimquant.types.spec import gguf_spec

gguf = pytest.importorskip("gguf")
TYPES = list(GGUF_TYPES)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("clip", [False, True])
def test_packed_blocks_dequantize_in_gguf_exactly_as_slimquant_computes(name, clip):
    t = gguf_type(name)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 512, generator=g) * 0.05
    w[0, :40] *= 30  # outliers: a large super-block scale beside small ones
    w[1, 32:64] = w[1, 32:64].abs() + 0.1  # a group with no negative value (Q4_K clamps its minimum to <= 0)
    w[2] = 0.0  # all-zero rows
    spec = gguf_spec(name)
    qw = quantize_weight(w, spec, clip_search=clip)
    params = block_params(qw.scale, qw.zero_point, t)
    data = gb.pack(qw.q, params, t)
    assert data.shape == (6, 512 // t.block * t.block_bytes) and data.dtype == np.uint8
    theirs = gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, name))
    ours = gb.dequantize(data, t, 512)
    assert np.array_equal(theirs, ours)  # bit for bit
    q, _ = gb.unpack(data, t, 512)
    assert np.array_equal(q, qw.q.to(torch.int32).numpy())
    sim = dequantize_weight(qw, spec).numpy()  # what slimquant's quantized module computes with
    np.testing.assert_allclose(theirs, sim, rtol=0, atol=4e-7 * np.abs(sim).max())
    err = np.sqrt(((sim - w.numpy()) ** 2).mean()) / w.std().item()
    assert err < {"Q8_0": 0.01, "Q6_K": 0.05, "Q5_0": 0.1}.get(name, 0.2)


def test_extreme_grid_values_pack_exactly():
    g = torch.Generator().manual_seed(0)
    for name in TYPES:
        t = gguf_type(name)
        spec = gguf_spec(name)
        from slimquant.types.qtype import qtype

        qt = qtype(spec.qtype)
        q = torch.randint(int(qt.qmin), int(qt.qmax) + 1, (3, 256), generator=g)
        q[0, :2] = torch.tensor([int(qt.qmin), int(qt.qmax)])
        scale = torch.rand(3, 256 // t.group_size, generator=g) + 0.01
        zp = None if t.symmetric else torch.rand(3, 256 // t.group_size, generator=g) * 8
        scale, zp = snap(scale, zp, t)
        p = block_params(scale, zp, t)
        data = gb.pack(q.to(torch.int8 if qt.signed else torch.uint8), p, t)
        back, _ = gb.unpack(data, t, 256)
        assert np.array_equal(back, q.numpy()), name
        theirs = gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, name))
        assert np.array_equal(theirs, gb.dequantize(data, t, 256)), name


def test_off_grid_parameters_are_named():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    qw = quantize_weight(w, QuantSpec("int4", "per_group", 32))  # float32 scales, not fp16
    with pytest.raises(OffGrid, match="float16.*row 0"):
        block_params(qw.scale, None, gguf_type("Q4_0"))
    with pytest.raises(OffGrid, match="super-block"):
        block_params(torch.rand(2, 16) + 0.1, torch.zeros(2, 16), gguf_type("Q4_K"))


def test_gguf_specs_are_validated():
    assert gguf_spec("q4_k").gguf == "Q4_K" and QuantSpec.from_dict(gguf_spec("Q6_K").to_dict()) == gguf_spec("Q6_K")
    assert "gguf" not in QuantSpec("int4", "per_group", 32).to_dict()  # older manifests / recipes unchanged
    with pytest.raises(SlimquantError, match="gguf Q4_0 is the grid int4 g32 sym"):
        QuantSpec("int4", "per_group", 64, gguf="Q4_0")
    with pytest.raises(SlimquantError, match="unknown GGUF block type 'Q3_K'"):
        QuantSpec("int4", "per_group", 32, gguf="Q3_K")
    with pytest.raises(ValueError, match="blocks of 256; in_features 96"):
        quantize_weight(torch.randn(4, 96), gguf_spec("Q4_K"))


def test_tensor_types_follow_llama_quantize():
    tt = gg.tensor_type
    # smollm2-135m: rows of 576 (not a multiple of 256), tied embeddings, 30 layers
    assert tt("token_embd.weight", 576, 2, "Q4_0", 30, tied=True) == "Q8_0"
    assert tt("token_embd.weight", 512, 2, "Q4_0", 30, tied=True) == "Q6_K"
    assert tt("token_embd.weight", 512, 2, "Q4_0", 30, tied=False) == "Q4_0"
    assert tt("output.weight", 512, 2, "Q8_0", 30, tied=False) == "Q8_0"
    assert tt("blk.0.attn_norm.weight", 576, 1, "Q4_0", 30, tied=True) == "F32"
    assert tt("blk.5.attn_q.weight", 576, 2, "Q4_K_M", 30, tied=True) == "Q5_0"  # Q4_K falls back for 576
    assert tt("blk.4.ffn_down.weight", 1536, 2, "Q4_K_M", 30, tied=True) == "Q4_K"
    more = [i for i in range(30) if tt(f"blk.{i}.ffn_down.weight", 1536, 2, "Q4_K_M", 30, tied=True) == "Q6_K"]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert tt("blk.0.attn_v.weight", 576, 2, "Q4_K_M", 30, tied=True) == "Q8_0"  # Q6_K falls back for 576
    assert tt("blk.3.ffn_up.weight", 576, 2, "F16", 30, tied=True) == "F16"
    with pytest.raises(SlimquantError, match="--gguf_type Q3_K_S: unknown GGUF file type"):
        gg.check_file_type("Q3_K_S")


# -- export --------------------------------------------------------------------------------------


def _bpe_tokenizer():
    from conftest import make_bpe_tokenizer

    return make_bpe_tokenizer()


def _llama(vocab: int, hidden: int = 256, tie: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=tie, max_position_embeddings=128)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def bpe():
    return _bpe_tokenizer()


def _read_back(path):
    """The GGUF as transformers loads it (dequantized with the gguf package): slimquant.load_model."""
    return sq.load_model(str(path)).model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("tie", [True, False])
def test_float_export_reads_back_with_the_same_logits(bpe, tmp_path, tie):
    model = _llama(len(bpe), hidden=64, tie=tie)
    ids = torch.randint(0, len(bpe), (2, 12), generator=torch.Generator().manual_seed(0))
    ex = gg.export_gguf(model, tmp_path / "f32", bpe, "F32")
    assert ex.path == tmp_path / "f32" / "model.gguf"
    back = _read_back(ex.path)
    assert torch.equal(_logits(model, ids), _logits(back, ids))  # q/k rows permuted there and back
    reader = gguf.GGUFReader(ex.path)
    f = reader.fields
    assert f["general.architecture"].contents() == "llama" and f["general.file_type"].contents() == 0
    assert f["tokenizer.ggml.model"].contents() == "gpt2" and f["tokenizer.ggml.pre"].contents() == "gpt-2"
    tokens = f["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == len(bpe) and tokens[bpe.convert_tokens_to_ids("<|im_start|>")] == "<|im_start|>"
    types = f["tokenizer.ggml.token_type"].contents()
    assert types[bpe.eos_token_id] == 3 and types[5] == 1  # control / normal
    assert f["tokenizer.ggml.bos_token_id"].contents() == bpe.bos_token_id
    assert ("output.weight" in {t.name for t in reader.tensors}) is not tie
    report = json.loads((tmp_path / "f32" / "gguf_export.json").read_text())
    assert report["file_type"] == "F32" and len(report["tensors"]) == len(reader.tensors)


@pytest.mark.parametrize("file_type,flags", [("Q4_0", ""), ("Q4_1", ""), ("Q5_0", ""), ("Q8_0", ""), ("Q6_K", ""),
                                             ("Q4_K_M", ""), ("Q4_0", "--w_method gptq --anti_method m3"),
                                             ("Q4_K_M", "--w_method gptq")])  # fmt: skip
def test_quantized_export_is_exact_and_reads_back_with_slimquants_logits(bpe, tmp_path, file_type, flags):
    model = _llama(len(bpe))
    recipe = gg.gguf_recipe(sq.Recipe.from_flags(flags), model, file_type)
    calib = torch.randint(0, len(bpe), (4, 32), generator=torch.Generator().manual_seed(1))
    res = sq.quantize(model, recipe, calib_data=calib if recipe.needs_calibration else None, show_progress=False)
    ex = gg.export_gguf(res.model, tmp_path / "q", bpe, None)
    assert all(r.how in ("exact", "float") for r in ex.tensors)
    assert max(r.max_abs_diff for r in ex.tensors) < 1e-6
    planned = gg.plan_types(res.model, file_type)
    assert {r.name: r.type for r in ex.tensors} == planned  # each layer was solved on llama.cpp's type for it
    ids = torch.randint(0, len(bpe), (2, 12), generator=torch.Generator().manual_seed(0))
    ours, theirs = _logits(res.model, ids), _logits(_read_back(ex.path), ids)
    assert (ours - theirs).abs().max() < 1e-4 * ours.abs().max()
    # naming the file type explicitly gives the same file
    again = gg.export_gguf(res.model, tmp_path / "q2", bpe, file_type)
    a, b = gguf.GGUFReader(again.path), gguf.GGUFReader(ex.path)
    assert all(x.name == y.name and np.array_equal(x.data, y.data) for x, y in zip(a.tensors, b.tensors))


def test_checkpoint_on_another_grid_is_refused_unless_requantized(bpe, tmp_path):
    res = sq.quantize(_llama(len(bpe)), sq.Recipe.from_flags("--w_bit 4 --group_size 64"), show_progress=False)
    with pytest.raises(SlimquantError, match=r"layer model\.layers\.0\.self_attn\.q_proj is int4 g64 sym.*--requantize"):
        gg.export_gguf(res.model, tmp_path / "x", bpe, "Q4_0")
    assert not (tmp_path / "x").exists()
    with pytest.raises(SlimquantError, match="not a GGUF grid"):
        gg.export_gguf(res.model, tmp_path / "x", bpe, None)
    with pytest.raises(SlimquantError, match="F16 would round"):
        gg.export_gguf(res.model, tmp_path / "x", bpe, "F16")
    ex = gg.export_gguf(res.model, tmp_path / "x", bpe, "Q4_0", requantize=True)
    linear = [r for r in ex.tensors if r.how == "requantized"]
    assert len(linear) == 14 and all(0 < r.added_rel_rmse < 0.3 for r in linear)
    assert [r.how for r in ex.tensors if r.name == "token_embd.weight"] == ["quantized_at_export"]
    with pytest.raises(SlimquantError, match="not empty; pass --overwrite"):
        gg.export_gguf(res.model, tmp_path / "x", bpe, "Q4_0", requantize=True)
    gg.export_gguf(res.model, tmp_path / "x", bpe, "Q8_0", requantize=True, overwrite=True)


def test_what_gguf_cannot_hold_is_refused(bpe, tmp_path, tokenizer):
    from conftest import make_bert

    w8a8 = sq.quantize(_llama(len(bpe), hidden=64), sq.Recipe.from_flags("--w_bit 8 --a_bit 8 --is_dynamic True"),
                       show_progress=False)  # fmt: skip
    with pytest.raises(SlimquantError, match="activation quantization is not expressible"):
        gg.export_gguf(w8a8.model, tmp_path / "y", bpe, "Q8_0", requantize=True)
    with pytest.raises(SlimquantError, match="model_type 'llama'"):
        gg.export_gguf(make_bert(len(tokenizer)), tmp_path / "y", tokenizer, "F32")
    with pytest.raises(SlimquantError, match="byte-level BPE only"):
        gg.export_gguf(_llama(len(tokenizer), hidden=64), tmp_path / "y", tokenizer, "F32")  # WordLevel tokenizer
    with pytest.raises(SlimquantError, match="blocks of 256; in_features 64"):
        sq.quantize(_llama(len(bpe), hidden=64), sq.Recipe(weight=gguf_spec("Q4_K")), show_progress=False)
    with pytest.raises(SlimquantError, match="weight-only"):
        gg.gguf_recipe(sq.Recipe.from_flags("--w_bit 8 --a_bit 8 --is_dynamic True"), _llama(len(bpe), hidden=64), "Q8_0")
    assert not (tmp_path / "y").exists()


def test_truncated_gguf_is_refused_naming_the_file(bpe, tmp_path):
    ex = gg.export_gguf(_llama(len(bpe), hidden=64), tmp_path / "f", bpe, "F16")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(ex.path.read_bytes()[:5000])
    with pytest.raises(SlimquantError, match="bad.gguf"):
        sq.load_model(str(bad))
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(SlimquantError, match="foreign.gguf"):
        sq.load_model(str(foreign))


# -- CLI -----------------------------------------------------------------------------------------


@pytest.fixture
def bpe_llama_dir(tmp_path, bpe):
    from conftest import save_hf

    return save_hf(_llama(len(bpe)), bpe, tmp_path / "model")


def test_cli_quantize_gguf_type_then_export(bpe_llama_dir, tmp_path, capsys):
    from slimquant.cli.main import main

    ck = tmp_path / "ck"
    assert main(["quantize", "--model_path", str(bpe_llama_dir), "--gguf_type", "Q4_K_M", "--save_directory", str(ck)]) == 0
    assert "gguf:Q4_K" in capsys.readouterr().out
    out = tmp_path / "gguf"
    assert main(["export", "--model", str(ck), "--format", "gguf", "--save_directory", str(out)]) == 0
    text = capsys.readouterr().out
    assert "GGUF Q4_K_M" in text and "Q6_K x" in text and (out / "model.gguf").is_file()
    direct = tmp_path / "direct"
    assert main(["quantize", "--model_path", str(bpe_llama_dir), "--gguf_type", "Q4_K_M", "--save_format", "gguf",
                 "--save_directory", str(direct)]) == 0  # fmt: skip
    a, b = gguf.GGUFReader(direct / "model.gguf"), gguf.GGUFReader(out / "model.gguf")
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    assert all(np.array_equal(x.data, y.data) for x, y in zip(a.tensors, b.tensors))  # same weights either way
    f16 = tmp_path / "f16"
    assert main(["export", "--model", str(bpe_llama_dir), "--format", "gguf", "--gguf_type", "F16",
                 "--save_directory", str(f16)]) == 0  # fmt: skip


@pytest.mark.parametrize("argv,match", [
    (["quantize", "--gguf_type", "Q4_0", "--w_bit", "4"], "sets the weight grid; remove --w_bit"),
    (["quantize", "--save_format", "gguf"], "--save_format gguf needs --gguf_type"),
    (["quantize", "--gguf_type", "F16"], "is a float type"),
    (["quantize", "--gguf_type", "Q4_0", "--a_bit", "8"], "weight-only"),
    (["quantize", "--gguf_type", "Q4_0", "--a_bit", "8", "--is_dynamic", "True"], "weight-only"),
    (["quantize", "--gguf_type", "Q2_K"], "unknown GGUF file type"),
    (["quantize", "--gguf_type", "Q4_0", "--save_format", "gguf", "--stream", "True"], "--stream with --save_format gguf"),
    (["export", "--format", "gguf", "--gguf_type", "Q4_0"], "is a float model"),
    (["export", "--format", "msmodelslim", "--requantize"], "apply to --format gguf"),
])  # fmt: skip
def test_cli_refusals(bpe_llama_dir, tmp_path, capsys, argv, match):
    import re

    from slimquant.cli.main import main

    if argv[0] == "quantize":
        argv = [*argv, "--model_path", str(bpe_llama_dir)]
    else:
        argv = [*argv, "--model", str(bpe_llama_dir)]
    assert main([*argv, "--save_directory", str(tmp_path / "o")]) == 1
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_gguf_is_a_registered_codec(bpe, tmp_path):
    res = sq.quantize(_llama(len(bpe)), gg.gguf_recipe(sq.Recipe(), _llama(len(bpe)), "Q4_K_M"), show_progress=False)
    path = sq.save(res, tmp_path / "c", tokenizer=bpe, format="gguf")
    report = json.loads((path / "gguf_export.json").read_text())
    assert report["file_type"] == "Q4_K_M"  # found again from the layers' grids
    assert gguf.GGUFReader(path / "model.gguf").fields["general.file_type"].contents() == 15
    with pytest.raises(SlimquantError, match="takes no option"):
        sq.save(res, tmp_path / "d", tokenizer=bpe, format="gguf", part_file_size=1.0)
    with pytest.raises(SlimquantError, match="stores the tokenizer"):
        sq.save(res, tmp_path / "d", format="gguf")


def test_signed_block_scales_use_the_extra_negative_level():
    # a group whose largest magnitude is positive: llama.cpp's d = max / -8 (negative) puts it on q = -8 exactly,
    # where a positive scale could only use q = +7 for it
    w = torch.tensor([[1.0] + [-0.025 * i for i in range(31)]])
    qw = quantize_weight(w, gguf_spec("Q4_0"))
    assert float(qw.scale) == -0.125 and int(qw.q[0, 0]) == -8
    err_signed = (dequantize_weight(qw, gguf_spec("Q4_0")) - w).abs().max()
    plain = quantize_weight(w, QuantSpec("int4", "per_group", 32))
    assert err_signed <= (dequantize_weight(plain, QuantSpec("int4", "per_group", 32)) - w).abs().max() + 1e-3
    data = gb.pack(qw.q, block_params(qw.scale, None, gguf_type("Q4_0")), gguf_type("Q4_0"))
    assert np.array_equal(gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_0), gb.dequantize(data, gguf_type("Q4_0"), 32))


def test_cli_m5_on_a_gguf_grid_exports_exactly(bpe_llama_dir, tmp_path, capsys, eval_text):
    """CBQ (--anti_method m5) trains on the GGUF type's own grid (its LoRA-rounded integers and range factors stay on
    Q4_0's block grid), so the export needs no --requantize."""
    from slimquant.cli.main import main

    calib = tmp_path / "calib.txt"
    calib.write_text(eval_text, encoding="utf-8")
    ck = tmp_path / "ck"
    assert main(["quantize", "--model_path", str(bpe_llama_dir), "--gguf_type", "Q4_0", "--anti_method", "m5",
                 "--iters", "2", "--batch_size", "2", "--calib_file", str(calib), "--calib_size", "4",
                 "--calib_seq_len", "16", "--save_directory", str(ck)]) == 0  # fmt: skip
    assert "gguf:Q4_0" in capsys.readouterr().out
    manifest = json.loads((ck / "slimquant_manifest.json").read_text())
    assert manifest["layers"]["model.layers.0.mlp.down_proj"]["method"]["algorithm"] == "cbq"
    out = tmp_path / "gguf"
    assert main(["export", "--model", str(ck), "--format", "gguf", "--save_directory", str(out)]) == 0
    assert "GGUF Q4_0" in capsys.readouterr().out and (out / "model.gguf").is_file()
