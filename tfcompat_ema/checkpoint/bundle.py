"""TF's V2 tensor bundle: ``<prefix>.index`` (a table of entries) and its data shards.

Facts from ``tensorflow/core/util/tensor_bundle/`` and checked against TF 2.21's own files:
key ``""`` holds a ``BundleHeaderProto`` (num_shards 1, endianness 2, version 3); every other
key a ``BundleEntryProto`` (dtype 1, shape 2, shard_id 3, offset 4, size 5, masked crc32c 6,
slices 7). Data is row-major bytes in ``<prefix>.data-NNNNN-of-NNNNN`` in the writer's
byte order; a string tensor is its elements' varint lengths, the masked CRC of those
lengths (4 bytes), then the bytes. A partitioned variable's entry lists its slices; each
slice is stored under an OrderedCode key (:func:`slice_key`).

Data files are memory-mapped copy-on-write: a tensor whose offset is aligned is a view of
the mapping (no copy), else one copy. Every shape, count, offset and size is checked against
the files before anything is allocated; every tensor's CRC is checked when it is read.

>>> import tempfile, numpy as np
>>> prefix = tempfile.mkdtemp() + "/ckpt"
>>> write_bundle(prefix, [("w", 1, (2,), np.array([1.5, 2.0], np.float32))])
>>> BundleReader(prefix).read("w")
array([1.5, 2. ], dtype=float32)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np

from . import proto, table
from .crc import crc32c, mask, unmask
from .dtypes import DTYPES, STRING, from_storage
from .errors import CheckpointError
from .files import map_file, read_whole, write_atomically

MAX_RANK = 254                       # TensorShape's limit
MAX_ELEMENTS = 1 << 62


@dataclass
class Entry:
    """One ``BundleEntryProto``; ``slices`` lists (start, length) per dim, length -1 = all."""
    dtype: int
    shape: Tuple[int, ...]
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc: int = 0
    slices: List[Tuple[Tuple[int, int], ...]] = field(default_factory=list)


def element_count(shape, what: str) -> int:
    count = 1
    for dim in shape:
        count *= dim
        if count > MAX_ELEMENTS:
            raise CheckpointError(f"{what}: shape {list(shape)} has too many elements")
    return count


def parse_shape(buf, what: str) -> Tuple[int, ...]:
    fields = proto.parse(buf, what)
    if proto.last(fields, 3):
        raise CheckpointError(f"{what}: a shape of unknown rank")
    dims = fields.get(2, [])
    if len(dims) > MAX_RANK:
        raise CheckpointError(f"{what}: {len(dims)} dimensions (TF allows {MAX_RANK})")
    shape = []
    for dim in dims:
        if not isinstance(dim, memoryview):
            raise CheckpointError(f"{what}: a malformed shape")
        size = proto.signed64(proto.last(proto.parse(dim, what), 1))
        if size < 0:
            raise CheckpointError(f"{what}: a negative dimension ({size})")
        shape.append(size)
    element_count(shape, what)
    return tuple(shape)


def parse_slice(buf, rank: int, what: str) -> Tuple[Tuple[int, int], ...]:
    extents = proto.parse(buf, what).get(1, [])
    if len(extents) != rank:
        raise CheckpointError(f"{what}: a slice of {len(extents)} dims for rank {rank}")
    out = []
    for extent in extents:
        if not isinstance(extent, memoryview):
            raise CheckpointError(f"{what}: a malformed slice")
        fields = proto.parse(extent, what)
        start = proto.signed64(proto.last(fields, 1))
        length = proto.signed64(proto.last(fields, 2)) if 2 in fields else -1
        if start < 0 or length < -1:
            raise CheckpointError(f"{what}: a slice extent ({start}, {length})")
        out.append((start, length))
    return tuple(out)


def parse_entry(buf, what: str) -> Entry:
    fields = proto.parse(buf, what)
    for number in (1, 3, 4, 5):
        if any(isinstance(v, memoryview) for v in fields.get(number, [])):
            raise CheckpointError(f"{what}: field {number} is not a number")
    shape_field = proto.last(fields, 2, None)
    shape = parse_shape(shape_field, what) if isinstance(shape_field, memoryview) else ()
    entry = Entry(proto.last(fields, 1), shape, proto.signed64(proto.last(fields, 3)),
                  proto.signed64(proto.last(fields, 4)), proto.signed64(proto.last(fields, 5)),
                  proto.last(fields, 6))
    if min(entry.shard_id, entry.offset, entry.size) < 0:
        raise CheckpointError(f"{what}: a negative shard, offset or size")
    for piece in fields.get(7, []):
        if not isinstance(piece, memoryview):
            raise CheckpointError(f"{what}: a malformed slice")
        entry.slices.append(parse_slice(piece, len(shape), what))
    return entry


def encode_entry(entry: Entry) -> bytes:
    dims = b"".join(proto.field_bytes(2, proto.field_varint(1, d) if d else b"")
                    for d in entry.shape)
    out = proto.field_varint(1, entry.dtype) + proto.field_bytes(2, dims)
    for number, value in ((3, entry.shard_id), (4, entry.offset), (5, entry.size)):
        if value:
            out += proto.field_varint(number, value)
    if entry.crc:
        out += proto.field_fixed32(6, entry.crc)
    for extents in entry.slices:
        out += proto.field_bytes(7, b"".join(
            proto.field_bytes(1, (proto.field_varint(1, start) if start else b"")
                              + (proto.field_varint(2, length) if length != -1 else b""))
            for start, length in extents))
    return out


# ---- OrderedCode keys of slices (tensorflow/core/lib/strings/ordered_code) --------------

def _ordered_string(data: bytes) -> bytes:
    escaped = (b"\x00\xff" if c == 0 else b"\xff\x00" if c == 255 else bytes([c]) for c in data)
    return b"".join(escaped) + b"\x00\x01"


def _ordered_unsigned(value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return bytes([len(raw)]) + raw


def _ordered_signed(value: int) -> bytes:
    magnitude = ~value if value < 0 else value
    bits = magnitude.bit_length() + 1                   # with the sign bit
    length = max(1, min(10, (bits + 6) // 7))
    header = ((1 << length) - 1) << (8 * length - length)   # `length` ones, then a zero
    if length == 10:                                    # the header fills 10 bits
        out = b"\xff\xc0" + magnitude.to_bytes(8, "big")
    else:
        out = (magnitude | header).to_bytes(length, "big")
    if value < 0:
        out = bytes(b ^ 0xFF for b in out)
    return out


def slice_key(name: str, extents) -> bytes:
    """The bundle key of one slice of ``name`` (``EncodeTensorNameSlice``)."""
    out = _ordered_unsigned(0) + _ordered_string(name.encode()) + _ordered_unsigned(len(extents))
    for start, length in extents:
        out += _ordered_signed(start) + _ordered_signed(length)
    return out


# ---- reading ------------------------------------------------------------------------------

def data_path(prefix: str, shard: int, shards: int) -> str:
    return f"{prefix}.data-{shard:05d}-of-{shards:05d}"


class BundleReader:
    """The entries of a V2 bundle at ``prefix``; :meth:`read` gives one tensor's value.

    Values are numpy arrays in their storage dtype (see :mod:`.dtypes`), strings an object
    array of bytes. Raises :class:`CheckpointError` naming the file for anything wrong.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.index_path = prefix + ".index"
        items = table.read_table(read_whole(self.index_path), self.index_path)
        if not items or items[0][0] != b"":
            raise CheckpointError(f"{self.index_path}: no bundle header (key \"\")")
        header = proto.parse(items[0][1], f"{self.index_path} (header)")
        self.num_shards = proto.last(header, 1)
        if isinstance(self.num_shards, memoryview) or not 1 <= self.num_shards <= 1 << 20:
            raise CheckpointError(f"{self.index_path}: a header with "
                                  f"{self.num_shards} shards")
        endianness = proto.last(header, 2)
        if endianness not in (0, 1):
            raise CheckpointError(f"{self.index_path}: endianness {endianness!r}")
        self.big_endian = endianness == 1
        self.entries: Dict[str, Entry] = {}
        self.slice_entries: Dict[bytes, Entry] = {}
        for key, value in items[1:]:
            what = f"{self.index_path} (entry {bytes(key)[:80]!r})"
            entry = parse_entry(value, what)
            if key.startswith(b"\x00"):
                self.slice_entries[bytes(key)] = entry
                continue
            try:
                name = bytes(key).decode("utf-8")
            except UnicodeDecodeError:
                raise CheckpointError(f"{what}: a name that is not UTF-8") from None
            self.entries[name] = entry
        self._maps: Dict[int, Tuple[object, int]] = {}

    def names(self) -> List[str]:
        return list(self.entries)

    def _shard(self, shard: int, what: str):
        if not 0 <= shard < self.num_shards:
            raise CheckpointError(f"{what}: shard {shard} of {self.num_shards}")
        if shard not in self._maps:
            self._maps[shard] = map_file(data_path(self.prefix, shard, self.num_shards))
        return self._maps[shard]

    def _bytes(self, entry: Entry, what: str, check: bool = True) -> Tuple[object, np.ndarray]:
        """The mapping holding ``entry``'s bytes and those bytes, CRC checked (unless
        ``check`` is false: strings have their own checksum)."""
        mapped, size = self._shard(entry.shard_id, what)
        path = data_path(self.prefix, entry.shard_id, self.num_shards)
        if entry.offset + entry.size > size:
            raise CheckpointError(f"{what}: {entry.size} bytes at {entry.offset} run past the "
                                  f"end of {path} ({size} bytes; truncated?)")
        raw = np.frombuffer(mapped, np.uint8, entry.size, entry.offset) if entry.size else \
            np.zeros(0, np.uint8)
        if check and crc32c(raw) != unmask(entry.crc):
            raise CheckpointError(f"{what}: its data in {path} fails its CRC (corrupt)")
        return mapped, raw

    def read(self, name: str) -> np.ndarray:
        """The value of ``name`` (partitioned variables reassembled)."""
        return self._read(self.entries[name], name)

    def _read(self, entry: Entry, name: str) -> np.ndarray:
        what = f"{self.prefix} (tensor {name[:200]!r})"
        dtype = DTYPES.get(entry.dtype)
        if dtype is None or (dtype.storage is None and entry.dtype != STRING):
            raise CheckpointError(f"{what}: dtype {dtype.name if dtype else entry.dtype} "
                                  "cannot be read")
        if entry.slices:
            return self._assemble(entry, name, what)
        count = element_count(entry.shape, what)
        if entry.dtype == STRING:
            return self._strings(entry, count, what)
        if count * dtype.storage.itemsize != entry.size:
            raise CheckpointError(f"{what}: {entry.size} bytes for shape {list(entry.shape)} "
                                  f"of {dtype.name}")
        mapped, raw = self._bytes(entry, what)
        if entry.offset % dtype.storage.itemsize or not count:
            array = raw.copy().view(dtype.storage)
        else:
            array = np.frombuffer(mapped, dtype.storage, count, entry.offset)
        if self.big_endian and dtype.storage.itemsize > 1:
            array = array.byteswap()
        if dtype.name == "bool" and count and array.view(np.uint8).max() > 1:
            raise CheckpointError(f"{what}: a bool that is neither 0 nor 1")
        return from_storage(array.reshape(entry.shape), dtype)

    def _strings(self, entry: Entry, count: int, what: str) -> np.ndarray:
        if count + 4 > entry.size:
            raise CheckpointError(f"{what}: {count} strings cannot fit in {entry.size} bytes")
        _, raw = self._bytes(entry, what, check=False)
        data = raw.tobytes()
        lengths, pos = [], 0
        for _ in range(count):
            length, pos = proto.read_varint(data, pos, len(data), what)
            lengths.append(length)
        order = "big" if self.big_endian else "little"
        length_crc = crc32c(_length_words(lengths, order))
        if pos + 4 > len(data) or unmask(int.from_bytes(data[pos:pos + 4], order)) != length_crc:
            raise CheckpointError(f"{what}: its string lengths fail their CRC (corrupt)")
        crc = crc32c(data[pos:], length_crc)
        if crc != unmask(entry.crc):
            raise CheckpointError(f"{what}: its strings fail their CRC (corrupt)")
        pos += 4
        if sum(lengths) != len(data) - pos:
            raise CheckpointError(f"{what}: string lengths add up to {sum(lengths)}, "
                                  f"{len(data) - pos} bytes are stored")
        out = np.empty(count, dtype=object)
        for i, length in enumerate(lengths):
            out[i] = data[pos:pos + length]
            pos += length
        return out.reshape(entry.shape)

    def _assemble(self, entry: Entry, name: str, what: str) -> np.ndarray:
        """A partitioned variable from its slices: they must tile it exactly."""
        boxes, total = [], 0
        for extents in entry.slices:
            box = []
            for (start, length), dim in zip(extents, entry.shape):
                stop = dim if length == -1 else start + length
                if start > dim or stop > dim:
                    raise CheckpointError(f"{what}: slice {extents} outside {list(entry.shape)}")
                box.append(slice(start, stop))
            key = slice_key(name, extents)
            part = self.slice_entries.get(key)
            if part is None:
                raise CheckpointError(f"{what}: slice {extents} is missing")
            if part.slices or part.dtype != entry.dtype or \
                    part.shape != tuple(s.stop - s.start for s in box):
                raise CheckpointError(f"{what}: slice {extents} holds {list(part.shape)} of "
                                      f"dtype {part.dtype}")
            boxes.append((box, part))
            total += element_count(part.shape, what)
        if total != element_count(entry.shape, what):
            raise CheckpointError(f"{what}: slices of {total} elements for shape "
                                  f"{list(entry.shape)} (overlapping or missing slices)")
        if entry.dtype == STRING:
            out = np.empty(entry.shape, dtype=object)
        else:
            out = np.empty(entry.shape, dtype=DTYPES[entry.dtype].storage)
        if DTYPES[entry.dtype].bits:
            out = out.astype(np.int8 if DTYPES[entry.dtype].name.startswith("i") else np.uint8)
        covered = np.zeros(entry.shape, dtype=bool)
        for box, part in boxes:
            box = tuple(box)
            if covered[box].any():
                raise CheckpointError(f"{what}: overlapping slices")
            covered[box] = True
            out[box] = self._read(part, name)
        return out


