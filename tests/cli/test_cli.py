"""The ``slimquant`` command, run in-process: happy paths on tiny saved models, and every refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimquant import Granularity, QuantSpec, Recipe
from slimquant.cli.main import build_parser, main
from slimquant.cli.quantize_cmd import recipe_from_args
from slimquant.formats.msmodelslim import read_manifest
from slimquant.types.steps import AWQ, RTN, OutlierSuppression, SmoothQuant, SmoothQuantSearch


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def error_line(err: str) -> str:
    """The single ``slimquant: error: ...`` line (progress bars from loading may precede it)."""
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "slimquant: error:" in ln]
    assert len(lines) == 1, err
    assert lines[0].startswith("slimquant: error: ")
    return lines[0]


@pytest.fixture
def outs(tmp_path) -> Path:
    """An empty parent directory for outputs, so leftovers are easy to see."""
    d = tmp_path / "outs"
    d.mkdir()
    return d


def assert_nothing_written(parent: Path) -> None:
    assert [p.name for p in parent.iterdir()] == []


# -- happy paths ----------------------------------------------------------------------------------


@pytest.fixture
def w4_out(capsys, llama_dir, outs) -> Path:
    out = outs / "w4"
    rc, stdout, _ = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", out, "--w_bit", "4",
                        "--group_size", "32", "--w_sym", "False", "--w_clip_search", "true")  # fmt: skip
    assert rc == 0
    assert "quantized 14 layer(s)" in stdout and "w4a16 (int4 g32 asym)" in stdout
    assert "kept float: lm_head (disable_last_linear)" in stdout
    return out


def test_quantize_writes_the_checkpoint(w4_out, llama_dir):
    names = {p.name for p in w4_out.iterdir()}
    assert {"quant_model_weight_w4a16.safetensors", "quant_model_description_w4a16.json", "config.json",
            "slimquant_manifest.json", "tokenizer.json"} <= names  # fmt: skip
    recipe = Recipe.from_dict(read_manifest(w4_out)["recipe"])
    assert recipe.weight == QuantSpec("int4", Granularity.PER_GROUP, 32, False)
    assert recipe.weight_step.clip_search is True and recipe.disable_last_linear is True
    assert json.loads((w4_out / "config.json").read_text())["quantize"] == "w4a16"
    assert (w4_out / "quant_model_weight_w4a16.safetensors").stat().st_size < (llama_dir / "model.safetensors").stat().st_size


def test_inspect_text_and_json(capsys, w4_out):
    rc, out, _ = run(capsys, "inspect", w4_out)
    assert rc == 0
    assert out.startswith(f"{w4_out}: w4a16")
    row = next(ln for ln in out.splitlines() if ln.startswith("model.layers.1.mlp.down_proj"))
    assert row.split()[1:6] == ["W4A16", "QLinear", "int4", "g32", "asym"] and row.split()[6] == "4"
    assert "quantized layers: 14" in out and "layer types: W4A16 x 14" in out
    assert "alias: lm_head.weight -> model.embed_tokens.weight" in out

    rc, out, _ = run(capsys, "inspect", w4_out, "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["quant_type"] == "w4a16" and len(info["layers"]) == 14
    assert {(r["qtype"], r["bits"], r["group_size"], r["symmetric"]) for r in info["layers"]} == {("int4", 4, 32, False)}
    assert info["files"] == ["quant_model_weight_w4a16.safetensors"]


def test_eval_lm_against_reference(capsys, w4_out, llama_dir, text_file):
    rc, out, _ = run(capsys, "eval", "--model", w4_out, "--reference", llama_dir, "--text", text_file,
                     "--windows", "2", "--seq_len", "16", "--json")  # fmt: skip
    assert rc == 0
    res = json.loads(out)
    assert (res["windows"], res["seq_len"], res["tokens"]) == (2, 16, 30)
    assert res["model"] == str(w4_out) and res["reference"] == str(llama_dir)
    assert 1.0 < res["perplexity"] < 1e6 and 1.0 < res["reference_perplexity"] < 1e6
    assert res["kl"] >= 0.0 and 0.0 <= res["top1"] <= 1.0
    assert res["kl"] > 0.0  # 4-bit weights do change the distribution


def test_eval_reference_against_itself(capsys, llama_dir, text_file):
    rc, out, _ = run(capsys, "eval", "--model", llama_dir, "--reference", llama_dir, "--text", text_file,
                     "--windows", "2", "--seq_len", "16", "--json")  # fmt: skip
    assert rc == 0
    res = json.loads(out)
    assert res["kl"] == 0.0 and res["top1"] == 1.0
    assert res["perplexity"] == res["reference_perplexity"]


def test_eval_plain_text_output(capsys, llama_dir, text_file):
    rc, out, _ = run(capsys, "eval", "--model", llama_dir, "--text", text_file, "--windows", "1", "--seq_len", "8")
    assert rc == 0
    fields = dict(ln.split(None, 1) for ln in out.strip().splitlines())
    assert fields["windows"] == "1" and fields["tokens"] == "7"
    assert float(fields["perplexity"]) > 1.0
    assert "kl" not in fields  # no reference, no comparison


def test_quantize_and_eval_bert_encoder(capsys, bert_dir, outs, text_file):
    out = outs / "bert8"
    rc, stdout, _ = run(capsys, "quantize", "--model_path", bert_dir, "--save_directory", out)
    assert rc == 0 and "kept float: pooler.dense (disable_last_linear)" in stdout
    rc, stdout, _ = run(capsys, "eval", "--model", out, "--reference", bert_dir, "--text", text_file, "--json")
    assert rc == 0
    res = json.loads(stdout)
    assert res["sentences"] == 18
    assert 0.99 < res["cosine_mean"] <= 1.0 + 1e-9  # int8 per-channel
    assert res["cosine_min"] <= res["cosine_mean"]


def test_embedding_bit_8_and_shards(capsys, llama_dir, outs):
    out = outs / "emb"
    rc, stdout, _ = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", out,
                        "--embedding_bit", "8", "--part_file_size", "0.00002")  # fmt: skip
    assert rc == 0
    assert "tied: lm_head shares the quantized model.embed_tokens" in stdout
    files = read_manifest(out)["files"]
    assert len(files) > 1 and all(f.startswith("quant_model_weight_w8a16-") for f in files)
    assert (out / "quant_model_weight_w8a16.safetensors.index.json").is_file()
    rc, stdout, _ = run(capsys, "inspect", out, "--json")
    info = json.loads(stdout)
    assert {r["name"]: r["tied_to"] for r in info["layers"]}["lm_head"] == "model.embed_tokens"


def test_boolean_flags_accept_any_case(capsys, llama_dir, outs):
    out = outs / "bools"
    rc, stdout, _ = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", out,
                        "--w_sym", "TRUE", "--w_clip_search", "True", "--disable_last_linear", "false")  # fmt: skip
    assert rc == 0
    recipe = Recipe.from_dict(read_manifest(out)["recipe"])
    assert recipe.weight.symmetric is True and recipe.weight_step.clip_search is True
    assert recipe.disable_last_linear is False
    assert "quantized 15 layer(s)" in stdout  # lm_head too
    assert "lm_head" in read_manifest(out)["layers"]


@pytest.mark.parametrize(
    "value, expected", [("True", True), ("false", False), ("TRUE", True), ("False", False), ("1", True), ("no", False)]
)
def test_str2bool_values_reach_the_recipe(value, expected):
    args = build_parser().parse_args(["quantize", "--save_directory", "x", "--w_sym", value,
                                      "--disable_last_linear", value, "--w_clip_search", value])  # fmt: skip
    recipe = recipe_from_args(args)
    assert recipe.weight.symmetric is expected
    assert recipe.disable_last_linear is expected and recipe.weight_step.clip_search is expected


@pytest.mark.parametrize("value", ["int", "float"])
def test_w_zero_point_reaches_the_recipe(value):
    args = build_parser().parse_args(["quantize", "--save_directory", "x", "--w_bit", "4", "--group_size", "64",
                                      "--w_sym", "False", "--w_zero_point", value])  # fmt: skip
    assert recipe_from_args(args).weight == QuantSpec("int4", Granularity.PER_GROUP, 64, False, zero_point=value)


def test_float_zero_point_needs_asymmetric_weights(capsys, llama_dir, outs):
    rc, _, err = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "q",
                     "--w_bit", "4", "--w_zero_point", "float")  # fmt: skip
    assert rc == 1 and "--w_zero_point float" in error_line(err) and "--w_sym False" in error_line(err)
    assert_nothing_written(outs)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--a_bit", "8"], Recipe(weight=QuantSpec("int8", Granularity.PER_TENSOR),
                                  input=QuantSpec("int8", Granularity.PER_TENSOR, symmetric=False))),
        (["--a_bit", "8", "--mm_tensor", "False", "--act_method", "3"],
         Recipe(weight=QuantSpec("int8", Granularity.PER_CHANNEL),
                input=QuantSpec("int8", Granularity.PER_TENSOR, symmetric=False), act_observer="auto")),
        (["--a_bit", "8", "--act_method", "2", "--use_sigma", "True", "--sigma_factor", "4"],
         Recipe(weight=QuantSpec("int8", Granularity.PER_TENSOR),
                input=QuantSpec("int8", Granularity.PER_TENSOR, symmetric=False), act_observer="histogram",
                sigma_factor=4.0)),
        (["--a_bit", "8", "--is_dynamic", "True", "--mm_tensor", "false"],
         Recipe(weight=QuantSpec("int8", Granularity.PER_CHANNEL),
                input=QuantSpec("int8", Granularity.PER_TOKEN, dynamic=True))),
        (["--mm_tensor", "True"], Recipe(weight=QuantSpec("int8", Granularity.PER_TENSOR))),
        (["--a_bit", "8", "--is_dynamic", "True", "--anti_method", "m1"],
         Recipe(weight=QuantSpec("int8", Granularity.PER_TENSOR), input=QuantSpec("int8", Granularity.PER_TOKEN, dynamic=True),
                steps=(SmoothQuant(), RTN()))),
        (["--a_bit", "8", "--act_method", "3", "--anti_method", "m4"],
         Recipe(weight=QuantSpec("int8", Granularity.PER_TENSOR),
                input=QuantSpec("int8", Granularity.PER_TENSOR, symmetric=False), act_observer="auto",
                steps=(SmoothQuantSearch(), RTN()))),
        (["--a_bit", "8", "--mm_tensor", "False", "--anti_method", "m2"],
         Recipe(weight=QuantSpec("int8", Granularity.PER_CHANNEL),
                input=QuantSpec("int8", Granularity.PER_TENSOR, symmetric=False), act_observer="token_clip",
                steps=(OutlierSuppression(), RTN()))),
        (["--a_bit", "8", "--do_smooth", "True", "--smooth_alpha", "0.8"],
         Recipe(weight=QuantSpec("int8", Granularity.PER_TENSOR),
                input=QuantSpec("int8", Granularity.PER_TENSOR, symmetric=False), steps=(SmoothQuant(alpha=0.8), RTN()))),
    ],
)  # fmt: skip
def test_activation_flags_reach_the_recipe(argv, expected):
    args = build_parser().parse_args(["quantize", "--save_directory", "x", *argv])
    assert recipe_from_args(args) == expected


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--a_bit", "8", "--w_bit", "4"], "the recipe's weight step is qat"),  # trained only: prepare_qat
        (["--a_bit", "8", "--group_size", "64", "--mm_tensor", "False", "--w_method", "gptq"], "--a_bit 8 needs"),
        (["--is_dynamic", "True"], "--is_dynamic applies to activation quantization; add --a_bit 8"),
        (["--act_method", "2"], "--act_method applies to activation quantization"),
        (["--a_bit", "8", "--is_dynamic", "True", "--act_method", "3"], "does not apply with --is_dynamic True"),
        (["--a_bit", "8", "--sigma_factor", "2"], "--sigma_factor needs --use_sigma True"),
        (["--mm_tensor", "True", "--group_size", "64"], "conflicts with --group_size"),
        (["--anti_method", "m1"], "--anti_method m1 smooths activations for quantization; add --a_bit 8"),
        (["--a_bit", "8", "--anti_method", "m4", "--smooth_alpha", "0.3"], "--smooth_alpha sets SmoothQuant m1"),
        (["--a_bit", "8", "--anti_method", "m1", "--smooth_alpha", "1.5"], "must be in [0, 1]"),
    ],
)
def test_bad_activation_flag_combinations(capsys, llama_dir, outs, argv, words):
    rc, _, err = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "q", *argv)
    assert rc == 1 and words in error_line(err)
    assert_nothing_written(outs)


def test_w8a8_static_with_a_calibration_file(capsys, llama_dir, outs, tmp_path, text_file):
    out = outs / "w8a8"
    rc, stdout, _ = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", out, "--a_bit", "8",
                        "--mm_tensor", "False", "--calib_file", text_file, "--calib_size", "4",
                        "--calib_seq_len", "16")  # fmt: skip
    assert rc == 0 and "w8a8" in stdout
    desc = json.loads((out / "quant_model_description_w8a8.json").read_text())
    assert desc["model.layers.0.mlp.gate_proj.input_offset"] == "W8A8"
    rc, stdout, _ = run(capsys, "eval", "--model", out, "--reference", llama_dir, "--text", text_file,
                        "--windows", "2", "--seq_len", "16")  # fmt: skip
    assert rc == 0


def test_w8a8_static_generates_its_own_calibration_text_when_asked(capsys, llama_dir, outs, caplog):
    import logging

    caplog.set_level(logging.INFO)
    rc, _, _ = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "gen", "--a_bit", "8",
                   "--calib_generate", "True", "--calib_size", "2", "--calib_seq_len", "16")  # fmt: skip
    assert rc == 0
    assert "generated from the model itself" in caplog.text


def test_bare_w8a8_uses_the_default_set_and_says_once_what_per_tensor_costs(capsys, llama_dir, outs, caplog):
    import logging

    caplog.set_level(logging.INFO)
    rc, _, _ = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "bare", "--w_bit", "8",
                   "--a_bit", "8", "--is_dynamic", "True", "--anti_method", "m1", "--calib_size", "2",
                   "--calib_seq_len", "16")  # fmt: skip
    assert rc == 0
    assert "default set" in caplog.text and "generated" not in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "--mm_tensor False" in r.getMessage()]
    assert len(warnings) == 1 and "per-tensor" in warnings[0]
    caplog.clear()
    rc, _, _ = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "pc", "--w_bit", "8",
                   "--a_bit", "8", "--is_dynamic", "True", "--mm_tensor", "False", "--calib_size", "2",
                   "--calib_seq_len", "16")  # fmt: skip
    assert rc == 0 and "--mm_tensor False" not in caplog.text
    rc, _, _ = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "pt", "--w_bit", "8",
                   "--a_bit", "8", "--is_dynamic", "True", "--mm_tensor", "True", "--calib_size", "2",
                   "--calib_seq_len", "16")  # fmt: skip
    assert rc == 0 and "--mm_tensor False" not in caplog.text  # chosen explicitly: no warning


def test_generated_calibration_excludes_calibration_text(capsys, llama_dir, outs, text_file):
    rc, _, err = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "q", "--a_bit", "8",
                     "--calib_generate", "True", "--calib_file", text_file)  # fmt: skip
    assert rc == 1 and "--calib_generate" in error_line(err)
    assert_nothing_written(outs)


def test_use_kvcache_quant_dynamic_records_the_kv_spec(capsys, llama_dir, outs):
    rc, _, _ = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "kv", "--use_kvcache_quant", "True",
                   "--kv_dynamic", "True")  # fmt: skip
    assert rc == 0
    recipe = Recipe.from_dict(read_manifest(outs / "kv")["recipe"])
    assert recipe.kv == QuantSpec("int8", Granularity.PER_TOKEN, dynamic=True)


def test_use_kvcache_quant_is_static_c8_by_default(capsys, llama_dir, outs, text_file):
    rc, stdout, _ = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "kv", "--use_kvcache_quant",
                        "True", "--calib_file", text_file, "--calib_size", "2", "--calib_seq_len", "16")  # fmt: skip
    assert rc == 0 and "KV cache: int8 with static per-channel scales in 2 layer(s)" in stdout
    assert Recipe.from_dict(read_manifest(outs / "kv")["recipe"]).kv == QuantSpec("int8", Granularity.PER_CHANNEL)
    desc = json.loads((outs / "kv" / "quant_model_description_w8a16.json").read_text())
    assert desc["kv_quant_type"] == "C8" and desc["model.layers.0.self_attn.k_proj.kv_cache_scale"] == "C8"


def test_use_fa_quant_with_fa_amp(capsys, llama_dir, outs, text_file):
    rc, stdout, _ = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "fa", "--use_fa_quant",
                        "True", "--fa_amp", "1", "--calib_file", text_file, "--calib_size", "2", "--calib_seq_len", "16")  # fmt: skip
    assert rc == 0 and "attention Q/K/V int8 per head in 1 layer(s); float (fa_amp): model.layers." in stdout
    manifest = read_manifest(outs / "fa")
    assert len(manifest["attention"]["modules"]) == 1 and Recipe.from_dict(manifest["recipe"]).fa_amp == 1
    desc = json.loads((outs / "fa" / "quant_model_description_w8a16.json").read_text())
    assert desc["fa_quant_type"] == "FAQuant"


def test_readme_w8a8_with_kv_and_attention_quantization(capsys, llama_dir, outs, text_file):
    rc, stdout, _ = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "all", "--w_bit", "8",
                        "--a_bit", "8", "--is_dynamic", "True", "--anti_method", "m4", "--mm_tensor", "False",
                        "--use_kvcache_quant", "True", "--use_fa_quant", "True", "--calib_file", text_file,
                        "--calib_size", "2", "--calib_seq_len", "16")  # fmt: skip
    assert rc == 0 and "w8a8_dynamic" in stdout and "KV cache: int8" in stdout and "attention Q/K/V" in stdout
    desc = json.loads((outs / "all" / "quant_model_description_w8a8_dynamic.json").read_text())
    assert desc["kv_quant_type"] == "C8" and desc["fa_quant_type"] == "FAQuant"
    rc, stdout, _ = run(capsys, "eval", "--model", outs / "all", "--reference", llama_dir, "--text", text_file,
                        "--seq_len", "16", "--windows", "2")  # fmt: skip
    assert rc == 0 and "\nkl " in stdout


def test_w_method_gptq(capsys, llama_dir, outs, text_file):
    rc, stdout, _ = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "g", "--w_bit", "4",
                        "--group_size", "32", "--w_method", "gptq", "--desc_act", "False", "--calib_file", text_file,
                        "--calib_size", "4", "--calib_seq_len", "16")  # fmt: skip
    assert rc == 0 and "w4a16" in stdout
    manifest = read_manifest(outs / "g")
    step = Recipe.from_dict(manifest["recipe"]).weight_step
    assert not step.act_order and step.static_groups  # the flag is read; groups still come from the float weight
    assert manifest["layers"]["model.layers.0.self_attn.q_proj"]["method"]["algorithm"] == "gptq"


def test_w_method_autoround(capsys, llama_dir, outs, text_file):
    rc, stdout, _ = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "ar", "--w_bit", "4",
                        "--group_size", "32", "--w_sym", "False", "--w_method", "autoround-light", "--iters", "3",
                        "--batch_size", "2", "--calib_file", text_file, "--nsamples", "4", "--seqlen", "16")  # fmt: skip
    assert rc == 0 and "w4a16" in stdout
    manifest = read_manifest(outs / "ar")
    step = Recipe.from_dict(manifest["recipe"]).weight_step
    assert (step.iters, step.lr, step.batch_size) == (3, 5e-3, 2)
    method = manifest["layers"]["model.layers.0.mlp.down_proj"]["method"]
    assert method["algorithm"] == "autoround" and method["iters"] == 3
    report = json.loads((outs / "ar" / "quantize_report.json").read_text())
    row = next(r for r in report["layers"] if r["name"] == "model.layers.0.mlp.down_proj")
    assert row["samples"] == 4 * 16 and row["autoround"]["steps"] == 3


def test_pretokenised_calibration_and_tokenizer_args(capsys, llama_dir, outs, text_file, tmp_path):
    """msModelSlim's --input_ids_name / --attention_mask_name (a pre-tokenised .jsonl) and --tokenizer_args."""
    torch.manual_seed(0)
    rows = [{"ids": torch.randint(1, 30, (12,)).tolist(), "mask": [1] * 12} for _ in range(3)]
    rows[1]["ids"] = [rows[1]["ids"], rows[0]["ids"]]  # an entry may hold a batch of rows
    rows[1]["mask"] = [[1] * 12, [0] * 2 + [1] * 10]
    f = tmp_path / "tok.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    common = ("quantize", "--model_path", llama_dir, "--w_bit", "4", "--group_size", "32", "--w_method", "gptq")
    rc, _, err = run(capsys, *common, "--save_directory", outs / "t", "--calib_file", f, "--input_ids_name", "ids",
                   "--attention_mask_name", "mask", "--calib_size", "3")  # fmt: skip
    assert rc == 0, err
    report = json.loads((outs / "t" / "quantize_report.json").read_text())
    assert next(r for r in report["layers"] if r["name"].endswith("layers.0.mlp.down_proj"))["samples"] == 3 * 12
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"ids": [1, 2, 99999]}))
    rc, _, err = run(capsys, *common, "--save_directory", outs / "b", "--calib_file", bad, "--input_ids_name", "ids")
    assert rc == 1 and "bad.jsonl line 1" in err and "outside the model's vocabulary" in err
    rc, _, err = run(capsys, *common, "--save_directory", outs / "n", "--calib_file", text_file, "--input_ids_name", "ids")
    assert rc == 1 and "has no entries holding 'ids'" in err
    rc, _, _ = run(capsys, *common, "--save_directory", outs / "k", "--calib_file", text_file, "--calib_size", "2",
                   "--calib_seq_len", "16", "--tokenizer_args", '{"padding_side": "left", "pad_token": "<unk>"}')  # fmt: skip
    assert rc == 0
    # the seed's W8A16 example: no calibration, --tokenizer_args accepted and not used
    rc, _, _ = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "w8", "--calib_file=",
                   "--w_bit", "8", "--a_bit", "16", "--tokenizer_args", '{"padding_side":"left","pad_token":"<unk>"}')  # fmt: skip
    assert rc == 0


