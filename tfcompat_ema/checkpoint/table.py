"""The LevelDB-style sorted string table of TF's ``.index`` files and V1 checkpoints.

Layout (``tensorflow/core/lib/io/table*`` and LevelDB's ``table_format``): data blocks of
prefix-compressed entries with restart points, each followed by a 5-byte trailer (compression
type, masked CRC-32C of the block and that byte); a metaindex block (empty in TF); an index
block whose entries map a separator key to a data block's handle; and a 48-byte footer
holding the two handles and the magic number. Blocks are uncompressed or snappy-compressed.

Every handle, length and count is checked against the file before it is used, and every
block's CRC is checked, so a corrupt or crafted table gives :class:`CheckpointError`.

>>> blob = write_table([(b"a", b"1"), (b"b", b"22")])
>>> [(k, bytes(v)) for k, v in read_table(blob, "example")]
[(b'a', b'1'), (b'b', b'22')]
"""
from __future__ import annotations

import struct
from typing import Iterable, List, Tuple

from . import snappy
from .crc import crc32c, mask, unmask
from .errors import CheckpointError
from .proto import encode_varint, read_varint

MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
TRAILER_SIZE = 5
NO_COMPRESSION, SNAPPY = 0, 1
#: TF's table::Options defaults, which BundleWriter keeps (and turns compression off).
BLOCK_SIZE = 262144
RESTART_INTERVAL = 16


def is_table(blob) -> bool:
    """Whether ``blob`` ends with a table footer's magic number."""
    return len(blob) >= FOOTER_SIZE and int.from_bytes(blob[-8:], "little") == MAGIC


def _handle(buf, pos: int, end: int, what: str):
    offset, pos = read_varint(buf, pos, end, what)
    size, pos = read_varint(buf, pos, end, what)
    return offset, size, pos


def _block(blob, offset: int, size: int, what: str) -> bytes:
    """A block's contents, its CRC checked and snappy decoded."""
    if offset + size + TRAILER_SIZE > len(blob) - FOOTER_SIZE:
        raise CheckpointError(f"{what}: a block at {offset} of {size} bytes runs past the "
                              f"end of the {len(blob)}-byte table (truncated?)")
    raw = blob[offset:offset + size + 1]
    stored = int.from_bytes(blob[offset + size + 1:offset + size + 5], "little")
    if unmask(stored) != crc32c(bytes(raw)):
        raise CheckpointError(f"{what}: the block at {offset} fails its CRC (corrupt)")
    kind = raw[-1]
    if kind == NO_COMPRESSION:
        return bytes(raw[:-1])
    if kind == SNAPPY:
        return snappy.decompress(raw[:-1], f"{what} (block at {offset})")
    raise CheckpointError(f"{what}: the block at {offset} has compression type {kind}")


def _entries(block: bytes, what: str) -> List[Tuple[bytes, memoryview]]:
    end = len(block)
    if end < 4:
        raise CheckpointError(f"{what}: a block of {end} bytes, too short for its restarts")
    restarts = int.from_bytes(block[-4:], "little")
    if restarts == 0 or restarts > (end - 4) // 4:
        raise CheckpointError(f"{what}: a block of {end} bytes claims {restarts} restarts")
    limit = end - 4 - 4 * restarts
    view = memoryview(block)
    out, key, pos = [], b"", 0
    while pos < limit:
        shared, pos = read_varint(block, pos, limit, what)
        unshared, pos = read_varint(block, pos, limit, what)
        size, pos = read_varint(block, pos, limit, what)
        if shared > len(key) or unshared + size > limit - pos:
            raise CheckpointError(f"{what}: a block entry whose lengths run past its block")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        out.append((key, view[pos:pos + size]))
        pos += size
    return out


