"""Legacy V1 checkpoints written by TF's Saver: float16, partitions, shards, snappy tables."""
import numpy as np
import pytest

from _ckpt_support import bits, no_tensorflow, tf_module  # noqa: F401
from tfcompat_ema import CheckpointError, read_checkpoint
from tfcompat_ema.checkpoint import table
from tfcompat_ema.checkpoint.state import v1_files


def v1_checkpoint(directory, sharded=False):
    tf = tf_module()
    v1 = tf.compat.v1
    with tf.Graph().as_default():
        with tf.device("/cpu:0"):
            variables = {
                "f16": v1.get_variable("f16", initializer=np.array([1.5, -2, 65504], np.float16)),
                "f32": v1.get_variable("scope/f32", initializer=np.arange(6, dtype=np.float32)
                                       .reshape(2, 3)),
                "f64": v1.get_variable("f64", initializer=np.float64(0.1)),
                "i32": v1.get_variable("i32", initializer=np.array([-7, 2**31 - 1], np.int32)),
                "i64": v1.get_variable("i64", initializer=np.array([-(2**62), 5])),
                "i8": v1.get_variable("i8", initializer=np.array([-128, 127], np.int8)),
                "u8": v1.get_variable("u8", initializer=np.array([0, 255], np.uint8)),
                "b": v1.get_variable("b", initializer=np.array([True, False])),
                "empty": v1.get_variable("empty", initializer=np.zeros((0, 2), np.float32)),
            }
            part = v1.get_variable("part/w", shape=[7, 2], dtype=tf.float16,
                                   initializer=v1.random_normal_initializer(seed=3),
                                   partitioner=v1.fixed_size_partitioner(3))
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            saver = v1.train.Saver(write_version=v1.train.SaverDef.V1, sharded=sharded)
            prefix = saver.save(sess, str(directory / "v1.ckpt"))
            want = {v.op.name: value for v, value in
                    zip(variables.values(), sess.run(list(variables.values())))}
            want["part/w"] = sess.run(tf.concat(list(part), 0))
            # The judge: TF's Saver restores what it wrote, into fresh values.
            sess.run(v1.global_variables_initializer())
            saver.restore(sess, prefix)
            restored = sess.run(list(variables.values()))
            assert all(bits(a) == bits(want[v.op.name])
                       for a, v in zip(restored, variables.values()))
    return prefix, want


def compare(ckpt, want):
    assert ckpt.version == "V1" and ckpt.format == "TF1"
    assert set(ckpt.tensors) == set(want)
    for name, value in want.items():
        got = ckpt.tensors[name]
        if value.dtype.name == "bfloat16":
            value = value.view(np.int16)
        assert bits(got) == bits(value), name


def test_v1_single_file(tmp_path):
    prefix, want = v1_checkpoint(tmp_path)
    compare(read_checkpoint(prefix), want)
    compare(read_checkpoint(tmp_path), want)


def test_v1_sharded(tmp_path):
    prefix, want = v1_checkpoint(tmp_path, sharded=True)
    assert len(v1_files(prefix)) >= 1
    compare(read_checkpoint(prefix), want)


def test_v1_snappy_blocks(tmp_path, no_tensorflow=None):
    prefix, want = v1_checkpoint(tmp_path)
    path = v1_files(prefix)[0]
    with open(path, "rb") as handle:
        items = table.read_table(handle.read(), path)
    with open(path, "wb") as handle:
        handle.write(table.write_table([(k, bytes(v)) for k, v in items], block_size=256,
                                       compression=table.SNAPPY))
    compare(read_checkpoint(prefix), want)
    tf = tf_module()                         # TF's own reader takes the snappy table too
    assert bits(tf.train.load_checkpoint(prefix).get_tensor("scope/f32")) == \
        bits(want["scope/f32"])


def test_v1_corruption_is_a_checkpoint_error(tmp_path):
    prefix, _ = v1_checkpoint(tmp_path)
    path = v1_files(prefix)[0]
    with open(path, "rb") as handle:
        blob = handle.read()
    for position in range(0, len(blob) - 48, max(1, len(blob) // 50)):
        with open(path, "wb") as handle:
            handle.write(blob[:position] + bytes([blob[position] ^ 0x40]) + blob[position + 1:])
        with pytest.raises(CheckpointError):
            read_checkpoint(prefix)