def test_stream_and_resume_after_a_crash(capsys, llama_dir, outs, text_file, monkeypatch, caplog):
    from slimquant.pipeline import workdir

    argv = ["quantize", "--model_path", str(llama_dir), "--save_directory", str(outs / "s"), "--w_bit", "4",
            "--group_size", "32", "--w_method", "gptq", "--stream", "True", "--calib_file", str(text_file),
            "--calib_size", "4", "--calib_seq_len", "16"]  # fmt: skip
    real = workdir.WorkDir.save_block

    def crash(self, i, *a, **k):
        if i == 1:
            raise KeyboardInterrupt  # as a kill would
        return real(self, i, *a, **k)

    monkeypatch.setattr(workdir.WorkDir, "save_block", crash)
    assert main(argv) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert not (outs / "s").exists() and (outs / "s.partial" / "block_00000.safetensors").is_file()
    monkeypatch.setattr(workdir.WorkDir, "save_block", real)
    with caplog.at_level("INFO"):
        rc = main(argv)
    stdout = capsys.readouterr().out
    assert rc == 0 and "resuming" in caplog.text and "1 block(s) already done" in caplog.text
    assert not (outs / "s.partial").exists()  # removed once the checkpoint is written
    assert (outs / "s" / "quantize_report.md").is_file()
    report = json.loads((outs / "s" / "quantize_report.json").read_text())
    assert len(report["layers"]) == 14 and all(r["algorithm"] == "gptq" for r in report["layers"])
    assert "largest relative output errors" in stdout


