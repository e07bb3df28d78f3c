"""Crash-safe file writes: the one implementation every part of moezoo uses.

A file is written to a private temporary path in its destination folder (same file system) and renamed over the
destination, so a reader sees the old file or the new one, never half of either, and a killed process leaves at
most a hidden ``.<name>.*.part`` file behind (removed on the next exit through the context manager, or by
:func:`remove_stale_temporaries`, which ``moezoo fit`` runs over its run folder when it starts).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def temporary_beside(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """A private temporary path beside ``dest``; the caller writes it, then :func:`os.replace` s it onto ``dest``.

    The temporary file gets the permissions a new file would get (``mkstemp`` alone makes it 0600) and is removed
    on exit if it is still there.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # the writer's process id is in the name, so that remove_stale_temporaries leaves a live writer's file alone
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _writer_alive(path: Path) -> bool:
    """Whether the process that :func:`temporary_beside` named in ``path`` (``.<name>.<pid>.<random>.part``) still
    runs; a name without a process id is from no live writer."""
    parts = path.name.removesuffix(".part").split(".")
    pid = parts[-2] if len(parts) >= 4 else ""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files :func:`temporary_beside` made under ``folder`` (recursively) that a killed process
    left behind; returns them. A file whose writer still runs (another fit logging into the same folder) is kept."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.rglob(".*.part") if p.is_file() and not _writer_alive(p)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    path = Path(path)
    with temporary_beside(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], data: Any, indent: int = 2, sort_keys: bool = True) -> Path:
    """Write ``data`` as JSON (newline-terminated) to ``path`` atomically; returns the path."""
    return write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n")


def copy_file_atomic(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Copy ``src`` onto ``dest`` atomically; returns ``dest``."""
    dest = Path(dest)
    with temporary_beside(dest) as tmp:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    return dest
