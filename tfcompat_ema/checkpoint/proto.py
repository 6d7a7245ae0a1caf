"""The protobuf wire format, by hand, for the few messages a checkpoint holds.

Dependency choice: no protobuf runtime. A checkpoint has a handful of small messages
(``BundleHeaderProto``, ``BundleEntryProto``, ``TensorShapeProto``, ``TensorSliceProto``,
``TrackableObjectGraph``, V1's ``SavedTensorSlices`` and ``TensorProto``); decoding them by
field number takes less code than pinning a protobuf version against TF's, and lets every
length be checked before anything is sliced. :func:`parse` reads one level only: nested
messages are parsed by explicit calls whose depth the schema fixes, never the file.

>>> fields = parse(b"\\x08\\x96\\x01\\x12\\x02hi", "example")
>>> fields[1], bytes(fields[2][0])
([150], b'hi')
>>> encode_varint(150)
b'\\x96\\x01'
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from .errors import CheckpointError

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


def read_varint(buf, pos: int, end: int, what: str):
    """Decode a varint of at most 10 bytes at ``buf[pos:end]``; return (value, new pos)."""
    result = shift = 0
    while True:
        if pos >= end:
            raise CheckpointError(f"{what}: a number runs past the end of its data")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if result >> 64:
                raise CheckpointError(f"{what}: a number wider than 64 bits")
            return result, pos
        shift += 7
        if shift >= 70:
            raise CheckpointError(f"{what}: a number longer than 10 bytes")


def parse(buf, what: str) -> Dict[int, List]:
    """The fields of one serialized message: field number -> list of values.

    Varints give ints, fixed32/fixed64 give unsigned ints, length-delimited fields give
    memoryviews (parse them with another call where they are messages). Groups and
    malformed input raise :class:`CheckpointError` mentioning ``what``.
    """
    view = memoryview(buf).cast("B") if not isinstance(buf, bytes) else buf
    fields: Dict[int, List] = {}
    pos, end = 0, len(view)
    while pos < end:
        key, pos = read_varint(view, pos, end, what)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise CheckpointError(f"{what}: a field numbered 0 (not a protobuf message)")
        if wire == VARINT:
            value, pos = read_varint(view, pos, end, what)
        elif wire == FIXED64:
            if pos + 8 > end:
                raise CheckpointError(f"{what}: a 64-bit field runs past the end")
            value = int.from_bytes(view[pos:pos + 8], "little")
            pos += 8
        elif wire == FIXED32:
            if pos + 4 > end:
                raise CheckpointError(f"{what}: a 32-bit field runs past the end")
            value = int.from_bytes(view[pos:pos + 4], "little")
            pos += 4
        elif wire == LENGTH:
            length, pos = read_varint(view, pos, end, what)
            if length > end - pos:
                raise CheckpointError(f"{what}: a field of {length} bytes where "
                                      f"{end - pos} are left")
            value = memoryview(view)[pos:pos + length]
            pos += length
        else:
            raise CheckpointError(f"{what}: wire type {wire} (groups or garbage) in field "
                                  f"{number}")
        fields.setdefault(number, []).append(value)
    return fields


def signed64(value: int) -> int:
    """An int64 field's value (varints carry negative numbers as 64-bit two's complement)."""
    return value - (1 << 64) if value >> 63 else value


def last(fields, number: int, default=0):
    """A singular field's value: the last one given, as protobuf merges."""
    values = fields.get(number)
    return values[-1] if values else default


def text(value, what: str) -> str:
    """A string field's value; CheckpointError if it is not length-delimited UTF-8."""
    if not isinstance(value, (bytes, memoryview)):
        raise CheckpointError(f"{what}: a number where a name belongs")
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{what}: a name that is not UTF-8") from None


def repeated(fields, number: int, kind: str, what: str) -> np.ndarray:
    """A repeated scalar field, packed or not, as a numpy array.

    ``kind``: ``"varint"`` (uint64 values), ``"float"``, ``"double"``, ``"fixed32"``,
    ``"fixed64"``.
    """
    parts = []
    fixed = {"float": "<f4", "double": "<f8", "fixed32": "<u4", "fixed64": "<u8"}
    for value in fields.get(number, []):
        if isinstance(value, memoryview):                  # packed
            if kind == "varint":
                parts.append(np.array(_packed_varints(value, what), dtype=np.uint64))
            else:
                dtype = np.dtype(fixed[kind])
                if len(value) % dtype.itemsize:
                    raise CheckpointError(f"{what}: a packed field of {len(value)} bytes, "
                                          f"not a multiple of {dtype.itemsize}")
                parts.append(np.frombuffer(value, dtype=dtype))
        elif kind == "varint":
            parts.append(np.array([value], dtype=np.uint64))
        else:
            dtype = np.dtype(fixed[kind])
            raw = value.to_bytes(dtype.itemsize, "little")
            parts.append(np.frombuffer(raw, dtype=dtype))
    if not parts:
        return np.zeros(0, dtype=np.uint64 if kind == "varint" else fixed[kind])
    return np.concatenate(parts)


def _packed_varints(view, what: str) -> list:
    out, pos, end = [], 0, len(view)
    while pos < end:
        value, pos = read_varint(view, pos, end, what)
        out.append(value)
    return out


# ---- encoding ------------------------------------------------------------------------------

def encode_varint(value: int) -> bytes:
    """A varint; negative values as 64-bit two's complement (10 bytes), as protobuf does."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field_varint(number: int, value: int) -> bytes:
    return encode_varint(number << 3 | VARINT) + encode_varint(value)


def field_bytes(number: int, value: bytes) -> bytes:
    return encode_varint(number << 3 | LENGTH) + encode_varint(len(value)) + bytes(value)


def field_fixed32(number: int, value: int) -> bytes:
    return encode_varint(number << 3 | FIXED32) + int(value).to_bytes(4, "little")
