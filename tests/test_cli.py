"""``tfcompat-ema inspect`` and ``convert`` on checkpoints TF wrote; bad input ends in one line."""
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import numpy as np
import torch

from tfcompat_ema.cli import main

tf = None
RULES = """
ignore_tf = ["global_step"]
[[rule]]
torch = "out"
tf = "dense"
layout = "dense"
"""


def setUpModule():
    global tf
    import tensorflow
    tf = tensorflow


def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


class CLITest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._directory = tempfile.TemporaryDirectory()
        cls.directory = Path(cls._directory.name)
        cls.kernel = np.arange(6, dtype=np.float32).reshape(3, 2)
        with tf.Graph().as_default():
            v1 = tf.compat.v1
            kernel = v1.get_variable("dense/kernel", initializer=cls.kernel)
            bias = v1.get_variable("dense/bias", initializer=np.ones(2, np.float32))
            v1.train.get_or_create_global_step()
            loss = tf.reduce_sum(kernel, name="loss")
            ema = v1.train.ExponentialMovingAverage(0.5)
            step = tf.group(ema.apply([kernel, bias]),
                            v1.train.ExponentialMovingAverage(0.9, zero_debias=True).apply([loss]))
            with v1.Session() as sess:
                sess.run(v1.global_variables_initializer())
                sess.run(kernel.assign_add(tf.fill([3, 2], 4.0)))
                sess.run(step)
                cls.averaged_kernel = sess.run(ema.average(kernel))
                cls.prefix = v1.train.Saver().save(sess, str(cls.directory / "model.ckpt"))
        cls.rules = cls.directory / "rules.toml"
        cls.rules.write_text(RULES)

    @classmethod
    def tearDownClass(cls):
        cls._directory.cleanup()

    def test_inspect(self):
        code, out, _ = run_cli("inspect", self.prefix)
        self.assertEqual(code, 0)
        self.assertIn("TF1 checkpoint (name-based), 3 variables, 3 averages", out)
        rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
        self.assertEqual(rows["dense/kernel"], ["dense/kernel", "[3,", "2]", "float32",
                                                "ExponentialMovingAverage", "-"])
        self.assertEqual(rows["global_step"][-2:], ["-", "-"])
        self.assertEqual(rows["loss"][1:], ["(tensor)", "[]", "float32",
                                            "ExponentialMovingAverage", "yes"])

    def test_inspect_tf2(self):
        prefix = tf.train.Checkpoint(w=tf.Variable([1.0, 2.0])).save(str(self.directory / "tf2"))
        code, out, _ = run_cli("inspect", prefix)
        self.assertEqual(code, 0)
        self.assertIn("TF2 checkpoint (object-based), 1 variables, 0 averages", out)

    def test_convert_averaged_and_raw(self):
        from safetensors.torch import load_file
        for flag, kernel in (("--averaged", self.averaged_kernel), ("--raw", self.kernel + 4)):
            out_file = self.directory / f"out{flag}.safetensors"
            code, out, err = run_cli("convert", self.prefix, "--map", self.rules, "--out",
                                     out_file, flag)
            self.assertEqual((code, err), (0, ""))
            self.assertIn("wrote 2 tensors", out)
            state = load_file(out_file)
            self.assertEqual(set(state), {"out.weight", "out.bias"})
            self.assertTrue(torch.equal(state["out.weight"], torch.from_numpy(kernel).t()))
            model = torch.nn.Sequential()
            model.add_module("out", torch.nn.Linear(3, 2))
            model.load_state_dict(state)          # ready for load_state_dict as it is

    def test_mapping_problems_print_the_report_and_write_nothing(self):
        rules = self.directory / "partial.toml"
        rules.write_text(RULES.replace('ignore_tf = ["global_step"]', ""))
        out_file = self.directory / "partial.safetensors"
        code, _, err = run_cli("convert", self.prefix, "--map", rules, "--out", out_file)
        self.assertEqual(code, 1)
        self.assertIn("TF variables not used (1):\n  global_step [] int64: no rule matches it",
                      err)
        self.assertFalse(out_file.exists())
        code, out, _ = run_cli("convert", self.prefix, "--map", rules, "--out", out_file,
                               "--non-strict")
        self.assertEqual(code, 0)
        self.assertTrue(out_file.exists())

    def test_bad_input_is_one_line_and_exit_2(self):
        notes = self.directory / "notes.txt"
        notes.write_text("hello")
        bad_regex = self.directory / "bad_regex.toml"
        bad_regex.write_text(RULES.replace('torch = "out"', 'torch = "{i:[0-9}"')
                             .replace('tf = "dense"', 'tf = "dense_{i}"'))
        not_toml = self.directory / "not.toml"
        not_toml.write_text("[[rule]\n")
        truncated = self.directory / "truncated"
        truncated.mkdir()
        for path in Path(self.prefix).parent.glob("model.ckpt*"):
            data = path.read_bytes()
            (truncated / path.name).write_bytes(data[:len(data) // 2] if ".data-" in path.name
                                                else data)
        out = self.directory / "x.safetensors"
        cases = {
            "missing path": ("inspect", self.directory / "missing"),
            "not a checkpoint": ("inspect", notes),
            "truncated": ("convert", truncated / "model.ckpt", "--map", self.rules, "--out", out),
            "bad regex": ("convert", self.prefix, "--map", bad_regex, "--out", out),
            "rules not TOML": ("convert", self.prefix, "--map", not_toml, "--out", out),
            "missing rules": ("convert", self.prefix, "--map", self.directory / "no.toml",
                              "--out", out),
            "output not safetensors": ("convert", self.prefix, "--map", self.rules, "--out",
                                       self.directory / "x.pt"),
        }
        for case, argv in cases.items():
            with self.subTest(case):
                code, stdout, err = run_cli(*argv)
                self.assertEqual(code, 2)
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertTrue(err.startswith("tfcompat-ema: error: "), err)
                self.assertNotIn("Traceback", err)
        self.assertFalse(out.exists())

    def test_installed_command(self):
        """The console script: a real process (TF imported), a bad path: one line, no more."""
        empty = self.directory / "empty"
        empty.mkdir(exist_ok=True)
        result = subprocess.run([str(Path(sys.executable).with_name("tfcompat-ema")), "inspect",
                                 str(empty)], capture_output=True, text=True,
                                env={k: v for k, v in os.environ.items()
                                     if not k.startswith("TF_")})
        self.assertEqual(result.stdout, "")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr, f"tfcompat-ema: error: {empty}: a directory without a "
                                        "TF checkpoint in it\n")
        self.assertNotIn("Traceback", result.stderr)


if __name__ == "__main__":
    unittest.main()
