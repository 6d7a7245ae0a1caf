"""Bad input to ExponentialMovingAverage: an error naming the culprit, and no state changed."""
import unittest

import numpy as np
import torch
from torch import nn

from tfcompat_ema import EMAModule, ExponentialMovingAverage


def snapshot(ema):
    return {k: v.clone() for k, v in ema.state_dict().items()}


class StateKeeper(unittest.TestCase):
    """A tracked variable and a debiased fed tensor; assert_unchanged after each failure."""

    def setUp(self):
        self.w = torch.ones(3)
        self.ema = ExponentialMovingAverage(0.9, num_updates="auto", zero_debias=True)
        self.ema.apply({"w": self.w})
        self.ema.apply_tensors({"loss": torch.tensor(2.0)})
        self.before = snapshot(self.ema)
        self.slots_before = sorted(self.ema._slots)

    def assert_unchanged(self):
        after = self.ema.state_dict()
        self.assertEqual(sorted(after), sorted(self.before))
        for key, value in self.before.items():
            self.assertTrue(torch.equal(after[key], value), key)
        self.assertEqual(sorted(self.ema._slots), self.slots_before)


class DuplicatesAndCollisionsTest(StateKeeper):
    def test_the_same_pair_twice_is_refused(self):
        with self.assertRaisesRegex(ValueError, "'w' is listed twice"):
            self.ema.apply([("w", self.w), ("w", self.w)])
        self.assert_unchanged()

    def test_ema_names_that_collide_with_debias_keys_are_refused(self):
        for name in ("biased", "local_step", "outer/biased"):
            with self.assertRaisesRegex(ValueError, "collide"):
                ExponentialMovingAverage(0.9, name=name)

    def test_untracked_empty_tensor_has_no_average(self):
        ema = ExponentialMovingAverage(0.9)
        tracked = torch.zeros(0)
        ema.apply({"e": tracked})
        self.assertIs(ema.average(tracked), ema.average("e"))
        self.assertIsNone(ema.average(torch.zeros(0)))
        self.assertIsNone(ema.average(torch.zeros(0, 3)))


class CountsTest(unittest.TestCase):
    def decay_after_one_apply(self, num_updates):
        w = torch.zeros(1)
        ema = ExponentialMovingAverage(0.5, num_updates=num_updates)
        ema.apply({"w": w})
        w.fill_(1.0)
        ema.apply()
        return 1.0 - float(ema.average("w"))     # shadow = 0 + (1 - 0) * (1 - decay)

    def test_huge_unsigned_counts_do_not_wrap(self):
        # TF casts a uint64 count straight to float32: (1 + n) / (10 + n) rounds to 1.
        self.assertEqual(self.decay_after_one_apply(np.uint64(2 ** 64 - 1)), 0.5)
        self.assertEqual(self.decay_after_one_apply(torch.tensor(2 ** 64 - 1,
                                                                 dtype=torch.uint64)), 0.5)
        self.assertEqual(self.decay_after_one_apply(torch.tensor(200, dtype=torch.uint8)), 0.5)

    def test_counts_beyond_int64_are_refused(self):
        with self.assertRaisesRegex(ValueError, "int64"):
            ExponentialMovingAverage(0.5, num_updates=2 ** 63)
        ema = ExponentialMovingAverage(0.5, num_updates=lambda: 2 ** 64 - 1)
        with self.assertRaisesRegex(ValueError, "int64"):
            ema.apply({"w": torch.zeros(1)})
        self.assertEqual(ema.state_dict(), {})

    def test_bad_counts_in_a_state_are_refused(self):
        ema = ExponentialMovingAverage(0.5, num_updates="auto")
        for count in (torch.tensor(True), torch.tensor(1 + 2j), torch.tensor(1.0),
                      torch.tensor(-1), torch.tensor([1])):
            with self.assertRaisesRegex(ValueError, "num_updates"):
                ema.load_state_dict({"num_updates": count})
        self.assertEqual(ema.num_updates, 0)


