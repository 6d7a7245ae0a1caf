"""ExponentialMovingAverage: the API, its state, and bad input (which must change nothing)."""
import copy
import unittest

import numpy as np
import torch
from parameterized import parameterized
from torch import nn

from tfcompat_ema import ExponentialMovingAverage


def f32_step(shadow, value, decay):
    """TF's update in independent numpy float32 arithmetic."""
    d = np.float32(1.0) - np.float32(decay)
    return (shadow - (shadow - value) * d).astype(np.float32)


def snapshot(ema):
    return {k: v.clone() for k, v in ema.state_dict().items()}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)


class ApplyTest(unittest.TestCase):
    def test_module_tracks_trainable_parameters_from_their_values(self):
        net = Net()
        ema = ExponentialMovingAverage(0.9)
        ema.apply(net)
        self.assertEqual(sorted(k for k in ema.state_dict()),
                         ["bn.bias/ExponentialMovingAverage", "bn.weight/ExponentialMovingAverage",
                          "fc.bias/ExponentialMovingAverage", "fc.weight/ExponentialMovingAverage"])
        self.assertTrue(torch.equal(ema.average(net.fc.weight), net.fc.weight))
        self.assertIsNone(ema.average(net.frozen))

    def test_tracks_by_reference_and_updates_like_tf(self):
        w = torch.tensor([1.0, -2.0, 3.0])
        ema = ExponentialMovingAverage(0.99)
        ema.apply({"w": w})
        expected = w.numpy().copy()
        for step in range(5):
            w.mul_(0.5).add_(step)
            ema.apply()
            expected = f32_step(expected, w.numpy(), 0.99)
        np.testing.assert_array_equal(ema.average("w").numpy(), expected)

    def test_subset_updates_only_the_subset(self):
        a, b = torch.zeros(2), torch.zeros(2)
        ema = ExponentialMovingAverage(0.5)
        ema.apply({"a": a, "b": b})
        a.fill_(1.0)
        b.fill_(1.0)
        ema.apply({"a": a})
        self.assertEqual(ema.average("a").tolist(), [0.5, 0.5])
        self.assertEqual(ema.average("b").tolist(), [0.0, 0.0])

    def test_pairs_and_aliases_of_the_same_memory(self):
        net = nn.Linear(2, 2)
        ema = ExponentialMovingAverage(0.5)
        ema.apply(list(net.named_parameters()))
        ema.apply(net.state_dict())      # detached views of the same memory: accepted
        self.assertIsNotNone(ema.average(net.weight))

    def test_new_storage_same_shape_is_followed(self):
        w = nn.Parameter(torch.zeros(3))
        ema = ExponentialMovingAverage(0.5)
        ema.apply({"w": w})
        ema.apply()
        w.data = torch.ones(3)           # new memory, same tensor object
        ema.apply()
        self.assertEqual(ema.average("w").tolist(), [0.5, 0.5, 0.5])

    @parameterized.expand([(torch.float16,), (torch.bfloat16,), (torch.float64,)])
    def test_shadow_keeps_dtype_and_device(self, dtype):
        w = torch.ones(3, dtype=dtype)
        ema = ExponentialMovingAverage(0.9)
        ema.apply({"w": w})
        self.assertEqual(ema.average("w").dtype, dtype)
        self.assertEqual(ema.average("w").device, w.device)

    def test_mixed_dtypes_in_one_apply(self):
        vars_ = {"h": torch.zeros(4, dtype=torch.float16), "f": torch.zeros(4),
                 "d": torch.zeros(4, dtype=torch.float64)}
        ema = ExponentialMovingAverage(0.5)
        ema.apply(vars_)
        for v in vars_.values():
            v.fill_(1.0)
        ema.apply()
        for name in vars_:
            self.assertEqual(ema.average(name).tolist(), [0.5] * 4)

    def test_no_autograd_history(self):
        net = nn.Linear(2, 2)
        ema = ExponentialMovingAverage(0.9)
        ema.apply(net)
        ema.apply()
        shadow = ema.average(net.weight)
        self.assertFalse(shadow.requires_grad)
        self.assertIsNone(shadow.grad_fn)
        with torch.no_grad():
            ema.apply()

    def test_channels_last_parameter(self):
        conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
        with torch.no_grad():      # integers: every step below is exact
            conv.weight.copy_(torch.arange(conv.weight.numel()).reshape(conv.weight.shape))
        ema = ExponentialMovingAverage(0.5)
        ema.apply(conv)
        before = conv.weight.detach().clone()
        with torch.no_grad():
            conv.weight.add_(2.0)
        ema.apply()
        self.assertTrue(torch.equal(ema.average(conv.weight), before + 1.0))