def test_stream_calibrates_on_the_default_set_but_cannot_generate(capsys, llama_dir, outs):
    rc, _, err = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "s", "--w_bit", "4",
                     "--w_method", "gptq", "--stream", "True", "--calib_generate", "True")  # fmt: skip
    assert rc == 1 and "--stream with --calib_generate True" in error_line(err)
    assert_nothing_written(outs)
    rc, stdout, _ = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "s", "--w_bit", "4",
                        "--group_size", "32", "--w_method", "gptq", "--stream", "True", "--calib_size", "2",
                        "--calib_seq_len", "16")  # fmt: skip
    assert rc == 0 and "w4a16" in stdout


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_anti_method_m3_awq(capsys, llama_dir, outs, text_file, method):
    rc, stdout, _ = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "a", "--w_bit", "4",
                        "--group_size", "32", "--w_sym", "False", "--anti_method", "m3", "--w_method", method,
                        "--calib_file", text_file, "--calib_size", "4", "--calib_seq_len", "16")  # fmt: skip
    assert rc == 0 and "w4a16" in stdout
    manifest = read_manifest(outs / "a")
    recipe = Recipe.from_dict(manifest["recipe"])
    assert recipe.steps[0] == AWQ() and recipe.algorithm == method
    method_entry = manifest["layers"]["model.layers.1.mlp.down_proj"]["method"]
    assert method_entry["algorithm"] == method and method_entry["awq"] == {"clip": method == "rtn"}