def _length_words(lengths, order: str) -> bytes:
    """String lengths as TF checksums them: uint32 words (uint64 for longer strings)."""
    return b"".join(n.to_bytes(4 if n <= 0xFFFFFFFF else 8, order) for n in lengths)


# ---- writing ------------------------------------------------------------------------------

def write_bundle(prefix: str, tensors: Sequence[Tuple[str, int, tuple, object]],
                 big_endian: bool = False) -> None:
    """Write ``(name, tf dtype, shape, value)`` tensors as TF's ``SaveV2`` does: data in the
    order given, the index sorted, byte for byte the same files.

    ``value`` is a C-contiguous numpy array in the dtype's storage type, or for strings a
    sequence of bytes. Files are written to temporary names, then renamed (data first).
    """
    entries: Dict[bytes, Entry] = {}
    chunks: List[object] = []
    offset = 0
    for name, dtype, shape, value in tensors:
        key = name.encode("utf-8")
        if not key:
            raise ValueError("a tensor with an empty name cannot be written (the bundle's "
                             "header uses that key)")
        if key in entries:
            raise ValueError(f"tensor {name!r} given twice")
        if dtype == STRING:
            value = [bytes(s) for s in value]
            order = "big" if big_endian else "little"
            length_crc = crc32c(_length_words([len(s) for s in value], order))
            tail = mask(length_crc).to_bytes(4, order) + b"".join(value)
            data = b"".join(proto.encode_varint(len(s)) for s in value) + tail
            crc, size = crc32c(tail, length_crc), len(data)
            chunks.append(data)
        else:
            array = np.ascontiguousarray(value)
            if big_endian and array.dtype.itemsize > 1:
                array = array.byteswap()
            raw = array.reshape(-1).view(np.uint8)
            crc, size = crc32c(raw), raw.size
            chunks.append(raw)
        entries[key] = Entry(dtype, tuple(int(d) for d in shape), 0, offset, size, mask(crc))
        offset += size
    header = proto.field_varint(1, 1) + (proto.field_varint(2, 1) if big_endian else b"") + \
        proto.field_bytes(3, proto.field_varint(1, 1))
    items = [(b"", header)] + [(key, encode_entry(entries[key])) for key in sorted(entries)]
    directory = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(directory, exist_ok=True)
    data_file = data_path(prefix, 0, 1)
    temporary = write_atomically(data_file, chunks, final=False)
    try:
        index = table.write_table(items)
        os.replace(temporary, data_file)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    write_atomically(prefix + ".index", [index])