class DecayTest(unittest.TestCase):
    def test_decay_tensor_is_read_at_every_apply(self):
        decay = torch.tensor(0.9)
        w = torch.zeros(3)
        ema = ExponentialMovingAverage(decay)
        ema.apply({"w": w})
        expected = np.zeros(3, np.float32)
        for step, new_decay in enumerate([0.9, 0.5, 0.999, 0.0, 1.0]):
            decay.fill_(new_decay)
            w.fill_(step + 1.0)
            ema.apply()
            expected = f32_step(expected, w.numpy(), np.float32(new_decay))
        np.testing.assert_array_equal(ema.average("w").numpy(), expected)

    def test_callables(self):
        calls = []
        ema = ExponentialMovingAverage(lambda: calls.append(1) or 0.5,
                                       num_updates=lambda: 1000)
        w = torch.zeros(1)
        ema.apply({"w": w})
        w.fill_(1.0)
        ema.apply()
        self.assertEqual(len(calls), 2)       # read once per apply
        self.assertEqual(ema.average("w").item(), 0.5)

    def test_num_updates_caps_decay(self):
        w = torch.zeros(1)
        ema = ExponentialMovingAverage(0.999, num_updates=0)   # decay = min(.999, 1/10)
        ema.apply({"w": w})
        w.fill_(1.0)
        ema.apply()
        self.assertEqual(ema.average("w").item(),
                         float(f32_step(np.float32([0]), np.float32([1]), np.float32(0.1))[0]))

    def test_auto_counts_updates_and_saves_the_count(self):
        ema = ExponentialMovingAverage(0.999, num_updates="auto")
        w = torch.zeros(2)
        for _ in range(3):
            ema.apply({"w": w})
        ema.apply_tensors({"loss": torch.ones(())})
        self.assertEqual(ema.num_updates, 4)
        self.assertEqual(int(ema.state_dict()["num_updates"]), 4)
        self.assertIsNone(ExponentialMovingAverage(0.9).num_updates)


class TensorsTest(unittest.TestCase):
    def test_start_at_zero_without_debias(self):
        ema = ExponentialMovingAverage(0.5)
        ema.apply_tensors({"loss": torch.tensor(4.0)})
        self.assertEqual(ema.average("loss").item(), 2.0)
        self.assertEqual(list(ema.state_dict()), ["loss/ExponentialMovingAverage"])

    def test_debias_state_keys_and_value(self):
        ema = ExponentialMovingAverage(0.5, zero_debias=True)
        ema.apply_tensors({"loss": torch.tensor(4.0)})
        self.assertEqual(sorted(ema.state_dict()),
                         ["loss/ExponentialMovingAverage", "loss/ExponentialMovingAverage/biased",
                          "loss/ExponentialMovingAverage/local_step"])
        self.assertEqual(ema.average("loss").item(), 4.0)   # 2 / (1 - 0.5)

    def test_variables_are_never_debiased(self):
        ema = ExponentialMovingAverage(0.5, zero_debias=True)
        ema.apply({"w": torch.ones(2)})
        self.assertEqual(list(ema.state_dict()), ["w/ExponentialMovingAverage"])

    def test_tensor_requiring_grad(self):
        x = torch.ones(2, requires_grad=True)
        ema = ExponentialMovingAverage(0.5)
        ema.apply_tensors({"loss": (x * 2).sum()})
        self.assertFalse(ema.average("loss").requires_grad)


class NamingTest(unittest.TestCase):
    def test_average_name(self):
        ema = ExponentialMovingAverage(0.9, name="EMA_1")
        self.assertEqual(ema.name, "EMA_1")
        self.assertEqual(ema.average_name("dense/kernel"), "dense/kernel/EMA_1")  # before apply
        w = torch.zeros(1)
        ema.apply({"dense/kernel": w})
        self.assertEqual(ema.average_name(w), "dense/kernel/EMA_1")

    def test_variables_to_restore(self):
        net = Net()
        ema = ExponentialMovingAverage(0.9, zero_debias=True)
        ema.apply(net)
        ema.apply_tensors({"loss": torch.ones(())})
        restore = ema.variables_to_restore()
        self.assertIs(restore["fc.weight/ExponentialMovingAverage"], net.fc.weight)
        self.assertIs(restore["frozen"], net.frozen)
        self.assertIs(restore["bn.running_mean"], net.bn.running_mean)
        self.assertIn("bn.num_batches_tracked", restore)
        self.assertNotIn("fc.weight", restore)
        self.assertIn("loss/ExponentialMovingAverage/local_step", restore)
        subset = ema.variables_to_restore([net.fc.weight])
        self.assertIs(subset["fc.weight/ExponentialMovingAverage"], net.fc.weight)
        self.assertIs(subset["fc.bias"], net.fc.bias)

    def test_restoring_averages_into_a_model(self):
        net = Net()
        ema = ExponentialMovingAverage(0.5)
        ema.apply(net)
        with torch.no_grad():
            net.fc.weight.add_(2.0)
        ema.apply()
        saved = {k: v.clone() for k, v in {**net.state_dict(), **ema.state_dict()}.items()}
        fresh = Net()
        restore = ExponentialMovingAverage(0.5)
        restore.apply(fresh)
        with torch.no_grad():
            for key, target in restore.variables_to_restore().items():
                target.copy_(saved[key])
        self.assertTrue(torch.equal(fresh.fc.weight, ema.average(net.fc.weight)))


