"""Atomic output: a save either produces the whole directory or leaves nothing behind."""

from __future__ import annotations

import pytest

import slimquant
from slimquant import Recipe, SlimquantError
from slimquant.formats import checkpoint, msmodelslim
from slimquant.formats.atomic import atomic_directory, check_target


@pytest.fixture
def qmlp(mlp):
    return slimquant.quantize(mlp, Recipe(), show_progress=False)


def test_check_target_cases(tmp_path):
    assert check_target(tmp_path / "new", overwrite=False) == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_target(tmp_path / "empty", overwrite=False)  # an empty directory is fine
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(SlimquantError, match=r"full is not empty; pass --overwrite"):
        check_target(tmp_path / "full", overwrite=False)
    with pytest.raises(SlimquantError, match=r"full is not a slimquant checkpoint .* --force_overwrite"):
        check_target(tmp_path / "full", overwrite=True)  # --overwrite replaces only our own outputs
    check_target(tmp_path / "full", overwrite=False, force_overwrite=True)
    (tmp_path / "full" / "slimquant_manifest.json").write_text("{}")
    check_target(tmp_path / "full", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SlimquantError, match=r"file exists and is not a directory"):
        check_target(tmp_path / "file", overwrite=True)
    # missing parents are created at write time (as save_pretrained does); a file in the way is not
    assert check_target(tmp_path / "missing" / "out", overwrite=False) == tmp_path / "missing" / "out"
    assert not (tmp_path / "missing").exists()
    with pytest.raises(SlimquantError, match="file is not a directory"):
        check_target(tmp_path / "file" / "out", overwrite=False)


def test_atomic_directory_success_and_failure(tmp_path, leftovers):
    with atomic_directory(tmp_path / "ok") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".ok.tmp-")
        (tmp / "a.txt").write_text("a")
        assert not (tmp_path / "ok").exists()  # nothing visible until complete
    assert (tmp_path / "ok" / "a.txt").read_text() == "a"

    with pytest.raises(ValueError, match="boom"):
        with atomic_directory(tmp_path / "bad") as tmp:
            (tmp / "a.txt").write_text("a")
            raise ValueError("boom")
    assert not (tmp_path / "bad").exists()
    assert leftovers(tmp_path) == []


def test_save_to_existing_file_is_refused(qmlp, tmp_path, leftovers):
    target = tmp_path / "out"
    target.write_text("keep me")
    with pytest.raises(SlimquantError, match="exists and is not a directory"):
        slimquant.save(qmlp, target)
    assert target.read_text() == "keep me"
    assert leftovers(tmp_path) == []


def test_non_empty_target_needs_overwrite(qmlp, tmp_path, leftovers):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(SlimquantError, match="not empty"):
        slimquant.save(qmlp, target)
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    with pytest.raises(SlimquantError, match="not a slimquant checkpoint"):
        slimquant.save(qmlp, target, overwrite=True)  # not our output: --overwrite alone never deletes it
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]

    slimquant.save(qmlp, target, force_overwrite=True)
    names = {p.name for p in target.iterdir()}
    assert "old.txt" not in names  # replaced, not merged
    (target / "note.txt").write_text("added later")
    slimquant.save(qmlp, target, overwrite=True)  # a slimquant checkpoint: --overwrite replaces it
    assert "note.txt" not in {p.name for p in target.iterdir()}
    assert "quant_model_weight_w8a16.safetensors" in names
    assert leftovers(tmp_path) == []


def test_exception_while_saving_leaves_nothing(qmlp, tmp_path, monkeypatch, leftovers):
    calls = []

    def broken_save_file(filename, entries, metadata=None):
        calls.append(filename)
        with open(filename, "wb") as fh:  # a half-written file, as a crash would leave it
            fh.write(b"\x00" * 10)
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "write_safetensors", broken_save_file)
    with pytest.raises(RuntimeError, match="disk full"):
        slimquant.save(qmlp, tmp_path / "out")
    assert calls, "the patched writer was not used"
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == []


def test_exception_while_overwriting_keeps_the_old_directory(qmlp, tmp_path, monkeypatch, leftovers):
    target = tmp_path / "out"
    slimquant.save(qmlp, target, part_file_size=None)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken_save_file(filename, entries, metadata=None):
        raise OSError("interrupted")

    monkeypatch.setattr(checkpoint, "write_safetensors", broken_save_file)
    with pytest.raises(OSError, match="interrupted"):
        slimquant.save(qmlp, target, overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert leftovers(tmp_path) == []
