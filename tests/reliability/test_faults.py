"""Faults: SIGKILL and SIGTERM during the final save and during a block, two runs to one target, and the
permissions and durability of what is written. The kills run in real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import slimquant
from slimquant import Recipe, SlimquantError
from slimquant.formats import atomic
from slimquant.types import steps

from .conftest import leftovers, run_script, snapshot

# Runs the CLI after patching a writer to kill the process while a file is half written. argv[1]: the writer
# ("save" = the checkpoint's safetensors, "block" = block 1's file in the work directory), argv[2]: the signal.
KILLER = r"""
import os, signal, sys
what, sig = sys.argv[1], getattr(signal, sys.argv[2])
def half_then_die(path):
    with open(path, "wb") as f:
        f.write(b"\0" * 4096)
        f.flush()
    os.kill(os.getpid(), sig)
    import time
    time.sleep(30)  # SIGTERM is handled at the next bytecode boundary; SIGKILL never returns
if what == "save":
    from slimquant.formats import checkpoint
    checkpoint.write_safetensors = lambda path, *a, **k: half_then_die(path)
else:
    from slimquant.pipeline import workdir
    real = workdir._write_tensors
    workdir._write_tensors = lambda path, t: half_then_die(path.with_name(path.name + ".tmp")) if "block_00001" in path.name else real(path, t)
from slimquant.cli.main import main
sys.exit(main(sys.argv[3:]))
"""

CLI = "import sys\nfrom slimquant.cli.main import main\nsys.exit(main(sys.argv[1:]))\n"

GPTQ = ("--w_bit", "4", "--group_size", "32", "--w_sym", "False", "--w_method", "gptq", "--calib_size", "4",
        "--calib_seq_len", "16")  # fmt: skip


@pytest.fixture
def model_dir(make_llama_dir) -> Path:
    return make_llama_dir("model", layers=3)


def _weights(directory: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / name))


def test_sigkill_during_the_final_save_then_rerun(model_dir, tmp_path):
    target = tmp_path / "out" / "q"
    argv = ("quantize", "--model_path", model_dir, "--save_directory", target)
    before = snapshot(tmp_path)
    r = run_script(KILLER, "save", "SIGKILL", *argv)
    assert r.rc == -signal.SIGKILL
    assert not target.exists()
    stale = [p for p in target.parent.iterdir() if p.name.startswith(".q.tmp-")]
    assert len(stale) == 1  # what a SIGKILL leaves: our temporary (and our lock file)
    r = run_script(CLI, *argv)
    assert r.rc == 0, r.err
    assert "removed" in r.err and stale[0].name in r.err  # said so
    assert leftovers(target.parent) == []
    assert (target / "quant_model_weight_w8a16.safetensors").is_file()
    after = snapshot(tmp_path, skip=(target.parent,))
    assert after == {k: v for k, v in before.items()}  # nothing else changed
    assert slimquant.load(target).model is not None


def test_sigterm_during_the_final_save_is_handled_like_ctrl_c(model_dir, tmp_path):
    target = tmp_path / "q"
    before = snapshot(tmp_path)
    r = run_script(KILLER, "save", "SIGTERM", "quantize", "--model_path", model_dir, "--save_directory", target)
    assert r.rc == 128 + signal.SIGTERM
    assert "slimquant: terminated (SIGTERM); the output was not written" in r.err and "Traceback" not in r.err
    assert snapshot(tmp_path) == before  # the temporary and the lock are gone


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_kill_during_a_block_then_resume_gives_the_uninterrupted_checkpoint(model_dir, calib_file, tmp_path, sig):
    ref = tmp_path / "ref"
    r = run_script(CLI, "quantize", "--model_path", model_dir, "--save_directory", ref, *GPTQ, "--calib_file", calib_file)
    assert r.rc == 0, r.err
    target = tmp_path / "q"
    argv = ("quantize", "--model_path", model_dir, "--save_directory", target, *GPTQ, "--calib_file", calib_file)
    r = run_script(KILLER, "block", sig, *argv)
    work = tmp_path / "q.partial"
    if sig == "SIGKILL":
        assert r.rc == -signal.SIGKILL
    else:
        assert r.rc == 143 and "1 finished block(s) are kept in" in r.err, r.err
    assert json.loads((work / "state.json").read_text())["done"] == 1
    r = run_script(CLI, *argv)
    assert r.rc == 0, r.err
    assert "resuming" in r.err and "1 block(s) already done" in r.err
    a, b = _weights(ref, "quant_model_weight_w4a16.safetensors"), _weights(target, "quant_model_weight_w4a16.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not work.exists() and leftovers(tmp_path) == []


# -- 8. one writer at a time ----------------------------------------------------------------------------------


HOLDER = r"""
import sys, time
from slimquant.formats.atomic import target_lock
with target_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_run_to_the_same_target_is_refused_at_once(cli, model_dir, tmp_path, monkeypatch):
    target = tmp_path / "q"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr("slimquant.models.loading.load_model", lambda *a, **k: pytest.fail("loaded the model"))
        t0 = time.perf_counter()
        r = cli("quantize", "--model_path", model_dir, "--save_directory", target)
        assert r.rc == 1 and f"pid {holder.pid}" in r.error and "is writing" in r.error
        assert time.perf_counter() - t0 < 5
        with pytest.raises(SlimquantError, match="another slimquant run"):
            with atomic.atomic_directory(target):
                pass
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.undo()
    assert cli("quantize", "--model_path", model_dir, "--save_directory", target).rc == 0  # the lock died with it


