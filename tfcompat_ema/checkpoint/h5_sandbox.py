"""HDF5 files described by libhdf5 in a child process; their datasets' bytes read here.

libhdf5 (under h5py) is known to crash on malformed files, and to spin forever on some (a
byte-flip fuzz of a small ``.weights.h5`` found one that hangs inside an attribute read).
A crash or a hang in the reader's process would take the caller down with it, so libhdf5
never runs here: :func:`describe` runs :mod:`.h5_probe` as a script in a child process
(``python -I``; it imports h5py and numpy, nothing of this package, torch or TF), under a
time limit, and checks its JSON answer as untrusted input; :func:`read_array` then reads a
dataset's bytes from the file at the offset the child gave, once they are checked to lie in
the file. A timeout, a signal, an exit without an answer or an answer of the wrong shape is a
:class:`CheckpointError` naming the file; the child is killed and reaped, never left behind.

Datasets are read by their bytes, so only those whose bytes are numpy's can be read: plain
contiguous storage in the file itself, in an HDF5 type equal to the one h5py makes of the
dtype (the child says which; the caller refuses the others).

The cost: one child process per file (Python's start and h5py's import, about 0.2 s here).

>>> round(time_limit(0), 1), round(time_limit(1 << 30), 1)     # seconds, by file size
(30.0, 132.4)
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from .errors import CheckpointError

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "h5_probe.py")
#: The child's time limit: PROBE_SECONDS, plus PROBE_SECONDS_PER_MIB for each MiB of the
#: file. The child reads metadata only (no values), which takes well under a second for any
#: Keras file seen; the limit is there to end a libhdf5 that loops, not to rush a slow disk.
PROBE_SECONDS = 30.0
PROBE_SECONDS_PER_MIB = 0.1
#: The child's answer is refused above this many bytes plus 8 per byte of the file (an
#: answer is mostly paths, and a path's text repeats its parents' names: deep nesting makes
#: them quadratic in the file's size); the child stops walking at half of it in paths.
MAX_ANSWER = 64 << 20
ANSWER_PER_FILE_BYTE = 8
MAX_RANK = 32                # HDF5's H5S_MAX_RANK (and numpy 1.x's limit)
_ERROR_CHARS = 500           # of the child's error text or stderr quoted in an error
_DTYPE = re.compile(r"[<>|=][A-Za-z][0-9]{0,3}")

Source = Union[bytes, Any]   # the file's bytes, or a binary file object open on it
Attrs = Dict[str, Union[None, str, Dict[str, str]]]


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset as the child describes it (checked for types, not for sense)."""
    path: str
    shape: Optional[Tuple[int, ...]]
    dtype: Optional[np.dtype]           # None: a compound or array type
    dtype_text: str
    exact: bool                         # its stored bytes are ``dtype``'s
    layout: str                         # "contiguous", "compact", "chunked", "virtual"...
    external: int                       # external files holding its data
    filters: int
    storage: int                        # bytes stored
    offset: Optional[int]               # of its contiguous data in the file
    attrs: Attrs


@dataclass(frozen=True)
class H5Info:
    """A file's root attributes, groups (path -> attributes) and datasets (path -> info)."""
    root: Attrs
    groups: Dict[str, Attrs]
    datasets: Dict[str, DatasetInfo]


def h5py_installed() -> bool:
    """Whether h5py can be imported (the child imports it; this process never does)."""
    if "h5py" in sys.modules:
        return sys.modules["h5py"] is not None
    import importlib.util
    try:
        return importlib.util.find_spec("h5py") is not None
    except (ImportError, ValueError):
        return False


def time_limit(size: int) -> float:
    """The child's time limit, in seconds, for a file of ``size`` bytes."""
    return PROBE_SECONDS + PROBE_SECONDS_PER_MIB * size / (1 << 20)


def describe(path: str, source: Source, size: int, max_objects: int) -> H5Info:
    """The HDF5 file ``source`` (``size`` bytes; ``path`` names it in errors), described by
    the child: at most ``max_objects`` groups and datasets."""
    answer = _run_probe(path, source, size, max_objects)
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise _bad_answer(path, "not an object with 'ok'")
    if not answer["ok"]:
        error, kind = answer.get("error"), answer.get("kind")
        if not isinstance(error, str) or not isinstance(kind, str):
            raise _bad_answer(path, "an error without its text")
        error = error[:_ERROR_CHARS]
        if kind == "import":
            raise ImportError("reading Keras files needs h5py: pip install "
                              f"'tfcompat-ema[keras]' (the HDF5 reader's process: {error})")
        if kind == "open":
            raise CheckpointError(f"{path}: not an HDF5 file ({error})")
        raise CheckpointError(f"{path}: {error}")
    groups = _field(path, answer, "groups", dict)
    datasets = {}
    for entry in _field(path, answer, "datasets", list):
        info = _dataset(path, entry)
        if info.path in datasets or info.path in groups:
            raise _bad_answer(path, f"{info.path!r} twice")
        datasets[info.path] = info
    return H5Info(_attrs(path, answer.get("root")),
                  {_text(path, g): _attrs(path, a) for g, a in groups.items()}, datasets)


