"""Atomic file output: a failure never leaves a half-written file behind. Also where the process's C library is
found, for the few settings facegender makes in it."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import tempfile
import time
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes owner-only files, and so do some writers that replace it; outputs get the usual mode
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(folder: Path, name: str, older_than: float) -> int:
    """Delete what ``atomic_path`` left in ``folder`` for files named ``name`` (a glob pattern) in runs that
    were killed before they could clean up, where unchanged for ``older_than`` seconds: longer than any
    writer of such a file runs, so none is still being written. Returns how many went."""
    removed = 0
    for tmp in folder.glob(f".{name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):  # another process may sweep at the same moment
            if time.time() - tmp.stat().st_mtime > older_than:
                tmp.unlink()
                removed += 1
    return removed


# A cache entry that no run has used for this long goes when another entry of its folder is used: the graphs an
# upgrade or a retrained model converted (22 MB each), or the crops of a dataset since changed, do not pile up.
UNUSED_FOR = 30 * 86400  # s
MARKED_EVERY = 86400  # s: a use writes an entry's modification time where it is older than this


def used_cache_entry(path: Path, pattern: str) -> Path:
    """Mark ``path``, a cache entry just read or written, as used (its modification time, at most once
    MARKED_EVERY), and delete the other entries of its folder matching ``pattern`` (a glob) that no run has
    used for UNUSED_FOR. Returns ``path``. Where the cache cannot be written (read-only, another process
    sweeping too) nothing changes."""
    now = time.time()
    with contextlib.suppress(OSError):
        if now - path.stat().st_mtime > MARKED_EVERY:
            os.utime(path)
    for other in path.parent.glob(pattern):
        if other != path:
            with contextlib.suppress(OSError):
                if now - other.stat().st_mtime > UNUSED_FOR:
                    other.unlink()
    return path


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs):
    """Open a temporary file for writing; it replaces ``path`` when the block ends without error."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc, else None: its ``mallopt`` (``images``) and its ``stdout``
    variable (``descriptor_runtime``) are what facegender sets, and musl's are a no-op and a constant."""
    if os.name != "posix":  # ctypes.CDLL(None) is POSIX's own
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc's own
    except (OSError, AttributeError):
        return None
    return libc


def cache_dir() -> Path:
    """Where derived files (decoded crops, descriptors, converted graphs) are kept: $FACEGENDER_CACHE, else
    ~/.cache/facegender."""
    return Path(os.environ.get("FACEGENDER_CACHE", Path.home() / ".cache" / "facegender"))


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


class UserError(Exception):
    """A mistake in the user's input: the command line prints the message alone and exits 2."""