def test_two_api_runs_on_one_work_directory(model_dir, tmp_path, input_ids):
    from slimquant.models.loading import load_model

    work = tmp_path / "w.partial"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(work)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        lm = load_model(str(model_dir))
        with pytest.raises(SlimquantError, match="another slimquant run"):
            slimquant.quantize(lm.model, Recipe(steps=(steps.GPTQ(),)), calib_data=input_ids, show_progress=False,
                               work_dir=work)  # fmt: skip
        assert not work.exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_file_is_taken_over(tmp_path, caplog):
    lock = tmp_path / ".q.lock"
    lock.write_text("999999")  # a lock file whose process is gone (no kernel lock on it)
    with atomic.target_lock(tmp_path / "q"):
        assert lock.read_text() == str(os.getpid())
    assert "pid 999999" in caplog.text
    assert not lock.exists()


def test_the_lock_is_reentrant_in_one_process(tmp_path):
    with atomic.target_lock(tmp_path / "q"):
        with atomic.atomic_directory(tmp_path / "q") as tmp:
            (tmp / "x").write_text("x")
    assert (tmp_path / "q" / "x").is_file() and leftovers(tmp_path) == []


# -- durability and permissions -------------------------------------------------------------------------------


def test_files_and_directories_are_fsynced_before_the_rename(llama, tmp_path, monkeypatch):
    result = slimquant.quantize(llama, Recipe(), show_progress=False)
    synced: list[str] = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = slimquant.save(result, tmp_path / "q")
    names = {Path(p).name for p in synced}
    for f in out.iterdir():
        assert any(n == f.name for n in names), f.name  # every file (under its temporary name's directory)
    assert str(tmp_path) in synced  # the parent, after the rename


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_outputs_honour_the_umask(cli, model_dir, tmp_path, umask):
    old = os.umask(umask)
    try:
        target = tmp_path / f"q{umask:o}"
        assert cli("quantize", "--model_path", model_dir, "--save_directory", target).rc == 0
        assert target.stat().st_mode & 0o777 == 0o777 & ~umask
        for f in target.iterdir():
            assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name
        os.chmod(target, 0o755)
        assert cli("quantize", "--model_path", model_dir, "--save_directory", target, "--overwrite").rc == 0
        assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # a replaced output is new: the umask again
        nested = tmp_path / f"new{umask:o}" / "deeper" / "q"
        assert cli("quantize", "--model_path", model_dir, "--save_directory", nested).rc == 0
        assert (tmp_path / f"new{umask:o}").stat().st_mode & 0o777 == 0o777 & ~umask
    finally:
        os.umask(old)
