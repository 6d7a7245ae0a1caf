"""Property tests: random sequences of valid and invalid calls on one EMA.

After every call: a failed call left every average, variable and the count bitwise
unchanged; a successful one left exactly what an independent per-op numpy reference
computes (float16/bfloat16 in float32, rounded after each op, as TF does). Values are
multiples of 2**-8 so that no result is subnormal where the kernel flushes them.
Also: concurrent apply() calls from threads take turns.
"""
import threading
import unittest

import ml_dtypes
import numpy as np
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from tfcompat_ema import ExponentialMovingAverage

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
STORAGE = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
           torch.bfloat16: ml_dtypes.bfloat16}
COMPUTE = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float32,
           torch.bfloat16: np.float32}
FAILURES = (TypeError, ValueError, KeyError, RuntimeError)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


def bits(a: np.ndarray) -> np.ndarray:
    return np.atleast_1d(a).view(np.uint8)


def op(dtype, fn, *args):
    """One op computed in the dtype's compute type, rounded to the dtype."""
    compute = COMPUTE[dtype]
    return np.asarray(fn(*(np.asarray(a).astype(compute) for a in args))).astype(STORAGE[dtype])


class Reference:
    """What the EMA should hold, computed with numpy."""

    def __init__(self, decay: float, zero_debias: bool):
        self.decay, self.zero_debias = decay, zero_debias
        self.state = {}            # state_dict key -> numpy array
        self.count = 0
        self.kinds = {}            # name -> "variable" | "tensor"

    def weight(self, dtype):
        n = np.float32(self.count)
        capped = np.minimum(np.float32(self.decay),
                            np.float32(np.float32(1) + n) / np.float32(np.float32(10) + n))
        return np.asarray(np.float32(1) - capped).astype(STORAGE[dtype])

    def update(self, key, value, dtype):
        d = self.weight(dtype)
        s = self.state[key]
        diff = op(dtype, np.subtract, s, value)
        self.state[key] = op(dtype, np.subtract, s, op(dtype, np.multiply, diff, d))

    def apply(self, pairs):
        for name, tensor in pairs:
            key = f"{name}/ExponentialMovingAverage"
            if key not in self.state:
                self.state[key] = to_numpy(tensor)
                self.kinds[name] = "variable"
            self.update(key, to_numpy(tensor), tensor.dtype)
        self.count += 1

    def apply_tensors(self, pairs):
        for name, tensor in pairs:
            key, dtype = f"{name}/ExponentialMovingAverage", tensor.dtype
            value = to_numpy(tensor)
            if key not in self.state:
                self.kinds[name] = "tensor"
                self.state[key] = np.zeros_like(value)
                if self.zero_debias:
                    self.state[key + "/biased"] = np.zeros_like(value)
                    self.state[key + "/local_step"] = np.zeros((), STORAGE[dtype])
            if not self.zero_debias:
                self.update(key, value, dtype)
                continue
            d = self.weight(dtype)
            step = op(dtype, np.add, self.state[key + "/local_step"], 1)
            self.state[key + "/local_step"] = step
            factor = op(dtype, np.subtract, 1, op(dtype, np.power,
                                                  op(dtype, np.subtract, 1, d), step))
            self.update(key + "/biased", value, dtype)
            self.state[key] = op(dtype, np.divide, self.state[key + "/biased"], factor)
        self.count += 1


def random_values(data, shape, dtype):
    ints = data.draw(st.lists(st.integers(-4096, 4096), min_size=int(np.prod(shape)),
                              max_size=int(np.prod(shape))))
    return (torch.tensor(ints, dtype=torch.float64) / 256).reshape(shape).to(dtype)


def make_variable(data, name):
    dtype = data.draw(st.sampled_from(DTYPES), label=f"{name} dtype")
    layout = data.draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    shape = data.draw(st.sampled_from([(3,), (2, 3), (3, 3), (2, 1, 2)]))
    base = random_values(data, shape if layout != "strided" else (shape[0] * 2,) + shape[1:],
                         dtype)
    if layout == "transposed" and base.dim() >= 2:
        return base.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "strided":
        return base[::2]
    return base


