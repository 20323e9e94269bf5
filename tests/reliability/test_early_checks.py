"""Everything that can be checked is checked before the slow part: the target, the calibration file, demo's
target. A model loader that fails the test stands in for the slow part."""

from __future__ import annotations

from pathlib import Path

import pytest

import slimquant
from slimquant import Recipe

from .conftest import snapshot


@pytest.fixture
def no_loading(monkeypatch):
    def fail(*a, **k):
        pytest.fail("the model was loaded before a check that needs no model")

    for where in ("slimquant.models.loading.load_model", "slimquant.models.streaming.open_streaming"):
        monkeypatch.setattr(where, fail)


@pytest.fixture
def model_dir(make_llama_dir) -> Path:
    return make_llama_dir("model")


def test_an_unwritable_target_is_refused_before_loading(cli, model_dir, no_loading):
    r = cli("quantize", "--model_path", model_dir, "--save_directory", "/sys/slimquant-probe/q")
    assert r.rc == 1 and "/sys" in r.error and "not writable" in r.error


def test_a_target_under_a_file_is_refused_before_loading(cli, model_dir, tmp_path, no_loading):
    (tmp_path / "afile").write_text("x")
    r = cli("quantize", "--model_path", model_dir, "--save_directory", tmp_path / "afile" / "q")
    assert r.rc == 1 and "afile" in r.error and "not a directory" in r.error


@pytest.mark.parametrize("content, name, words", [
    ("", "calib.txt", "calib.txt"),
    ("{not json\n", "calib.jsonl", "calib.jsonl"),
    ('{"txt": "a"}\n', "calib.jsonl", "text"),
])  # fmt: skip
def test_a_bad_calibration_file_is_refused_before_loading(cli, model_dir, tmp_path, no_loading, content, name, words):
    f = tmp_path / name
    f.write_text(content)
    before = snapshot(tmp_path)
    r = cli("quantize", "--model_path", model_dir, "--save_directory", tmp_path / "q", "--w_method", "gptq",
            "--calib_file", f)  # fmt: skip
    assert r.rc == 1 and words in r.error
    assert snapshot(tmp_path) == before


def test_a_missing_calibration_file_is_refused_before_loading(cli, model_dir, tmp_path, no_loading):
    r = cli("quantize", "--model_path", model_dir, "--save_directory", tmp_path / "q", "--a_bit", "8",
            "--calib_file", tmp_path / "nope.jsonl")  # fmt: skip
    assert r.rc == 1 and "nope.jsonl" in r.error


def test_demo_checks_its_target_first(cli, model_dir, tmp_path, no_loading, eval_text):
    text = tmp_path / "t.txt"
    text.write_text(eval_text)
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.txt").write_text("keep")
    r = cli("demo", "--model", model_dir, "--text", text, "--save_directory", out)
    assert r.rc == 1 and "not empty" in r.error and "--overwrite" in r.error
    r = cli("demo", "--model", model_dir, "--text", text, "--save_directory", out, "--overwrite")
    assert r.rc == 1 and "not a slimquant checkpoint" in r.error
    assert (out / "x.txt").read_text() == "keep"
    r = cli("demo", "--model", model_dir, "--text", text, "--save_directory", model_dir, "--overwrite")
    assert r.rc == 1 and "is the input" in r.error


def test_demo_overwrites_its_own_checkpoint(cli, model_dir, tmp_path, eval_text):
    text = tmp_path / "t.txt"
    text.write_text(eval_text * 20)
    out = tmp_path / "out"
    argv = ("demo", "--model", model_dir, "--text", text, "--save_directory", out, "--group_size", "32",
            "--windows", "1", "--seq_len", "16", "--calib_size", "2", "--calib_seq_len", "16")  # fmt: skip
    assert cli(*argv).rc == 0
    assert cli(*argv).rc == 1  # exists now
    r = cli(*argv, "--overwrite")
    assert r.rc == 0 and "perplexity" in r.out
    assert "AWQ + GPTQ, reloaded" in r.out and "round-to-nearest" in r.out and "default calibration set" in r.out


def test_save_creates_missing_parents_as_save_pretrained_does(mlp, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mlp_q = slimquant.quantize(mlp, Recipe(), show_progress=False)
    slimquant.save(mlp_q, "out/deeper/mlp-w8")  # the README's example, from an empty directory
    assert (tmp_path / "out" / "deeper" / "mlp-w8" / "slimquant_manifest.json").is_file()
