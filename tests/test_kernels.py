"""The fused CPU kernel against the op-by-op torch path, and TF's denormal flushing."""
import subprocess
import sys
import textwrap
import threading
import unittest
from array import array

import torch
from parameterized import parameterized

from tfcompat_ema import kernels, tf_math

ALL_DTYPES = [(torch.float32,), (torch.float64,), (torch.float16,), (torch.bfloat16,)]
needs_fused = unittest.skipUnless(kernels.fused_available(), "fused kernel not built")


def weight(decay, dtype):
    return tf_math.update_weight(tf_math.float32_decay(decay), dtype)


def normal_values(n, dtype, seed):
    """Random values without subnormals (the torch path does not flush them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 10 ** torch.randint(
        -3, 4, (n,), generator=g).to(torch.float64)
    return x.to(dtype)


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@needs_fused
class FusedKernelTest(unittest.TestCase):
    @parameterized.expand(ALL_DTYPES)
    def test_equals_torch_path_bitwise(self, dtype):
        shapes = [(), (7,), (3, 5), (0,), (100_003,), (64, 65)]
        shadows = [normal_values(max(1, torch.Size(s).numel()), dtype, i)[:torch.Size(s).numel()]
                   .reshape(s) for i, s in enumerate(shapes)]
        values = [normal_values(max(1, torch.Size(s).numel()), dtype, 100 + i)[:torch.Size(s).numel()]
                  .reshape(s) for i, s in enumerate(shapes)]
        expected = [s.clone() for s in shadows]
        d = weight(0.99, dtype)
        for _ in range(3):
            kernels.Batch(shadows, values).moving_average_(d)
            kernels.torch_moving_average_(expected, values, d)
        for got, want in zip(shadows, expected):
            self.assertTrue(torch.equal(bits(got), bits(want)))

    @parameterized.expand([(torch.float16,), (torch.bfloat16,)])
    def test_every_16_bit_input(self, dtype):
        # Every bit pattern as shadow (NaNs aside) against random values: the kernel's own
        # float<->16-bit conversions must round exactly as torch's.
        every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
        keep = ~torch.isnan(every)
        if dtype == torch.bfloat16:   # flushed by the kernel as by TF, not by torch
            keep &= (every.float().abs() >= torch.finfo(torch.float32).tiny) | (every == 0)
        shadow = every[keep].clone()
        value = normal_values(shadow.numel(), dtype, 7)
        expected = shadow.clone()
        d = weight(0.75, dtype)
        kernels.Batch([shadow], [value]).moving_average_(d)
        kernels.torch_moving_average_([expected], [value], d)
        same = (bits(shadow) == bits(expected)) | (torch.isnan(shadow) & torch.isnan(expected))
        self.assertTrue(bool(same.all()), f"{int((~same).sum())} elements differ")

    @parameterized.expand([(torch.float32,), (torch.float64,), (torch.bfloat16,)])
    def test_denormals_flush_to_zero_as_in_tf(self, dtype):
        tiny = torch.finfo(dtype).tiny
        d = weight(0.9, dtype)
        # FTZ: (3 * tiny) * d is below the smallest normal, so it becomes 0 and s stays.
        shadow = torch.tensor([3 * tiny], dtype=dtype)
        kernels.Batch([shadow], [torch.zeros(1, dtype=dtype)]).moving_average_(d)
        self.assertEqual(float(shadow), float(torch.tensor(3 * tiny, dtype=dtype)))
        # DAZ: a subnormal input reads as zero: s - (s - 0) * d with s read as 0 gives 0.
        shadow = torch.tensor([tiny / 4], dtype=dtype)
        kernels.Batch([shadow], [torch.zeros(1, dtype=dtype)]).moving_average_(d)
        self.assertEqual(float(shadow), 0.0)

    def test_float16_subnormals_are_kept(self):
        # float16 subnormals are normal float32 numbers: TF keeps them, so must we.
        shadow = torch.tensor([2 ** -20], dtype=torch.float16)
        kernels.Batch([shadow], [torch.zeros(1, dtype=torch.float16)]).moving_average_(
            weight(0.5, torch.float16))
        self.assertEqual(float(shadow), 2 ** -21)

    def test_flush_does_not_leak_to_the_caller(self):
        tiny = torch.finfo(torch.float32).tiny
        kernels.Batch([torch.ones(10)], [torch.zeros(10)]).moving_average_(
            weight(0.9, torch.float32))
        self.assertGreater(float(torch.tensor(tiny) / 4), 0.0)

    def test_thread_count_does_not_change_results(self):
        values = normal_values(300_001, torch.float32, 3)
        results = []
        for threads in (1, 2, 3):
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                shadow = normal_values(300_001, torch.float32, 4)
                kernels.Batch([shadow], [values]).moving_average_(weight(0.9, torch.float32))
            finally:
                torch.set_num_threads(previous)
            results.append(shadow)
        self.assertTrue(torch.equal(results[0], results[1]) and torch.equal(results[0], results[2]))

    def test_debias_equals_torch_path(self):
        d = weight(0.9, torch.float32)
        shadow, biased = torch.zeros(1000), normal_values(1000, torch.float32, 5)
        value = normal_values(1000, torch.float32, 6)
        factor = torch.tensor(0.271, dtype=torch.float32)
        expected_biased = biased.clone()
        kernels.torch_moving_average_([expected_biased], [value], d)
        kernels.Batch([shadow], [value], biased=[biased]).zero_debias_(d, [factor])
        self.assertTrue(torch.equal(biased, expected_biased))
        self.assertTrue(torch.equal(shadow, expected_biased / factor))


def with_threads(count, update):
    """``update()`` with torch (and so the kernel) set to ``count`` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        update()
    finally:
        torch.set_num_threads(previous)


