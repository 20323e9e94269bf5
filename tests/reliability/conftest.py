"""Helpers of the reliability suite: run the CLI (in-process or in a subprocess), snapshot a directory tree to
prove that nothing outside a run's target changed, and break files the way a crash or a hostile input would."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from slimquant.cli.main import main


class Result:
    def __init__(self, rc: int, out: str, err: str) -> None:
        self.rc, self.out, self.err = rc, out, err

    @property
    def error(self) -> str:
        """The single one-line ``slimquant: error: ...`` message (asserting there is exactly one, and no traceback)."""
        assert "Traceback" not in self.err, self.err
        lines = [ln for ln in self.err.splitlines() if ln.startswith("slimquant: error: ")]
        assert len(lines) == 1, self.err
        return lines[0]


@pytest.fixture
def cli(capsys):
    """``cli(*argv)``: run ``slimquant`` in-process; a :class:`Result`."""

    def run(*argv) -> Result:
        rc = main([str(a) for a in argv])
        cap = capsys.readouterr()
        return Result(rc, cap.out, cap.err)

    return run


def run_script(script: str, *argv, cwd: Path | None = None, timeout: float = 300) -> Result:
    """Run Python ``script`` (with ``sys.argv[1:] = argv``) in a fresh interpreter, as a user's process would."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, "-c", script, *map(str, argv)], capture_output=True, text=True, cwd=cwd,
                       timeout=timeout, env=env, stdin=subprocess.DEVNULL)  # fmt: skip
    return Result(p.returncode, p.stdout, p.stderr)


def snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple]:
    """Every entry under ``root`` (but ``skip``): kind, mode, size, content hash of files. Equal snapshots = nothing
    there was created, removed or changed."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames if (d / n) not in skip]
        for n in dirnames:
            st = (d / n).stat()
            out[str((d / n).relative_to(root))] = ("dir", st.st_mode)
        for n in filenames:
            p = d / n
            if p in skip:
                continue
            st = p.stat()
            out[str(p.relative_to(root))] = ("file", st.st_mode, st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def leftovers(parent: Path) -> list[str]:
    """Temporaries, backups and locks of ours in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if any(s in p.name for s in (".tmp-", ".old-", ".lock")))


def rewrite_header(path: Path, edit) -> None:
    """Change a safetensors file's header in place (``edit(header_dict)``), keeping its data bytes."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n :])


def edit_json(path: Path, edit) -> None:
    """Edit a JSON file: ``edit`` changes the data in place, or returns a list to write instead."""
    data = json.loads(path.read_text())
    out = edit(data)
    path.write_text(json.dumps(out if isinstance(out, list) else data))


@pytest.fixture
def calib_file(tmp_path, eval_text) -> Path:
    p = tmp_path / "calib.txt"
    p.write_text(eval_text * 4, encoding="utf-8")
    return p
