"""Atomic file writes: a temporary file beside the target, fsynced, then renamed over it; and the exclusive lock
a writer holds over several such writes.

A reader (or a run killed at any moment) sees the old file or the new one, never a torn mix.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

try:  # POSIX; without it (Windows) exclusive_lock locks nothing
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None


class LockedError(OSError):
    """Another process (or another open of the file here) holds the lock ``exclusive_lock`` asked for."""


def unwritable(directory: str | os.PathLike, *, mode: int = 0o777) -> str | None:
    """Why files cannot be written atomically in ``directory`` (created with ``mode``, less the umask, where
    missing), or None: a temporary file is created and removed there, as ``atomic_write_bytes`` will need. The
    reason is the error's type and text, never the path (the caller decides who may read it)."""
    try:
        Path(directory).mkdir(mode=mode, parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".fedlora_fast-probe.", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror}" if e.strerror else type(e).__name__
    return None


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike):
    """Hold ``flock``'s exclusive lock on ``path`` (created mode 0o600, never removed) while the block runs,
    taken without waiting. The kernel drops it when the holder exits, however it exits: a killed process
    leaves no stale lock. ``flock`` is advisory and local (on a network file system it may not exclude another
    machine). Yields whether a lock is held (False without ``fcntl``: Windows).

    Raises:
        LockedError: the lock is held elsewhere.
        OSError: the lock file cannot be opened.
    """
    if fcntl is None:  # pragma: no cover
        yield False
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(f"{path} is locked by another process") from None
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``.

    The file gets permission bits ``mode`` whatever the umask (default 0o644: outputs are ordinary files; 0o600
    for a file only its owner may read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)  # mkstemp makes 0600; outputs are ordinary files (0o644) unless told otherwise
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_text(path: str | os.PathLike, text: str, *, mode: int = 0o644) -> None:
    """``atomic_write_bytes`` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def unused_path(stem: str | os.PathLike, suffix: str) -> Path:
    """``stem + suffix``, or ``stem-1 + suffix``, ``stem-2 + suffix``... the first that does not exist: an audit
    copy never replaces an earlier one (the caller holds a lock that keeps other writers of the directory out)."""
    stem = Path(stem)
    path, i = stem.parent / f"{stem.name}{suffix}", 1
    while path.exists():
        path, i = stem.parent / f"{stem.name}-{i}{suffix}", i + 1
    return path