class EvaluationTest(unittest.TestCase):
    def setUp(self):
        self.net = nn.Linear(3, 2)
        self.ema = ExponentialMovingAverage(0.5)
        self.ema.apply(self.net)
        with torch.no_grad():
            self.net.weight.add_(1.0)
        self.ema.apply()
        self.live = {k: v.clone() for k, v in self.net.state_dict().items()}

    def test_copy_to(self):
        self.ema.copy_to(self.net)
        self.assertTrue(torch.equal(self.net.weight, self.ema.average("weight")))

    def test_swap_restores_exactly_even_after_an_error(self):
        with self.assertRaises(RuntimeError):
            with self.ema.average_parameters():
                self.assertTrue(torch.equal(self.net.weight, self.ema.average("weight")))
                raise RuntimeError("evaluation failed")
        for k, v in self.net.state_dict().items():
            self.assertTrue(torch.equal(v, self.live[k]))

    def test_to_device(self):
        self.assertIs(self.ema.to("cpu"), self.ema)
        self.ema.apply()


class StateDictTest(unittest.TestCase):
    def run_steps(self, ema, net, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(torch.randn(p.shape, generator=g))
            ema.apply(net)
            ema.apply_tensors({"loss": torch.randn((), generator=g)})

    @parameterized.expand([(torch.float32,), (torch.float16,), (torch.bfloat16,)])
    def test_resume_is_bit_identical(self, dtype):
        torch.manual_seed(0)
        net = nn.Linear(4, 3).to(dtype)
        twin = copy.deepcopy(net)
        full = ExponentialMovingAverage(0.99, num_updates="auto", zero_debias=True)
        self.run_steps(full, net, 7, seed=1)
        self.run_steps(full, net, 5, seed=2)

        first = ExponentialMovingAverage(0.99, num_updates="auto", zero_debias=True)
        self.run_steps(first, twin, 7, seed=1)
        saved = {k: v.clone() for k, v in first.state_dict().items()}
        resumed = ExponentialMovingAverage(0.99, num_updates="auto", zero_debias=True)
        resumed.load_state_dict(saved)               # before anything is applied
        self.run_steps(resumed, twin, 5, seed=2)
        self.assertEqual(sorted(resumed.state_dict()), sorted(full.state_dict()))
        for key, value in full.state_dict().items():
            self.assertTrue(torch.equal(resumed.state_dict()[key], value), key)

    def test_torch_save_round_trip_with_weights_only(self):
        import io
        ema = ExponentialMovingAverage(0.9, num_updates="auto")
        ema.apply({"w": torch.ones(3)})
        buffer = io.BytesIO()
        torch.save(ema.state_dict(), buffer)
        buffer.seek(0)
        other = ExponentialMovingAverage(0.9, num_updates="auto")
        other.load_state_dict(torch.load(buffer, weights_only=True))
        self.assertEqual(other.num_updates, 1)

    def test_its_own_empty_state_handed_back_is_refused(self):
        # what torch.distributed.checkpoint hands back for an EMA that had no averages
        # to load into: loading it would let the next apply restart the averages
        for auto in (False, True):
            ema = ExponentialMovingAverage(0.9, num_updates="auto" if auto else None)
            state = ema.state_dict()
            if auto:
                state["num_updates"].fill_(5)        # as DCP loads in place
            with self.assertRaisesRegex(ValueError, "no averages.*ema.apply"):
                ema.load_state_dict(state)
            self.assertEqual(ema.num_updates, 0 if auto else None)
            # a copy of it is DCP's leftover just the same
            copied = dict(ema.state_dict())
            with self.assertRaisesRegex(ValueError, "no averages.*ema.apply"):
                ema.load_state_dict(copied)
        # any other state without averages loads (a count to start from, an empty save)
        ema = ExponentialMovingAverage(0.9, num_updates="auto")
        ema.load_state_dict({"num_updates": torch.tensor(5)})
        self.assertEqual(ema.num_updates, 5)
        ExponentialMovingAverage(0.9).load_state_dict(ExponentialMovingAverage(0.9).state_dict())

    def test_loaded_average_is_checked_against_its_variable(self):
        ema = ExponentialMovingAverage(0.9)
        ema.load_state_dict({"w/ExponentialMovingAverage": torch.zeros(3)})
        with self.assertRaisesRegex(ValueError, "w/ExponentialMovingAverage"):
            ema.apply({"w": torch.zeros(4)})
        self.assertEqual(list(ema.state_dict()), ["w/ExponentialMovingAverage"])
        with self.assertRaisesRegex(ValueError, "no average for the new variable 'v'"):
            ema.apply({"v": torch.zeros(3)})


class BadInputTest(unittest.TestCase):
    """Each bad input raises a clear error naming the culprit, and changes no state."""

    def setUp(self):
        self.w = torch.ones(3)
        self.ema = ExponentialMovingAverage(0.9, num_updates="auto", zero_debias=True)
        self.ema.apply({"w": self.w})
        self.ema.apply_tensors({"loss": torch.tensor(2.0)})
        self.w.fill_(5.0)
        self.before = snapshot(self.ema)

    def assert_unchanged(self):
        after = self.ema.state_dict()
        self.assertEqual(sorted(after), sorted(self.before))
        for key, value in self.before.items():
            self.assertTrue(torch.equal(after[key], value), key)

    @parameterized.expand([(torch.int32,), (torch.int64,), (torch.bool,), (torch.complex64,),
                           (torch.uint8,)])
    def test_non_float_dtypes(self, dtype):
        with self.assertRaisesRegex(TypeError, "'bad'"):
            self.ema.apply({"w": self.w, "bad": torch.zeros(2, dtype=dtype)})
        with self.assertRaisesRegex(TypeError, "'bad'"):
            self.ema.apply_tensors({"bad": torch.zeros(2, dtype=dtype)})
        self.assert_unchanged()

    @parameterized.expand([(-0.1,), (1.5,), (float("nan"),), (float("inf"),)])
    def test_decay_out_of_range(self, decay):
        with self.assertRaisesRegex(ValueError, "decay"):
            ExponentialMovingAverage(decay)
        ema = ExponentialMovingAverage(torch.tensor(0.5))
        ema.apply({"w": self.w})
        before = ema.average("w").clone()
        ema._decay.fill_(decay)
        with self.assertRaisesRegex(ValueError, "decay"):
            ema.apply()
        self.assertTrue(torch.equal(ema.average("w"), before))

    def test_decay_wrong_type(self):
        with self.assertRaisesRegex(TypeError, "decay"):
            ExponentialMovingAverage("0.9")
        with self.assertRaisesRegex(ValueError, "0-dim"):
            ExponentialMovingAverage(torch.tensor([0.9, 0.9]))

    def test_negative_num_updates(self):
        with self.assertRaisesRegex(ValueError, "num_updates"):
            ExponentialMovingAverage(0.9, num_updates=-1)
        count = torch.tensor(3)
        ema = ExponentialMovingAverage(0.9, num_updates=count)
        ema.apply({"w": self.w})
        count.fill_(-5)
        before = ema.average("w").clone()
        with self.assertRaisesRegex(ValueError, "num_updates"):
            ema.apply()
        self.assertTrue(torch.equal(ema.average("w"), before))
        with self.assertRaisesRegex(ValueError, "integer"):
            ExponentialMovingAverage(0.9, num_updates=torch.tensor(1.5))

    def test_shape_changed(self):
        self.w.data = torch.ones(4)
        with self.assertRaisesRegex(ValueError, r"'w' has shape \(4,\)"):
            self.ema.apply()
        self.assert_unchanged()

    def test_dtype_changed(self):
        self.w.data = torch.ones(3, dtype=torch.float64)
        with self.assertRaisesRegex(ValueError, "'w'.*float64"):
            self.ema.apply()
        self.assert_unchanged()

    def test_two_tensors_under_one_name(self):
        with self.assertRaisesRegex(ValueError, "'w'"):
            self.ema.apply({"w": torch.ones(3)})
        with self.assertRaisesRegex(ValueError, "'x'"):
            self.ema.apply([("x", torch.ones(1)), ("x", torch.ones(1))])
        self.assert_unchanged()

    def test_variable_and_tensor_under_one_name(self):
        with self.assertRaisesRegex(ValueError, "'loss'"):
            self.ema.apply({"loss": torch.tensor(1.0)})
        with self.assertRaisesRegex(ValueError, "'w'"):
            self.ema.apply_tensors({"w": torch.ones(3)})
        self.assert_unchanged()

    def test_unknown_names(self):
        with self.assertRaisesRegex(KeyError, "'nope'"):
            self.ema.average("nope")
        with self.assertRaisesRegex(KeyError, "neither tracked"):
            self.ema.average_name(torch.zeros(1))
        self.assertIsNone(self.ema.average(torch.zeros(1)))

    def test_apply_before_tracking(self):
        with self.assertRaisesRegex(RuntimeError, "none are tracked"):
            ExponentialMovingAverage(0.9).apply()

    def test_tensor_with_new_shape(self):
        with self.assertRaisesRegex(ValueError, "'loss'"):
            self.ema.apply_tensors({"loss": torch.ones(2)})
        self.assert_unchanged()

    def test_not_a_name_tensor_mapping(self):
        with self.assertRaises(TypeError):
            self.ema.apply(torch.ones(3))
        with self.assertRaises(TypeError):
            self.ema.apply_tensors([("loss", torch.ones(()))])

    def test_load_missing_extra_misshaped_wrong_dtype(self):
        good = snapshot(self.ema)
        missing = dict(good)
        del missing["w/ExponentialMovingAverage"]
        extra = {**good, "z/ExponentialMovingAverage": torch.zeros(1)}
        misshaped = {**good, "w/ExponentialMovingAverage": torch.zeros(4)}
        wrong_dtype = {**good, "w/ExponentialMovingAverage": torch.zeros(3, dtype=torch.float64)}
        no_count = {k: v for k, v in good.items() if k != "num_updates"}
        for bad, pattern in ((missing, "missing.*w/Exponential"), (extra, "z/Exponential"),
                             (misshaped, "w/Exponential"), (wrong_dtype, "float64"),
                             (no_count, "num_updates")):
            for key in bad:
                if key in self.before and bad[key] is self.before[key]:
                    bad[key] = bad[key] + 1 if bad[key].is_floating_point() else bad[key]
            with self.assertRaisesRegex((KeyError, ValueError), pattern):
                self.ema.load_state_dict(bad)
            self.assert_unchanged()

    def test_load_into_fresh_object_checks_structure(self):
        fresh = ExponentialMovingAverage(0.9)
        with self.assertRaisesRegex(KeyError, "'w'"):
            fresh.load_state_dict({"w": torch.zeros(1)})
        with self.assertRaisesRegex(KeyError, "local_step"):
            fresh.load_state_dict({"l/ExponentialMovingAverage": torch.zeros(1),
                                   "l/ExponentialMovingAverage/biased": torch.zeros(1)})
        with self.assertRaisesRegex(KeyError, "num_updates"):
            fresh.load_state_dict({"num_updates": torch.tensor(3)})
        self.assertEqual(fresh.state_dict(), {})


class PortingExampleTest(unittest.TestCase):
    """The README's porting example against the TF1 code beside it, bitwise."""

    def test_auto_count_after_a_first_apply_reads_tf1s_incremented_global_step(self):
        from _tf import require
        tf = require()
        tf1 = tf.compat.v1
        rng = np.random.default_rng(0)
        inputs = [rng.standard_normal(3).astype(np.float32) for _ in range(6)]
        with tf.Graph().as_default():
            w = tf1.get_variable("w", initializer=np.array([1.0, -2.0, 3.0], np.float32))
            global_step = tf1.train.get_or_create_global_step()
            x = tf1.placeholder(tf.float32, [3])
            train_op = tf1.train.GradientDescentOptimizer(0.1).minimize(
                tf.reduce_sum(w * x), global_step=global_step)
            tf_ema = tf1.train.ExponentialMovingAverage(0.999, num_updates=global_step)
            with tf.control_dependencies([train_op]):
                train_op = tf_ema.apply([w])
            with tf1.Session() as sess:
                sess.run(tf1.global_variables_initializer())
                steps = []
                for value in inputs:
                    sess.run(train_op, {x: value})
                    steps.append((sess.run(w), sess.run(tf_ema.average(w))))
        p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
        ema = ExponentialMovingAverage(0.999, num_updates="auto")
        ema.apply({"w": p})                 # as the README: before the loop
        for weights, expected in steps:
            with torch.no_grad():
                p.copy_(torch.from_numpy(weights))
            ema.apply()
            np.testing.assert_array_equal(ema.average("w").numpy(), expected)
