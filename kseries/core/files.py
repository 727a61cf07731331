"""Shared files made safely: under a lock, written to a temporary name and renamed into place.

Two tasks may run at once on one cache (two boxes booting in parallel, two terminals), and any
of them may be killed halfway. So a shared artifact is only ever seen whole or not at all: it
is written beside its final name and renamed (atomic on one file system), and the work of
making it is done by one process at a time under an flock, the others waiting and then finding
it made.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from kseries.errors import ToolkitError

Log = Callable[[str], None]


@contextmanager
def exclusive(path: Path, waiting: str = "", log: Log | None = None) -> Iterator[None]:
    """Hold an flock on `path` (made if missing); if another process holds it, say `waiting`
    and wait. The kernel drops the lock when its holder dies, however it dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting and log:
                log(waiting)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextmanager
def try_exclusive(path: Path) -> Iterator[bool]:
    """Take the flock on `path` if it is free; yield whether this process got it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def scratch_name(path: Path) -> Path:
    """A fresh, unique name beside `path` for building it; never the name of a finished file."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    os.unlink(name)
    return Path(name)


def write_atomic(path: Path, data: str | bytes, mode: int | None = None) -> None:
    """Replace `path` with `data` in one step: readers see the old file or the new, never half.
    The file keeps its mode (or gets `mode`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(name, mode if mode is not None else _mode_of(path))
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def _mode_of(path: Path) -> int:
    """The replaced file's mode, else a plain file's 0644: mkstemp's 0600 is for scratch files,
    not for a diff in patches/ or a manifest."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o644


def remove_stale(directory: Path) -> None:
    """Delete what killed writers left behind (`.*.partial` files), to be called under the lock
    that guards `directory`'s artifacts."""
    for stale in directory.glob(".*.partial"):
        if stale.is_file() or stale.is_symlink():
            stale.unlink(missing_ok=True)


def output_dir(path: Path, option: str = "--out") -> Path:
    """A task's output directory, checked before any work is done: made if missing, refused
    (naming the option) if it is a file or cannot be written."""
    path = path.expanduser()
    hint = "pass a writable directory (it is made if missing)"
    if path.exists() and not path.is_dir():
        raise ToolkitError(f"{option} {path} is a file, not a directory", hint)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ToolkitError(f"{option} {path} cannot be made: {e.strerror}", hint) from None
    if not os.access(path, os.W_OK | os.X_OK):  # also EROFS for root on a read-only mount
        raise ToolkitError(f"{option} {path} is not writable", hint)
    return path