@needs_fused
class ThreadsTest(unittest.TestCase):
    """The kernel's threads: every share flushed as TF flushes, every share done."""

    # Enough elements for the kernel to split the work over 4 threads (65,536 each at least).
    SPLIT = 4 * 65_536 + 5

    @parameterized.expand([(torch.float32,), (torch.float64,), (torch.bfloat16,)])
    def test_every_thread_flushes_denormals(self, dtype):
        tiny = torch.finfo(dtype).tiny
        d = weight(0.9, dtype)
        kept = torch.full((self.SPLIT,), 3 * tiny, dtype=dtype)        # FTZ keeps it
        zeroed = torch.full((self.SPLIT,), tiny / 4, dtype=dtype)      # DAZ reads it as 0
        zeros = torch.zeros(self.SPLIT, dtype=dtype)
        with_threads(4, lambda: kernels.Batch([kept, zeroed], [zeros, zeros]).moving_average_(d))
        self.assertTrue(bool((kept == torch.tensor(3 * tiny, dtype=dtype)).all()))
        self.assertTrue(bool((zeroed == 0).all()))

    def test_more_threads_than_the_kernel_starts(self):
        # Asked for 100,000 threads with enough numbers for 65 of them: it uses 64 at most.
        n = 65 * 65_536 + 3
        shadow, value = normal_values(n, torch.float32, 1), normal_values(n, torch.float32, 2)
        expected = shadow.clone()
        d = weight(0.9, torch.float32)
        kernels.torch_moving_average_([expected], [value], d)
        kernels._fused.update(0, array("Q", [shadow.data_ptr()]), None, array("Q", [value.data_ptr()]),
                              array("q", [n]), float(d), None, 100_000)
        self.assertTrue(torch.equal(shadow, expected))

    def test_concurrent_updates_from_python_threads(self):
        # Two updates at once: one has the pool, the other runs on its own thread; both exact.
        d = weight(0.99, torch.float32)
        pairs = [(normal_values(self.SPLIT, torch.float32, 10 + i),
                  normal_values(self.SPLIT, torch.float32, 20 + i)) for i in range(4)]
        expected = [s.clone() for s, _ in pairs]
        for _ in range(20):
            kernels.torch_moving_average_(expected, [v for _, v in pairs], d)
        errors = []

        def worker(shadow, value):
            try:
                batch = kernels.Batch([shadow], [value])
                for _ in range(20):
                    batch.moving_average_(d)
            except Exception as error:      # reported below, in the test's thread
                errors.append(error)

        def run_all():
            threads = [threading.Thread(target=worker, args=pair) for pair in pairs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        with_threads(2, run_all)
        self.assertEqual(errors, [])
        for (shadow, _), want in zip(pairs, expected):
            self.assertTrue(torch.equal(shadow, want))

    def test_forked_child_gets_a_working_pool(self):
        # The parent's workers do not exist in a forked child (DataLoader workers are forked):
        # the child's first split update must start its own, not wait on the parent's forever
        # (as the OpenMP build did).
        code = textwrap.dedent(f"""
            import os, signal, torch
            from tfcompat_ema import kernels
            torch.set_num_threads(2)
            d = torch.tensor(0.5)
            s, v = torch.ones({self.SPLIT}), torch.zeros({self.SPLIT})
            kernels.Batch([s], [v]).moving_average_(d)          # starts the parent's pool
            pid = os.fork()
            if pid == 0:
                signal.alarm(20)            # a hung child ends itself, not left behind
                kernels.Batch([s], [v]).moving_average_(d)
                torch.set_num_threads(1)    # torch's own OpenMP pool hangs in a forked child
                os._exit(0 if bool((s == 0.25).all()) else 1)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, os.waitstatus_to_exitcode(status)
            print("ok")
        """)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertEqual(result.stdout.strip(), "ok")


class RuntimeTest(unittest.TestCase):
    """On Linux the kernel's threads are torch's OpenMP threads: no runtime of its own."""

    def setUp(self):
        if kernels._fused is None or not sys.platform.startswith("linux"):
            self.skipTest("needs the compiled kernel on Linux")

    def test_no_openmp_runtime_of_its_own(self):
        self.assertEqual(kernels._fused.threading, "openmp (torch's runtime)")
        needed = subprocess.run(["readelf", "-d", kernels._fused.__file__], capture_output=True,
                                text=True)
        if needed.returncode != 0:
            self.skipTest("readelf is not installed")
        self.assertNotIn("gomp", needed.stdout)        # no libgomp of its own, bundled or not
        self.assertIn("libc.so", needed.stdout)

    def test_one_openmp_runtime_in_the_process(self):
        # Every libgomp mapped after an update is torch's: the kernel brought no second one.
        x = torch.zeros(1 << 20)
        kernels.Batch([x], [torch.ones(1 << 20)]).moving_average_(torch.tensor(0.5))
        with open("/proc/self/maps") as maps:
            runtimes = {line.split()[-1] for line in maps if "gomp" in line or "omp5" in line}
        self.assertEqual(len(runtimes), 1, runtimes)
        self.assertTrue(float(x[0]) == 0.5)


class LayoutTest(unittest.TestCase):
    def test_channels_last_and_transposed_values(self):
        d = weight(0.9, torch.float32)
        conv = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
        transposed = torch.randn(6, 8).t()                 # not dense like its shadow
        for value, shadow in ((conv, conv.clone(memory_format=torch.preserve_format)),
                              (transposed, torch.randn(8, 6))):
            shadow.add_(1.0)
            expected = shadow.clone()
            kernels.torch_moving_average_([expected], [value], d)
            kernels.Batch([shadow], [value]).moving_average_(d)
            self.assertTrue(torch.equal(shadow, expected))

    def test_torch_path_chunks_large_tensors(self):
        d = weight(0.9, torch.float32)
        old = kernels.CHUNK_BYTES
        kernels.CHUNK_BYTES = 1024
        try:
            shadow, value = torch.randn(10_000), torch.randn(10_000)
            expected = shadow - (shadow - value) * d
            kernels.torch_moving_average_([shadow], [value], d)
        finally:
            kernels.CHUNK_BYTES = old
        self.assertTrue(torch.equal(shadow, expected))

    def test_dense_detection(self):
        self.assertTrue(kernels._dense(torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last)))
        self.assertFalse(kernels._dense(torch.zeros(4, 6)[:, :3]))
        self.assertTrue(kernels._dense(torch.zeros(4, 6).t()))


