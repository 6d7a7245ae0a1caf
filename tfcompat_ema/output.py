"""Writing a file all or nothing: a temporary file beside it, fsync, then one rename.

A failed or interrupted write (disk full, file size limit, SIGTERM, Ctrl-C) leaves no
temporary file and no partial output, and the output is never replaced unless asked. The
file gets the mode a new file gets (``0o666`` less the umask), as a shell redirection does.

Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "out.bin")
    >>> with AtomicOutput(path) as out:
    ...     out.write(b"hello")
    ...     out.commit()
    >>> open(path, "rb").read()
    b'hello'
    >>> AtomicOutput(path)
    Traceback (most recent call last):
    ...
    tfcompat_ema.output.OutputError: ... exists (--force replaces it)
"""
from __future__ import annotations

import errno
import os
import signal
import stat
import tempfile
from typing import Optional, Set

#: Temporary files being written now; removed by :meth:`AtomicOutput.__exit__` on any exit.
PENDING: Set[str] = set()
_write = os.write                # (the tests make it fail as a full disk would)
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGINT")
                 if hasattr(signal, name))


class OutputError(ValueError):
    """The output cannot be (or was not) written; the message names it."""


class Terminated(BaseException):
    """Raised by :func:`raise_on_signals`' handlers, so ``finally`` blocks clean up."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_on_signals(signum, frame) -> None:
    """A signal handler (SIGTERM, SIGHUP) that unwinds the stack as an exception would."""
    raise Terminated(signum)


def check_output(path: str, replace: bool, label: str = "") -> None:
    """Refuse early what :class:`AtomicOutput` would refuse: a missing directory, an
    existing output (without ``replace``), a directory or other non-regular file."""
    name = f"{label} {path}" if label else path
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise OutputError(f"{name}: the directory {directory} does not exist")
    if os.path.lexists(path):
        if os.path.isdir(path):
            raise OutputError(f"{name}: is a directory")
        if not replace:
            raise OutputError(f"{name}: exists (--force replaces it)")
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise OutputError(f"{name}: exists and is not a regular file; not replaced")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class AtomicOutput:
    """A context manager: ``write`` bytes, ``commit`` to put them at ``path``; anything
    else (an error, a signal, no commit) removes the temporary file and leaves ``path`` as
    it was. ``replace``: an existing ``path`` may be replaced (else :class:`OutputError`)."""

    def __init__(self, path, replace: bool = False, label: str = ""):
        self.path = os.fspath(path)
        self.replace = replace
        self.name = f"{label} {self.path}" if label else self.path
        check_output(self.path, replace, label)
        self._descriptor: Optional[int] = None
        self._temporary: Optional[str] = None

    def __enter__(self) -> "AtomicOutput":
        directory = os.path.dirname(os.path.abspath(self.path))
        # No signal between creating the file and recording it: the record is what
        # __exit__ removes.
        blocked = hasattr(signal, "pthread_sigmask")
        if blocked:
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            try:
                self._descriptor, self._temporary = tempfile.mkstemp(
                    prefix=f".{os.path.basename(self.path)}.", suffix=".tmp", dir=directory)
            except OSError as error:
                raise OutputError(f"{self.name}: cannot write in {directory} "
                                  f"({error.strerror})") from None
            PENDING.add(self._temporary)
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return self

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[_write(self._descriptor, view[:1 << 30]):]
        except OSError as error:
            raise OutputError(f"{self.name}: {error.strerror or error}; nothing written"
                              ) from None

    def commit(self) -> None:
        """Make the written bytes the output, durably, in one step."""
        try:
            os.fchmod(self._descriptor, 0o666 & ~_umask())
            os.fsync(self._descriptor)
        except OSError as error:
            raise OutputError(f"{self.name}: {error.strerror or error}; nothing written"
                              ) from None
        # Forget the descriptor before closing it: a signal that lands between the two must
        # not make __exit__ close it again (EBADF would hide the signal).
        descriptor, self._descriptor = self._descriptor, None
        os.close(descriptor)
        try:
            if self.replace:
                os.replace(self._temporary, self.path)
            else:
                self._link_new()
        except OSError as error:
            raise OutputError(f"{self.name}: {error.strerror or error}; nothing written"
                              ) from None
        PENDING.discard(self._temporary)
        self._temporary = None
        self._sync_directory()

    def _link_new(self) -> None:
        """Put the file at ``path`` only if nothing is there, even if something appeared
        since :func:`check_output` (``link`` fails on an existing name; ``rename`` would not)."""
        try:
            os.link(self._temporary, self.path)
        except FileExistsError:
            raise OutputError(f"{self.name}: exists (--force replaces it)") from None
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                                   errno.EMLINK):
                raise
            # A file system without hard links: check, then rename (a small window).
            if os.path.lexists(self.path):
                raise OutputError(f"{self.name}: exists (--force replaces it)") from None
            os.rename(self._temporary, self.path)
            return
        os.unlink(self._temporary)

    def _sync_directory(self) -> None:
        if not hasattr(os, "O_DIRECTORY"):
            return
        descriptor = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY
                             | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
        finally:
            os.close(descriptor)

    def __exit__(self, *exc_info) -> None:
        if self._descriptor is not None:
            descriptor, self._descriptor = self._descriptor, None
            os.close(descriptor)
        if self._temporary is not None:
            try:
                os.unlink(self._temporary)
            except FileNotFoundError:
                pass                       # already gone: nothing left to clean
            PENDING.discard(self._temporary)
            self._temporary = None