def read_array(path: str, source: Source, size: int, info: DatasetInfo,
               dtype: np.dtype, shape: Tuple[int, ...]) -> np.ndarray:
    """``info``'s values as a writable array of ``dtype`` and ``shape`` (whose size the
    caller has checked against ``info.storage``), read from ``source`` at its offset."""
    nbytes = dtype.itemsize * int(np.prod(shape, dtype=object))
    offset = info.offset
    if offset is None:
        raise CheckpointError(f"{path}: {info.path!r} has no data stored in the file")
    if offset + nbytes > size:
        raise CheckpointError(f"{path}: {info.path!r} claims bytes {offset} to "
                              f"{offset + nbytes}, past the end of the file ({size} bytes)")
    if isinstance(source, (bytes, bytearray, memoryview)):
        buffer = np.frombuffer(source, np.uint8, nbytes, offset).copy()
    else:                 # (np.empty: a bytearray's zero-filling would cost a third more)
        buffer, done = np.empty(nbytes, np.uint8), 0
        source.seek(offset)
        view = memoryview(buffer)
        while done < nbytes:
            got = source.readinto(view[done:])
            if not got:
                raise CheckpointError(f"{path}: changed size while being read")
            done += got
    return buffer.view(dtype).reshape(shape)


def _run_probe(path, source, size, max_objects):
    """The child's answer, parsed JSON (not yet checked)."""
    if not sys.executable:
        raise RuntimeError("no Python executable (sys.executable) to run the HDF5 reader in")
    in_memory = isinstance(source, (bytes, bytearray, memoryview))
    command = [sys.executable, "-I", PROBE, "bytes" if in_memory else "file",
               str(max_objects), str(_max_answer(size) // 2), json.dumps(sys.path)]
    limit = time_limit(size)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, stdin=subprocess.PIPE if in_memory else source,
                                   stdout=out, stderr=err)
        try:
            process.communicate(bytes(source) if in_memory else None, timeout=limit)
        except subprocess.TimeoutExpired:
            raise CheckpointError(
                f"{path}: libhdf5 was still reading it after {limit:.0f} s and was stopped: a "
                "hostile or corrupt HDF5 file (or raise h5_sandbox.PROBE_SECONDS)") from None
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        code = process.returncode
        if code < 0:
            raise CheckpointError(f"{path}: libhdf5 crashed on it ({_signal_name(-code)}): a "
                                  "hostile or corrupt HDF5 file")
        answer_size = os.fstat(out.fileno()).st_size
        if code != 0 or answer_size == 0:
            err.seek(0, os.SEEK_END)
            err.seek(max(0, err.tell() - _ERROR_CHARS))
            tail = err.read().decode("utf-8", "replace").strip()
            raise CheckpointError(f"{path}: the HDF5 reader's process failed (exit {code}): "
                                  f"{tail or 'no answer'}")
        if answer_size > _max_answer(size):
            raise _bad_answer(path, f"{answer_size} bytes")
        out.seek(0)
        try:
            return json.loads(out.read().decode("ascii"))
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            raise _bad_answer(path, f"not JSON ({error})") from None


def _max_answer(size):
    return MAX_ANSWER + ANSWER_PER_FILE_BYTE * size


def _signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _bad_answer(path, what):
    return CheckpointError(f"{path}: the HDF5 reader's process answered wrongly ({what}): "
                           "libhdf5 misread the file, a hostile or corrupt HDF5 file")


def _field(path, mapping, key, kind):
    value = mapping.get(key) if isinstance(mapping, dict) else None
    if type(value) is not kind:
        raise _bad_answer(path, f"{key!r} is not a {kind.__name__}")
    return value


def _text(path, value):
    if type(value) is not str:
        raise _bad_answer(path, f"{value!r:.80} is not text")
    return value


def _count(path, value, key, optional=False):
    if (value is None and optional) or (type(value) is int and value >= 0):
        return value
    raise _bad_answer(path, f"{key} {value!r:.80}")


def _attrs(path, found) -> Attrs:
    if type(found) is not dict:
        raise _bad_answer(path, "attributes are not an object")
    for key, value in found.items():
        if not (value is None or type(value) is str or (
                type(value) is dict and list(value) == ["error"]
                and type(value["error"]) is str)):
            raise _bad_answer(path, f"attribute {key!r}")
    return found


def _dataset(path, entry) -> DatasetInfo:
    if type(entry) is not dict:
        raise _bad_answer(path, "a dataset is not an object")
    name = _text(path, entry.get("path"))
    shape = entry.get("shape")
    if shape is not None:
        shape = tuple(_count(path, n, "shape") for n in _field(path, entry, "shape", list))
        if len(shape) > MAX_RANK:
            raise _bad_answer(path, f"{len(shape)} dimensions")
    dtype = entry.get("dtype")
    if dtype is not None:
        if type(dtype) is not str or not _DTYPE.fullmatch(dtype):
            raise _bad_answer(path, f"dtype {dtype!r:.80}")
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            raise _bad_answer(path, f"dtype {entry['dtype']!r}") from None
    exact = entry.get("exact")
    if type(exact) is not bool:
        raise _bad_answer(path, f"'exact' of {name!r}")
    return DatasetInfo(name, shape, dtype, _text(path, entry.get("dtype_text")), exact,
                       _text(path, entry.get("layout")),
                       _count(path, entry.get("external"), "external"),
                       _count(path, entry.get("filters"), "filters"),
                       _count(path, entry.get("storage"), "storage"),
                       _count(path, entry.get("offset"), "offset", optional=True),
                       _attrs(path, entry.get("attrs")))
