"""Keras weight files read without TensorFlow or Keras: ``.keras``, ``.weights.h5``, ``.h5``.

Three layouts, each turned into the :class:`~tfcompat_ema.checkpoint.reader.TFCheckpoint`
the name map consumes, with TF-style names (``dense/kernel``; an optimizer's ``use_ema``
average of it ``dense/kernel/average``; the optimizer's step count ``optimizer/iteration``):

- the Keras 3 saving format (also tf_keras' ``.keras`` and ``.weights.h5``): an HDF5 file
  ``layers/<snake_case class>[_N]/vars/<i>`` and ``optimizer/vars/<i>``, positional (the
  variables' names are not in the file); a ``.keras`` file is a zip of it with
  ``config.json`` and ``metadata.json``. How positions get names: :mod:`.keras_layout`.
- the legacy HDF5 format (tf_keras' ``save_weights("x.h5")`` and ``save("x.h5")``, Keras 3's
  ``save("x.h5")``): datasets named by the variables (``dense/dense/kernel:0``), the
  optimizer's under ``optimizer_weights`` (tf_keras: ``Adam/average/dense/kernel:0``).

libhdf5 (under h5py) parses the HDF5 files, and it is out of our control: known to crash,
or to loop forever, on malformed files. So it runs in a child process under a time limit
(:mod:`.h5_sandbox`, :mod:`.h5_probe`), which only describes the file; its answer is checked,
and the values are read here, from the file's bytes. What we bound: only plain numeric
datasets are read (no compound, string, reference or variable-length types, no HDF5 type
that libhdf5 would convert), only uncompressed contiguous ones stored in the file itself,
and only after their stored size has been checked to equal their shape times their item
size and to fit in the file, so a crafted shape cannot make us allocate more than the file
holds; the number of objects walked is capped; a ``.keras`` archive's members are read with
their declared sizes checked against the archive (no zip bombs) and ``config.json`` is
capped in size. Every failure, a crash or a hang of libhdf5 included, is a
:class:`CheckpointError` naming the file.

h5py is an optional dependency: ``pip install 'tfcompat-ema[keras]'``. Torch-free.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np

from . import keras_layout
from .errors import CheckpointError
from .files import open_regular
from .h5_sandbox import DatasetInfo, H5Info, describe, h5py_installed, read_array
from .reader import Convert, TFCheckpoint

SUFFIXES = (".keras", ".h5", ".hdf5")
MAX_OBJECTS = 1_000_000        # HDF5 groups and datasets walked in one file
MAX_JSON = 64 << 20            # config.json / metadata.json
MAX_EXPANSION = 100            # a zip member may inflate to 100x its compressed size (+1 MiB)
_NUMERIC = "fiub"              # numpy kinds read: float, int, uint, bool


@dataclass
class KerasFile(TFCheckpoint):
    """A Keras weight file read into memory (a :class:`TFCheckpoint`, so the name map and
    ``inspect`` take it as they take a TF checkpoint).

    ``format``: ``"keras3"`` or ``"tf_keras"`` where the file says which Keras wrote it
    (``KerasEMA(flavour=ckpt.format)``), ``"keras"`` where it does not (a ``.weights.h5``
    read without its config). ``version``: ``"keras"`` (a ``.keras`` archive),
    ``"weights.h5"`` (the Keras 3 layout alone) or ``"legacy h5"``. ``config``: the model's
    ``config.json`` (a ``.keras`` file's, or the one given as ``config=``), None otherwise.
    ``optimizer``: the compiled optimizer's config (``use_ema``, ``ema_momentum``,
    ``ema_overwrite_frequency``...), where a config says. ``keys`` maps every name to its
    path in the HDF5 file (``layers/dense_1/vars/0``).
    """
    config: Optional[Dict[str, Any]] = None
    optimizer: Optional[Dict[str, Any]] = None
    keras_version: Optional[str] = None


def is_keras_path(path) -> bool:
    """Whether ``path`` names a Keras file (by its suffix) rather than a TF checkpoint prefix."""
    path = os.fspath(path)
    return path.lower().endswith(SUFFIXES) and not os.path.lexists(path + ".index")


def read(path, convert: Convert, config=None) -> KerasFile:
    """Read every variable of the Keras file at ``path``; ``convert`` makes the values.

    ``config``: a ``.keras`` file of the same model and optimizer, for a ``.weights.h5``
    file, whose positional entries it names (without it, the optimizer's entries keep their
    positions, ``optimizer/vars/<i>``, and the averages are not told from the other slots).
    """
    path = os.fspath(path)
    try:
        return _read(path, convert, config)
    except CheckpointError as error:
        raise CheckpointError(f"unreadable Keras file: {error}") from None


def _read(path: str, convert: Convert, config) -> KerasFile:
    if not h5py_installed():
        raise ImportError("reading Keras files needs h5py: pip install 'tfcompat-ema[keras]'")
    meta = None
    if path.lower().endswith(".keras"):
        if config is not None:
            raise CheckpointError(f"{path}: a .keras file carries its own config; config= is "
                                  "for .weights.h5 files")
        data, meta = _read_archive(path)
        info = describe(path, data, len(data), MAX_OBJECTS)
        return _from_h5(path, info, data, len(data), "keras", meta, convert)
    handle, size = open_regular(path)
    with handle:
        if config is not None:
            meta = _read_archive(os.fspath(config), weights=False)[1]
        info = describe(path, handle, size, MAX_OBJECTS)
        return _from_h5(path, info, handle, size, None, meta, convert)


def _from_h5(path, h5: H5Info, source, size, version, meta, convert) -> KerasFile:
    """The file's variables, named, from the child's description of it and its bytes."""
    datasets, groups = h5.datasets, h5.groups
    legacy = _has_attr(path, h5.root, "layer_names") or "model_weights" in groups
    if legacy:
        keras_version = (_text_attr(path, "model_weights", groups["model_weights"],
                                    "keras_version") if "model_weights" in groups else None) \
            or _text_attr(path, "/", h5.root, "keras_version")
        names = keras_layout.legacy_names(datasets)
        version, config, optimizer = "legacy h5", None, None
    else:
        config, keras_version = (meta or {}).get("config"), (meta or {}).get("keras_version")
        attrs = {g: _text_attr(path, g, a, "name") for g, a in groups.items()
                 if g.endswith("/vars") or g == "vars"}
        shapes = {p: (_shape(path, d), _dtype_name(path, d, check=False))
                  for p, d in datasets.items()}
        names, optimizer = keras_layout.new_format_names(path, shapes, attrs, config,
                                                         keras_version)
        version = version or "weights.h5"
    fmt = "keras" if not keras_version else "keras3" if keras_version.startswith("3.") \
        else "tf_keras"
    ckpt = KerasFile(path, fmt, {}, {}, version=version, config=config, optimizer=optimizer,
                     keras_version=keras_version)
    for file_path in sorted(datasets, key=lambda p: names[p]):
        name = names[file_path]
        if name in ckpt.keys:
            raise CheckpointError(f"{path}: {ckpt.keys[name]!r} and {file_path!r} would both "
                                  f"be named {name!r}")
        ckpt.keys[name] = file_path
        array, dtype_name = _read_dataset(path, datasets[file_path], source, size)
        ckpt.add(name, dtype_name, array, convert)
    return ckpt


def _has_attr(path, attrs, key) -> bool:
    if key in attrs:
        _text_attr(path, "/", attrs, key)         # (unreadable: an error, not "present")
        return True
    return False


def _text_attr(path, where, attrs, key) -> Optional[str]:
    """The attribute's text; None where it is absent or not text."""
    value = attrs.get(key)
    if isinstance(value, dict):
        raise CheckpointError(f"{path}: {where!r}'s attribute {key!r} is unreadable "
                              f"({value['error']})")
    return value


