"""V2 bundles: TF's own files read by us, ours read by TF, byte for byte against SaveV2."""
import os

import numpy as np
import pytest
import torch

from _ckpt_support import bits, no_tensorflow, tf_module, tf_values  # noqa: F401
from tfcompat_ema import CheckpointError, read_checkpoint, write_checkpoint
from tfcompat_ema.checkpoint import table
from tfcompat_ema.checkpoint.bundle import BundleReader, write_bundle
from tfcompat_ema.checkpoint.dtypes import tf_dtype_of

ML_DTYPES = ["bfloat16", "float8_e5m2", "float8_e4m3fn", "float8_e4m3fnuz",
             "float8_e4m3b11fnuz", "float8_e5m2fnuz", "int4", "uint4", "int2", "uint2",
             "float4_e2m1fn"]


def every_dtype():
    """name -> numpy value: every dtype TF saves, scalars and empty tensors among them."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(0)
    values = {}
    for dtype in ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                  "uint8", "uint16", "uint32", "uint64", "complex64", "complex128"):
        values[dtype] = rng.standard_normal((3, 4)).astype(dtype) if "float" in dtype or \
            "complex" in dtype else rng.integers(-100 if dtype[0] == "i" else 0, 100, (3, 4)
                                                 ).astype(dtype)
    values["bool"] = np.array([True, False, True])
    values["float32_special"] = np.array([-0.0, np.inf, -np.inf, np.nan, 1e-45], np.float32)
    for name in ML_DTYPES:
        if not hasattr(ml_dtypes, name):        # older ml_dtypes (the oldest stack) lack some
            continue
        pool = [0, 1, 3, 2, 1] if name.startswith("u") else [0, 1, -1, -2, 1]
        value = np.array(pool, dtype=getattr(ml_dtypes, name))
        if _tf_can_hold(value):
            values[name] = value
    values["scalar"] = np.array(3.5, np.float32)
    values["empty"] = np.zeros((0, 7), np.float32)
    values["empty_scalar_shape"] = np.zeros((2, 0), np.int64)
    values["strings"] = np.array([b"hi", b"", b"\x00\xff" * 50], dtype=object)
    values["deep/name/with.dots-and:colons"] = np.arange(6, dtype=np.int32).reshape(1, 2, 3)
    return values


def _tf_can_hold(value) -> bool:
    """Whether this TF makes a tensor of this dtype (TF 2.16 lacks some of ml_dtypes' types)."""
    tf = tf_module()
    try:
        tf.constant(value)
    except ValueError as error:
        assert "Unsupported numpy type" in str(error), error
        return False
    return True


def save_v2(prefix, values):
    tf = tf_module()
    names = list(values)
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(values[n]) for n in names])


def ours(values):
    out = []
    for name, value in values.items():
        if value.dtype == object:
            out.append((name, 7, value.shape, list(value.reshape(-1))))
        else:
            storage = value.view(np.uint8) if value.dtype.itemsize == 1 else value
            if value.dtype.name == "bfloat16":
                storage = value.view(np.uint16)
            out.append((name, tf_dtype_of(value.dtype), value.shape, storage))
    return out


def test_tf_written_every_dtype_read_bitwise(tmp_path):
    values = every_dtype()
    save_v2(tmp_path / "all", values)
    judge = tf_values(tmp_path / "all")
    reader = BundleReader(str(tmp_path / "all"))
    for name, value in values.items():
        got = reader.read(name)
        want = judge[name]
        if want.dtype.name in ("int4", "int2"):
            want = want.astype(np.int8)
        elif want.dtype.name in ("uint4", "uint2"):
            want = want.astype(np.uint8)
        elif want.dtype.kind == "V" or want.dtype.name == "bfloat16":
            want = want.view(np.uint8 if want.dtype.itemsize == 1 else np.uint16)
        assert bits(got) == bits(want), name
    ckpt = read_checkpoint(tmp_path / "all")
    assert ckpt.skipped["strings"] == "string"
    assert list(ckpt.strings["strings"]) == list(values["strings"])
    for name in {"int4", "uint2", "float8_e4m3b11fnuz", "float4_e2m1fn"} & set(values):
        assert "no PyTorch dtype" in ckpt.skipped[name] and name in ckpt.arrays
    assert np.array_equal(ckpt.arrays["int4"], [0, 1, -1, -2, 1])
    assert ckpt.tensors["float8_e4m3fn"].dtype == torch.float8_e4m3fn
    assert bits(ckpt.tensors["bfloat16"]) == bits(judge["bfloat16"].view(np.int16))
    assert ckpt.tensors["scalar"].shape == () and ckpt.tensors["empty"].shape == (0, 7)


