"""Nothing wrong written, and a message instead of a traceback: every tensor read is checked against what it
claims to be (float model files, checkpoints, manifests, work directories), and malformed inputs are named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import slimquant
from slimquant import Recipe, SlimquantError
from slimquant.models.loading import load_model
from slimquant.pipeline import workdir as workdir_mod

from .conftest import edit_json, rewrite_header, snapshot

DOWN = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture
def model_dir(make_llama_dir) -> Path:
    return make_llama_dir("model", layers=2)


def _edit_weights(directory: Path, edit) -> None:
    f = directory / "model.safetensors"
    w = load_file(str(f))
    edit(w)
    save_file(w, str(f), metadata={"format": "pt"})


def _quantize_refused(cli, model_dir, tmp_path, *names, extra=()) -> str:
    """Every load path (in memory, streamed, eval) refuses the model naming ``names``; nothing is written."""
    before = snapshot(tmp_path)
    messages = []
    for argv in (("quantize", "--model_path", model_dir, "--save_directory", tmp_path / "q", *extra),
                 ("quantize", "--model_path", model_dir, "--save_directory", tmp_path / "q", "--stream", "True", *extra),
                 ("eval", "--model", model_dir, "--text", tmp_path / "eval.txt")):  # fmt: skip
        r = cli(*argv)
        assert r.rc == 1, (argv, r.err)
        for n in names:
            assert n in r.error, (argv, r.error)
        messages.append(r.error)
    assert snapshot(tmp_path) == before
    return messages[0]


@pytest.fixture(autouse=True)
def _eval_text(tmp_path, eval_text):
    (tmp_path / "eval.txt").write_text(eval_text)


# -- 3. missing, unexpected and mis-shaped tensors ----------------------------------------------------------------


def test_a_missing_weight_is_an_error_on_every_load_path(cli, model_dir, tmp_path):
    _edit_weights(model_dir, lambda w: w.pop(DOWN))
    msg = _quantize_refused(cli, model_dir, tmp_path, DOWN)
    assert "missing" in msg


def test_a_renamed_weight_names_both_names(cli, model_dir, tmp_path):
    _edit_weights(model_dir, lambda w: w.__setitem__("model.layers.0.mlp.down.weight", w.pop(DOWN)))
    r = cli("quantize", "--model_path", model_dir, "--save_directory", tmp_path / "q")
    assert r.rc == 1 and DOWN in r.error and "model.layers.0.mlp.down.weight" in r.error


def test_a_transposed_weight_names_the_tensor_and_both_shapes(cli, model_dir, tmp_path):
    _edit_weights(model_dir, lambda w: w.__setitem__(DOWN, w[DOWN].t().contiguous()))
    msg = _quantize_refused(cli, model_dir, tmp_path, DOWN)
    assert "(128, 64)" in msg and "(64, 128)" in msg


def test_unused_extra_tensors_are_only_a_warning(cli, model_dir, tmp_path, caplog):
    _edit_weights(model_dir, lambda w: w.__setitem__("model.extra.weight", torch.zeros(3)))
    assert cli("quantize", "--model_path", model_dir, "--save_directory", tmp_path / "q").rc == 0
    assert "model.extra.weight" in caplog.text


# -- 4. relabelled dtypes and non-finite float weights -------------------------------------------------------------


def test_a_float_weight_relabelled_as_int32_is_refused(cli, model_dir, tmp_path):
    rewrite_header(model_dir / "model.safetensors", lambda h: h[DOWN].update(dtype="I32"))
    msg = _quantize_refused(cli, model_dir, tmp_path, DOWN)
    assert "I32" in msg


@pytest.mark.parametrize("tensor", ["model.norm.weight", "model.embed_tokens.weight", DOWN])
def test_nan_anywhere_in_a_float_model_is_refused_up_front(cli, model_dir, tmp_path, tensor):
    def poison(w):
        w[tensor].view(-1)[7] = float("nan")

    _edit_weights(model_dir, poison)
    _quantize_refused(cli, model_dir, tmp_path, tensor, "NaN")


@pytest.mark.parametrize("tensor", ["model.norm.weight", "model.embed_tokens.weight", "model.layers.1.input_layernorm.weight"])
@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_nan_in_a_norm_or_embedding_is_refused_by_the_api(llama, tensor, algorithm, input_ids):
    with torch.no_grad():
        llama.get_parameter(tensor).view(-1)[3] = float("inf")
    recipe = Recipe.from_flags(f"--w_method {algorithm}")
    with pytest.raises(SlimquantError, match=rf"tensor {tensor}\); cannot quantize"):
        slimquant.quantize(llama, recipe, calib_data=input_ids if algorithm == "gptq" else None, show_progress=False)


# -- 5. checkpoints: every tensor against the manifest and the codec ----------------------------------------------


@pytest.fixture
def w4_ckpt(model_dir, tmp_path) -> Path:
    lm = load_model(str(model_dir))
    recipe = Recipe(weight=slimquant.QuantSpec("int4", "per_group", 32, symmetric=False))
    lm_q = slimquant.quantize(lm.model, recipe, show_progress=False)
    return slimquant.save(lm_q, tmp_path / "ckpt", tokenizer=lm.tokenizer)


WFILE = "quant_model_weight_w4a16.safetensors"
QW = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("tensor, dtype", [
    (f"{QW}.weight", "I8"),           # packed uint8 nibbles relabelled int8 (same width: the header still fits)
    (f"{QW}.weight_scale", "F16"),    # a scale of another width: the header no longer fits the data
    (f"{QW}.weight", "F32"),          # a float weight where the codec stores packed integers
])  # fmt: skip
def test_relabelled_checkpoint_tensors_are_refused(cli, w4_ckpt, tmp_path, tensor, dtype):
    rewrite_header(w4_ckpt / WFILE, lambda h: h[tensor].update(dtype=dtype))
    with pytest.raises(SlimquantError, match=tensor.replace(".", r"\.")) as ei:
        slimquant.load(w4_ckpt).model
    if dtype == "I8":
        assert "stored as int8, its layer (manifest) stores uint8" in str(ei.value)
    r = cli("eval", "--model", w4_ckpt, "--text", tmp_path / "eval.txt")
    assert r.rc == 1 and tensor in r.error


def _rewrite_tensor(directory: Path, name: str, value: torch.Tensor) -> None:
    f = directory / WFILE
    w = load_file(str(f))
    w[name] = value
    save_file(w, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_checkpoint_scales_of_another_float_type_are_refused(w4_ckpt, dtype):
    name = f"{QW}.weight_scale"
    _rewrite_tensor(w4_ckpt, name, load_file(str(w4_ckpt / WFILE))[name].to(dtype))
    with pytest.raises(SlimquantError, match=rf"{name} is stored as {str(dtype)[6:]}, its layer \(manifest\) stores float32"):
        slimquant.load(w4_ckpt).model


def test_checkpoint_nan_scale_is_refused(cli, w4_ckpt, tmp_path):
    name = f"{QW}.weight_scale"
    s = load_file(str(w4_ckpt / WFILE))[name]
    s[0, 0] = float("nan")
    _rewrite_tensor(w4_ckpt, name, s)
    r = cli("eval", "--model", w4_ckpt, "--text", tmp_path / "eval.txt")
    assert r.rc == 1 and name in r.error and "NaN" in r.error


def test_checkpoint_weight_stored_as_float32_is_refused(cli, w4_ckpt, tmp_path):
    name = f"{QW}.weight"
    q = load_file(str(w4_ckpt / WFILE))[name]
    _rewrite_tensor(w4_ckpt, name, q.float())
    r = cli("eval", "--model", w4_ckpt, "--text", tmp_path / "eval.txt")
    assert r.rc == 1 and name in r.error and "stored as float32" in r.error and "uint8" in r.error


def test_checkpoint_with_a_missing_or_extra_tensor_is_refused(w4_ckpt):
    w = load_file(str(w4_ckpt / WFILE))
    extra = dict(w, **{"model.layers.0.surprise": torch.zeros(2)})
    save_file(extra, str(w4_ckpt / WFILE), metadata={"format": "pt"})
    with pytest.raises(SlimquantError, match=r"model\.layers\.0\.surprise is not part of the model"):
        slimquant.load(w4_ckpt).model
    w.pop(f"{QW}.weight_offset")
    save_file(w, str(w4_ckpt / WFILE), metadata={"format": "pt"})
    with pytest.raises(SlimquantError, match=rf"{QW}\.weight_offset is missing"):
        slimquant.load(w4_ckpt).model


# -- 6. manifest file names -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors", "..", ""])
def test_manifest_files_outside_the_checkpoint_are_refused(cli, w4_ckpt, tmp_path, entry):
    shutil.copy(w4_ckpt / WFILE, tmp_path / "outside.safetensors")
    edit_json(w4_ckpt / "slimquant_manifest.json", lambda m: m.update(files=[entry]))
    for argv in (("inspect", w4_ckpt), ("eval", "--model", w4_ckpt, "--text", tmp_path / "eval.txt")):
        r = cli(*argv)
        assert r.rc == 1 and "not a plain file name" in r.error and repr(entry) in r.error


# -- 10. messages instead of tracebacks ----------------------------------------------------------------------------


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.pop("recipe"), "'recipe' is missing"),
    (lambda m: m.pop("layers"), "'layers' is missing"),
    (lambda m: [m], "must be a JSON object"),
    (lambda m: m.update(recipe={"weight": {"qtype": "int7"}}), "'recipe' is invalid"),
    (lambda m: m.update(recipe=[1]), "'recipe' must be an object"),
    (lambda m: m["model"].update(architecture="BertModel"), "does not match"),
    (lambda m: m["layers"][QW].update(module="QNope"), "unknown module 'QNope'"),
    (lambda m: m["layers"][QW].pop("spec"), f"layer {QW}: invalid or missing spec"),
    (lambda m: m["layers"][QW]["args"].update(in_features="x"), f"layer {QW}"),
])  # fmt: skip
def test_malformed_manifests_get_one_line(cli, w4_ckpt, tmp_path, edit, words):
    edit_json(w4_ckpt / "slimquant_manifest.json", edit)
    for argv in (("eval", "--model", w4_ckpt, "--text", tmp_path / "eval.txt"), ("inspect", w4_ckpt)):
        r = cli(*argv)
        if argv[0] == "inspect" and words.startswith(f"layer {QW}") and "spec" not in words:
            assert r.rc == 0  # inspect reads no module arguments
            continue
        assert r.rc == 1 and words in r.error, (argv, r.err)


def test_a_corrupt_work_directory_gets_one_line(cli, model_dir, calib_file, tmp_path, monkeypatch):
    gptq = ("quantize", "--model_path", model_dir, "--save_directory", tmp_path / "q", "--w_method", "gptq",
            "--calib_file", calib_file, "--calib_size", "4", "--calib_seq_len", "16")  # fmt: skip
    real = workdir_mod.WorkDir.save_block

    def save_block(self, i, *a, **k):
        real(self, i, *a, **k)
        raise KeyboardInterrupt  # killed after block 0

    monkeypatch.setattr(workdir_mod.WorkDir, "save_block", save_block)
    assert cli(*gptq).rc == 130
    monkeypatch.undo()
    work = tmp_path / "q.partial"
    pristine = tmp_path / "pristine"
    shutil.copytree(work, pristine)

    def damage(what):
        shutil.rmtree(work)
        shutil.copytree(pristine, work)
        if what == "truncated block":
            f = work / "block_00000.safetensors"
            f.write_bytes(f.read_bytes()[:-100])
        elif what == "block json":
            (work / "block_00000.json").write_text("{not json")
        elif what == "state json":
            (work / "state.json").write_text("[1, 2")
        elif what == "state type":
            (work / "state.json").write_text(json.dumps({"done": "x", "fingerprint": {}}))
        elif what == "missing block":
            (work / "block_00000.safetensors").unlink()
        elif what == "truncated inputs":
            f = work / "inputs_00001.safetensors"
            f.write_bytes(f.read_bytes()[:50])

    for what, culprit in [("truncated block", "block_00000.safetensors"), ("block json", "block_00000.json"),
                          ("state json", "state.json"), ("state type", "state.json"),
                          ("missing block", "block_00000.safetensors"), ("truncated inputs", "inputs_00001.safetensors")]:  # fmt: skip
        damage(what)
        r = cli(*gptq)
        assert r.rc == 1 and culprit in r.error and "remove" in r.error, (what, r.err)
        assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("flag, value", [("--part_file_size", "nan"), ("--part_file_size", "inf"),
                                         ("--part_file_size", "-1"), ("--max_activation_gb", "inf"),
                                         ("--max_activation_gb", "nan"), ("--sigma_factor", "inf"),
                                         ("--calib_size", "0"), ("--percdamp", "nan"), ("--smooth_alpha", "nan"),
                                         ("--fa_amp", "-1")])  # fmt: skip
def test_bad_numbers_are_refused_before_any_work(capsys, model_dir, tmp_path, flag, value, monkeypatch):
    from slimquant.cli.main import main

    monkeypatch.setattr("slimquant.models.loading.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    try:
        rc = main(["quantize", "--model_path", str(model_dir), "--save_directory", str(tmp_path / "q"), flag, value])
    except SystemExit as e:  # argparse's own refusals exit 2
        rc = e.code
    assert rc in (1, 2)
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
    assert not (tmp_path / "q").exists()


def test_part_file_size_nan_from_the_api_is_refused_before_writing(llama, tmp_path):
    llama_q = slimquant.quantize(llama, Recipe(), show_progress=False)
    for bad in (float("nan"), float("inf"), 0.0):
        with pytest.raises(SlimquantError, match="part_file_size"):
            slimquant.save(llama_q, tmp_path / "q", part_file_size=bad)
    assert [p.name for p in tmp_path.iterdir()] == ["eval.txt"]


def test_eval_against_a_reference_with_another_vocabulary(cli, model_dir, tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer) + 7))  # fmt: skip
    other.save_pretrained(str(tmp_path / "other"))
    r = cli("eval", "--model", model_dir, "--reference", tmp_path / "other", "--text", tmp_path / "eval.txt",
            "--seq_len", "16", "--windows", "1")  # fmt: skip
    assert r.rc == 1 and "vocabulary" in r.error and str(len(tokenizer) + 7) in r.error


def test_eval_against_a_reference_with_another_tokenizer(cli, model_dir, tmp_path, tokenizer):
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = list(vocab)[5:7]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tj))
    r = cli("eval", "--model", model_dir, "--reference", other, "--text", tmp_path / "eval.txt", "--seq_len", "16")
    assert r.rc == 1 and "another tokenizer" in r.error


def test_unknown_model_type_gets_one_line(cli, model_dir, tmp_path):
    edit_json(model_dir / "config.json", lambda c: c.update(model_type="llamazing"))
    for argv in (("quantize", "--model_path", model_dir, "--save_directory", tmp_path / "q"),
                 ("quantize", "--model_path", model_dir, "--save_directory", tmp_path / "q", "--stream", "True"),
                 ("eval", "--model", model_dir, "--text", tmp_path / "eval.txt")):  # fmt: skip
        r = cli(*argv)
        assert r.rc == 1 and "model_type 'llamazing' is not known to transformers" in r.error
        assert len(r.error) < 300


def test_remote_code_model_types_need_trust_remote_code(cli, model_dir, tmp_path):
    edit_json(model_dir / "config.json", lambda c: c.update(model_type="custom", auto_map={"AutoConfig": "x.Config"}))
    r = cli("quantize", "--model_path", model_dir, "--save_directory", tmp_path / "q")
    assert r.rc == 1 and "--trust_remote_code" in r.error


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    """A small but valid GGUF file (two F32 tensors), written with the gguf package."""
    import gguf
    import numpy as np

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.zeros((64, 32), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.02])
def test_a_truncated_gguf_file_gets_one_line(cli, tiny_gguf, tmp_path, keep):
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    r = cli("eval", "--model", cut, "--text", tmp_path / "eval.txt")
    assert r.rc == 1 and "cut.gguf" in r.error and "truncated" in r.error and len(r.error) < 400


# -- 13. only suggest what the command line accepts --------------------------------------------------------------


def test_group_size_suggestions_are_accepted_by_the_cli(cli, tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=len(tokenizer)))  # fmt: skip
    model.save_pretrained(str(tmp_path / "m96"))
    tokenizer.save_pretrained(str(tmp_path / "m96"))
    r = cli("quantize", "--model_path", tmp_path / "m96", "--save_directory", tmp_path / "q", "--w_bit", "4",
            "--group_size", "64")  # fmt: skip
    assert r.rc == 1 and "model.layers.0.mlp.down_proj" in r.error and "group sizes that divide it: [32]" in r.error
    assert cli("quantize", "--model_path", tmp_path / "m96", "--save_directory", tmp_path / "q", "--w_bit", "4",
               "--group_size", "32").rc == 0  # fmt: skip
