"""Nothing lost: --overwrite never deletes the input or a directory that is not ours, and a resumed run never
mixes two models' weights."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import slimquant
from slimquant import Recipe, SlimquantError
from slimquant.models.loading import load_model
from slimquant.pipeline import workdir as workdir_mod

from .conftest import leftovers, snapshot

GPTQ = ("--w_bit", "4", "--group_size", "32", "--w_sym", "False", "--w_method", "gptq", "--calib_size", "4",
        "--calib_seq_len", "16")  # fmt: skip


@pytest.fixture
def model_dir(make_llama_dir) -> Path:
    return make_llama_dir("model", layers=3)


# -- 1. --overwrite -----------------------------------------------------------------------------------------------


def test_overwrite_onto_the_model_itself_is_refused(cli, model_dir, tmp_path):
    before = snapshot(tmp_path)
    r = cli("quantize", "--model_path", model_dir, "--save_directory", model_dir, "--overwrite")
    assert r.rc == 1 and "is the input" in r.error and str(model_dir) in r.error
    assert snapshot(tmp_path) == before
    r = cli("quantize", "--model_path", model_dir, "--save_directory", model_dir, "--force_overwrite")
    assert r.rc == 1 and "is the input" in r.error  # not even with the stronger flag
    assert snapshot(tmp_path) == before


def test_overwrite_of_a_directory_holding_the_model_is_refused(cli, make_llama_dir, tmp_path):
    outer = tmp_path / "outer"
    outer.mkdir()
    src = make_llama_dir("outer/model")
    (outer / "notes.txt").write_text("unrelated")
    before = snapshot(tmp_path)
    for flag in ("--overwrite", "--force_overwrite"):
        r = cli("quantize", "--model_path", src, "--save_directory", outer, flag)
        assert r.rc == 1 and "contains the input" in r.error
    assert snapshot(tmp_path) == before


def test_output_inside_the_model_directory_is_refused(cli, model_dir, tmp_path):
    before = snapshot(tmp_path)
    r = cli("quantize", "--model_path", model_dir, "--save_directory", model_dir / "q")
    assert r.rc == 1 and "lies inside the input model" in r.error
    assert snapshot(tmp_path) == before


def test_output_holding_the_calibration_file_is_refused(cli, model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "calib.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    before = snapshot(tmp_path)
    r = cli("quantize", "--model_path", model_dir, "--save_directory", data, "--force_overwrite", *GPTQ,
            "--calib_file", data / "calib.txt")  # fmt: skip
    assert r.rc == 1 and "contains the input" in r.error and "calib.txt" in r.error
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_only_our_checkpoints(cli, model_dir, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    before = snapshot(tmp_path)
    r = cli("quantize", "--model_path", model_dir, "--save_directory", target, "--overwrite")
    assert r.rc == 1 and "not a slimquant checkpoint" in r.error and "--force_overwrite" in r.error
    assert snapshot(tmp_path) == before
    assert cli("quantize", "--model_path", model_dir, "--save_directory", target, "--force_overwrite").rc == 0
    assert not (target / "thesis.tex").exists()
    assert cli("quantize", "--model_path", model_dir, "--save_directory", target, "--overwrite", "--w_bit", "4").rc == 0
    assert (target / "quant_model_weight_w4a16.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_api_save_never_replaces_the_models_source(model_dir, tmp_path):
    lm = load_model(str(model_dir))
    lm_q = slimquant.quantize(lm.model, Recipe(), show_progress=False)
    before = snapshot(tmp_path)
    for target in (model_dir, tmp_path, model_dir / "sub"):
        with pytest.raises(SlimquantError, match="input"):
            slimquant.save(lm_q, target, force_overwrite=True)
    assert snapshot(tmp_path) == before


def test_the_current_directory_is_never_replaced(cli, model_dir, tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    before = snapshot(tmp_path)
    r = cli("quantize", "--model_path", model_dir, "--save_directory", "")
    assert r.rc == 1 and "empty" in r.error
    for target in (".", here, ".."):
        r = cli("quantize", "--model_path", model_dir, "--save_directory", target, "--force_overwrite")
        assert r.rc == 1 and ("current directory" in r.error or "input" in r.error), r.err
    assert snapshot(tmp_path) == before


def test_a_failed_run_leaves_no_parent_directories_behind(cli, model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    w = load_file(str(model_dir / "model.safetensors"))
    w["model.norm.weight"][0] = float("nan")
    save_file(w, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    before = snapshot(tmp_path)
    r = cli("quantize", "--model_path", model_dir, "--save_directory", tmp_path / "new" / "deeper" / "q")
    assert r.rc == 1 and "model.norm.weight" in r.error
    assert snapshot(tmp_path) == before  # the parents made for the lock are gone again


# -- 2. resume --------------------------------------------------------------------------------------------------


class _Killed(Exception):
    pass


def _die_after_block(monkeypatch, block: int) -> None:
    real = workdir_mod.WorkDir.save_block

    def save_block(self, i, *a, **k):
        real(self, i, *a, **k)
        if i == block:
            raise _Killed  # as a kill right after block ``block`` was persisted

    monkeypatch.setattr(workdir_mod.WorkDir, "save_block", save_block)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "quant_model_weight_w4a16.safetensors"))


@pytest.mark.parametrize("stream", [False, True])
def test_resume_refuses_other_weights(cli, model_dir, calib_file, tmp_path, monkeypatch, stream):
    target = tmp_path / "q"
    argv = ("quantize", "--model_path", model_dir, "--save_directory", target, *GPTQ, "--calib_file", calib_file,
            "--stream", str(stream))  # fmt: skip
    _die_after_block(monkeypatch, 0)
    with pytest.raises(_Killed):
        cli(*argv)
    monkeypatch.undo()
    work = tmp_path / "q.partial"
    assert json.loads((work / "state.json").read_text())["done"] == 1
    from safetensors.torch import load_file, save_file

    # other weights of the same config, as subtle as it gets: one value of the finished block 0 changed
    w = load_file(str(model_dir / "model.safetensors"))
    w["model.layers.0.self_attn.q_proj.weight"][3, 5] += 1e-3
    save_file(w, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    before = snapshot(tmp_path)
    r = cli(*argv)
    assert r.rc == 1 and "different setup" in r.error and "weights" in r.error
    assert snapshot(tmp_path) == before  # the unfinished run is kept, nothing written


def test_resume_accepts_the_same_model_under_another_path_spelling(cli, model_dir, calib_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    once = ("quantize", "--model_path", model_dir, "--save_directory", tmp_path / "once", *GPTQ, "--calib_file",
            calib_file)  # fmt: skip
    assert cli(*once).rc == 0
    rel = os.path.relpath(model_dir, tmp_path)
    argv = ["quantize", "--model_path", rel, "--save_directory", "twice", *GPTQ, "--calib_file", calib_file]
    _die_after_block(monkeypatch, 1)
    with pytest.raises(_Killed):
        cli(*argv)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    argv[2] = str(model_dir.resolve())  # absolute this time
    solved = []
    real = workdir_mod.WorkDir.save_block
    monkeypatch.setattr(workdir_mod.WorkDir, "save_block", lambda self, i, *a, **k: solved.append(i) or real(self, i, *a, **k))
    r = cli(*argv)
    assert r.rc == 0, r.err
    assert solved == [2]  # blocks 0 and 1 came from the unfinished run
    a, b = _tensors(tmp_path / "once"), _tensors(tmp_path / "twice")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "twice.partial").exists()
    assert leftovers(tmp_path) == []


# -- 9. what a failed or finished run leaves --------------------------------------------------------------------


def test_a_streamed_run_failing_at_block_0_leaves_no_work_directory(cli, model_dir, calib_file, tmp_path):
    from safetensors.torch import load_file, save_file

    w = load_file(str(model_dir / "model.safetensors"))
    w["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(w, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    r = cli("quantize", "--model_path", model_dir, "--save_directory", tmp_path / "q", *GPTQ, "--calib_file", calib_file,
            "--stream", "True")  # fmt: skip
    assert r.rc == 1 and "model.layers.0.mlp.up_proj.weight" in r.error and "NaN" in r.error
    assert "finished block" not in r.err  # nothing was finished: nothing is said to be kept
    assert not (tmp_path / "q.partial").exists() and not (tmp_path / "q").exists()
    assert leftovers(tmp_path) == []


def test_a_failed_run_with_finished_blocks_says_where_they_are(cli, model_dir, calib_file, tmp_path, monkeypatch):
    real = workdir_mod.WorkDir.save_block

    def save_block(self, i, *a, **k):
        if i == 1:
            raise KeyboardInterrupt
        return real(self, i, *a, **k)

    monkeypatch.setattr(workdir_mod.WorkDir, "save_block", save_block)
    r = cli("quantize", "--model_path", model_dir, "--save_directory", tmp_path / "q", *GPTQ, "--calib_file", calib_file)
    assert r.rc == 130 and "1 finished block(s) are kept in" in r.err and "q.partial" in r.err


def test_a_finished_run_removes_a_stale_work_directory(cli, model_dir, calib_file, tmp_path, monkeypatch, caplog):
    _die_after_block(monkeypatch, 0)
    with pytest.raises(_Killed):
        cli("quantize", "--model_path", model_dir, "--save_directory", tmp_path / "q", *GPTQ, "--calib_file", calib_file)
    monkeypatch.undo()
    assert (tmp_path / "q.partial" / "state.json").is_file()
    r = cli("quantize", "--model_path", model_dir, "--save_directory", tmp_path / "q")  # RTN: no work directory
    assert r.rc == 0
    assert not (tmp_path / "q.partial").exists()
    assert "removed" in caplog.text and "q.partial" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", "q", "calib.txt"])


def test_an_unrelated_partial_directory_is_never_removed(cli, model_dir, tmp_path):
    (tmp_path / "q.partial").mkdir()
    (tmp_path / "q.partial" / "mine.txt").write_text("not slimquant's")
    assert cli("quantize", "--model_path", model_dir, "--save_directory", tmp_path / "q").rc == 0
    assert (tmp_path / "q.partial" / "mine.txt").read_text() == "not slimquant's"
    shutil.rmtree(tmp_path / "q")
    r = cli("quantize", "--model_path", model_dir, "--save_directory", tmp_path / "q", *GPTQ, "--calib_texts",
            "the quick brown fox jumps over the lazy dog " * 10)  # fmt: skip
    assert r.rc == 1 and "not a slimquant work directory" in r.error
    assert (tmp_path / "q.partial" / "mine.txt").read_text() == "not slimquant's"
