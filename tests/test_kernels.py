"""The fused CPU kernel against the op-by-op torch path, and TF's denormal flushing."""
import unittest

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