def test_anti_method_m5_cbq(capsys, llama_dir, outs, text_file):
    rc, stdout, _ = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "m5", "--a_bit", "8",
                        "--mm_tensor", "False", "--anti_method", "m5", "--iters", "3", "--batch_size", "2",
                        "--calib_file", text_file, "--calib_size", "4", "--calib_seq_len", "16")  # fmt: skip
    assert rc == 0 and "w8a8" in stdout
    manifest = read_manifest(outs / "m5")
    recipe = Recipe.from_dict(manifest["recipe"])
    assert [s.TYPE for s in recipe.steps] == ["cbq_preprocess", "cbq"] and recipe.weight_step.iters == 3
    entry = manifest["layers"]["model.layers.0.self_attn.q_proj"]["method"]
    assert entry["algorithm"] == "cbq" and entry["window"] == 2


def test_seed_example_dynamic_m1_runs(capsys, llama_dir, outs, text_file):
    # msModelSlim's example: --a_bit 8 --is_dynamic True --anti_method m1
    rc, stdout, _ = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "dm1", "--w_bit", "8",
                        "--a_bit", "8", "--is_dynamic", "True", "--anti_method", "m1", "--calib_file", text_file,
                        "--calib_size", "2", "--calib_seq_len", "16")  # fmt: skip
    assert rc == 0 and "w8a8_dynamic" in stdout
    assert (outs / "dm1" / "quant_model_weight_w8a8_dynamic.safetensors").is_file()


