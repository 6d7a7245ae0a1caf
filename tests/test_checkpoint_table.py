"""The table, snappy, CRC and protobuf pieces, on their own (no TF needed)."""
import os
import random

import numpy as np
import pytest

from tfcompat_ema.checkpoint import crc, proto, snappy, table
from tfcompat_ema.checkpoint.errors import CheckpointError


def test_crc32c_known_values_and_fallback_agree():
    assert crc.crc32c(b"") == 0
    assert crc.crc32c(b"123456789") == 0xE3069283
    assert crc.crc32c(bytes(32)) == 0x8A9136AA                 # RFC 3720's test vectors
    assert crc.crc32c(b"\xff" * 32) == 0x62A8AB43
    rng = np.random.default_rng(0)
    for size in (1, 255, 4096, 65537, 1 << 20):
        data = rng.integers(0, 256, size, dtype=np.uint8)
        assert crc._fallback(data, 7) == crc.crc32c(data.tobytes(), 7)
    assert crc.unmask(crc.mask(123456789)) == 123456789


def test_snappy_round_trips_and_refuses_bad_blocks():
    rng = random.Random(0)
    for _ in range(200):
        data = bytes(rng.choice(b"ab\x00\xff") for _ in range(rng.randrange(2000)))
        assert snappy.decompress(snappy.compress(data), "t") == data
    # A 4-byte literal, then an overlapping 1-byte-offset copy of 8 bytes.
    assert snappy.decompress(b"\x0c\x0cabcd\x11\x04", "t") == b"abcdabcdabcd"
    for bad in (b"\x05\x00a", b"\x10\x05\x00", b"\xff\xff\xff\xff\x0f", b"\x03\x08ab",
                b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01", b"\x02\x00a\x01\x01"):
        with pytest.raises(CheckpointError):
            snappy.decompress(bad, "t")


def test_table_round_trip_many_blocks_and_snappy():
    items = [(f"key{i:06d}".encode(), os.urandom(i % 300)) for i in range(3000)]
    for compression in (table.NO_COMPRESSION, table.SNAPPY):
        blob = table.write_table(items, block_size=4096, compression=compression)
        assert [(k, bytes(v)) for k, v in table.read_table(blob, "t")] == items


def test_table_refuses_corruption_with_clear_errors():
    blob = table.write_table([(b"a", b"1"), (b"b", b"2")])
    with pytest.raises(CheckpointError, match="CRC"):
        table.read_table(blob[:3] + bytes([blob[3] ^ 1]) + blob[4:], "t.index")
    with pytest.raises(CheckpointError, match="t.index"):
        table.read_table(blob[:-1], "t.index")
    with pytest.raises(CheckpointError, match="too short"):
        table.read_table(b"", "t.index")


def test_proto_parse_checks_lengths():
    assert proto.parse(proto.field_varint(1, 5) + proto.field_bytes(2, b"xy"), "m")[1] == [5]
    for bad in (b"\x12\x05ab", b"\x08", b"\x0b", b"\x08" + b"\xff" * 11, b"\x00\x00"):
        with pytest.raises(CheckpointError):
            proto.parse(bad, "m")
    assert proto.signed64(proto.parse(proto.field_varint(1, -3), "m")[1][0]) == -3