def test_writer_is_byte_identical_to_save_v2(tmp_path):
    values = every_dtype()
    save_v2(tmp_path / "tf", values)
    write_bundle(str(tmp_path / "us"), ours(values))
    for suffix in (".index", ".data-00000-of-00001"):
        assert (tmp_path / ("us" + suffix)).read_bytes() == \
            (tmp_path / ("tf" + suffix)).read_bytes(), suffix


def test_writer_matches_save_v2_over_many_index_blocks(tmp_path):
    """3,000 long names: an index of several 256 KiB blocks, separators and all."""
    values = {f"layer_{i:05d}/" + "x" * (i % 97) + "/kernel": np.full((2,), i, np.float32)
              for i in range(3000)}
    values["\u00e9t\u00e9/w"] = np.ones(1, np.float16)
    save_v2(tmp_path / "tf", values)
    write_bundle(str(tmp_path / "us"), ours(values))
    assert (tmp_path / "us.index").read_bytes() == (tmp_path / "tf.index").read_bytes()
    assert len(table.read_table((tmp_path / "us.index").read_bytes(), "x")) == 3002


def test_write_checkpoint_read_back_by_tf_and_same_bytes_as_save_v2(tmp_path, no_tensorflow):
    tensors = {"f16": torch.randn(3).half(), "bf16": torch.randn(2, 2).bfloat16(),
               "f32": torch.tensor([-0.0, 1e-45, float("inf")]), "f64": torch.randn(4).double(),
               "step": torch.tensor(7), "b": torch.tensor([True, False]),
               "u8": torch.arange(5, dtype=torch.uint8), "i16": torch.arange(3, dtype=torch.int16),
               "f8": torch.randn(4).to(torch.float8_e4m3fn), "empty": torch.zeros(0, 3),
               "c64": torch.randn(2, dtype=torch.complex64), "t": torch.randn(3, 4).t()}
    write_checkpoint(tmp_path / "model.ckpt", tensors)
    assert "tensorflow" not in __import__("sys").modules or \
        __import__("sys").modules["tensorflow"] is None
    ckpt = read_checkpoint(tmp_path)
    for name, value in tensors.items():
        assert ckpt.tensors[name].dtype == value.dtype
        assert bits(ckpt.tensors[name]) == bits(value.contiguous()), name


def test_tf_reads_what_we_write(tmp_path):
    tensors = {"f16": torch.randn(3).half(), "bf16": torch.randn(2, 2).bfloat16(),
               "f32": torch.randn(2, 3), "i64": torch.tensor([2 ** 62, -1]),
               "bool": torch.tensor(True), "u32": torch.tensor([1, 2], dtype=torch.uint32),
               "f8": torch.randn(4).to(torch.float8_e5m2)}
    write_checkpoint(tmp_path / "m", tensors)
    judge = tf_values(tmp_path / "m")
    for name, value in tensors.items():
        want = judge[name]
        if want.dtype.itemsize <= 2 and want.dtype.kind in "Vf" and value.dtype != torch.float16:
            want = want.view(np.uint8 if want.dtype.itemsize == 1 else np.int16)
        assert bits(value) == bits(want), name
    tf = tf_module()
    names = sorted(tensors)
    tf.raw_ops.SaveV2(prefix=str(tmp_path / "tf"), tensor_names=names,
                      shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(judge[n]) for n in names])
    for suffix in (".index", ".data-00000-of-00001"):
        assert (tmp_path / ("m" + suffix)).read_bytes() == \
            (tmp_path / ("tf" + suffix)).read_bytes()


def test_empty_name_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        write_checkpoint(tmp_path / "m", {"": torch.ones(1), "w": torch.ones(1)})
    assert os.listdir(tmp_path) == []