def test_seed_example_static_auto_m4_runs(capsys, llama_dir, outs, text_file):
    rc, stdout, _ = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "m4", "--a_bit", "8",
                        "--act_method", "3", "--anti_method", "m4", "--calib_file", text_file,
                        "--calib_size", "2", "--calib_seq_len", "16")  # fmt: skip
    assert rc == 0 and "w8a8" in stdout


def test_empty_calibration_file_names_it(capsys, llama_dir, outs, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc, _, err = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "q", "--a_bit", "8",
                     "--calib_file", empty)  # fmt: skip
    assert rc == 1 and str(empty) in error_line(err)
    assert_nothing_written(outs)


def test_encoder_w8a8_static_calibrates_on_the_default_set(capsys, bert_dir, outs):
    rc, _, err = run(capsys, "quantize", "--model_path", bert_dir, "--save_directory", outs / "q", "--a_bit", "8",
                     "--calib_generate", "True")  # fmt: skip
    assert rc == 1 and "cannot generate" in error_line(err) and "--calib_file or --calib_texts" in error_line(err)
    rc, stdout, _ = run(capsys, "quantize", "--model_path", bert_dir, "--save_directory", outs / "q", "--a_bit", "8",
                        "--mm_tensor", "False", "--calib_size", "2", "--calib_seq_len", "16")  # fmt: skip
    assert rc == 0 and "w8a8" in stdout