class DebiasStateTest(unittest.TestCase):
    def test_debiased_ema_refuses_a_state_without_debias_state(self):
        source = ExponentialMovingAverage(0.9)
        source.apply_tensors({"loss": torch.tensor(3.0)})
        target = ExponentialMovingAverage(0.9, zero_debias=True)
        target.load_state_dict(source.state_dict())
        with self.assertRaisesRegex(ValueError, "zero-debias"):
            target.apply_tensors({"loss": torch.tensor(1.0)})
        self.assertEqual(float(target.average("loss")), float(source.average("loss")))

    def test_plain_ema_refuses_a_debiased_state(self):
        source = ExponentialMovingAverage(0.9, zero_debias=True)
        source.apply_tensors({"loss": torch.tensor(3.0)})
        target = ExponentialMovingAverage(0.9)
        with self.assertRaisesRegex(ValueError, "zero-debias"):
            target.load_state_dict(source.state_dict())      # found at load time
        self.assertEqual(target.state_dict(), {})


class FirstApplyTest(unittest.TestCase):
    """A refused first apply leaves no average behind."""

    def assert_refused(self, bad_pairs, error=(TypeError, ValueError)):
        ema = ExponentialMovingAverage(0.9)
        ema.apply({"ok": torch.ones(2)})
        with self.assertRaises(error):
            ema.apply([("ok", ema._slots["ok"].var), ("new", torch.ones(2))] + bad_pairs)
        self.assertEqual(list(ema.state_dict()), ["ok/ExponentialMovingAverage"])

    def test_sparse_variable(self):
        self.assert_refused([("s", torch.eye(2).to_sparse())])

    def test_uninitialised_lazy_module(self):
        self.assert_refused(list(nn.LazyLinear(3).named_parameters()))

    def test_nested_tensor(self):
        nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
        self.assert_refused([("n", nested)])

    def test_meta_variable(self):
        self.assert_refused([("m", torch.ones(2, device="meta"))])

    def test_meta_decay(self):
        with self.assertRaisesRegex(ValueError, "meta"):
            ExponentialMovingAverage(torch.tensor(0.9, device="meta"))
        ema = ExponentialMovingAverage(lambda: torch.tensor(0.9, device="meta"))
        with self.assertRaisesRegex(ValueError, "meta"):
            ema.apply({"w": torch.ones(2)})
        self.assertEqual(ema.state_dict(), {})

    def test_meta_num_updates(self):
        with self.assertRaisesRegex(ValueError, "meta"):
            ExponentialMovingAverage(0.9, num_updates=torch.tensor(1, device="meta"))

    def test_tensor_subclass_variable(self):
        class Tagged(torch.Tensor):
            pass
        self.assert_refused([("t", torch.ones(2).as_subclass(Tagged))], error=TypeError)


class LoadStateTest(StateKeeper):
    def test_meta_and_sparse_values_change_nothing(self):
        for bad in (torch.ones(3, device="meta"), torch.ones(3).to_sparse()):
            state = {**self.before, "w/ExponentialMovingAverage": bad}
            state["loss/ExponentialMovingAverage"] = torch.tensor(99.0)   # a good one first
            with self.assertRaises((TypeError, ValueError)):
                self.ema.load_state_dict(state)
            self.assert_unchanged()


class InferenceModeTest(unittest.TestCase):
    def test_averages_made_under_inference_mode_update_later(self):
        emas = [ExponentialMovingAverage(0.5, zero_debias=True) for _ in range(2)]
        for index, ema in enumerate(emas):
            ema.apply_tensors({"a": torch.tensor(2.0)})
            with torch.inference_mode(index == 0):
                ema.apply_tensors({"b": torch.tensor(4.0)})
            ema.apply_tensors({"a": torch.tensor(1.0), "b": torch.tensor(3.0)})
        for key, value in emas[1].state_dict().items():
            self.assertTrue(torch.equal(emas[0].state_dict()[key], value), key)

    def test_state_loaded_under_inference_mode_updates_later(self):
        ema = ExponentialMovingAverage(0.5)
        with torch.inference_mode():
            ema.load_state_dict({"w/ExponentialMovingAverage": torch.zeros(2)})
        w = torch.ones(2)
        ema.apply({"w": w})
        self.assertTrue(torch.equal(ema.average("w"), torch.full((2,), 0.5)))


