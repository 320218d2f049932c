"""Atomic file writes: a temporary file beside the target, fsynced, then renamed over it (or linked to a name
no other file holds: ``atomic_write_new``); and the exclusive lock a writer holds over several such writes.

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


def _write_temp(directory: Path, name: str, data: bytes, mode: int) -> str:
    """A temporary file in ``directory`` holding ``data``, fsynced, with permission bits ``mode``: its path."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)  # mkstemp makes 0600; outputs are ordinary files (0o644) unless told otherwise
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def _fsync_dir(directory: Path) -> None:
    """Make a rename or link in ``directory`` durable (best effort)."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``.

    The file gets permission bits ``mode`` whatever the umask (default 0o644: outputs are ordinary files; 0o600
    for a file only its owner may read)."""
    path = Path(path)
    tmp = _write_temp(path.parent, path.name, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_new(stem: str | os.PathLike, suffix: str, data: bytes, *, mode: int = 0o644) -> Path:
    """Write ``data`` as a new file: ``stem + suffix``, or ``stem-1 + suffix``, ``stem-2 + suffix``... the first
    name free, returned. An audit copy never replaces another, even one a concurrent writer (another run
    sharing the directory) creates meanwhile: the complete file is hard-linked to its name, which fails where
    the name exists, and the next is tried. Atomic as ``atomic_write_bytes``: a name appears only whole. On a file
    system without hard links (vfat, exFAT, many SMB and FUSE mounts) the name is created exclusively
    (``O_EXCL``) and written in place: still never replacing a file, but visible before it is whole."""
    stem = Path(stem)
    tmp = _write_temp(stem.parent, stem.name + suffix, data, mode)
    try:
        path, i, linked = stem.parent / f"{stem.name}{suffix}", 1, True
        while True:
            try:
                if linked:
                    os.link(tmp, path)
                else:
                    _write_exclusive(path, data, mode)
                break
            except FileExistsError:
                path, i = stem.parent / f"{stem.name}-{i}{suffix}", i + 1
            except OSError:
                if not linked:
                    raise
                linked = False  # no hard links here: the same name tried again, created exclusively
    finally:
        os.unlink(tmp)
    _fsync_dir(stem.parent)
    return path


def _write_exclusive(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (FileExistsError where it exists) and write ``data`` to it, fsynced, permission bits ``mode``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            fd = None
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if fd is not None:
            os.close(fd)
        os.unlink(path)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, *, mode: int = 0o644) -> None:
    """``atomic_write_bytes`` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)

