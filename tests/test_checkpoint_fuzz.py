"""Hostile checkpoints: flips, truncations and crafted entries with valid checksums.

Every input must give a result or a CheckpointError: no other exception, no signal (one
would kill this process), no hang, no allocation much beyond the files' size. Seeded and
bounded, so it runs in seconds in `make test`.
"""
import os
import random
import time
import tracemalloc

import numpy as np
import pytest

from _ckpt_support import no_tensorflow  # noqa: F401
from tfcompat_ema import CheckpointError, read_checkpoint
from tfcompat_ema.checkpoint import proto, table
from tfcompat_ema.checkpoint.bundle import Entry, encode_entry, slice_key, write_bundle
from tfcompat_ema.checkpoint.crc import crc32c, mask
from tfcompat_ema.checkpoint.object_graph import KEY
from tfcompat_ema.checkpoint.proto import field_bytes, field_varint

BUDGET_S = 8


def graph_bytes():
    attribute = field_bytes(2, field_bytes(1, b"VARIABLE_VALUE") + field_bytes(2, b"w")
                            + field_bytes(3, b"w/.ATTRIBUTES/VARIABLE_VALUE"))
    root = field_bytes(1, field_varint(1, 1) + field_bytes(2, b"w"))
    return field_bytes(1, root) + field_bytes(1, attribute)


def base_checkpoint(directory):
    """A TF2 bundle with numbers, strings, a bool, an empty tensor and a partitioned one."""
    prefix = str(directory / "base")
    part = np.arange(12, dtype=np.float32).reshape(4, 3)
    tensors = [(KEY, 7, (), [graph_bytes()]),
               ("w/.ATTRIBUTES/VARIABLE_VALUE", 1, (2, 3), np.ones((2, 3), np.float32)),
               ("s", 7, (2,), [b"ab", b"cde"]), ("b", 10, (2,), np.array([True, False])),
               ("e", 2, (0,), np.zeros(0)), ("i", 9, (), np.array(5))]
    write_bundle(prefix, tensors + [("p_a", 1, (2, 3), part[:2]), ("p_b", 1, (2, 3), part[2:])])
    items = {bytes(k): bytes(v) for k, v in
             table.read_table(open(prefix + ".index", "rb").read(), "x")}
    # Re-key p_a/p_b as slices of "p" and add p's entry listing them.
    slices = [((0, 2), (0, -1)), ((2, 2), (0, 3))]
    for old, extents in zip((b"p_a", b"p_b"), slices):
        items[slice_key("p", extents)] = items.pop(old)
    items[b"p"] = encode_entry(Entry(1, (4, 3), slices=list(slices)))
    write_index(prefix, items)
    return prefix


def write_index(prefix, items):
    with open(prefix + ".index", "wb") as out:
        out.write(table.write_table(sorted(items.items())))


def attempt(prefix):
    try:
        return read_checkpoint(prefix)
    except CheckpointError as error:
        assert str(error), "an error must say what is wrong"
        return None


def test_base_is_readable(tmp_path, no_tensorflow):
    ckpt = attempt(base_checkpoint(tmp_path))
    assert ckpt is not None and ckpt.format == "TF2"
    assert np.array_equal(ckpt.tensors["p"].numpy(), np.arange(12, dtype=np.float32)
                          .reshape(4, 3))
    assert list(ckpt.strings["s"]) == [b"ab", b"cde"]


def crafted_entries():
    """BundleEntryProtos TF's reader aborts on, and others that lie about sizes."""
    big = 1 << 40
    shape = lambda *dims: field_bytes(2, b"".join(      # noqa: E731
        field_bytes(2, field_varint(1, d)) for d in dims))
    yield "negative dim", field_varint(1, 1) + shape(-3, 2) + field_varint(5, 24)
    yield "element overflow", field_varint(1, 1) + shape(big, big, big) + field_varint(5, 4)
    yield "300 dims", field_varint(1, 1) + shape(*([1] * 300)) + field_varint(5, 4)
    yield "unparsable", b"\x0a\xff\xff\xff\xff\x0f"
    yield "huge size", field_varint(1, 1) + shape(1 << 30) + field_varint(5, 1 << 32)
    yield "huge offset", field_varint(1, 1) + shape(1) + field_varint(4, big) + \
        field_varint(5, 4)
    yield "negative offset", field_varint(1, 1) + shape(1) + field_varint(4, -4) + \
        field_varint(5, 4)
    yield "bad shard", field_varint(1, 1) + shape(1) + field_varint(3, 7) + field_varint(5, 4)
    yield "unknown rank", field_varint(1, 1) + field_bytes(2, field_varint(3, 1))
    yield "unknown dtype", field_varint(1, 999) + shape(1) + field_varint(5, 4)
    yield "variant", field_varint(1, 21) + shape(1) + field_varint(5, 4)
    yield "many strings", field_varint(1, 7) + shape(1 << 40) + field_varint(5, 8)
    slice_extent = field_bytes(7, field_bytes(1, b"") + field_bytes(1, b""))
    yield "duplicate slices", field_varint(1, 1) + shape(4, 3) + slice_extent + slice_extent
    yield "slice past end", field_varint(1, 1) + shape(4, 3) + field_bytes(
        7, field_bytes(1, field_varint(1, 3) + field_varint(2, 5)) + field_bytes(1, b""))
    yield "slice of wrong rank", field_varint(1, 1) + shape(4, 3) + field_bytes(
        7, field_bytes(1, b""))