def _shape(path, dataset: DatasetInfo):
    if dataset.shape is None:
        raise CheckpointError(f"{path}: {dataset.path!r} has no shape (an empty dataspace)")
    return dataset.shape


def _dtype_name(path, dataset: DatasetInfo, check=True) -> str:
    dtype = dataset.dtype
    if _text_attr(path, dataset.path, dataset.attrs, "dtype") == "bfloat16" \
            and dtype is not None and dtype.itemsize == 2 and dtype.kind in "uV":
        return "bfloat16"                 # Keras 3 saves bfloat16 as 2-byte raw values
    if dtype is None or dtype.kind not in _NUMERIC:
        if check:
            raise CheckpointError(f"{path}: {dataset.path!r} has dtype {dataset.dtype_text}, "
                                  "not a number type")
        return dataset.dtype_text
    return dtype.newbyteorder("=").name


def _read_dataset(path, dataset: DatasetInfo, source, file_size):
    """The dataset's values, read only once its stored size is its shape's (no filters)."""
    dtype_name = _dtype_name(path, dataset)
    dtype, where = dataset.dtype, f"{path}: {dataset.path!r}"
    if dataset.layout == "chunked" or dataset.filters:
        raise CheckpointError(f"{where} is chunked or compressed; Keras writes neither")
    if dataset.layout != "contiguous" or dataset.external:
        raise CheckpointError(f"{where} is stored {dataset.layout}" + (
            " in external files" if dataset.external else "") + "; Keras stores contiguous "
            "data in the file")
    if not dataset.exact:
        raise CheckpointError(f"{where} is stored in an HDF5 type that {dtype} only "
                              "approximates (libhdf5 would convert its values)")
    shape = _shape(path, dataset)
    count = 1
    for n in shape:
        count *= n
    nbytes = count * dtype.itemsize
    if nbytes > file_size:
        raise CheckpointError(f"{where}: shape {list(shape)} needs {nbytes} bytes, more than "
                              f"the file's {file_size}")
    if count and dataset.storage != nbytes:
        raise CheckpointError(f"{where}: {dataset.storage} bytes stored for shape "
                              f"{list(shape)} ({nbytes} bytes)")
    if count:
        array = read_array(path, source, file_size, dataset, dtype, shape)
    else:
        try:
            array = np.empty(shape, dtype)
        except ValueError:                        # (0, 2**64 - 1): empty, yet too big
            raise CheckpointError(f"{where}: shape {list(shape)} is too big for numpy") \
                from None
    if dtype_name == "bfloat16":     # 2-byte raw values (opaque ones: as Keras wrote them,
        bits = array.view("<u2") if dtype.kind == "V" else array      # little-endian)
        return bits.astype(np.uint16), dtype_name
    if dtype.kind == "b" and count and array.view(np.uint8).max() > 1:
        raise CheckpointError(f"{where}: a bool dataset holding values other than 0 and 1")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array, dtype_name


