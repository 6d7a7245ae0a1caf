"""tf_math against independent numpy arithmetic (and closed forms), never our own output."""
import unittest

import ml_dtypes
import numpy as np
import torch
from parameterized import parameterized

from tfcompat_ema import kernels, tf_math

NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
         torch.bfloat16: ml_dtypes.bfloat16}
ALL_DTYPES = [(dtype,) for dtype in NUMPY]


def to_numpy(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return t.to(torch.float64).numpy().astype(NUMPY[dtype])


class Float32DecayTest(unittest.TestCase):
    @parameterized.expand([(0.9,), (0.999,), (0.9999,), (0.1234567891,), (1.0,), (0.0,)])
    def test_decay_rounds_to_float32(self, decay):
        self.assertEqual(float(tf_math.float32_decay(decay)), float(np.float32(decay)))

    @parameterized.expand([(0,), (1,), (5,), (99,), (12345,), (2 ** 24 - 1,), (2 ** 24 + 1,),
                           (2 ** 24 + 3,), (2 ** 31 + 7,)])
    def test_num_updates_cap_in_float32(self, n):
        n32 = np.float32(n)         # int -> float32 rounds to nearest even, as TF's cast
        expected = min(np.float32(1.0), (np.float32(1.0) + n32) / (np.float32(10.0) + n32))
        self.assertEqual(float(tf_math.float32_decay(1.0, n)), float(expected))

    def test_counts_above_2_24_round_like_float32(self):
        # 2**24 + 1 is not a float32: it rounds to 2**24, so both counts give one decay.
        self.assertEqual(float(tf_math.float32_decay(1.0, 2 ** 24)),
                         float(tf_math.float32_decay(1.0, 2 ** 24 + 1)))

    def test_cap_does_not_raise_decay(self):
        self.assertEqual(float(tf_math.float32_decay(0.5, 10 ** 6)), 0.5)

    def test_tensor_inputs(self):
        decay = torch.tensor(0.99, dtype=torch.float64)
        n = torch.tensor(3)
        expected = min(np.float32(0.99), np.float32(4) / np.float32(13))
        self.assertEqual(float(tf_math.float32_decay(decay, n)), float(expected))


class UpdateWeightTest(unittest.TestCase):
    @parameterized.expand(ALL_DTYPES)
    def test_one_minus_decay_in_float32_then_cast(self, dtype):
        for decay in (0.9, 0.999, 0.9999, 0.3):
            d = tf_math.update_weight(tf_math.float32_decay(decay), dtype)
            expected = (np.float32(1.0) - np.float32(decay)).astype(NUMPY[dtype])
            self.assertEqual(d.dtype, dtype)
            self.assertEqual(float(d), float(expected))

    def test_float64_differs_from_computing_in_float64(self):
        # The reason this library exists: 1 - 0.999 in float64 is not TF's d.
        d = tf_math.update_weight(tf_math.float32_decay(0.999), torch.float64)
        self.assertNotEqual(float(d), 1 - 0.999)


class AssignMovingAverageTest(unittest.TestCase):
    @parameterized.expand(ALL_DTYPES)
    def test_matches_per_op_numpy(self, dtype):
        rng = np.random.default_rng(0)
        np_dtype = NUMPY[dtype]
        shadow_np = rng.standard_normal(1000).astype(np_dtype)
        shadow = torch.from_numpy(shadow_np.astype(np.float64)).to(dtype)
        d = tf_math.update_weight(tf_math.float32_decay(0.99), dtype)
        d_np = (np.float32(1.0) - np.float32(0.99)).astype(np_dtype)
        for _ in range(20):
            value_np = rng.standard_normal(1000).astype(np_dtype)
            value = torch.from_numpy(value_np.astype(np.float64)).to(dtype)
            tf_math.assign_moving_average_(kernels.Batch([shadow], [value]), d)
            diff = (shadow_np - value_np).astype(np_dtype)      # each op rounded in the dtype
            shadow_np = (shadow_np - (diff * d_np).astype(np_dtype)).astype(np_dtype)
        np.testing.assert_array_equal(to_numpy(shadow, dtype).view(np.uint8),
                                      shadow_np.view(np.uint8))

    def test_per_op_rounding_is_not_lerp(self):
        # Over many pairs, lerp (one rounding, FMA) departs from TF's two roundings;
        # ours does not.
        rng = np.random.default_rng(2)
        s_np = rng.standard_normal(10_000).astype(np.float32)
        v_np = rng.standard_normal(10_000).astype(np.float32)
        d = tf_math.update_weight(tf_math.float32_decay(0.999), torch.float32)
        ref = s_np - (s_np - v_np) * np.float32(d)
        s, v = torch.from_numpy(s_np.copy()), torch.from_numpy(v_np)
        lerped = s.clone().lerp_(v, float(d))
        tf_math.assign_moving_average_(kernels.Batch([s], [v]), d)
        np.testing.assert_array_equal(s.numpy(), ref)
        self.assertTrue((lerped.numpy() != ref).any())


class ZeroDebiasTest(unittest.TestCase):
    @parameterized.expand(ALL_DTYPES)
    def test_matches_per_op_numpy(self, dtype):
        rng = np.random.default_rng(1)
        np_dtype = NUMPY[dtype]
        shadow, biased = torch.zeros(50, dtype=dtype), torch.zeros(50, dtype=dtype)
        local_step = torch.zeros((), dtype=dtype)
        d = tf_math.update_weight(tf_math.float32_decay(0.9), dtype)
        d_np = (np.float32(1.0) - np.float32(0.9)).astype(np_dtype)
        biased_np, step_np = np.zeros(50, np_dtype), np_dtype(0)
        for _ in range(30):
            value_np = rng.standard_normal(50).astype(np_dtype)
            value = torch.from_numpy(value_np.astype(np.float64)).to(dtype)
            tf_math.zero_debias_(kernels.Batch([shadow], [value], biased=[biased]), [local_step], d)
            biased_np = (biased_np - ((biased_np - value_np).astype(np_dtype) * d_np)
                         .astype(np_dtype)).astype(np_dtype)
            step_np = np_dtype(step_np + np_dtype(1))
            one_minus_d = np_dtype(np_dtype(1) - d_np)
            compute = np.float64 if dtype == torch.float64 else np.float32   # Eigen's
            factor = np_dtype(np_dtype(1) - np_dtype(np.power(compute(one_minus_d),
                                                              compute(step_np))))
            shadow_np = (biased_np / factor).astype(np_dtype)
        np.testing.assert_array_equal(to_numpy(biased, dtype).view(np.uint8),
                                      biased_np.view(np.uint8))
        np.testing.assert_array_equal(to_numpy(shadow, dtype).view(np.uint8),
                                      shadow_np.view(np.uint8))

    @parameterized.expand([(torch.float16, 2048), (torch.bfloat16, 256)])
    def test_local_step_saturates(self, dtype, limit):
        shadow, biased = torch.zeros(1, dtype=dtype), torch.zeros(1, dtype=dtype)
        local_step = torch.zeros((), dtype=dtype)
        d = tf_math.update_weight(tf_math.float32_decay(0.999), dtype)
        batch = kernels.Batch([shadow], [torch.ones(1, dtype=dtype)], biased=[biased])
        for _ in range(limit + 100):
            tf_math.zero_debias_(batch, [local_step], d)
        # limit + 1 is halfway between limit and limit + 2: it rounds to the even limit.
        self.assertEqual(float(local_step), float(limit))

    def test_constant_input_is_debiased_exactly_in_float64(self):
        # Closed form: biased = c * (1 - b**t), so biased / (1 - b**t) = c up to rounding.
        shadow, biased = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        local_step = torch.zeros((), dtype=torch.float64)
        d = tf_math.update_weight(tf_math.float32_decay(0.9), torch.float64)
        batch = kernels.Batch([shadow], [torch.full((1,), 3.0, dtype=torch.float64)],
                              biased=[biased])
        for _ in range(50):
            tf_math.zero_debias_(batch, [local_step], d)
            self.assertAlmostEqual(float(shadow), 3.0, places=12)
