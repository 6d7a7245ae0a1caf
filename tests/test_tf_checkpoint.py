"""Reading TF1 and TF2 checkpoints that TF wrote, and writing ones that TF's Saver restores."""
import os
import tempfile
import unittest
from pathlib import Path

import numpy as np
import torch

from _tf import require
from tfcompat_ema import (CheckpointError, ExponentialMovingAverage, MappingError, NameMap,
                          Rule, read_checkpoint, write_checkpoint)

tf = None


def setUpModule():
    global tf
    tf = require()


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


class CheckpointTestCase(unittest.TestCase):
    def setUp(self):
        self._directory = tempfile.TemporaryDirectory()
        self.directory = Path(self._directory.name)

    def tearDown(self):
        self._directory.cleanup()


class ReadTest(CheckpointTestCase):
    def tf1_checkpoint(self):
        """A TF1 graph with an EMA over a variable and a zero-debiased one over a tensor."""
        with tf.Graph().as_default():
            v1 = tf.compat.v1
            kernel = v1.get_variable("dense/kernel", initializer=np.arange(6, dtype=np.float32)
                                     .reshape(2, 3))
            loss = tf.reduce_sum(kernel * 2, name="loss")
            step = tf.group(v1.train.ExponentialMovingAverage(0.9).apply([kernel]),
                            v1.train.ExponentialMovingAverage(0.5, zero_debias=True).apply([loss]))
            with v1.Session() as sess:
                sess.run(v1.global_variables_initializer())
                sess.run(kernel.assign_add(tf.ones([2, 3])))
                sess.run(step)
                prefix = v1.train.Saver().save(sess, str(self.directory / "model.ckpt"),
                                               global_step=3)
                values = {v.op.name: sess.run(v) for v in v1.global_variables()}
        return prefix, values

    def test_tf1_saver_checkpoint(self):
        prefix, values = self.tf1_checkpoint()
        for path in (prefix, prefix + ".index", str(self.directory)):
            ckpt = read_checkpoint(path)
            self.assertEqual((ckpt.format, ckpt.prefix), ("TF1", prefix))
            self.assertEqual(set(ckpt.tensors), set(values))
            for name, value in values.items():
                self.assertTrue(same_bits(ckpt.tensors[name].numpy(), value), name)
        self.assertIn("loss/ExponentialMovingAverage/local_step", values)

    def test_tf2_object_checkpoint(self):
        model = tf.Module()
        model.dense = tf.Module()
        model.dense.kernel = tf.Variable(np.ones((2, 3), np.float32))
        prefix = tf.train.Checkpoint(model=model, step=tf.Variable(4, dtype=tf.int64)).save(
            str(self.directory / "ckpt"))
        ckpt = read_checkpoint(prefix)
        self.assertEqual(ckpt.format, "TF2")
        self.assertEqual(set(ckpt.tensors), {"model/dense/kernel", "step"})
        self.assertTrue(same_bits(ckpt.tensors["model/dense/kernel"].numpy(),
                                  np.ones((2, 3), np.float32)))

    def test_keras_model_into_a_pytorch_port(self):
        """A TF2 checkpoint of a Keras 3 model, its object-graph names mapped by rules."""
        import keras
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, 5, 3)).astype(np.float32)
        keras_model = keras.Sequential([keras.Input((5, 3)),
                                        keras.layers.LSTM(4, return_sequences=True),
                                        keras.layers.Dense(2)])
        for variable in keras_model.weights:
            variable.assign(rng.standard_normal(variable.shape).astype(np.float32))
        prefix = tf.train.Checkpoint(model=keras_model).save(str(self.directory / "keras"))

        class Port(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.rnn = torch.nn.LSTM(3, 4, batch_first=True)
                self.head = torch.nn.Linear(4, 2)

            def forward(self, inputs):
                return self.head(self.rnn(inputs)[0])

        names = NameMap([Rule("rnn", "model/_functional/_operations/1/cell", "keras_lstm"),
                         Rule("head", "model/_functional/_operations/2", "dense",
                              kernel="_kernel")])
        port = Port()
        tensors = read_checkpoint(prefix).tensors
        with self.assertRaises(MappingError):               # Keras keeps no averages here ...
            names.load(tensors, port)
        report = names.load(tensors, port, allow_raw=True)  # ... so the raw weights, explicitly
        self.assertEqual(len(report.raw_fallbacks), 5)
        with torch.no_grad():
            ours = port(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(ours, keras_model(x).numpy(), rtol=1e-5, atol=2e-5)

    def test_bad_paths_raise_checkpoint_error(self):
        prefix, _ = self.tf1_checkpoint()
        (self.directory / "notes.txt").write_text("not a checkpoint")
        (self.directory / "junk.index").write_bytes(b"\x00garbage" * 20)
        empty = self.directory / "empty"
        empty.mkdir()
        for path, message in ((self.directory / "nope", "no such checkpoint"),
                              (self.directory / "notes.txt", "not a TF checkpoint"),
                              (self.directory / "junk", "unreadable TF checkpoint"),
                              (empty, "a directory without a TF checkpoint")):
            with self.subTest(path=path.name), self.assertRaisesRegex(CheckpointError, message):
                read_checkpoint(path)
        data = next(self.directory.glob("model.ckpt-3.data-*"))
        data.write_bytes(data.read_bytes()[:10])                          # truncated
        with self.assertRaisesRegex(CheckpointError, "unreadable TF checkpoint"):
            read_checkpoint(prefix)


class WriteTest(CheckpointTestCase):
    def test_every_dtype_round_trips(self):
        tensors = {"f16": torch.randn(3).half(), "bf16": torch.randn(2, 2).bfloat16(),
                   "f32": torch.tensor([-0.0, 1e-45, float("inf")]), "f64": torch.randn(4).double(),
                   "step": torch.tensor(7), "scope/w": torch.randn(2, 3)}
        write_checkpoint(self.directory / "out" / "model.ckpt", tensors)
        ckpt = read_checkpoint(self.directory / "out")
        for name, value in tensors.items():
            self.assertEqual(ckpt.tensors[name].dtype, value.dtype)
            self.assertTrue(torch.equal(ckpt.tensors[name].reshape(-1).view(torch.uint8),
                                        value.reshape(-1).view(torch.uint8)), name)

    def test_tf_saver_restores_averages_into_its_variables(self):
        """TF's eval pattern: Saver(ema.variables_to_restore()) on what we wrote."""
        model = torch.nn.Linear(3, 2)
        ema = ExponentialMovingAverage(0.5)
        ema.apply(model)
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.apply(model)
        names = NameMap([Rule("", "dense", "dense")])
        write_checkpoint(self.directory / "model.ckpt", names.export(model, ema=ema))
        with tf.Graph().as_default():
            v1 = tf.compat.v1
            kernel = v1.get_variable("dense/kernel", [3, 2])
            bias = v1.get_variable("dense/bias", [2])
            restore = v1.train.ExponentialMovingAverage(0.5).variables_to_restore()
            self.assertEqual(set(restore), {"dense/kernel/ExponentialMovingAverage",
                                            "dense/bias/ExponentialMovingAverage"})
            with v1.Session() as sess:
                v1.train.Saver(restore).restore(sess, str(self.directory / "model.ckpt"))
                got_kernel, got_bias = sess.run([kernel, bias])
        self.assertTrue(same_bits(got_kernel, ema.average(model.weight).t().numpy()))
        self.assertTrue(same_bits(got_bias, ema.average(model.bias).numpy()))
        self.assertFalse(same_bits(got_kernel, model.weight.detach().t().numpy()))

    def test_non_tensor_is_refused_before_writing(self):
        with self.assertRaisesRegex(TypeError, "'w' is a list, not a tensor"):
            write_checkpoint(self.directory / "model.ckpt", {"w": [1.0]})
        self.assertEqual(os.listdir(self.directory), [])


if __name__ == "__main__":
    unittest.main()


class WithoutTensorFlowTest(unittest.TestCase):
    """The reader and writer in a process where `import tensorflow` fails."""

    def test_read_write_inspect_without_tensorflow(self):
        import subprocess
        import sys
        code = (
            "import sys; sys.modules['tensorflow'] = None\n"
            "import tempfile, torch, tfcompat_ema\n"
            "from tfcompat_ema import read_checkpoint, write_checkpoint\n"
            "from tfcompat_ema.cli import main\n"
            "d = tempfile.mkdtemp()\n"
            "write_checkpoint(d + '/m', {'w': torch.ones(2), 'w/ExponentialMovingAverage':"
            " torch.zeros(2)})\n"
            "assert read_checkpoint(d).tensors['w'].tolist() == [1.0, 1.0]\n"
            "assert main(['inspect', d]) == 0\n"
            "assert sys.modules['tensorflow'] is None\n"
            "print('ok')\n")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("ok", result.stdout)

    def test_crafted_index_is_an_error_not_a_signal(self):
        """Issue 9.8: entries TF's reader aborts on (valid checksums) give CheckpointError."""
        from tfcompat_ema.checkpoint import table
        from tfcompat_ema.checkpoint.proto import field_bytes, field_varint
        with tempfile.TemporaryDirectory() as directory:
            prefix = os.path.join(directory, "m")
            write_checkpoint(prefix, {"w": torch.ones(2)})
            items = dict((bytes(k), bytes(v)) for k, v in
                         table.read_table(open(prefix + ".index", "rb").read(), "x"))
            shape = lambda *dims: field_bytes(2, b"".join(     # noqa: E731
                field_bytes(2, field_varint(1, d)) for d in dims))
            for entry in (field_varint(1, 1) + shape(-1), field_varint(1, 1) + shape(*[1] * 300),
                          field_varint(1, 1) + shape(1 << 40, 1 << 40), b"\x12\x7f"):
                items[b"w"] = entry
                with open(prefix + ".index", "wb") as out:
                    out.write(table.write_table(sorted(items.items())))
                with self.assertRaisesRegex(CheckpointError, "unreadable TF checkpoint"):
                    read_checkpoint(prefix)