def test_disable_names_flag(capsys, llama_dir, outs):
    out = outs / "dn"
    rc, stdout, _ = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", out, "--disable_names",
                        "model.layers.0.mlp.down_proj", "model.layers.1.*", "re:.*q_proj", "no_such_layer")  # fmt: skip
    assert rc == 0
    assert "kept float: model.layers.0.mlp.down_proj (disable_names)" in stdout
    assert "kept float: model.layers.0.self_attn.q_proj (disable_names)" in stdout
    assert "warning: --disable_names pattern 'no_such_layer' matched no layer" in stdout
    assert set(read_manifest(out)["layers"]) == {
        f"model.layers.0.{s}" for s in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                        "mlp.gate_proj", "mlp.up_proj")  # fmt: skip
    }


def test_recipe_file(capsys, llama_dir, outs, tmp_path):
    recipe = Recipe(weight=QuantSpec("int3", Granularity.PER_GROUP, 32, False), disable_names=("model.layers.0.*",))
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    out = outs / "r"
    rc, stdout, _ = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", out, "--recipe", path)
    assert rc == 0 and "quantized 7 layer(s)" in stdout
    assert Recipe.from_dict(read_manifest(out)["recipe"]) == recipe
    assert (out / "quant_model_weight_w3a16.safetensors").is_file()


