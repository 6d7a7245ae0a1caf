"""HDF5 files read with libhdf5 kept out of the process (tfcompat_ema.checkpoint.h5_sandbox,
h5_probe): a file on which libhdf5 hangs, a child that crashes, hangs or answers nonsense, a
byte-flip fuzz: each a CheckpointError within the time limit, never a dead or stuck test
process. The values the parent reads from the file's bytes are compared with h5py's own
reading of the same files (in the test process for valid files, in a child for fuzzed ones)."""
import inspect
import json
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import numpy as np

from _tf import require
from tfcompat_ema import CheckpointError, read_checkpoint
from tfcompat_ema.checkpoint import h5_sandbox, keras_files

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
# A 13 KB .weights.h5 with a few bytes flipped (seed 7, case 2194 of a byte-flip fuzz) on
# which libhdf5 1.14.6 (h5py 3.14) spins forever inside an attribute read.
HANG = os.path.join(DATA, "hang.weights.h5")
# Case 755 of the same fuzz: h5py's walk fails on it (a broken symbol table); libhdf5 1.14.6
# segfaults where a walk reads a group's size and then its attributes on its way.
SEGFAULT = os.path.join(DATA, "segfault.weights.h5")
LIMIT = 2.0                 # seconds: the child's time limit in these tests
FUZZ_CASES = 200


def arrays(dtype_name, array):
    """A ``convert`` that keeps the numpy arrays the reader makes (bfloat16 as uint16)."""
    return array


def small_limit(seconds=LIMIT):
    return mock.patch.multiple(h5_sandbox, PROBE_SECONDS=seconds, PROBE_SECONDS_PER_MIB=0.0)


def write_weights(path, **options):
    """The small Keras 3 ``.weights.h5`` file the fuzz mutates."""
    h5py = require("h5py")
    with h5py.File(path, "w", **options) as f:
        f.create_group("layers/dense/vars").attrs["name"] = "dense"
        f["layers/dense/vars/0"] = np.arange(6, dtype=np.float32).reshape(3, 2)
        f["layers/dense/vars/1"] = np.array([0.5, -2], np.float32)
        f["optimizer/vars/0"] = np.int64(5)
    return path


def native(array):
    """h5py's array as the reader gives it: native byte order, 2-byte raw values (Keras'
    bfloat16, opaque to HDF5) as little-endian uint16."""
    array = np.asarray(array)
    if array.dtype.kind == "V":
        array = array.view("<u2")
    return array.astype(array.dtype.newbyteorder("="))