@unittest.skipUnless(torch.cuda.is_available(), "no CUDA device")
class CudaTest(unittest.TestCase):
    @parameterized.expand(ALL_DTYPES)
    def test_cuda_matches_cpu_torch_path(self, dtype):
        d = weight(0.99, dtype)
        shadow, value = normal_values(10_000, dtype, 1), normal_values(10_000, dtype, 2)
        expected = shadow.clone()
        kernels.torch_moving_average_([expected], [value], d)
        on_gpu = shadow.cuda()
        kernels.Batch([on_gpu], [value.cuda()]).moving_average_(d)
        self.assertTrue(torch.equal(bits(on_gpu.cpu()), bits(expected)))


def cpu_flags():
    """This CPU's flags, read here independently of the library (x86-64 Linux)."""
    import platform
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return None
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return line.split(":", 1)[1].split()
    return None


class XlaHostTest(unittest.TestCase):
    """XLA contracts the update into an FMA only where the CPU has one for the dtype."""

    def test_native_fma_dtypes_read_from_this_cpu(self):
        flags = cpu_flags()
        if flags is None:
            self.assertIsNone(kernels.native_fma_dtypes())
            return
        fma = "fma" in flags or "fma4" in flags
        expected = ({torch.float32, torch.float64} if fma else set()) | (
            {torch.float16} if "avx512fp16" in flags else set())
        self.assertEqual(kernels.native_fma_dtypes(), expected)

    def test_float16_without_half_fma_is_the_eager_form(self):
        flags = cpu_flags()
        if flags is None or "avx512fp16" in flags:
            self.skipTest("this CPU has half-precision FMA (or is not x86-64 Linux): "
                          "tests/test_tf_math_xla.py judges it against TF's XLA")
        import numpy as np
        from tfcompat_ema import ExponentialMovingAverage
        rng = np.random.default_rng(3)
        start = (rng.standard_normal(4096) * 50).astype(np.float16)
        values = [(rng.standard_normal(4096) * 50).astype(np.float16) for _ in range(5)]
        d = np.float16(np.float32(1) - np.float32(0.9))
        expected = start.copy()
        for v in values:        # each op in float32, rounded to half (numpy float16 ops)
            expected = expected - (expected - v) * d
        w = torch.from_numpy(start.copy())
        ema = ExponentialMovingAverage(0.9, xla=True)
        ema.apply({"w": w})
        for v in values:
            w.copy_(torch.from_numpy(v))
            ema.apply()
        got = ema.average("w").numpy()
        self.assertTrue(np.array_equal(got.view(np.int16), expected.view(np.int16)))

    def test_float16_refused_where_the_cpu_is_not_known(self):
        from unittest import mock
        from tfcompat_ema import ExponentialMovingAverage
        ema = ExponentialMovingAverage(0.9, xla=True)
        with mock.patch.object(kernels, "native_fma_dtypes", lambda: None):
            with self.assertRaisesRegex(NotImplementedError, "'w'.*float16.*AVX512-FP16"):
                ema.apply({"v": torch.ones(3), "w": torch.ones(3, dtype=torch.float16)})
            self.assertEqual(ema.state_dict(), {})
            ema.apply({"v": torch.ones(3)})        # float32 is still taken as fused there
        self.assertEqual(list(ema.state_dict()), ["v/ExponentialMovingAverage"])