def test_recipe_file_with_weight_flags_is_refused(capsys, llama_dir, outs, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(Recipe().to_yaml())
    rc, _, err = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "r",
                     "--recipe", path, "--w_bit", "4")  # fmt: skip
    assert rc == 1
    assert "--w_bit" in error_line(err) and "--recipe" in error_line(err)
    assert_nothing_written(outs)


def test_bad_recipe_file_is_refused(capsys, llama_dir, outs, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("weight: {qtype: int7}\n")
    rc, _, err = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "r", "--recipe", path)
    assert rc == 1 and "int7" in error_line(err)
    assert_nothing_written(outs)


def test_overwrite(capsys, llama_dir, outs):
    target = outs / "q"
    target.mkdir()
    (target / "old.txt").write_text("old")
    rc, _, err = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", target)
    assert rc == 1 and "not empty" in error_line(err) and "--overwrite" in error_line(err)
    assert [p.name for p in target.iterdir()] == ["old.txt"]

    rc, _, err = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", target, "--overwrite")
    assert rc == 1 and "not a slimquant checkpoint" in error_line(err) and "--force_overwrite" in error_line(err)
    assert [p.name for p in target.iterdir()] == ["old.txt"]  # --overwrite never deletes what is not ours

    rc, _, _ = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", target, "--force_overwrite")
    assert rc == 0
    assert not (target / "old.txt").exists()
    rc, _, _ = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", target, "--overwrite")
    assert rc == 0  # our own checkpoint: replaced
    assert (target / "quant_model_weight_w8a16.safetensors").is_file()
    assert [p.name for p in outs.iterdir()] == ["q"]  # no temp or backup directories


def test_save_target_that_is_a_file(capsys, llama_dir, outs):
    target = outs / "q"
    target.write_text("keep")
    rc, _, err = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", target)
    assert rc == 1 and str(target) in error_line(err) and "not a directory" in error_line(err)
    assert target.read_text() == "keep" and [p.name for p in outs.iterdir()] == ["q"]


def test_exception_while_saving_leaves_nothing(capsys, llama_dir, outs, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("slimquant.formats.checkpoint.write_safetensors", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        main(["quantize", "--model_path", str(llama_dir), "--save_directory", str(outs / "q")])
    assert_nothing_written(outs)


# -- bad inputs -------------------------------------------------------------------------------


def _nan_llama_dir(tmp_path, factories, tokenizer, value) -> Path:
    model = factories["llama"](len(tokenizer))
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = value
    d = tmp_path / "nan_llama"
    model.save_pretrained(str(d), safe_serialization=True)
    tokenizer.save_pretrained(str(d))
    return d


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_names_the_layer(capsys, tmp_path, outs, factories, tokenizer, value):
    d = _nan_llama_dir(tmp_path, factories, tokenizer, value)
    rc, _, err = run(capsys, "quantize", "--model_path", d, "--save_directory", outs / "q")
    assert rc == 1
    assert "model.layers.1.self_attn.v_proj" in error_line(err) and "NaN/Inf" in error_line(err)
    assert_nothing_written(outs)


def test_group_size_not_dividing_names_the_layer(capsys, llama_dir, outs):
    rc, _, err = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "q",
                     "--w_bit", "4", "--group_size", "128")  # fmt: skip
    assert rc == 1
    line = error_line(err)
    assert "layer model.layers.0.self_attn.q_proj" in line and "group_size 128" in line
    assert_nothing_written(outs)


def test_invalid_group_size_value(capsys, llama_dir, outs):
    rc, _, err = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "q", "--group_size", "48")
    assert rc == 1 and "--group_size 48" in error_line(err)
    assert_nothing_written(outs)


def test_truncated_safetensors_in_model_dir(capsys, llama_dir, outs):
    f = llama_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:4000])
    rc, _, err = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "q")
    assert rc == 1 and str(f) in error_line(err)
    assert_nothing_written(outs)


def test_gguf_with_bad_magic(capsys, tmp_path, outs):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"NOPE" + bytes(100))
    rc, _, err = run(capsys, "quantize", "--model_path", f, "--save_directory", outs / "q")
    assert rc == 1 and str(f) in error_line(err) and "magic" in error_line(err)
    assert_nothing_written(outs)


def test_pickle_only_model_dir_is_refused(capsys, llama_dir, outs):
    (llama_dir / "model.safetensors").unlink()
    (llama_dir / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    rc, _, err = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "q")
    assert rc == 1 and "pytorch_model.bin" in error_line(err) and "never loaded" in error_line(err)
    assert_nothing_written(outs)


def test_missing_config_json(capsys, llama_dir, outs):
    (llama_dir / "config.json").unlink()
    rc, _, err = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "q")
    assert rc == 1 and "config.json" in error_line(err) and str(llama_dir) in error_line(err)
    assert_nothing_written(outs)


