"""Opening checkpoint files safely and writing files atomically.

A checkpoint file is opened without blocking and refused unless it is a regular file (a
FIFO or a device named ``x.index`` would hang or never end); writes go to a temporary file
in the same directory, created with the umask's permissions, then renamed into place.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "f")
>>> _ = write_atomically(path, [b"abc"])
>>> read_whole(path)
b'abc'
"""
from __future__ import annotations

import mmap
import os
import stat
import uuid
from typing import Iterable

from .errors import CheckpointError


def open_regular(path: str):
    """A binary file object for ``path`` and its size; CheckpointError unless a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot open ({error.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{path}: not a regular file")
        return os.fdopen(fd, "rb"), info.st_size
    except BaseException:
        os.close(fd)
        raise


def read_whole(path: str, limit: int = 1 << 31) -> bytes:
    """A regular file's bytes (refused above ``limit``, which no index file comes near)."""
    handle, size = open_regular(path)
    with handle:
        if size > limit:
            raise CheckpointError(f"{path}: {size} bytes, too big for this kind of file")
        data = handle.read(size + 1)
    if len(data) != size:
        raise CheckpointError(f"{path}: changed size while being read")
    return data


def map_file(path: str):
    """``path`` memory-mapped copy-on-write (writable arrays, the file never written), and
    its size; an empty file gives ``b""``."""
    handle, size = open_regular(path)
    with handle:
        if size == 0:
            return b"", 0
        try:
            return mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY), size
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{path}: cannot memory-map ({error})") from None


def temporary_path(path: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex[:12]}")


def write_atomically(path: str, chunks: Iterable, final: bool = True) -> str:
    """Write ``chunks`` (bytes-like) to a temporary file beside ``path``, fsync, and rename
    it to ``path`` (or, with ``final=False``, return the temporary path unrenamed)."""
    temporary = temporary_path(path)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if final:
            os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return temporary