class Harness:
    def __init__(self, test, data):
        self.test, self.data = test, data
        decay = data.draw(st.sampled_from([0.0, 0.5, 0.9, 0.999, 1.0]), label="decay")
        debias = data.draw(st.booleans(), label="zero_debias")
        self.ema = ExponentialMovingAverage(decay, num_updates="auto", zero_debias=debias)
        self.ref = Reference(decay, debias)
        self.variables = {f"v{i}": make_variable(data, f"v{i}") for i in range(3)}
        self.fed = {f"t{i}": (data.draw(st.sampled_from(DTYPES)), (2,)) for i in range(2)}
        self.snapshots = []

    # ----------------------------------------------------------- checks
    def observed(self):
        state = {k: to_numpy(v) for k, v in self.ema.state_dict().items() if k != "num_updates"}
        return state, self.ema.num_updates, {n: to_numpy(v) for n, v in self.variables.items()}

    def assert_equal_state(self, expected, actual):
        self.test.assertEqual(sorted(expected), sorted(actual))
        for key in expected:
            np.testing.assert_array_equal(bits(expected[key]), bits(actual[key]),
                                          err_msg=key)

    def assert_matches_reference(self):
        state, count, _ = self.observed()
        self.assert_equal_state(self.ref.state, state)
        self.test.assertEqual(count, self.ref.count)

    def expect_failure(self, call):
        before = self.observed()
        with self.test.assertRaises(FAILURES):
            call()
        after = self.observed()
        self.assert_equal_state(before[0], after[0])
        self.test.assertEqual(before[1], after[1])
        self.assert_equal_state(before[2], after[2])

    def tracked(self):
        return [n for n, kind in self.ref.kinds.items() if kind == "variable"]

    # ----------------------------------------------------------- steps
    def step(self):
        kind = self.data.draw(st.sampled_from(
            ["mutate", "apply", "apply", "apply_tensors", "copy_to", "average_parameters",
             "snapshot", "load", "to"]), label="call")
        getattr(self, "do_" + kind)()

    def do_mutate(self):
        name = self.data.draw(st.sampled_from(sorted(self.variables)))
        v = self.variables[name]
        with torch.no_grad():
            v.copy_(random_values(self.data, tuple(v.shape), v.dtype))

    def do_apply(self):
        names = self.data.draw(st.lists(st.sampled_from(sorted(self.variables)), unique=True,
                                        max_size=3), label="apply names")
        pairs = [(n, self.variables[n]) for n in names]
        bad = self.data.draw(st.sampled_from([None, None, "duplicate", "int", "shape", "meta",
                                              "other tensor", "fed name"]), label="apply bad")
        if bad is None and not names:
            if self.tracked():
                self.ema.apply()
                self.ref.apply([(n, self.variables[n]) for n in self.tracked()])
            else:
                self.expect_failure(lambda: self.ema.apply())
            return
        if bad is None:
            self.ema.apply(pairs)
            self.ref.apply(pairs)
            return
        name = names[0] if names else "v0"
        broken = {"duplicate": pairs + [(name, self.variables[name])] * (2 - (name in names)),
                  "int": pairs + [("i", torch.ones(2, dtype=torch.int32))],
                  "shape": pairs + [("v0", torch.zeros(7))],
                  "meta": pairs + [("m", torch.ones(2, device="meta"))],
                  "other tensor": pairs + [("v1", self.variables["v1"].clone())],
                  "fed name": pairs + [("t0", torch.ones(2))]}[bad]
        if bad == "other tensor" and "v1" not in self.tracked():
            broken.append(("v1", self.variables["v1"]))   # a second tensor under one name
        if bad == "fed name" and self.ref.kinds.get("t0") != "tensor":
            broken += [("t0", torch.ones(3))]
        if bad == "shape" and "v0" not in self.tracked():
            broken += [("v0", self.variables["v0"])]
        self.expect_failure(lambda: self.ema.apply(broken))

    def do_apply_tensors(self):
        names = self.data.draw(st.lists(st.sampled_from(sorted(self.fed)), unique=True,
                                        min_size=1, max_size=2))
        values = {n: random_values(self.data, self.fed[n][1], self.fed[n][0]) for n in names}
        bad = self.data.draw(st.sampled_from([None, None, "int", "variable name", "shape"]))
        if bad is None:
            self.ema.apply_tensors(values)
            self.ref.apply_tensors(list(values.items()))
            return
        if bad == "int":
            values["t9"] = torch.ones(2, dtype=torch.int64)
        elif bad == "variable name":
            if not self.tracked():
                return
            values[self.tracked()[0]] = torch.ones(2)
        elif names[0] in self.ref.kinds:        # a shape other than its average's
            values[names[0]] = torch.ones(5, dtype=self.fed[names[0]][0])
        else:
            return
        self.expect_failure(lambda: self.ema.apply_tensors(values))

    def targets(self):
        return {n: torch.empty_like(self.variables[n]).fill_(-1) for n in self.tracked()}

    def do_copy_to(self):
        targets = self.targets()
        if targets and self.data.draw(st.booleans(), label="copy_to bad"):
            name = sorted(targets)[0]
            targets[name] = torch.zeros(11, dtype=targets[name].dtype)
            fresh = {n: t.clone() for n, t in targets.items()}
            self.expect_failure(lambda: self.ema.copy_to(targets))
            for n, t in targets.items():
                self.test.assertTrue(torch.equal(t, fresh[n]), n)
            return
        self.ema.copy_to(targets)
        for n, t in targets.items():
            np.testing.assert_array_equal(
                bits(to_numpy(t)), bits(self.ref.state[f"{n}/ExponentialMovingAverage"]))

    def do_average_parameters(self):
        if not self.tracked():
            return
        if self.data.draw(st.booleans(), label="swap bad"):
            broken = [(n, self.variables[n]) for n in self.tracked()] + \
                [("x", torch.ones(2, device="meta"))]
            self.expect_failure(lambda: self.ema.average_parameters(broken).__enter__())
            return
        before = self.observed()
        with self.ema.average_parameters():
            for n in self.tracked():
                np.testing.assert_array_equal(
                    bits(to_numpy(self.variables[n])),
                    bits(self.ref.state[f"{n}/ExponentialMovingAverage"]))
        self.assert_equal_state(before[2], self.observed()[2])

    def do_snapshot(self):
        self.snapshots.append(({k: v.clone() for k, v in self.ema.state_dict().items()},
                               {k: v.copy() for k, v in self.ref.state.items()}, self.ref.count))

    def do_load(self):
        if not self.snapshots or not self.ref.state:
            return
        state, ref_state, count = self.data.draw(st.sampled_from(self.snapshots))
        corrupt = self.data.draw(st.sampled_from([None, "meta", "shape", "sparse"]))
        if corrupt is None and sorted(ref_state) == sorted(self.ref.state):
            self.ema.load_state_dict(state)
            self.ref.state = {k: v.copy() for k, v in ref_state.items()}
            self.ref.count = count
            return
        state = dict(state)
        if corrupt is not None and ref_state:
            key = sorted(ref_state)[-1]
            state[key] = {"meta": lambda t: t.to("meta"), "shape": lambda t: t.reshape(-1)[:0],
                          "sparse": lambda t: t.reshape(-1).to_sparse()}[corrupt](state[key])
        if sorted(ref_state) == sorted(self.ref.state) and corrupt is None:
            return
        self.expect_failure(lambda: self.ema.load_state_dict(state))

    def do_to(self):
        if self.data.draw(st.booleans(), label="to bad"):
            self.expect_failure(lambda: self.ema.to(torch.float16))
        else:
            self.ema.to("cpu")