@pytest.mark.parametrize("label,entry", list(crafted_entries()), ids=lambda x: str(x)[:20])
def test_crafted_entries_with_valid_checksums(tmp_path, no_tensorflow, label, entry):
    prefix = base_checkpoint(tmp_path)
    items = {bytes(k): bytes(v) for k, v in
             table.read_table(open(prefix + ".index", "rb").read(), "x")}
    items[b"w/.ATTRIBUTES/VARIABLE_VALUE" if "slice" not in label else b"p"] = entry
    write_index(prefix, items)
    ckpt = attempt(prefix)
    if label in ("unknown dtype", "variant"):
        assert ckpt is not None and "w" in ckpt.skipped
    else:
        assert ckpt is None, label


def test_crafted_headers(tmp_path, no_tensorflow):
    prefix = base_checkpoint(tmp_path)
    items = {bytes(k): bytes(v) for k, v in
             table.read_table(open(prefix + ".index", "rb").read(), "x")}
    for header in (b"", field_varint(1, 0), field_varint(1, 1 << 40), field_varint(1, 2),
                   field_varint(1, 1) + field_varint(2, 5), b"\xff", field_bytes(1, b"x")):
        items[b""] = header
        write_index(prefix, items)
        assert attempt(prefix) is None, header
    del items[b""]
    write_index(prefix, items)
    assert attempt(prefix) is None


def mutate(rng, blob):
    blob = bytearray(blob)
    kind = rng.randrange(5)
    if kind == 0 and blob:                                    # flip bits
        for _ in range(rng.randrange(1, 4)):
            blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
    elif kind == 1:                                           # truncate
        del blob[rng.randrange(len(blob) + 1):]
    elif kind == 2 and blob:                                  # a random byte
        blob[rng.randrange(len(blob))] = rng.randrange(256)
    elif kind == 3:                                           # insert
        at = rng.randrange(len(blob) + 1)
        blob[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 12)))
    elif blob:                                                # delete a run
        at = rng.randrange(len(blob))
        del blob[at:at + rng.randrange(1, 12)]
    return bytes(blob)


def test_random_mutations(tmp_path, no_tensorflow):
    prefix = base_checkpoint(tmp_path)
    index = open(prefix + ".index", "rb").read()
    data_path = prefix + ".data-00000-of-00001"
    data = open(data_path, "rb").read()
    items = [(bytes(k), bytes(v)) for k, v in table.read_table(index, "x")]
    rng = random.Random(1234)
    sizes = len(index) + len(data)
    start, cases, accepted = time.monotonic(), 0, 0
    tracemalloc.start()
    try:
        while time.monotonic() - start < BUDGET_S and cases < 3000:
            cases += 1
            which = rng.randrange(4)
            new_index, new_data = index, data
            if which == 0:
                new_index = mutate(rng, index)
            elif which == 1:
                new_data = mutate(rng, data)
            else:                       # an entry (or key) mutated, the table's CRCs valid
                mutated = list(items)
                at = rng.randrange(len(mutated))
                key, value = mutated[at]
                if which == 2:
                    value = mutate(rng, value)
                else:
                    key = mutate(rng, key)
                mutated[at] = (key, value)
                mutated = sorted(dict(mutated).items())
                new_index = table.write_table(mutated)
                if which == 3 and rng.random() < 0.5:        # and the data's CRC fixed up
                    new_data = data
            with open(prefix + ".index", "wb") as out:
                out.write(new_index)
            with open(data_path, "wb") as out:
                out.write(new_data)
            tracemalloc.reset_peak()
            ckpt = attempt(prefix)
            accepted += ckpt is not None
            peak = tracemalloc.get_traced_memory()[1]
            assert peak < 16 * sizes + (8 << 20), (cases, peak)
    finally:
        tracemalloc.stop()
    assert cases >= 200 and accepted < cases


def test_object_graph_mutations(tmp_path, no_tensorflow):
    graph = graph_bytes()
    rng = random.Random(99)
    for case in range(400):
        bad = mutate(rng, graph)
        prefix = str(tmp_path / f"g{case % 4}")
        write_bundle(prefix, [(KEY, 7, (), [bad]), ("w/.ATTRIBUTES/VARIABLE_VALUE", 1, (1,),
                                                      np.ones(1, np.float32))])
        attempt(prefix)


def test_deeply_nested_graph_does_not_recurse(tmp_path, no_tensorflow):
    nested = b""
    for _ in range(2000):
        nested = field_bytes(1, nested)
    write_bundle(str(tmp_path / "deep"), [(KEY, 7, (), [nested])])
    assert attempt(str(tmp_path / "deep")) is None
    assert crc32c(b"") == 0 and mask(0)
    assert proto.parse(b"", "empty") == {}