def test_eval_on_truncated_checkpoint_names_the_file(capsys, w4_out, text_file):
    f = w4_out / "quant_model_weight_w4a16.safetensors"
    f.write_bytes(f.read_bytes()[:3000])
    rc, _, err = run(capsys, "eval", "--model", w4_out, "--text", text_file, "--windows", "1", "--seq_len", "8")
    assert rc == 1 and str(f) in error_line(err)


def test_eval_text_too_short(capsys, llama_dir, tmp_path):
    t = tmp_path / "short.txt"
    t.write_text("the quick fox")
    rc, _, err = run(capsys, "eval", "--model", llama_dir, "--text", t, "--seq_len", "16")
    assert rc == 1 and "fewer than one window of 16" in error_line(err)


def test_eval_missing_text_file(capsys, llama_dir, tmp_path):
    rc, _, err = run(capsys, "eval", "--model", llama_dir, "--text", tmp_path / "nope.txt")
    assert rc == 1 and "nope.txt" in error_line(err)


@pytest.mark.parametrize(
    "argv, flag, words",
    [
        (["--a_bit", "8", "--anti_method", "m5", "--w_method", "gptq"], "--anti_method m5", "leave --w_method gptq out"),
        (["--a_bit", "8", "--anti_method", "m3"], "--anti_method m3", "not supported yet"),
        (["--fa_amp", "1"], "--fa_amp", "needs --use_fa_quant True"),
        (["--kv_dynamic", "True"], "--kv_dynamic", "needs --use_kvcache_quant True"),
        (["--desc_act", "True"], "--desc_act", "--w_method gptq"),
        (["--w_method", "gptq", "--percdamp", "0"], "--percdamp 0", "(0, 1]"),
        (["--use_fa_quant", "True", "--fa_amp", "-1"], "--fa_amp -1", "positive"),
        (["--w_bit", "4", "--w_method", "gptq", "--tokenizer_args", '{"no_such": 1}'], "--tokenizer_args", "'no_such'"),
        (["--w_bit", "4", "--w_method", "gptq", "--tokenizer_args", "[1]"], "--tokenizer_args", "JSON object"),
        (["--w_bit", "4", "--w_method", "gptq", "--input_ids_name", "ids"], "--input_ids_name ids", "none was given"),
        (["--use_reduce_quant", "true"], "--use_reduce_quant", "not supported yet"),
        (["--co_sparse", "true", "--a_bit", "16"], "--co_sparse with --a_bit 16", "int8"),
        (["--co_sparse", "true", "--group_size", "64"], "--co_sparse with --group_size 64", "one scale per channel"),
        (["--device_type", "npu"], "--device_type npu", "Ascend"),
    ],
)
def test_flags_not_supported(capsys, llama_dir, outs, argv, flag, words):
    rc, _, err = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "q", *argv)
    assert rc == 1
    line = error_line(err)
    assert flag in line and words in line
    assert_nothing_written(outs)


@pytest.mark.parametrize(
    "argv, flag, words",
    [
        (["--w_bit", "5"], "--w_bit", "invalid choice"),
        (["--w_sym", "maybe"], "--w_sym", "expected a boolean"),
        (["--w_clip_search", "sometimes"], "--w_clip_search", "expected a boolean"),
        (["--part_file_size", "-1"], "--part_file_size", "positive"),
        (["--device_type", "tpu"], "--device_type", "invalid choice"),
        (["--disable_level", "9"], "--disable_level", "expected L<n>"),
    ],
)
def test_bad_flag_values_exit_2(capsys, llama_dir, outs, argv, flag, words):
    with pytest.raises(SystemExit) as ei:
        main(["quantize", "--model_path", str(llama_dir), "--save_directory", str(outs / "q"), *argv])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("slimquant quantize: error: argument " + flag) and words in last
    assert_nothing_written(outs)


def test_missing_required_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["quantize"])
    assert ei.value.code == 2
    assert "--save_directory" in capsys.readouterr().err


def test_inspect_non_checkpoint(capsys, llama_dir):
    rc, _, err = run(capsys, "inspect", llama_dir)
    assert rc == 1 and "not a slimquant checkpoint" in error_line(err)


def test_cuda_requested_without_cuda(capsys, llama_dir, outs, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, _, err = run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", outs / "q", "--device_type", "cuda")
    assert rc == 1 and "--device_type cuda" in error_line(err)
    assert_nothing_written(outs)


def test_quantizing_a_checkpoint_again_is_refused(capsys, w4_out, tmp_path):
    rc, _, err = run(capsys, "quantize", "--model_path", w4_out, "--save_directory", tmp_path / "again")
    assert rc == 1 and "already quantized" in error_line(err)
    assert not (tmp_path / "again").exists()


def test_eval_checkpoint_without_tokenizer(capsys, llama_dir, outs, text_file):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (llama_dir / f).unlink()
    out = outs / "notok"
    assert run(capsys, "quantize", "--model_path", llama_dir, "--save_directory", out)[0] == 0
    assert not (out / "tokenizer.json").exists()
    rc, _, err = run(capsys, "eval", "--model", out, "--text", text_file)
    assert rc == 1 and f"{out} has no tokenizer files" in error_line(err)