class PropertyTest(unittest.TestCase):
    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def test_random_call_sequences(self, data):
        harness = Harness(self, data)
        for _ in range(data.draw(st.integers(1, 12), label="calls")):
            harness.step()
            harness.assert_matches_reference()


class ThreadsTest(unittest.TestCase):
    def test_concurrent_applies_take_turns(self):
        w = torch.full((1 << 18,), 1.0)
        ema = ExponentialMovingAverage(0.99, num_updates="auto")
        ema.apply({"w": w})
        with torch.no_grad():
            w.fill_(3.0)
        errors = []

        def work():
            try:
                for _ in range(50):
                    ema.apply()
            except Exception as error:          # reported below, not swallowed
                errors.append(error)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        self.assertEqual(errors, [])
        ref = Reference(0.99, False)
        ref.state["w/ExponentialMovingAverage"] = np.ones(1 << 18, np.float32)
        ref.count = 1
        for _ in range(200):
            ref.update("w/ExponentialMovingAverage", np.full(1 << 18, 3.0, np.float32),
                       torch.float32)
            ref.count += 1
        self.assertEqual(ema.num_updates, 201)
        np.testing.assert_array_equal(to_numpy(ema.average("w")),
                                      ref.state["w/ExponentialMovingAverage"])


if __name__ == "__main__":
    unittest.main()
