"""What leaves an FSDP2 (``fully_shard``) model's averages for a checkpoint, on 2 CPU ranks (gloo)
with a hard time limit (tests/_ranks.py), in one multi-rank run:

- ``NameMap.export``: every rank gathers the DTensors whole; the averages equal numpy's per-op
  float32 arithmetic on full weights assembled independently (``all_gather_object`` of the
  local shards, not DTensor's redistribution), uneven and empty shards, both reshard
  settings; rank 0's TF checkpoint reads back (our reader, and TF's where installed);
  DTensors that cannot be gathered bitwise are refused on every rank before any collective.
- ``EMAModule``'s own ``state_dict`` through ``torch.distributed.checkpoint``: saved shard by
  shard, loaded into a fresh EMAModule on 2 ranks (after its first ``update()``) and resumed
  bitwise, loaded on 1 rank (2 -> 1), and refused, never restarted, without that ``update()``.
"""
import os
import tempfile
import unittest

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import _ranks
from _ranks import DECAY, numpy_of, reference_step, same_on_every_rank, train_step
from _tf import require

from tfcompat_ema import (EMAModule, ExponentialMovingAverage, NameMap, Rule, read_checkpoint,
                          write_checkpoint)

NAMES = NameMap([Rule("{i}", "dense_{i}", "dense")])
EMA = "ExponentialMovingAverage"


def plain_model(seed=0):
    """Uneven shards on 2 ranks: a (3, 6) weight (2 + 1 rows), and a (1, 3) one (1 + empty)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 1))


def sharded_model(seed, reshard_after_forward):
    from torch.distributed.fsdp import fully_shard
    model = plain_model(seed)
    fully_shard(model[0], reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    return model


def assembled(parameter):
    """The full weight from every rank's local shard (FSDP2 shards dim 0 in rank order),
    put together with numpy: independent of DTensor's own gathering."""
    shards = [None] * dist.get_world_size()
    dist.all_gather_object(shards, numpy_of(parameter))
    return np.concatenate(shards, axis=0)


def tf_layout(torch_state):
    """The TF variables a dense rule gives: kernel = weight transposed, bias as is."""
    out = {}
    for name, value in torch_state.items():
        index, kind = name.split(".")
        out[f"dense_{index}/{'kernel' if kind == 'weight' else 'bias'}"] = \
            np.ascontiguousarray(value.T) if kind == "weight" else value
    return out


def export_scenario(rank, tmp, reshard_after_forward):
    from torch.distributed.tensor import DTensor
    model = sharded_model(0, reshard_after_forward)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ExponentialMovingAverage(DECAY)
    reference = None
    for step in range(3):
        train_step(model, optimizer, rank, step)
        ema.apply(model)
        full = {name: assembled(p) for name, p in model.named_parameters()}
        reference = full if reference is None else {
            name: reference_step(reference[name], full[name], DECAY) for name in full}
    expected = tf_layout(full)
    expected.update({f"{k}/{EMA}": v for k, v in tf_layout(reference).items()})
    shards = {name: numpy_of(p) for name, p in model.named_parameters()}
    with torch.no_grad():
        model(torch.ones(2, 6))          # reshard_after_forward=False: left unsharded now

    tf_vars = NAMES.export(model, ema=ema)           # on every rank: it all-gathers

    assert sorted(tf_vars) == sorted(expected), sorted(tf_vars)
    for key, value in tf_vars.items():
        assert type(value) is torch.Tensor, (key, type(value))      # full, not a DTensor
        assert np.array_equal(value.numpy(), expected[key]), (rank, key)
        assert same_on_every_rank(value), key
    assert not np.array_equal(expected[f"dense_0/kernel/{EMA}"], expected["dense_0/kernel"])
    # export changed no shard (FSDP2's state_dict registers the sharded parameters again)
    for name, parameter in model.named_parameters():
        assert isinstance(parameter, DTensor) and np.array_equal(numpy_of(parameter),
                                                                 shards[name]), name
    prefix = os.path.join(tmp, f"export_{reshard_after_forward}", "model.ckpt")
    if rank == 0:
        write_checkpoint(prefix, tf_vars)
        np.savez(os.path.join(tmp, f"expected_{reshard_after_forward}.npz"), **{
            k.replace("/", "|"): v for k, v in expected.items()})
    dist.barrier()
    back = read_checkpoint(prefix).tensors
    assert sorted(back) == sorted(expected)
    for key, value in back.items():
        assert np.array_equal(value.numpy(), expected[key]), key