class _Case(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def path(self, name):
        return os.path.join(self.tmp.name, name)

    def processes(self):
        """Patch Popen to keep the child processes started, to check they were reaped."""
        started, real = [], subprocess.Popen

        def popen(*args, **kwargs):
            started.append(real(*args, **kwargs))
            return started[-1]
        patcher = mock.patch.object(h5_sandbox.subprocess, "Popen", popen)
        patcher.start()
        self.addCleanup(patcher.stop)
        return started


class HostileFixturesTest(_Case):
    def test_the_hanging_file_is_stopped_within_the_limit(self):
        h5py = require("h5py")
        started = self.processes()
        begin = time.monotonic()
        with small_limit(), self.assertRaises(CheckpointError) as caught:
            read_checkpoint(HANG)
        elapsed = time.monotonic() - begin
        self.assertIn(HANG, str(caught.exception))
        self.assertLess(elapsed, LIMIT + 2)
        self.assertTrue(started and all(p.returncode is not None for p in started))
        if h5py.version.hdf5_version == "1.14.6":     # the libhdf5 it hangs in
            self.assertIn("still reading it after 2 s", str(caught.exception))
            self.assertLess(started[0].returncode, 0)             # killed
        print(f"\nhanging file: CheckpointError after {elapsed:.2f} s (limit {LIMIT} s)")

    def test_the_file_libhdf5_crashes_on_is_an_error(self):
        require("h5py")
        with small_limit(), self.assertRaises(CheckpointError) as caught:
            read_checkpoint(SEGFAULT)
        self.assertIn(SEGFAULT, str(caught.exception))

    def test_the_limit_grows_with_the_file(self):
        self.assertEqual(h5_sandbox.time_limit(0), h5_sandbox.PROBE_SECONDS)
        self.assertAlmostEqual(h5_sandbox.time_limit(10 << 20) - h5_sandbox.time_limit(0),
                               10 * h5_sandbox.PROBE_SECONDS_PER_MIB)


class ChildProcessTest(_Case):
    """The child replaced by scripts that crash, hang or answer wrongly."""

    def setUp(self):
        super().setUp()
        self.weights = write_weights(self.path("m.weights.h5"))

    def fake_probe(self, source):
        script = self.path("probe.py")
        with open(script, "w") as out:
            out.write(textwrap.dedent(source))
        patcher = mock.patch.object(h5_sandbox, "PROBE", script)
        patcher.start()
        self.addCleanup(patcher.stop)

    def refused(self, pattern, path=None):
        with small_limit(), self.assertRaisesRegex(CheckpointError, pattern) as caught:
            read_checkpoint(path or self.weights)
        self.assertIn(path or self.weights, str(caught.exception))
        return str(caught.exception)

    def answer(self, answer):
        self.fake_probe(f"import sys; sys.stdout.write({json.dumps(answer)!r})")

    def test_a_segfault_is_an_error(self):
        self.fake_probe("import ctypes; ctypes.string_at(0)")
        self.refused("libhdf5 crashed on it [(]SIGSEGV[)]")

    def test_a_real_libhdf5_crash_is_an_error(self):
        h5py = require("h5py")        # a walk that reads each group's size and attributes
        self.fake_probe("""
            import h5py
            h5 = h5py.File(open(0, "rb", closefd=False), "r")
            h5.visititems(lambda name, obj: (len(obj), dict(obj.attrs)) and None
                          if isinstance(obj, h5py.Group) else None)
        """)
        message = self.refused("", SEGFAULT)
        if h5py.version.hdf5_version == "1.14.6":
            self.assertIn("libhdf5 crashed on it (SIGSEGV)", message)

    def test_a_child_killed_by_a_signal_is_an_error(self):
        self.fake_probe("import os, signal; os.kill(os.getpid(), signal.SIGABRT)")
        self.refused("crashed on it [(]SIGABRT[)]")

    def test_a_hanging_child_is_killed_and_reaped(self):
        started = self.processes()
        self.fake_probe("while True: pass")
        begin = time.monotonic()
        self.refused("still reading it after 2 s and was stopped")
        self.assertLess(time.monotonic() - begin, LIMIT + 2)
        self.assertEqual(len(started), 1)
        self.assertIsNotNone(started[0].returncode)       # waited for: no zombie
        with self.assertRaises(ProcessLookupError):
            os.kill(started[0].pid, 0)

    def test_a_keras_archive_in_memory_hangs_the_same(self):
        import zipfile
        keras = self.path("m.keras")
        with zipfile.ZipFile(keras, "w") as archive:
            archive.writestr("metadata.json", '{"keras_version": "3.15.1"}')
            archive.writestr("config.json", '{"config": {"layers": []}}')
            archive.writestr("model.weights.h5", b"x" * (1 << 20))
        self.fake_probe("import sys; sys.stdin.buffer.read(); sys.stdout.write('{')\n"
                        "while True: pass")
        self.refused("still reading", keras)

    def test_an_exit_without_an_answer_quotes_stderr(self):
        self.fake_probe("import sys; sys.stderr.write('h5py exploded'); sys.exit(3)")
        self.refused(r"process failed \(exit 3\): h5py exploded")
        self.fake_probe("pass")
        self.refused(r"process failed \(exit 0\): no answer")

    def test_answers_of_the_wrong_shape_are_errors(self):
        good = {"ok": True, "root": {}, "groups": {"layers/dense/vars": {"name": "dense"}},
                "datasets": [{"path": "layers/dense/vars/0", "shape": [2], "dtype": "<f4",
                              "dtype_text": "float32", "exact": True, "layout": "contiguous",
                              "external": 0, "filters": 0, "storage": 8, "offset": 0,
                              "attrs": {}}]}
        dataset = good["datasets"][0]
        wrong = [[], {"ok": 1}, {"ok": False}, {"ok": True}, {**good, "groups": []},
                 {**good, "root": {"keras_version": 3}},
                 {**good, "datasets": [dataset, dataset]},
                 {**good, "datasets": [{**dataset, "path": "layers/dense/vars"}]}]
        for key, value in [("shape", [-1]), ("shape", [2.0]), ("shape", [1] * 33),
                           ("shape", "2"), ("dtype", "f4"),
                           ("dtype", "<f4; import os"), ("dtype", "<q9"), ("exact", 1),
                           ("storage", True), ("offset", -8), ("offset", "0"),
                           ("attrs", {"dtype": {"error": 1}}), ("path", None)]:
            wrong.append({**good, "datasets": [{**dataset, key: value}]})
        for answer in wrong:
            with self.subTest(answer=answer):
                self.answer(answer)
                self.refused("answered wrongly")
        self.fake_probe("print('not json')")
        self.refused("answered wrongly [(]not JSON")
        self.answer(good)                       # the good answer reads the file's first bytes
        with open(self.weights, "rb") as f:
            want = np.frombuffer(f.read(8), "<f4")
        got = keras_files.read(self.weights, arrays).tensors["dense/kernel"]
        self.assertEqual(got.tobytes(), want.tobytes())

    def test_an_offset_past_the_end_is_refused_before_reading(self):
        size = os.path.getsize(self.weights)
        for offset, storage in ((size - 4, 8), (None, 8), (1 << 62, 8)):
            self.answer({"ok": True, "root": {}, "groups": {}, "datasets": [
                {"path": "layers/dense/vars/0", "shape": [2], "dtype": "<f4",
                 "dtype_text": "float32", "exact": True, "layout": "contiguous",
                 "external": 0, "filters": 0, "storage": storage, "offset": offset,
                 "attrs": {}}]})
            self.refused("past the end of the file" if offset else "no data stored")

    def test_an_empty_shape_too_big_for_numpy_is_refused(self):
        self.answer({"ok": True, "root": {}, "groups": {}, "datasets": [
            {"path": "layers/dense/vars/0", "shape": [0, 2 ** 64 - 1], "dtype": "<f4",
             "dtype_text": "float32", "exact": True, "layout": "contiguous", "external": 0,
             "filters": 0, "storage": 0, "offset": None, "attrs": {}}]})
        self.refused("too big for numpy")

    def test_errors_from_h5py_are_checkpoint_errors(self):
        self.answer({"ok": False, "kind": "h5py", "error": "KeyError: " + "x" * 5000})
        self.assertLess(len(self.refused("KeyError: xxx")), 800)      # quoted, cut short
        self.answer({"ok": False, "kind": "import", "error": "No module named 'h5py'"})
        with self.assertRaisesRegex(ImportError, r"tfcompat-ema\[keras\]"):
            read_checkpoint(self.weights)

    def test_the_child_imports_neither_this_package_nor_torch_nor_tf(self):
        seen = self.path("modules.json")
        self.fake_probe(f"""
            import atexit, json, runpy, sys
            atexit.register(lambda: open({seen!r}, "w").write(json.dumps(sorted(sys.modules))))
            sys.argv[0] = {h5_sandbox.PROBE!r}
            runpy.run_path(sys.argv[0], run_name="__main__")
        """)
        ckpt = read_checkpoint(self.weights)        # the real probe, run by the wrapper
        self.assertEqual(ckpt.tensors["optimizer/iteration"].item(), 5)
        with open(seen) as f:
            modules = {name.partition(".")[0] for name in json.load(f)}
        self.assertIn("h5py", modules)
        self.assertFalse(modules & {"tfcompat_ema", "torch", "tensorflow", "keras",
                                    "tf_keras"}, sorted(modules))


class WalkLimitsTest(_Case):
    def test_objects_and_path_characters_are_capped_in_the_child(self):
        path = write_weights(self.path("m.weights.h5"))
        self.assertEqual(len(keras_files.read(path, arrays).tensors), 3)
        with mock.patch.object(keras_files, "MAX_OBJECTS", 5), \
                self.assertRaisesRegex(CheckpointError, "more than 5 HDF5 objects"):
            keras_files.read(path, arrays)         # layers, dense, vars, 0, 1, optimizer...
        with mock.patch.multiple(h5_sandbox, MAX_ANSWER=100, ANSWER_PER_FILE_BYTE=0), \
                self.assertRaisesRegex(CheckpointError, "more than 50 characters of HDF5"):
            keras_files.read(path, arrays)


class StoredBytesTest(_Case):
    """Datasets read from their bytes, against h5py's reading of them; the storage that the
    bytes do not give (compact, external, a type libhdf5 converts...) refused."""

    def legacy(self, name, fill, **options):
        h5py = require("h5py")
        path = self.path(name)
        with h5py.File(path, "w", **options) as f:
            f.attrs["layer_names"] = [b"x"]             # the legacy layout: named by path
            fill(f)
        return path

    def assert_as_h5py(self, path, ckpt):
        h5py = require("h5py")
        with h5py.File(path, "r") as f:
            for name, file_path in ckpt.keys.items():
                want = native(f[file_path][()])
                self.assertEqual(ckpt.tensors[name].dtype, want.dtype, name)
                self.assertEqual(ckpt.tensors[name].shape, want.shape, name)
                self.assertEqual(ckpt.tensors[name].tobytes(), want.tobytes(), name)

    def test_values_and_byte_orders(self):
        ml_dtypes = require("ml_dtypes")

        def fill(f):
            f["x/f32"] = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
            f["x/f64be"] = np.array([1.5, -2.25, 1e300], ">f8")
            f["x/i16be"] = np.array([[1, -2], [300, -32768]], ">i2")
            f["x/u8"] = np.arange(5, dtype=np.uint8)
            f["x/flag"] = np.array([True, False, True])
            f["x/scalar"] = np.int64(-7)
            f["x/empty"] = np.zeros((0, 3), np.float32)
            f["x/bf"] = np.array([1.5, -3, 0.1], ml_dtypes.bfloat16)
            f["x/bf"].attrs["dtype"] = "bfloat16"
            f["x/bfbe"] = np.array([1.5, -3], ml_dtypes.bfloat16).view(np.uint16).astype(">u2")
            f["x/bfbe"].attrs["dtype"] = "bfloat16"
        for options in ({}, {"userblock_size": 512}):     # offsets from the file's start
            with self.subTest(**options):
                path = self.legacy("values.h5", fill, **options)
                ckpt = keras_files.read(path, arrays)
                self.assertEqual(sorted(ckpt.tensors), ["bf", "bfbe", "empty", "f32", "f64be",
                                                        "flag", "i16be", "scalar", "u8"])
                for name, array in ckpt.tensors.items():
                    self.assertTrue(array.dtype.isnative and array.flags.writeable, name)
                self.assertEqual(ckpt.tensors["f64be"].tolist(), [1.5, -2.25, 1e300])
                self.assertEqual(ckpt.tensors["i16be"].tolist(), [[1, -2], [300, -32768]])
                self.assertEqual(ckpt.tensors["flag"].tolist(), [True, False, True])
                for name in ("bf", "bfbe"):          # bfloat16 as its bits, native uint16
                    self.assertEqual(ckpt.tensors[name].dtype, np.uint16)
                    self.assertEqual(ckpt.tensors[name][:2].view(ml_dtypes.bfloat16).tolist(),
                                     [1.5, -3])
                self.assert_as_h5py(path, ckpt)

    def test_storage_the_bytes_do_not_give_is_refused(self):
        h5py = require("h5py")

        def compact(f):
            plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            plist.set_layout(h5py.h5d.COMPACT)
            h5py.h5d.create(f.create_group("x").id, b"k", h5py.h5t.IEEE_F32LE,
                            h5py.h5s.create_simple((2,)), dcpl=plist)

        def external(f):
            f.create_dataset("x/k", data=np.ones(4, "f4"),
                             external=[(self.path("outside.bin"), 0, 16)])

        def converted(f):                # a float whose exponent bias is not IEEE's
            odd = h5py.h5t.IEEE_F32LE.copy()
            odd.set_ebias(100)
            space = h5py.h5s.create_simple((2,))
            h5py.h5d.create(f.create_group("x").id, b"k", odd, space).write(
                h5py.h5s.ALL, h5py.h5s.ALL, np.ones(2, np.float32))

        def unallocated(f):
            f.create_dataset("x/k", shape=(4,), dtype="f4")

        def bad_bool(f):
            f["x/k"] = np.array([True, False])
        cases = {"compact": (compact, "stored compact"),
                 "external": (external, "in external files"),
                 "converted": (converted, "only approximates"),
                 "unallocated": (unallocated, "0 bytes stored"),
                 "no shape": (lambda f: f.create_dataset("x/k", data=h5py.Empty("f4")),
                              "no shape")}
        for name, (fill, message) in cases.items():
            for options in ({}, {"userblock_size": 512}):
                with self.subTest(name, **options):
                    path = self.legacy(name + ".h5", fill, **options)
                    with self.assertRaisesRegex(CheckpointError, message):
                        keras_files.read(path, arrays)
        path = self.legacy("bool.h5", bad_bool)
        with open(path, "rb") as f:
            offset = h5_sandbox.describe(path, f, os.path.getsize(path), 10) \
                .datasets["x/k"].offset
        with open(path, "r+b") as f:                     # [True, False] -> [2, False]
            f.seek(offset)
            self.assertEqual(f.read(2), b"\x01\x00")
            f.seek(offset)
            f.write(b"\x02")
        with self.assertRaisesRegex(CheckpointError, "other than 0 and 1"):
            keras_files.read(path, arrays)


class ByteFlipFuzzTest(_Case):
    def test_mutated_files_read_or_raise_within_the_limit(self):
        good = open(write_weights(self.path("good.weights.h5")), "rb").read()
        rng = random.Random(7)
        paths = []
        for case in range(FUZZ_CASES):
            data = bytearray(good)
            for _ in range(rng.choice([1, 2, 4, 8, 32])):
                data[rng.randrange(len(data))] = rng.randrange(256)
            paths.append(self.path(f"c{case:03d}.weights.h5"))
            with open(paths[-1], "wb") as out:
                out.write(data)

        def attempt(path):
            start = time.monotonic()
            try:
                return path, keras_files.read(path, arrays), time.monotonic() - start
            except CheckpointError as error:
                return path, error, time.monotonic() - start
        begin = time.monotonic()
        with small_limit(5.0), ThreadPoolExecutor(2) as pool:     # (two children at once)
            results = list(pool.map(attempt, paths))
        elapsed = time.monotonic() - begin
        outcomes, read = {}, {}
        for path, result, seconds in results:
            self.assertLess(seconds, 5.0 + 3, path)
            if isinstance(result, CheckpointError):
                self.assertIn(path, str(result))
                text = str(result)
                outcome = "hung" if "still reading" in text else \
                    "crashed" if "crashed" in text else "refused"
            else:
                read[path], outcome = result, "read"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        print(f"\nbyte-flip fuzz: {FUZZ_CASES} files in {elapsed:.1f} s: {outcomes}")
        self.assertGreater(outcomes.get("read", 0), 0)
        self.assertGreater(outcomes.get("refused", 0), 0)
        self.assert_as_h5py_in_a_child(read)

    def assert_as_h5py_in_a_child(self, read):
        """What we read is what h5py reads (in a child: libhdf5 may misbehave on them)."""
        require("h5py")
        wanted = {path: ckpt.keys for path, ckpt in read.items()}
        script = "import json, sys, h5py\nimport numpy as np\n" + inspect.getsource(native) \
            + textwrap.dedent("""
            out = {}
            for path, keys in json.load(sys.stdin).items():
                with h5py.File(path, "r") as f:
                    out[path] = {k: native(f[p][()]).tobytes().hex() for k, p in keys.items()}
            print(json.dumps(out))
        """)
        done = subprocess.run([sys.executable, "-c", script], input=json.dumps(wanted),
                              capture_output=True, text=True, timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        values = json.loads(done.stdout)
        for path, ckpt in read.items():
            for name in ckpt.keys:
                self.assertEqual(ckpt.tensors[name].tobytes().hex(), values[path][name],
                                 (path, name))


if __name__ == "__main__":
    unittest.main()
