"""tf_math against independent numpy arithmetic (and closed forms), never our own output."""
import struct
import unittest

import ml_dtypes
import numpy as np
import torch
from hypothesis import given, settings, strategies as st
from parameterized import parameterized

from tfcompat_ema import ExponentialMovingAverage, kernels, tf_math

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


def f32(x: float) -> float:
    """``x`` rounded to the nearest float32 (ties to even), through its 4-byte encoding."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def decay_by_struct(decay: float, n: int) -> float:
    """TF's capped decay in float32, op by op with Python floats rounded by ``f32``.

    Each op is computed in float64 and rounded once to float32: for +, - and / of float32
    operands that is the correctly rounded float32 result (53 >= 2 * 24 + 2 bits), and no
    numpy is involved, so it cannot depend on numpy's promotion rules.
    """
    n32 = f32(float(n))                  # math_ops.cast(num_updates, float32), n < 2**53
    cap = f32(f32(1.0 + n32) / f32(10.0 + n32))
    return min(f32(decay), cap)


def decays_by_torch(decay: float, counts: torch.Tensor) -> torch.Tensor:
    """The same, vectorised with torch float32 tensor ops (another independent float32)."""
    n = counts.to(torch.int64).to(torch.float32)
    return torch.minimum(torch.tensor(decay, dtype=torch.float32), (1 + n) / (10 + n))


class HostCountsAreFloat32Test(unittest.TestCase):
    """Host ``num_updates`` (Python ints, numpy ints, "auto", callables) give TF's float32
    decay whatever numpy's promotion rules: numpy 1.x promotes ``1.0 + np.float32(n)`` to
    float64. ``make test`` runs this on numpy 1.26 (the oldest stack) as well as on 2.x."""

    COUNTS = range(0, 200_000)

    def expected(self, decay: float) -> np.ndarray:
        return decays_by_torch(decay, torch.arange(len(self.COUNTS))).numpy()

    @parameterized.expand([(0.9999,), (0.999,), (1.0,)])
    def test_python_ints(self, decay):
        expected = self.expected(decay)
        got = [tf_math.float32_decay(decay, n) for n in self.COUNTS]
        self.assertTrue(all(type(d) is np.float32 for d in got[:1000]))
        np.testing.assert_array_equal(np.array(got, dtype=np.float32).view(np.uint32),
                                      expected.view(np.uint32))

    def test_numpy_ints(self):
        expected = self.expected(0.9999)
        for np_int in (np.int64, np.int32, np.uint32):
            got = np.array([tf_math.float32_decay(0.9999, np_int(n)) for n in self.COUNTS],
                           dtype=np.float32)
            np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32),
                                          err_msg=np_int.__name__)

    def test_update_weight_of_host_counts_is_float32(self):
        # The weight 1 - decay (in float32, then cast) is what the kernels read.
        n = torch.arange(0, 100_000)
        expected = (1 - decays_by_torch(0.9999, n)).numpy()
        got = np.array([float(tf_math.update_weight(tf_math.float32_decay(0.9999, int(k)),
                                                    torch.float32)) for k in n[::7]],
                       dtype=np.float32)
        np.testing.assert_array_equal(got.view(np.uint32), expected[::7].view(np.uint32))

    def test_struct_and_torch_references_agree(self):
        # The two references are independent of each other; check them against each other too.
        counts = list(range(0, 300)) + [4321, 89_990, 89_991, 2 ** 24 - 1, 2 ** 24 + 1,
                                        2 ** 24 + 3, 2 ** 31 - 1, 2 ** 31 + 7, 2 ** 40 + 5]
        by_torch = decays_by_torch(0.9999, torch.tensor(counts))
        for n, t in zip(counts, by_torch.tolist()):
            self.assertEqual(decay_by_struct(0.9999, n), t, n)

    def test_known_values(self):
        # n = 9: TF's weight 1 - 10/19 is 0.47368419 in float32; in float64, 0.47368422.
        self.assertEqual(float(tf_math.float32_decay(0.9999, 9)), f32(10 / 19))
        weight = tf_math.update_weight(tf_math.float32_decay(0.9999, 9), torch.float32)
        self.assertEqual(float(weight), float(np.float32("0.47368419")))
        self.assertEqual(f32(1 - 10 / 19), float(np.float32("0.47368422")))

    @settings(max_examples=500, deadline=None)
    @given(n=st.integers(0, 2 ** 53), decay=st.floats(0.0, 1.0))
    def test_any_count_and_decay(self, n, decay):
        self.assertEqual(float(tf_math.float32_decay(decay, n)), decay_by_struct(decay, n))
        self.assertEqual(float(tf_math.float32_decay(decay, np.int64(n))),
                         decay_by_struct(decay, n))

    def _ema_weights(self, num_updates, steps: int, reset=None):
        """The ``1 - decay`` each ``apply_tensors`` used, read off an average of ones."""
        ema = ExponentialMovingAverage(0.9999, num_updates=num_updates)
        one = torch.ones((), dtype=torch.float32)
        weights = []
        for t in range(steps):
            if reset is not None:
                reset(t)
            # From 0, one update towards 1 gives 0 - (0 - 1) * w = w exactly.
            ema.load_state_dict({"x/ExponentialMovingAverage": torch.zeros(()),
                                 **({"num_updates": torch.tensor(t)}
                                    if num_updates == "auto" else {})})
            ema.apply_tensors({"x": one})
            weights.append(float(ema.average("x")))
        return weights

    def expected_weights(self, counts):
        return [f32(1.0 - decay_by_struct(0.9999, n)) for n in counts]

    def test_auto_and_callable_counts_in_the_ema(self):
        steps = 3000                     # crosses n = 9, up to a few thousand
        self.assertEqual(self._ema_weights("auto", steps), self.expected_weights(range(steps)))
        step = [0]
        weights = self._ema_weights(lambda: step[0], steps, reset=lambda t: step.__setitem__(0, t))
        self.assertEqual(weights, self.expected_weights(range(steps)))
        for np_int in (np.int64, int):
            weights = self._ema_weights(lambda: np_int(step[0] * 977), 300,
                                        reset=lambda t: step.__setitem__(0, t))
            self.assertEqual(weights, self.expected_weights(range(0, 300 * 977, 977)))

    def test_host_int_counts_in_the_ema(self):
        for n in (9, 10, 4321, 89_990, 2 ** 24 + 1, 2 ** 31 + 7):
            ema = ExponentialMovingAverage(0.9999, num_updates=n)
            ema.apply_tensors({"x": torch.ones(())})
            self.assertEqual(float(ema.average("x")), f32(1.0 - decay_by_struct(0.9999, n)), n)


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
