"""Legacy V1 checkpoints (``Saver(write_version=SaverDef.V1)``): ``SavedTensorSlices`` tables.

One table per file (``<prefix>`` or ``<prefix>-NNNNN-of-NNNNN``); key ``""`` holds the meta
(each tensor's name 1, shape 2, dtype 3, slices 4), every other key one slice: a ``SavedSlice``
(name 1, slice 2, data 3) whose ``TensorProto`` keeps the values in its typed repeated field
(``float_val``, ``half_val``... see ``tensorflow/core/util/tensor_slice_writer.h``) or in
``tensor_content``. Slices are reassembled into whole tensors, each checked to tile it.

>>> from tfcompat_ema.checkpoint.v1 import values_from_tensor_proto
>>> from tfcompat_ema.checkpoint.proto import field_varint, field_bytes
>>> proto_bytes = field_varint(1, 1) + field_bytes(5, np.float32([1, 2]).tobytes())
>>> values_from_tensor_proto(proto_bytes, 1, 2, "example")
array([1., 2.], dtype=float32)
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from . import proto, table
from .bundle import element_count, parse_shape, parse_slice, slice_key
from .dtypes import DTYPES, STRING, from_storage
from .errors import CheckpointError
from .files import read_whole

_INT_FIELDS = {3, 4, 5, 6, 11, 12, 13, 15, 16, 17, 29, 30, 31, 32}
_FLOAT8 = {24, 25, 26, 27, 28, 33}


def values_from_tensor_proto(buf, dtype_number: int, count: int, what: str) -> np.ndarray:
    """The ``count`` values of a serialized ``TensorProto`` of dtype ``dtype_number``, flat,
    in the dtype's storage type (strings: an object array of bytes)."""
    fields = proto.parse(buf, what)
    dtype = DTYPES[dtype_number]
    content = proto.last(fields, 4, None)
    if isinstance(content, memoryview) and len(content) and dtype_number != STRING:
        values = np.frombuffer(bytes(content), dtype=dtype.storage)
    elif dtype_number == STRING:
        raw = fields.get(8, [])
        if not all(isinstance(v, memoryview) for v in raw):
            raise CheckpointError(f"{what}: a malformed string value")
        values = np.empty(len(raw), dtype=object)
        for i, value in enumerate(raw):
            values[i] = bytes(value)
    elif dtype_number == 1:
        values = proto.repeated(fields, 5, "float", what)
    elif dtype_number == 2:
        values = proto.repeated(fields, 6, "double", what)
    elif dtype_number == 8:
        values = proto.repeated(fields, 9, "float", what).view(np.complex64)
    elif dtype_number == 18:
        values = proto.repeated(fields, 12, "double", what).view(np.complex128)
    elif dtype_number == 9:
        values = proto.repeated(fields, 10, "varint", what).view(np.int64)
    elif dtype_number == 10:
        values = proto.repeated(fields, 11, "varint", what) != 0
    elif dtype_number in (14, 19):                          # the bits, in an int field
        values = proto.repeated(fields, 13, "varint", what).astype(np.uint16)
        values = values.view(dtype.storage)
    elif dtype_number == 22:
        values = proto.repeated(fields, 16, "varint", what).astype(np.uint32)
    elif dtype_number == 23:
        values = proto.repeated(fields, 17, "varint", what)
    elif dtype_number in _FLOAT8:
        raw = proto.last(fields, 18, b"")
        if not isinstance(raw, (bytes, memoryview)):
            raise CheckpointError(f"{what}: a malformed float8 value")
        values = np.frombuffer(bytes(raw), np.uint8)
    elif dtype_number in _INT_FIELDS:
        values = proto.repeated(fields, 7, "varint", what).view(np.int64).astype(dtype.storage)
    else:
        raise CheckpointError(f"{what}: dtype {dtype.name} in a V1 checkpoint")
    if len(values) != count:
        raise CheckpointError(f"{what}: {len(values)} values for {count} elements")
    if dtype_number != STRING:
        values = values.astype(dtype.storage, copy=False)
    return values