def _read_archive(path: str, weights: bool = True):
    """A ``.keras`` archive's ``model.weights.h5`` bytes (with ``weights``) and its
    metadata: ``{"config": config.json, "keras_version": ...}``."""
    handle, size = open_regular(path)
    with handle:
        try:
            archive = zipfile.ZipFile(handle)
        except (zipfile.BadZipFile, OSError, ValueError) as error:
            raise CheckpointError(f"{path}: not a .keras archive ({error})") from None
        with archive:
            members = set(archive.namelist())
            if weights and "model.weights.h5" not in members:
                other = sorted(m for m in members if m.startswith("model.weights"))
                raise CheckpointError(f"{path}: no model.weights.h5 in the archive" + (
                    f" (it has {', '.join(other)}: sharded or npz weights are not read)"
                    if other else ""))
            for member in ("config.json", "metadata.json"):
                if member not in members:
                    raise CheckpointError(f"{path}: no {member} in the archive")
            config = _json(path, "config.json", _member(path, archive, "config.json", MAX_JSON))
            metadata = _json(path, "metadata.json",
                             _member(path, archive, "metadata.json", MAX_JSON))
            data = _member(path, archive, "model.weights.h5", size * MAX_EXPANSION + (1 << 20)) \
                if weights else None
    version = metadata.get("keras_version") if isinstance(metadata, dict) else None
    if not isinstance(config, dict) or not isinstance(version, str):
        raise CheckpointError(f"{path}: config.json or metadata.json is not what Keras writes")
    return data, {"config": config, "keras_version": version}


def _member(path, archive, name, limit) -> bytes:
    info = archive.getinfo(name)
    if info.file_size > limit or info.file_size > MAX_EXPANSION * info.compress_size + (1 << 20):
        raise CheckpointError(f"{path}: {name} claims {info.file_size} bytes, too many for "
                              "the archive")
    try:
        with archive.open(info) as member:
            data = member.read(info.file_size + 1)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise CheckpointError(f"{path}: {name} is damaged ({error})") from None
    if len(data) != info.file_size:
        raise CheckpointError(f"{path}: {name} is not the size the archive says")
    return data


def _json(path, name, data: bytes):
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise CheckpointError(f"{path}: {name} is not JSON ({error})") from None