def test_big_endian_bundle_read_by_tf_and_us(tmp_path):
    values = {"f32": np.arange(6, dtype=np.float32).reshape(2, 3), "i64": np.array([1, -2]),
              "f16": np.array([1.5, -2], np.float16), "s": np.array([b"ab", b"c"], object),
              "u8": np.arange(3, dtype=np.uint8)}
    write_bundle(str(tmp_path / "be"), ours(values), big_endian=True)
    reader = BundleReader(str(tmp_path / "be"))
    assert reader.big_endian
    judge = tf_values(tmp_path / "be")
    for name, value in values.items():
        assert bits(reader.read(name)) == bits(value) == bits(judge[name]), name


def test_snappy_compressed_index_read_by_tf_and_us(tmp_path):
    values = {f"v{i}": np.full((3,), i, np.float32) for i in range(50)}
    save_v2(tmp_path / "c", values)
    items = table.read_table((tmp_path / "c.index").read_bytes(), "x")
    blob = table.write_table([(k, bytes(v)) for k, v in items], compression=table.SNAPPY)
    assert blob[-48 - 5 - 1] is not None and blob != (tmp_path / "c.index").read_bytes()
    (tmp_path / "c.index").write_bytes(blob)
    judge = tf_values(tmp_path / "c")
    ckpt = read_checkpoint(tmp_path / "c")
    for name, value in values.items():
        assert bits(ckpt.tensors[name]) == bits(value) == bits(judge[name])


def test_partitioned_variable_reassembled(tmp_path):
    tf = tf_module()
    v1 = tf.compat.v1
    with tf.Graph().as_default():
        w = v1.get_variable("part/w", shape=[10, 3], initializer=v1.random_normal_initializer(
            seed=1), partitioner=v1.fixed_size_partitioner(3))
        s = v1.get_variable("part/s", shape=[2, 9], dtype=tf.float16,
                            partitioner=v1.fixed_size_partitioner(4, axis=1))
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            prefix = v1.train.Saver().save(sess, str(tmp_path / "part"))
            want = {"part/w": sess.run(tf.concat(list(w), 0)),
                    "part/s": sess.run(tf.concat(list(s), 1))}
    ckpt = read_checkpoint(prefix)
    assert set(ckpt.tensors) == {"part/w", "part/s"}
    for name in want:
        assert bits(ckpt.tensors[name]) == bits(want[name]), name
    # TF 2.21's load_checkpoint cannot read partitioned float16; it reads float32 ones.
    assert bits(tf.train.load_checkpoint(prefix).get_tensor("part/w")) == bits(want["part/w"])


def test_multi_shard_tf2_checkpoint(tmp_path):
    tf = tf_module()
    module = tf.Module()
    module.a = tf.Variable(np.arange(10000, dtype=np.float32).reshape(100, 100))
    module.b = tf.Variable(np.ones((100, 100), np.float64))
    module.c = tf.Variable(np.int32(3))
    policy = tf.train.experimental.MaxShardSizePolicy(max_shard_size=20000)
    prefix = tf.train.Checkpoint(m=module).write(
        str(tmp_path / "sharded"),
        options=tf.train.CheckpointOptions(experimental_sharding_callback=policy))
    assert BundleReader(prefix).num_shards > 1
    judge = tf_values(prefix)
    ckpt = read_checkpoint(prefix)
    assert ckpt.format == "TF2"
    for name in ("m/a", "m/b", "m/c"):
        assert bits(ckpt.tensors[name]) == bits(judge[name + "/.ATTRIBUTES/VARIABLE_VALUE"])


def test_tf1_saver_sharded_on_two_devices(tmp_path):
    tf = tf_module()
    v1 = tf.compat.v1
    with tf.Graph().as_default():
        with tf.device("/cpu:0"):
            a = v1.get_variable("a", initializer=np.arange(4, dtype=np.float32))
        with tf.device("/device:CPU:0"):
            b = v1.get_variable("b", initializer=np.int64(5))
        config = v1.ConfigProto(allow_soft_placement=True)
        with v1.Session(config=config) as sess:
            sess.run(v1.global_variables_initializer())
            prefix = v1.train.Saver(sharded=True).save(sess, str(tmp_path / "s"))
            want = sess.run({"a": a, "b": b})
    ckpt = read_checkpoint(prefix)
    judge = tf_values(prefix)
    for name in want:
        assert bits(ckpt.tensors[name]) == bits(want[name]) == bits(judge[name])
