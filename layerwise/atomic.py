"""Atomic file writes: a kill at any moment leaves either the old file or the new one."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

from layerwise.errors import LayerwiseError


@functools.cache
def file_mode() -> int:
    """The mode ``open()`` would give a new file: 0666 less the umask. (mkstemp makes its files
    0600, which would hide checkpoints from the other users of a shared run folder.)"""
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then ``os.replace`` it in."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise LayerwiseError(f"cannot write {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise LayerwiseError(f"cannot write {path}: {exc.strerror}; the previous version is untouched") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Text version of :func:`write_bytes_atomic`."""
    write_bytes_atomic(path, text.encode("utf-8"))


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that writes killed half-way left in ``folder``; return them.

    They are named ``.<file>.<random>.tmp`` by :func:`write_bytes_atomic`, never read, and safe
    to remove once no write is running (a resumed run calls this before it writes anything).
    """
    stale = sorted(Path(folder).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