def refusal_scenario(rank):
    """DTensors export cannot gather bitwise: the same error on both ranks, before any
    collective (a rank that went on would wait for the other until the deadline)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    mesh_1d = init_device_mesh("cpu", (2,))
    mesh_2d = init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard"))
    for mesh, placements, culprit in ((mesh_1d, [Partial()], "the model's entry '0.weight'"),
                                      (mesh_2d, [Replicate(), Shard(0)],
                                       "the model's entry '0.weight'")):
        model = nn.Sequential(nn.Linear(2, 2))
        model[0].weight = nn.Parameter(DTensor.from_local(torch.ones(1, 2), mesh, placements))
        try:
            NAMES.export(model)
        except ValueError as error:
            assert culprit in str(error) and "1-D mesh" in str(error), error
        else:
            raise AssertionError(f"exported {placements}")
    # an average waiting in a fresh EMA (loaded, not applied yet) is checked as well
    model = nn.Sequential(nn.Linear(2, 2))
    ema = ExponentialMovingAverage(DECAY)
    ema.load_state_dict({f"0.weight/{EMA}": DTensor.from_local(
        torch.ones(1, 2), mesh_2d, [Replicate(), Shard(0)])})
    try:
        NAMES.export(model, ema=ema)
    except ValueError as error:
        assert "the average of '0.weight'" in str(error), error
    else:
        raise AssertionError("exported an average on a 2-D mesh")
    dist.barrier()


def module_dcp_scenario(rank, tmp, reshard_after_forward):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor
    checkpoint = os.path.join(tmp, f"module_{reshard_after_forward}")
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    model = sharded_model(0, reshard_after_forward)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)        # stateless: nothing to save
    wrapped = EMAModule(model, DECAY, num_updates="auto")
    for step in range(3):
        train_step(model, optimizer, rank, step)
        wrapped.update()
    saved = {k: (v.full_tensor() if isinstance(v, DTensor) else v).clone()
             for k, v in wrapped.ema.state_dict().items()}           # for the 2 -> 1 load
    saved.update({f"module.{n}": p.detach().full_tensor() for n, p in model.named_parameters()})
    if rank == 0:
        torch.save(saved, checkpoint + ".full.pt")
    dcp.save(wrapped.state_dict(), checkpoint_id=checkpoint)

    # a fresh EMAModule has no averages for DCP to load into: refused, never restarted
    fresh = EMAModule(sharded_model(1, reshard_after_forward), DECAY, num_updates="auto")
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=checkpoint)
    try:
        fresh.load_state_dict(state)
    except ValueError as error:
        assert "one update() of the EMAModule" in str(error), error
    else:
        raise AssertionError("loaded nothing and would restart the averages")
    assert list(fresh.ema.state_dict()) == ["num_updates"]

    # the documented order: update() once (the averages to load into), then load
    resumed_model = sharded_model(1, reshard_after_forward)
    resumed = EMAModule(resumed_model, DECAY, num_updates="auto")
    resumed.update()
    state = resumed.state_dict()
    dcp.load(state, checkpoint_id=checkpoint)
    resumed.load_state_dict(state)
    resumed_optimizer = torch.optim.SGD(resumed_model.parameters(), lr=0.1)
    with torch.no_grad():
        assert torch.equal(resumed.eval()(x), wrapped.eval()(x))
    resumed.train(), wrapped.train()
    for m, opt, w in ((model, optimizer, wrapped), (resumed_model, resumed_optimizer, resumed)):
        train_step(m, opt, rank, 3)
        w.update()
    ours, theirs = resumed.ema.state_dict(), wrapped.ema.state_dict()
    assert list(ours) == list(theirs) and int(ours["num_updates"]) == 4
    for key, value in theirs.items():
        assert type(ours[key]) is type(value), key
        assert np.array_equal(numpy_of(ours[key]), numpy_of(value)), (rank, key)


def scenario(rank, world, tmp):
    for reshard_after_forward in (True, False):
        export_scenario(rank, tmp, reshard_after_forward)
        module_dcp_scenario(rank, tmp, reshard_after_forward)
    refusal_scenario(rank)


class FSDP2CheckpointsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        _ranks.run(scenario, cls.tmp.name, timeout=30)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def expected(self, reshard_after_forward):
        with np.load(os.path.join(self.tmp.name, f"expected_{reshard_after_forward}.npz")) as f:
            return {k.replace("|", "/"): f[k] for k in f.files}

    def test_tf_reads_the_checkpoint_rank_0_wrote_from_the_gathered_export(self):
        tf = require()
        for reshard_after_forward in (True, False):
            prefix = os.path.join(self.tmp.name, f"export_{reshard_after_forward}",
                                  "model.ckpt")
            reader = tf.train.load_checkpoint(prefix)
            expected = self.expected(reshard_after_forward)
            self.assertEqual(sorted(reader.get_variable_to_shape_map()), sorted(expected))
            for key, value in expected.items():
                self.assertTrue(np.array_equal(reader.get_tensor(key), value), key)

    def test_ema_module_state_saved_on_2_ranks_loads_on_1(self):
        import torch.distributed.checkpoint as dcp
        for reshard_after_forward in (True, False):
            checkpoint = os.path.join(self.tmp.name, f"module_{reshard_after_forward}")
            saved = torch.load(checkpoint + ".full.pt")
            # the averages were saved shard by shard (2 chunks), not pickled whole by rank 0
            metadata = dcp.FileSystemReader(checkpoint).read_metadata().state_dict_metadata
            self.assertEqual(len(metadata[f"_extra_state.0.weight/{EMA}"].chunks), 2)
            wrapped = EMAModule(plain_model(seed=5), DECAY, num_updates="auto")
            state = wrapped.state_dict()
            dcp.load(state, checkpoint_id=checkpoint)
            with self.assertRaisesRegex(ValueError, "one update"):
                wrapped.load_state_dict(state)
            wrapped.update()
            state = wrapped.state_dict()
            dcp.load(state, checkpoint_id=checkpoint)
            wrapped.load_state_dict(state)
            ours = wrapped.ema.state_dict()
            self.assertEqual(int(ours.pop("num_updates")), int(saved.pop("num_updates")))
            for key, value in saved.items():
                mine = dict(wrapped.named_parameters())[key] if key.startswith("module.") \
                    else ours[key]
                self.assertTrue(torch.equal(mine, value), key)


if __name__ == "__main__":
    unittest.main()
