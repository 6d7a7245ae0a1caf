"""copy_to, average_parameters and variables_to_restore: what they write, and into what."""
import copy
import unittest

import pytest
import torch
from torch import nn

from tfcompat_ema import ExponentialMovingAverage


def trained_pair():
    """A model whose averages differ from its weights, and its EMA."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ema = ExponentialMovingAverage(0.5)
    ema.apply(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.apply()
    return model, ema


def values(module):
    return {n: p.detach().clone() for n, p in module.state_dict().items()}


class CopyToTest(unittest.TestCase):
    def test_copies_into_the_model_given_not_the_tracked_one(self):
        model, ema = trained_pair()
        live = values(model)
        eval_model = copy.deepcopy(model)
        ema.copy_to(eval_model)
        for name, p in eval_model.named_parameters():
            self.assertTrue(torch.equal(p, ema.average(name)), name)
        for name, value in values(model).items():
            self.assertTrue(torch.equal(value, live[name]), name)

    def test_average_parameters_swaps_the_model_given(self):
        model, ema = trained_pair()
        live = values(model)
        eval_model = copy.deepcopy(model)
        eval_live = values(eval_model)
        with ema.average_parameters(eval_model):
            for name, p in eval_model.named_parameters():
                self.assertTrue(torch.equal(p, ema.average(name)), name)
            for name, value in values(model).items():
                self.assertTrue(torch.equal(value, live[name]), name)
        for name, value in values(eval_model).items():
            self.assertTrue(torch.equal(value, eval_live[name]), name)

    def test_mismatched_target_is_refused_before_anything_is_copied(self):
        model, ema = trained_pair()
        other = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 3))      # "1.*" has other shapes
        before = values(other)
        with self.assertRaisesRegex(ValueError, "'1.weight'"):
            ema.copy_to(other)
        with self.assertRaisesRegex(ValueError, "'1.weight'"):
            with ema.average_parameters(other):
                self.fail("entered the block")
        for name, value in values(other).items():
            self.assertTrue(torch.equal(value, before[name]), name)

    def test_wrong_dtype_and_unknown_names_are_refused(self):
        model, ema = trained_pair()
        with self.assertRaisesRegex(ValueError, "dtype"):
            ema.copy_to(copy.deepcopy(model).double())
        with self.assertRaisesRegex(KeyError, "'2.weight'"):
            ema.copy_to({"2.weight": torch.zeros(2, 4)})

    def test_a_variable_whose_shape_changed_is_refused(self):
        model, ema = trained_pair()
        before = values(model)
        model[0].bias.data = torch.zeros(7)
        with self.assertRaisesRegex(ValueError, "'0.bias'"):
            ema.copy_to()
        with self.assertRaisesRegex(ValueError, "'0.bias'"):
            with ema.average_parameters():
                self.fail("entered the block")
        self.assertTrue(torch.equal(model[0].weight, before["0.weight"]))

    def test_failed_swap_in_puts_back_what_it_copied(self):
        model, ema = trained_pair()
        before = values(model)
        failing = torch.ones(2, 4, device="meta")
        with self.assertRaises((TypeError, ValueError)):
            with ema.average_parameters([("0.weight", model[0].weight), ("1.weight", failing)]):
                self.fail("entered the block")
        for name, value in values(model).items():
            self.assertTrue(torch.equal(value, before[name]), name)


class VariablesToRestoreTest(unittest.TestCase):
    def ours(self):
        v0, v1, v2 = (torch.tensor(x) for x in (10.0, 30.0, 20.0))
        ema = ExponentialMovingAverage(0.25, name="foo")
        ema.apply({"v0": v0, "v1": v1})
        restore = ema.variables_to_restore([v0, v1, ("v2", v2)])
        names = {id(v0): "v0", id(v1): "v1", id(v2): "v2"}
        return {key: names[id(target)] for key, target in restore.items()}

    def test_never_averaged_variables_map_under_their_average_name_as_in_tf(self):
        tf = pytest.importorskip("tensorflow")
        v0, v1, v2 = (tf.Variable(x, name=n) for x, n in ((10.0, "v0"), (30.0, "v1"),
                                                             (20.0, "v2")))
        ema = tf.train.ExponentialMovingAverage(0.25, name="foo")
        ema.apply([v0, v1])
        eager = {k: v.name.split(":")[0] for k, v in ema.variables_to_restore([v0, v1, v2]).items()}
        with tf.Graph().as_default():
            g = [tf.compat.v1.Variable(x, name=n) for x, n in ((10.0, "v0"), (30.0, "v1"),
                                                               (20.0, "v2"))]
            graph_ema = tf.compat.v1.train.ExponentialMovingAverage(0.25, name="foo")
            graph_ema.apply(g[:2])
            graph = {k: v.op.name for k, v in graph_ema.variables_to_restore(g).items()}
        self.assertEqual(eager, {"v0/foo": "v0", "v1/foo": "v1", "v2/foo": "v2"})
        self.assertEqual(graph, eager)
        self.assertEqual(self.ours(), eager)

    def test_module_entries_are_found_by_identity(self):
        model = nn.BatchNorm1d(2)
        ema = ExponentialMovingAverage(0.9)
        ema.apply(model)
        restore = ema.variables_to_restore([model.weight, model.running_var])
        self.assertIs(restore["running_var/ExponentialMovingAverage"], model.running_var)
        self.assertIs(restore["weight/ExponentialMovingAverage"], model.weight)
        self.assertIs(restore["bias"], model.bias)

    def test_fed_tensors_map_to_the_tensor_holding_their_average(self):
        ema = ExponentialMovingAverage(0.9)
        ema.apply_tensors({"loss": torch.tensor(2.0)})
        restore = ema.variables_to_restore(["loss"])
        self.assertIs(restore["loss/ExponentialMovingAverage"], ema.average("loss"))

    def test_an_unknown_tensor_is_refused_by_name(self):
        ema = ExponentialMovingAverage(0.9)
        ema.apply({"w": torch.ones(1)})
        with self.assertRaisesRegex(KeyError, "name, tensor"):
            ema.variables_to_restore([torch.ones(1)])


if __name__ == "__main__":
    unittest.main()
