"""Atomic directory output: write into a temporary sibling, rename into place when complete.

Guarantees, for every directory slimquant writes (checkpoints, work directories):

- the target is never the input: :func:`check_target` refuses a target that is, contains or lies inside a
  protected path (the model being read, the calibration file);
- only our own outputs are replaced: a non-empty target is replaced with ``overwrite`` only when it is a
  slimquant checkpoint (it holds :data:`OWNED_MARKER`); anything else needs ``force_overwrite``;
- one writer at a time: :func:`target_lock` holds an exclusive lock (``.<name>.lock`` beside the target, with
  the owner's pid) for as long as a run writes there; a second run is refused at once, and a lock left by a
  killed process is taken over (the kernel releases ``flock`` locks when their process dies);
- nothing half-written is visible or left: files are fsynced before the rename; temporaries of our own naming
  (``.<name>.tmp-*``, ``.<name>.old-*``) left by a killed run are removed by the next run on that target;
- directories get the permissions the umask gives (``mkdtemp`` alone would make them 0700).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from slimquant.errors import SlimquantError

log = logging.getLogger(__name__)

# The file that marks a directory as a slimquant checkpoint (the manifest), so that --overwrite may replace it.
OWNED_MARKER = "slimquant_manifest.json"
# Every file that marks a directory as slimquant's own output (a checkpoint, a GGUF export, a pruned model).
OWNED_MARKERS = (OWNED_MARKER, "gguf_export.json", "pruning.json")

# Locks this process holds: path -> [fd, depth]. A process-wide registry because flock locks belong to open
# file descriptions: the same process locking the same file twice through two descriptors would refuse itself.
_HELD: dict[Path, list[int]] = {}


def absolute_path(path: str | os.PathLike) -> Path:
    """An absolute path with symlinks and ``..`` resolved (``.`` and relative spellings of one place agree)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def umask_mode(mode: int = 0o777) -> int:
    """``mode`` as the process umask would leave it for a newly created file or directory."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return p


def check_target(
    target: str | os.PathLike,
    overwrite: bool,
    protect: Iterable[str | os.PathLike] = (),
    force_overwrite: bool = False,
) -> Path:
    """Refuse a target we must not write (before any slow work); returns its absolute path.

    Refused: a file; a target that is or contains the current directory; a target that is, contains or lies
    inside a ``protect`` path; a non-empty directory unless
    ``overwrite`` and it is a slimquant checkpoint, or ``force_overwrite``; a place where no directory can be
    created (missing parents are created at write time, as ``save_pretrained`` does, so they only need a
    writable existing ancestor).
    """
    if not os.fspath(target).strip():
        raise SlimquantError("output directory name is empty (--save_directory)")
    path = absolute_path(target)
    cwd = absolute_path(os.getcwd())
    if cwd.is_relative_to(path):
        raise SlimquantError(f"output {target} {'is' if cwd == path else 'contains'} the current directory, which a "
                             "finished write would replace under the running process; name a new directory")  # fmt: skip
    for p in protect:
        src = absolute_path(p)
        if path == src or src.is_relative_to(path):
            raise SlimquantError(f"output {target} {'is' if path == src else 'contains'} the input {p}: writing there "
                                 "would destroy it; choose another --save_directory")  # fmt: skip
        if src.is_dir() and path.is_relative_to(src):
            raise SlimquantError(f"output {target} lies inside the input model {p}; choose a directory outside it")
    if path.exists() and not path.is_dir():
        raise SlimquantError(f"output {target} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not (overwrite or force_overwrite):
            raise SlimquantError(f"output directory {target} is not empty; pass --overwrite (overwrite=True) to replace "
                                 "it")  # fmt: skip
        if not force_overwrite and not any((path / m).is_file() for m in OWNED_MARKERS):
            raise SlimquantError(f"output directory {target} is not a slimquant checkpoint (no {OWNED_MARKER}): "
                                 "--overwrite only replaces slimquant's own outputs; to delete everything in it and "
                                 "write there anyway pass --force_overwrite (force_overwrite=True)")  # fmt: skip
    base = _existing_ancestor(path.parent)
    if not base.is_dir():
        raise SlimquantError(f"cannot create output {target}: {base} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise SlimquantError(f"cannot write output {target}: {base} is not writable ({e.strerror})") from None
    return path


def _lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def target_lock(target: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive lock of ``target`` (re-entrant within this process); refuse if another process has it.

    The lock file ``.<name>.lock`` beside the target holds the owner's pid; it is removed on release. A lock
    file whose process died (SIGKILL) holds no kernel lock any more and is taken over, with a log line. Missing
    parent directories are created for it, and removed on release if they are still empty (a failed run).
    """
    path = absolute_path(target)
    held = _HELD.get(path)
    if held is not None:
        held[1] += 1
        try:
            yield path
        finally:
            held[1] -= 1
        return
    lock = _lock_path(path)
    created = []  # parents made for the lock (and the output); removed again if the run leaves them empty
    p = lock.parent
    while not p.exists():
        created.append(p)
        p = p.parent
    lock.parent.mkdir(parents=True, exist_ok=True)  # mode 0777 less the umask
    try:
        fd = _acquire(lock, target)
    except BaseException:
        _remove_empty(created)
        raise
    previous = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    if previous and previous != str(os.getpid()):
        log.warning("took over the lock of %s left by an earlier run (pid %s) that did not finish", target, previous)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _HELD[path] = [fd, 1]
    try:
        yield path
    finally:
        del _HELD[path]
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still holding it: a waiter then sees a different inode and retries
        os.close(fd)
        _remove_empty(created)


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:  # deepest first; a directory the output (or anyone) put something in stays
        try:
            d.rmdir()
        except OSError:
            break