class MessagesTest(StateKeeper):
    def test_to_refuses_dtypes(self):
        with self.assertRaisesRegex(TypeError, "dtype"):
            self.ema.to(torch.float16)
        with self.assertRaisesRegex(TypeError, "device"):
            self.ema.to(None)
        self.assert_unchanged()
        self.ema.apply()

    def test_accessors_name_their_argument(self):
        with self.assertRaisesRegex(TypeError, "average.. takes a tensor or its name, got int"):
            self.ema.average(5)
        with self.assertRaisesRegex(TypeError, "got NoneType"):
            self.ema.average_name(None)

    def test_constructor_arguments(self):
        with self.assertRaisesRegex(ValueError, r"decay must be in \[0, 1\]"):
            ExponentialMovingAverage(10 ** 400)
        with self.assertRaisesRegex(TypeError, "zero_debias must be True or False"):
            ExponentialMovingAverage(0.9, zero_debias="no")
        with self.assertRaisesRegex(TypeError, "num_updates"):
            ExponentialMovingAverage(0.9, num_updates=True)
        with self.assertRaisesRegex(TypeError, "nn.Module, got NoneType"):
            EMAModule(None, 0.9)


class EMAModuleTest(unittest.TestCase):
    def test_a_state_of_other_names_is_not_evaluated_as_live_weights(self):
        trained = EMAModule(nn.Sequential(nn.Linear(2, 2)), 0.9)
        trained.update()
        other = EMAModule(nn.Linear(2, 2), 0.9)       # names "weight", not "0.weight"
        other.ema.load_state_dict(trained.ema.state_dict())
        with self.assertRaisesRegex(RuntimeError, "have none"):
            other.eval()(torch.ones(1, 2))


if __name__ == "__main__":
    unittest.main()


class FoundByNewUsersTest(StateKeeper):
    """Found by trying the library from its README (hostile new-user sessions)."""

    def test_copy_to_refuses_unwritable_targets_before_writing(self):
        ema = ExponentialMovingAverage(0.9)
        ema.apply({"a": torch.ones(3), "x": torch.ones(5, 8)})
        with torch.inference_mode():
            frozen = torch.zeros(5, 8)
        for bad, message in ((torch.zeros(1, 8).expand(5, 8), "share memory"),
                             (frozen, "inference"), (ema.average("x"), "an average")):
            first = torch.zeros(3)
            with self.assertRaisesRegex(ValueError, f"target 'x'.*{message}"):
                ema.copy_to({"a": first, "x": bad})
            self.assertTrue(torch.equal(first, torch.zeros(3)), message)
        strided = torch.zeros(10, 8)[::2]               # not dense, but no shared elements
        ema.copy_to({"x": strided})
        self.assertTrue(torch.equal(strided, ema.average("x")))

    def test_meta_device_is_refused(self):
        with self.assertRaisesRegex(ValueError, "meta"):
            self.ema.to("meta")
        self.assert_unchanged()

    def test_one_variable_has_one_average(self):
        with self.assertRaisesRegex(ValueError, "'alias' is the tensor averaged as 'w'"):
            self.ema.apply({"alias": self.w})
        v = torch.ones(2)
        with self.assertRaisesRegex(ValueError, "'q' is the tensor averaged as 'p'"):
            self.ema.apply({"p": v, "q": v})
        self.assert_unchanged()
        self.assertEqual(self.ema.average_name(self.w), "w/ExponentialMovingAverage")

    def test_the_automatic_count_stops_at_int64(self):
        state = dict(self.before)
        state["num_updates"] = torch.tensor(2 ** 63 - 1)
        self.ema.load_state_dict(state)
        with self.assertRaisesRegex(ValueError, "int64"):
            self.ema.apply()
        self.assertEqual(self.ema.num_updates, 2 ** 63 - 1)
        self.ema.state_dict()                          # still saveable

    def test_loaded_average_mismatch_names_both_sides(self):
        ema = ExponentialMovingAverage(0.9)
        ema.load_state_dict({"w/ExponentialMovingAverage": torch.zeros(3, 4, dtype=torch.float64)})
        with self.assertRaisesRegex(ValueError, r"'w' has shape \(3, 5\) and dtype torch.float32, "
                                                r"but its loaded average"):
            ema.apply({"w": torch.zeros(3, 5)})
        with self.assertRaisesRegex(ValueError, "empty"):
            ema.apply({"": torch.zeros(3, 4, dtype=torch.float64)})