def read_table(blob, what: str) -> List[Tuple[bytes, memoryview]]:
    """Every (key, value) of the table in ``blob``, in order; keys strictly increasing."""
    if len(blob) < FOOTER_SIZE:
        raise CheckpointError(f"{what}: {len(blob)} bytes, too short for a table (truncated?)")
    if not is_table(blob):
        raise CheckpointError(f"{what}: not a table (no magic number at its end)")
    footer = bytes(blob[-FOOTER_SIZE:-8])
    meta_offset, meta_size, pos = _handle(footer, 0, len(footer), f"{what} (footer)")
    index_offset, index_size, _ = _handle(footer, pos, len(footer), f"{what} (footer)")
    _block(blob, meta_offset, meta_size, f"{what} (metaindex)")      # CRC-checked, unused
    index = _entries(_block(blob, index_offset, index_size, what), f"{what} (index block)")
    items: List[Tuple[bytes, memoryview]] = []
    previous_end = 0
    for _, handle in index:
        offset, size, used = _handle(handle, 0, len(handle), f"{what} (index entry)")
        if used != len(handle) or offset < previous_end:
            raise CheckpointError(f"{what}: an index entry that is not an ordered block handle")
        previous_end = offset + size + TRAILER_SIZE
        for key, value in _entries(_block(blob, offset, size, what), f"{what} (data block)"):
            if items and key <= items[-1][0]:
                raise CheckpointError(f"{what}: keys out of order or repeated ({key!r})")
            items.append((key, value))
    return items


# ---- writing, byte for byte as TF's TableBuilder --------------------------------------------

def _shortest_separator(start: bytes, limit: bytes) -> bytes:
    common = 0
    while common < min(len(start), len(limit)) and start[common] == limit[common]:
        common += 1
    if common >= min(len(start), len(limit)):
        return start
    byte = start[common]
    if byte < 0xFF and byte + 1 < limit[common]:
        return start[:common] + bytes([byte + 1])
    return start


def _short_successor(key: bytes) -> bytes:
    for i, byte in enumerate(key):
        if byte != 0xFF:
            return key[:i] + bytes([byte + 1])
    return key


class _BlockBuilder:
    def __init__(self, interval: int):
        self.interval, self.buffer, self.restarts = interval, bytearray(), [0]
        self.counter, self.last = 0, b""

    def add(self, key: bytes, value: bytes):
        shared = 0
        if self.counter < self.interval:
            while shared < min(len(self.last), len(key)) and self.last[shared] == key[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buffer))
            self.counter = 0
        self.buffer += encode_varint(shared) + encode_varint(len(key) - shared)
        self.buffer += encode_varint(len(value)) + key[shared:] + value
        self.last, self.counter = key, self.counter + 1

    def size(self) -> int:
        return len(self.buffer) + 4 * len(self.restarts) + 4

    def finish(self) -> bytes:
        return bytes(self.buffer) + b"".join(struct.pack("<I", r) for r in self.restarts) + \
            struct.pack("<I", len(self.restarts))

    def empty(self) -> bool:
        return not self.buffer


def write_table(items: Iterable[Tuple[bytes, bytes]], block_size: int = BLOCK_SIZE,
                compression: int = NO_COMPRESSION) -> bytes:
    """A table of ``items`` (keys strictly increasing), as TF's ``TableBuilder`` writes it."""
    out = bytearray()
    index = _BlockBuilder(1)
    block = _BlockBuilder(RESTART_INTERVAL)
    pending, last = None, b""

    def write_block(builder) -> bytes:
        contents = builder.finish()
        kind = NO_COMPRESSION
        if compression == SNAPPY:
            packed = snappy.compress(contents)
            if len(packed) < len(contents) - len(contents) // 8:
                contents, kind = packed, SNAPPY
        handle = encode_varint(len(out)) + encode_varint(len(contents))
        out.extend(contents)
        out.append(kind)
        out.extend(struct.pack("<I", mask(crc32c(contents + bytes([kind])))))
        return handle

    for key, value in items:
        key = bytes(key)
        if (pending is not None or not block.empty() or last) and key <= last:
            raise ValueError(f"table keys must increase: {key!r} after {last!r}")
        if pending is not None:
            index.add(_shortest_separator(last, key), pending)
            pending = None
        block.add(key, bytes(value))
        last = key
        if block.size() >= block_size:
            pending = write_block(block)
            block = _BlockBuilder(RESTART_INTERVAL)
    if not block.empty():
        pending = write_block(block)
    if pending is not None:
        index.add(_short_successor(last), pending)
    metaindex = write_block(_BlockBuilder(RESTART_INTERVAL))
    index_handle = write_block(index)
    footer = metaindex + index_handle
    out.extend(footer + bytes(40 - len(footer)) + struct.pack("<Q", MAGIC))
    return bytes(out)