def _acquire(lock: Path, target: str | os.PathLike) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, umask_mode(0o666))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise SlimquantError(f"another slimquant run ({_owner(lock)}) is writing {target}; wait for it to finish "
                                 "or choose another output") from None  # fmt: skip
        # the file may have been removed (and recreated) by its previous owner between our open and our lock
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _owner(lock: Path) -> str:
    try:
        pid = lock.read_text(encoding="ascii").strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid else "another process"


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove ``.<name>.tmp-*`` / ``.<name>.old-*`` beside ``target`` (call with its lock held: they are then no
    live run's). Returns what was removed."""
    removed = []
    if not target.parent.is_dir():
        return removed
    for p in target.parent.iterdir():
        if p.name.startswith((f".{target.name}.tmp-", f".{target.name}.old-")) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
            log.warning("removed %s, a temporary directory left by an interrupted run", p)
    return removed


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (and ``root``), so a rename publishes complete data."""
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(
    target: str | os.PathLike,
    overwrite: bool = False,
    protect: Iterable[str | os.PathLike] = (),
    force_overwrite: bool = False,
) -> Iterator[Path]:
    """Yield a temporary directory next to ``target``; on success it replaces ``target``.

    Checked first with :func:`check_target`; missing parents are created. While the temporary exists the
    target's lock is held. On any exception (Ctrl-C and SIGTERM included) the temporary directory is removed
    and ``target`` is untouched.
    """
    protect = list(protect)
    path = check_target(target, overwrite, protect, force_overwrite)
    with target_lock(path):  # creates missing parents (removed again if nothing is written)
        remove_stale_temporaries(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            os.chmod(tmp, umask_mode())  # mkdtemp makes it 0700
            yield tmp
            check_target(path, overwrite, protect, force_overwrite)  # it may have appeared while we were writing
            fsync_tree(tmp)
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
            fsync_dir(path.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def write_file_atomic(path: str | os.PathLike, data: str | bytes, overwrite: bool = True) -> Path:
    """Write one file whole or not at all: into ``.<name>.tmp`` beside it, fsynced, then renamed over ``path``.
    With ``overwrite`` False an existing ``path`` is refused (naming it) before anything is written."""
    path = absolute_path(path)
    if path.exists() and not overwrite:
        raise SlimquantError(f"{path} exists; pass overwrite (--overwrite) to replace it")
    if path.is_dir():
        raise SlimquantError(f"{path} is a directory, not a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return path

