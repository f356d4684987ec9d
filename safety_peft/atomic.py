"""Atomic file writes: readers see the old file or the new one, never a mix, and a failure loses nothing."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


def _usual_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; if the block succeeds it replaces ``path``.

    For writers that want a file name (``safetensors.torch.save_file``). The file gets the usual
    permissions (mkstemp creates it 0600). On any error the temporary file is removed and ``path`` is
    left as it was.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _usual_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (str as UTF-8) to ``path`` atomically, flushed to disk before the rename."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary sibling folder; if the block succeeds it replaces ``final`` (a complete folder
    or none, never half of one). On any error the temporary folder is removed and ``final`` is untouched.
    """
    final = os.path.abspath(os.fspath(final))
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
