"""W8A8SC: the open tile codec (reference vs native, exactness, corruption), the tensor-parallel split, the
partI-of-N directory, loading it back, and the refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import slimquant
from slimquant import Granularity, QuantSpec, Recipe, SlimquantError
from slimquant.cli.main import main
from slimquant.formats import w8a8sc as sc
from slimquant.kernels import w8a8sc as kc
from slimquant.math.weights import quantize_weight

G = Granularity
W8A8S = Recipe(weight=QuantSpec("int8", G.PER_CHANNEL, outlier_fraction=0.05),
               input=QuantSpec("int8", G.PER_TENSOR, None, False))  # fmt: skip
IMPLS = ["reference", "native"]


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(150, 300, generator=g)
    return {
        "w8a8s": quantize_weight(w, QuantSpec("int8", G.PER_CHANNEL, outlier_fraction=0.01)).q,  # edge tiles both ways
        "heavy": quantize_weight(w**3, QuantSpec("int8", G.PER_CHANNEL, outlier_fraction=0.1)).q,
        "dense_int8": torch.randint(-128, 128, (70, 40), generator=g, dtype=torch.int8),  # stored raw
        "zeros": torch.zeros(16, 32, dtype=torch.int8),
        "one_value": torch.full((33, 65), -8, dtype=torch.int8),
    }


@pytest.fixture(params=IMPLS)
def impl(request, native_lib_or_skip):
    if request.param == "native":
        native_lib_or_skip()
    return request.param


@pytest.fixture
def native_lib_or_skip():
    def need():
        from slimquant.kernels import native

        if native.codec_library() is None:
            pytest.skip(f"native W8A8SC codec unavailable: {native.codec_unavailable_reason()}")

    return need


@pytest.mark.parametrize("name", list(_weights()))
def test_round_trip_is_exact(name, impl):
    w = _weights()[name]
    c = sc.compress_weight(w, (2, 3), impl=impl)
    assert c.weight.dtype == torch.int8 and c.weight.dim() == 1 and c.index.dtype == torch.int8
    n, k = w.shape
    n_index, k_index = -(-(-(-n // 16)) // 2), -(-(-(-k // 32)) // 3)
    assert c.index.numel() == n_index * k_index * 8  # the seed's y = k_index * n_index * 8
    assert torch.equal(sc.decompress_weight(c, "w", impl=impl), w)
    if name != "dense_int8":
        assert c.weight.numel() < w.numel()  # x < n * k


def test_native_and_reference_are_byte_identical(native_lib_or_skip):
    native_lib_or_skip()
    for name, w in _weights().items():
        a = sc.compress_weight(w, impl="reference")
        b = sc.compress_weight(w, impl="native")
        assert torch.equal(a.weight, b.weight) and torch.equal(a.index, b.index) and torch.equal(a.info, b.info), name


def test_w8a8s_weights_compress_well():
    w = _weights()["w8a8s"]
    c = sc.compress_weight(w)
    # a Gaussian channel at fraction 0.01 has about 3.6 bits of entropy per value; observed 2.1x
    assert w.numel() / c.weight.numel() > 1.9


def test_frequencies_sum_and_keep_rare_symbols():
    counts = np.zeros((3, kc.N_SYMBOLS), dtype=np.int64)
    counts[0, 16] = 10**6
    counts[0, [0, kc.ESCAPE]] = 1  # rare symbols keep a frequency of 1
    counts[1, :] = 1
    counts[2, 3] = 5
    f = kc.normalize_frequencies(counts)
    assert (f.sum(axis=1) == kc.PROB_SCALE).all()
    assert (f[counts > 0] >= 1).all() and (f[counts == 0] == 0).all()


@pytest.mark.parametrize("seed", range(6))
def test_corrupt_tiles_are_refused_never_misread(seed, impl):
    """Flip bytes of the stream behind the checksums' back: decoding raises naming the tile, or (rarely, when the
    flip keeps the tile self-consistent) returns a different weight, never crashes or reads out of bounds."""
    w = _weights()["w8a8s"]
    tiling = kc.Tiling(150, 300, 64, 256)
    stream, index = kc.encode_weight(w, tiling, "reference")
    rng = np.random.default_rng(seed)
    bad = stream.copy()
    for pos in rng.integers(0, bad.size, size=3):
        bad[pos] = np.int8((int(bad[pos]) + 128 + int(rng.integers(1, 256))) % 256 - 128)  # another value
    try:
        got = kc.decode_weight(bad, index, tiling, impl)
    except ValueError as e:
        assert str(e).startswith("tile ")
    else:
        assert got.shape == w.shape
    bad_index = index.copy()
    bad_index[4:8] = np.frombuffer(np.uint32(10**9).tobytes(), dtype=np.int8)  # tile 0's length past the end
    with pytest.raises(ValueError, match="tile 0: the index points outside"):
        kc.decode_weight(stream, bad_index, tiling, impl)


def test_checksums_name_what_is_corrupt():
    w = _weights()["w8a8s"]
    c = sc.compress_weight(w)
    flipped = c.index.clone()
    flipped[3] ^= 1
    with pytest.raises(SlimquantError, match=r"L\.index is corrupt"):
        sc.decompress_weight(sc.Compressed(c.weight, flipped, c.info), "L")
    s = c.weight.clone()
    s[-1] ^= 1
    with pytest.raises(SlimquantError, match=r"L\.weight is corrupt"):
        sc.decompress_weight(sc.Compressed(s, c.index, c.info), "L")
    info = c.info.clone()
    info[0] = 7
    with pytest.raises(SlimquantError, match="unknown format id"):
        sc.decompress_weight(sc.Compressed(c.weight, c.index, info), "L")
    with pytest.raises(SlimquantError, match=r"L\.weight: expected int8"):
        sc.decompress_weight(sc.Compressed(c.weight[:-1], c.index, c.info), "L")


# -- the tensor-parallel split --------------------------------------------------------------------------------


def test_row_parallel_parts_sum_to_the_layer_and_column_parts_concatenate():
    g = torch.Generator().manual_seed(3)
    w = torch.randint(-128, 128, (6, 8), generator=g, dtype=torch.int8)
    acc_bias = torch.randint(-1000, 1000, (6,), generator=g, dtype=torch.int32)
    zp = 5
    from slimquant.kernels.int8 import fold_input_zero_point

    file = {"weight": w, "input_scale": torch.tensor([0.1]), "input_offset": torch.tensor([float(zp)]),
            "quant_bias": fold_input_zero_point(acc_bias, zp, w), "deq_scale": torch.rand(6)}  # fmt: skip
    x = torch.randint(-128, 128, (3, 8), generator=g).to(torch.int64)  # int8 inputs, zero point zp
    whole = x @ w.to(torch.int64).T + file["quant_bias"].to(torch.int64)
    row = sc.split_layer("L", file, "row", 2, True)
    parts = sum(x[:, 4 * i:4 * (i + 1)] @ p["weight"].to(torch.int64).T + p["quant_bias"].to(torch.int64)
                for i, p in enumerate(row))  # fmt: skip
    assert torch.equal(parts, whole)  # the runtime's all-reduce of the parts' accumulators
    assert all(torch.equal(p["deq_scale"], file["deq_scale"]) for p in row)
    col = sc.split_layer("L", file, "column", 2, True)
    assert torch.equal(torch.cat([x @ p["weight"].to(torch.int64).T + p["quant_bias"].to(torch.int64) for p in col], 1), whole)
    for kind, ps in (("row", row), ("column", col)):
        merged = sc.merge_layer("L", ps, kind, "here")
        assert all(torch.equal(merged[k], file[k]) for k in file), kind


# -- checkpoints ----------------------------------------------------------------------------------------------


@pytest.fixture
def w8a8s_dir(llama, tokenizer, input_ids, tmp_path):
    result = slimquant.quantize(llama, W8A8S, input_ids, show_progress=False)
    return slimquant.save(result, tmp_path / "w8a8s", tokenizer=tokenizer), result


@pytest.mark.parametrize("tp_size", [1, 2])
def test_compress_layout_and_load_runs_as_w8a8s(w8a8s_dir, tmp_path, input_ids, tp_size, capsys):
    src, result = w8a8s_dir
    out = tmp_path / "sc"
    assert main(["compress", "--model_path", str(src), "--save_directory", str(out), "--tp_size", str(tp_size)]) == 0
    assert "w8a8sc:" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["quantize"] == "w8a8sc"
    assert (out / "tokenizer.json").is_file()
    src_tensors = load_file(str(src / "quant_model_weight_w8a8s.safetensors"))
    for i in range(tp_size):
        part = out / f"part{i}-of-{tp_size}"
        desc = json.loads((part / "quant_model_description_w8a8sc.json").read_text())
        tensors = load_file(str(part / "quant_model_weight_w8a8sc.safetensors"))
        assert desc["model_quant_type"] == "W8A8SC" and set(desc) - {"model_quant_type"} == set(tensors)
        p = "model.layers.0.self_attn.q_proj"
        assert [desc[f"{p}.{t}"] for t in ("weight", "index", "info", "input_scale", "input_offset", "deq_scale",
                                           "quant_bias")] == ["W8A8SC"] * 3 + ["W8A8S"] * 4  # fmt: skip
        assert desc["model.embed_tokens.weight"] == "FLOAT"
        w, info = tensors[f"{p}.weight"], tensors[f"{p}.info"]
        assert w.dtype == torch.int8 and w.dim() == 1 and info.dtype == torch.int64
        n, k = 64 // tp_size, 64
        assert info[1:3].tolist() == [n, k] and w.numel() < n * k
        assert tuple(tensors[f"{p}.quant_bias"].shape) == (n,)  # column-parallel: a block of output channels
        d = "model.layers.0.mlp.down_proj"
        assert tensors[f"{d}.info"][1:3].tolist() == [64, 128 // tp_size]  # row-parallel: a block of inputs
        assert torch.equal(tensors["model.embed_tokens.weight"], src_tensors["model.embed_tokens.weight"])
    with torch.no_grad():
        assert torch.equal(slimquant.load(out).model(input_ids).logits, result.model(input_ids).logits)
    from slimquant.eval.size import checkpoint_bytes
    from slimquant.formats.checkpoint import describe_checkpoint

    info = describe_checkpoint(out)
    assert info["format"] == "w8a8sc" and {r["type"] for r in info["layers"]} == {"W8A8S"}
    assert 0 < checkpoint_bytes(out) - info["total_bytes"] < 16384 * tp_size  # every part counted; the rest: headers
    assert main(["inspect", str(out)]) == 0 and "W8A8S" in capsys.readouterr().out


def test_save_as_w8a8sc_from_the_api(llama, input_ids, tmp_path):
    result = slimquant.quantize(llama, W8A8S, input_ids, show_progress=False)
    out = slimquant.save(result, tmp_path / "sc", format="w8a8sc", tp_size=2)
    assert (out / "part1-of-2" / "quant_model_weight_w8a8sc.safetensors").is_file()
    with torch.no_grad():
        assert torch.equal(slimquant.load(out).model(input_ids).logits, result.model(input_ids).logits)


def test_missing_part_and_corrupt_index_are_named(w8a8s_dir, tmp_path):
    src, _ = w8a8s_dir
    out = sc.compress(src, tmp_path / "sc", tp_size=2, show_progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    shutil.rmtree(broken / "part1-of-2")
    with pytest.raises(SlimquantError, match="part part1-of-2 is missing"):
        slimquant.load(broken).model
    f = out / "part0-of-2" / "quant_model_weight_w8a8sc.safetensors"
    tensors = load_file(str(f))
    name = "model.layers.1.mlp.up_proj.index"
    tensors[name] = tensors[name].clone()
    tensors[name][0] ^= 0x10
    save_file(tensors, str(f))
    with pytest.raises(SlimquantError, match=r"part0-of-2: model\.layers\.1\.mlp\.up_proj\.index is corrupt"):
        slimquant.load(out).model


def test_tp_size_must_divide_heads_and_widths(tmp_path, tokenizer, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=90, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=len(tokenizer))  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, len(tokenizer), (2, 8))
    src = slimquant.save(slimquant.quantize(model, W8A8S, ids, show_progress=False), tmp_path / "w8a8s")
    with pytest.raises(SlimquantError, match=r"--tp_size 3 does not divide the model's num_attention_heads \(4\)"):
        sc.compress(src, tmp_path / "o3", tp_size=3, show_progress=False)
    # heads (4) and hidden width (64) divide by 4, the 90 MLP channels do not: the layer is named
    with pytest.raises(SlimquantError, match=r"--tp_size 4 does not divide model\.layers\.0\.mlp\.\w+_proj's 90 "
                       r"(input|output) channels"):  # fmt: skip
        sc.compress(src, tmp_path / "o4", tp_size=4, show_progress=False)
    assert sc.compress(src, tmp_path / "o2", tp_size=2, show_progress=False).is_dir()
    with pytest.raises(SystemExit):
        main(["compress", "--model_path", str(src), "--save_directory", str(tmp_path / "o"), "--tp_size", "0"])
    assert "--tp_size: expected a positive integer" in capsys.readouterr().err
    with pytest.raises(SlimquantError, match="--tp_size 0: must be a positive integer"):
        sc.tp_plan({}, [], 0)
    assert not any((tmp_path / o).exists() for o in ("o", "o3", "o4"))


def test_compress_refuses_what_is_not_w8a8s(llama, tmp_path, capsys):
    src = slimquant.save(slimquant.quantize(llama, Recipe(), show_progress=False), tmp_path / "w8a16")
    assert main(["compress", "--model_path", str(src), "--save_directory", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "is W8A16; W8A8SC compresses W8A8S checkpoints" in err
    assert main(["compress", "--model_path", str(tmp_path / "nope"), "--save_directory", str(tmp_path / "o")]) == 1
    assert "not a slimquant checkpoint directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
