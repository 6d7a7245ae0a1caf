"""Snappy block format (raw, not framed), as early TF and LevelDB tables compress blocks.

Dependency choice: written here, in Python. Only the small blocks of old ``.index`` files
and V1 tables are ever snappy-compressed (TF writes them uncompressed today), so speed does
not matter, and a compiled package (python-snappy needs libsnappy) would be a dependency
for a legacy case. The decoder checks every length and offset against what it has and
refuses an output longer than the format can make of the input.

>>> decompress(compress(b"abcabcabcabcabcabc-abcabcabc"), "example")
b'abcabcabcabcabcabc-abcabcabc'
"""
from __future__ import annotations

from .errors import CheckpointError
from .proto import encode_varint, read_varint

#: The most output one input byte can give: a 2-byte copy tag makes 64 bytes.
_MAX_RATIO = 32


def decompress(data, what: str) -> bytes:
    """Decode one snappy block; malformed input raises :class:`CheckpointError`."""
    data = bytes(data)
    end = len(data)
    length, pos = read_varint(data, 0, end, f"{what} (snappy length)")
    if length > _MAX_RATIO * end + 64:
        raise CheckpointError(f"{what}: a snappy block of {end} bytes claims {length} "
                              "uncompressed, more than snappy can encode")
    out = bytearray()
    while pos < end:
        tag = data[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:                                           # literal
            size = tag >> 2
            if size >= 60:
                extra = size - 59
                if pos + extra > end:
                    raise CheckpointError(f"{what}: a snappy literal length runs past the end")
                size = int.from_bytes(data[pos:pos + extra], "little")
                pos += extra
            size += 1
            if pos + size > end:
                raise CheckpointError(f"{what}: a snappy literal runs past the end")
            out += data[pos:pos + size]
            pos += size
        else:
            if kind == 1:
                if pos + 1 > end:
                    raise CheckpointError(f"{what}: a snappy copy runs past the end")
                size = ((tag >> 2) & 7) + 4
                offset = ((tag >> 5) << 8) | data[pos]
                pos += 1
            else:
                width = 2 if kind == 2 else 4
                if pos + width > end:
                    raise CheckpointError(f"{what}: a snappy copy runs past the end")
                size = (tag >> 2) + 1
                offset = int.from_bytes(data[pos:pos + width], "little")
                pos += width
            if offset == 0 or offset > len(out):
                raise CheckpointError(f"{what}: a snappy copy from offset {offset} with "
                                      f"{len(out)} bytes decoded")
            start = len(out) - offset
            if size <= offset:
                out += out[start:start + size]
            else:                                              # overlapping: a repeat
                pattern = bytes(out[start:])
                out += (pattern * (size // offset + 1))[:size]
        if len(out) > length:
            raise CheckpointError(f"{what}: snappy output longer than its {length} bytes")
    if len(out) != length:
        raise CheckpointError(f"{what}: snappy output of {len(out)} bytes, {length} expected")
    return bytes(out)


def compress(data: bytes) -> bytes:
    """A valid (not maximally small) snappy encoding of ``data``: greedy 4-byte matches."""
    data = bytes(data)
    out = bytearray(encode_varint(len(data)))
    table = {}
    pos = literal_start = 0
    end = len(data)

    def literal(start, stop):
        while start < stop:
            chunk = min(stop - start, 1 << 16)
            size = chunk - 1
            if size < 60:
                out.append(size << 2)
            elif size < 256:
                out.extend((60 << 2, size))
            else:
                out.append(61 << 2)
                out.extend(size.to_bytes(2, "little"))
            out.extend(data[start:start + chunk])
            start += chunk

    while pos + 4 <= end:
        key = data[pos:pos + 4]
        candidate = table.get(key)
        table[key] = pos
        if candidate is None or pos - candidate > 0xFFFF:
            pos += 1
            continue
        literal(literal_start, pos)
        size = 4
        while pos + size < end and data[candidate + size] == data[pos + size] and size < 64:
            size += 1
        out.append(((size - 1) << 2) | 2)
        out.extend((pos - candidate).to_bytes(2, "little"))
        pos += size
        literal_start = pos
    literal(literal_start, end)
    return bytes(out)
