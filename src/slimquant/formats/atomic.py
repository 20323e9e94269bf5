"""Atomic directory output: write into a temporary sibling, rename into place when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from slimquant.errors import SlimquantError


def check_target(target: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a target that is a file, or a non-empty directory unless ``overwrite``."""
    path = Path(target)
    if path.exists() and not path.is_dir():
        raise SlimquantError(f"output {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise SlimquantError(f"output directory {path} is not empty; pass --overwrite (overwrite=True) to replace it")
    if not path.parent.exists():
        raise SlimquantError(f"parent directory of {path} does not exist")
    return path


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; on success it replaces ``target``.

    On any exception the temporary directory is removed and ``target`` is untouched.
    """
    path = check_target(target, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        check_target(path, overwrite)  # it may have appeared while we were writing
        if path.is_dir():
            backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rmdir(backup)
            os.rename(path, backup)
            try:
                os.rename(tmp, path)
            except OSError:
                os.rename(backup, path)  # put the old output back
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