class V1Reader:
    """The tensors of a V1 checkpoint made of ``files``; :meth:`read` reassembles one."""

    def __init__(self, prefix: str, files: List[str]):
        self.prefix = prefix
        self.meta: Dict[str, Tuple[int, tuple, list]] = {}
        self.slices: Dict[bytes, Tuple[str, memoryview]] = {}
        for path in files:
            items = table.read_table(read_whole(path), path)
            for key, value in items:
                if key == b"":
                    self._read_meta(value, path)
                elif key in self.slices:
                    raise CheckpointError(f"{path}: slice {key[:60]!r} stored twice")
                else:
                    self.slices[key] = (path, value)
        if not self.meta:
            raise CheckpointError(f"{prefix}: a V1 checkpoint without its meta entry")

    def _read_meta(self, value, path: str):
        what = f"{path} (meta)"
        meta = proto.parse(value, what).get(1)
        if not meta or not isinstance(meta[-1], memoryview):
            raise CheckpointError(f"{what}: a SavedTensorSlices without meta")
        for tensor in proto.parse(meta[-1], what).get(1, []):
            if not isinstance(tensor, memoryview):
                raise CheckpointError(f"{what}: a malformed tensor entry")
            fields = proto.parse(tensor, what)
            name = proto.text(proto.last(fields, 1, b""), what)
            shape_field = proto.last(fields, 2, b"")
            if not isinstance(shape_field, (bytes, memoryview)):
                raise CheckpointError(f"{what}: a malformed shape of {name!r}")
            shape = parse_shape(shape_field, f"{what}, {name!r}")
            dtype = proto.last(fields, 3)
            if isinstance(dtype, memoryview) or dtype not in DTYPES:
                raise CheckpointError(f"{what}: {name!r} has dtype {dtype!r}")
            extents = []
            for piece in fields.get(4, []):
                if not isinstance(piece, memoryview):
                    raise CheckpointError(f"{what}: a malformed slice of {name!r}")
                extents.append(parse_slice(piece, len(shape), f"{what}, {name!r}"))
            previous = self.meta.get(name)
            if previous is not None and previous[:2] != (dtype, shape):
                raise CheckpointError(f"{what}: {name!r} with two shapes or dtypes")
            self.meta[name] = (dtype, shape, (previous[2] if previous else []) + extents)

    def names(self) -> List[str]:
        return list(self.meta)

    def dtype(self, name: str) -> int:
        return self.meta[name][0]

    def read(self, name: str) -> np.ndarray:
        dtype_number, shape, extents = self.meta[name]
        what = f"{self.prefix} (tensor {name[:200]!r})"
        dtype = DTYPES[dtype_number]
        if dtype.storage is None and dtype_number != STRING:
            raise CheckpointError(f"{what}: dtype {dtype.name} cannot be read")
        total = element_count(shape, what)
        pieces, count = [], 0
        for extent in extents:
            box = []
            for (start, length), dim in zip(extent, shape):
                stop = dim if length == -1 else start + length
                if start > dim or stop > dim:
                    raise CheckpointError(f"{what}: slice {extent} outside {list(shape)}")
                box.append(slice(start, stop))
            pieces.append((extent, tuple(box)))
            count += element_count([s.stop - s.start for s in box], what)
        if count != total:
            raise CheckpointError(f"{what}: slices of {count} elements for shape {list(shape)}"
                                  " (overlapping or missing slices)")
        out = np.empty(shape, dtype=object if dtype_number == STRING else dtype.storage)
        covered = np.zeros(shape, dtype=bool)
        for extent, box in pieces:
            found = self.slices.get(slice_key(name, extent))
            if found is None:
                raise CheckpointError(f"{what}: slice {extent} is missing")
            path, value = found
            where = f"{path} (slice of {name[:200]!r})"
            fields = proto.parse(value, where).get(2)
            if not fields or not isinstance(fields[-1], memoryview):
                raise CheckpointError(f"{where}: not a SavedSlice")
            saved = proto.parse(fields[-1], where)
            data = proto.last(saved, 3, None)
            if not isinstance(data, memoryview):
                raise CheckpointError(f"{where}: no data")
            size = [s.stop - s.start for s in box]
            values = values_from_tensor_proto(data, dtype_number,
                                              element_count(size, where), where)
            if covered[box].any():
                raise CheckpointError(f"{what}: overlapping slices")
            covered[box] = True
            out[box] = values.reshape(size)
        return from_storage(out, dtype) if dtype.bits else out
