"""DTensor averages under FSDP2 (``fully_shard``) on 2 CPU ranks (gloo), each in its own process
with a hard time limit (tests/_ranks.py): exact on every local shard against numpy's per-op
float32 arithmetic, in place, uneven and empty shards, both reshard settings, the torch path;
DCP save on 2 ranks, load on 2 (resume bitwise) and on 1; evaluation under FSDP2."""
import os
import tempfile
import unittest

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import _ranks
from _ranks import DECAY, numpy_of, reference_step, train_step

from tfcompat_ema import EMAModule, ExponentialMovingAverage


def plain_model():
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3), nn.Linear(3, 1))


def sharded_model(seed, reshard_after_forward):
    """Uneven shards on 2 ranks: 7 rows (4 + 3), 3 (2 + 1), and 1 row (1 + an empty shard)."""
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3), nn.Linear(3, 1))
    for layer in (model[0], model[2]):
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    return model


FSDP_NAMES = ["0.weight", "0.bias", "2.weight", "2.bias", "3.weight", "3.bias"]


def fsdp_scenario(rank, world, tmp):
    for reshard_after_forward in (True, False):
        one_fsdp_scenario(rank, tmp, reshard_after_forward)
    # the pure-torch path (CUDA's, and CPU's without the compiled kernel), cut in slices
    # as large parameters are: slices of local shards, not of DTensors
    import warnings
    from tfcompat_ema import kernels
    kernels._fused, kernels.CHUNK_BYTES = None, 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # "compiled kernel not installed"
        one_fsdp_scenario(rank, tmp, "torch path")


def one_fsdp_scenario(rank, tmp, tag):
    reshard_after_forward = tag is not False
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor
    model = sharded_model(0, reshard_after_forward)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ExponentialMovingAverage(DECAY, num_updates="auto")
    train_step(model, optimizer, rank, 0)
    ema.apply(model)
    first = {name: numpy_of(p) for name, p in model.named_parameters()}
    reference = dict(first)
    pointers = {n: ema.average(n).to_local().data_ptr() for n in FSDP_NAMES}
    plan = next(iter(ema._plans.values()))
    for step in range(1, 4):
        train_step(model, optimizer, rank, step)
        ema.apply(model)
        for name, parameter in model.named_parameters():
            # num_updates counts: decay = min(DECAY, (1 + n) / (10 + n)) in float32
            decay = min(np.float32(DECAY), np.float32(1 + step) / np.float32(10 + step))
            reference[name] = reference_step(reference[name], numpy_of(parameter), decay)
    assert [n for n, _ in model.named_parameters()] == FSDP_NAMES
    for name, parameter in model.named_parameters():
        average = ema.average(name)
        assert isinstance(average, DTensor) and average.placements == parameter.placements
        assert average.device_mesh == parameter.device_mesh and average.shape == parameter.shape
        assert np.array_equal(numpy_of(average), reference[name]), (rank, name)
        assert average.to_local().data_ptr() == pointers[name]          # updated in place
        assert ema.average(parameter) is average
        assert ema.average(DTensor.from_local(parameter.to_local().clone(),
                                              parameter.device_mesh,
                                              parameter.placements)) is None
    for call, error in ((lambda: ema.apply_tensors({"w": model[0].weight}), "DTensor"),
                        (lambda: ema.copy_to([("0.weight", ema.average("0.weight"))]),
                         "shares memory with an average"),
                        (lambda: ema.apply({"0.weight": model[2].weight}),
                         "'0.weight' is the tensor averaged as '2.weight'"),
                        (lambda: ema.apply({"0.weight": DTensor.from_local(
                            model[0].weight.to_local().clone(), model[0].weight.device_mesh,
                            model[0].weight.placements)}), "two different tensors")):
        try:
            call()
        except (TypeError, ValueError) as caught:
            assert error in str(caught), caught
        else:
            raise AssertionError(f"no error: {error}")
    empty = [n for n in FSDP_NAMES if ema.average(n).to_local().numel() == 0]
    assert empty == (["3.weight", "3.bias"] if rank == 1 else []), empty
    assert list(ema._plans.values()) == [plan]       # planned once, reused every step
    fused = sum(len(batch._fused_index) for _, batch in plan.batches)
    from tfcompat_ema import kernels
    if tag == "torch path" or kernels._fused is None:
        assert fused == 0, fused
    else:
        assert fused == (6 if rank == 0 else 4), fused               # every non-empty shard

    # save on 2 ranks, load on 2 ranks (into averages made first), resume bitwise
    saved = {k: (v.full_tensor() if isinstance(v, DTensor) else v).clone()
             for k, v in ema.state_dict().items()}
    if rank == 0:
        torch.save(saved, os.path.join(tmp, f"full_{tag}.pt"))
    checkpoint = os.path.join(tmp, f"dcp_{tag}")
    dcp.save({"ema": ema.state_dict()}, checkpoint_id=checkpoint)
    resumed = ExponentialMovingAverage(DECAY, num_updates="auto")
    resumed.apply(model)                         # averages to load into: the call order
    state = {"ema": resumed.state_dict()}
    dcp.load(state, checkpoint_id=checkpoint)
    resumed.load_state_dict(state["ema"])
    train_step(model, optimizer, rank, 4)
    ema.apply(model)
    resumed.apply(model)
    for key, value in ema.state_dict().items():
        mine = resumed.state_dict()[key]
        assert type(mine) is type(value), key
        assert np.array_equal(numpy_of(mine), numpy_of(value)), key

    # a plain (full) state for DTensor averages is refused, loaded now or waiting
    for target in (resumed, ExponentialMovingAverage(DECAY, num_updates="auto")):
        try:
            target.load_state_dict(saved)
            target.apply(model)
        except ValueError as error:
            assert "torch.distributed.checkpoint" in str(error), error
        else:
            raise AssertionError("a plain state was loaded into DTensor averages")

    # an EMA without averages: DCP has nothing to load into, and the load says so
    fresh = ExponentialMovingAverage(DECAY, num_updates="auto")
    state = {"ema": fresh.state_dict()}
    dcp.load(state, checkpoint_id=checkpoint)
    try:
        fresh.load_state_dict(state["ema"])
    except ValueError as error:
        assert "still holds no averages" in str(error), error
    else:
        raise AssertionError("a load without averages restarted the averages silently")
    dist.barrier()


def fsdp_eval_scenario(rank, world, tmp):
    from torch.distributed.tensor import DTensor
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(11))
    for reshard_after_forward in (True, False):
        model, control = (sharded_model(0, reshard_after_forward) for _ in range(2))
        optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, control)]
        wrapper = EMAModule(model, DECAY)
        for step in range(2):
            for m, optimizer in zip((model, control), optimizers):
                train_step(m, optimizer, rank, step)
            wrapper.update()
        # the averaged model, gathered into a plain one: what every evaluation must give
        averaged = plain_model()
        averaged.load_state_dict({n: wrapper.ema.average(n).full_tensor() for n in FSDP_NAMES})
        with torch.no_grad():
            expected, live = averaged(x), control(x)     # control: unsharded if not resharding
            assert not torch.equal(expected, live)
            model(x)                                     # the same state as the control
            if not reshard_after_forward:                # unsharded now: apply says so
                try:
                    wrapper.ema.apply(model)
                except ValueError as error:
                    assert "call its reshard()" in str(error), error
                else:
                    raise AssertionError("apply read unsharded parameters")
            with wrapper.ema.average_parameters(model):
                assert torch.equal(model(x), expected), "average_parameters"
                assert torch.equal(model(x), expected), "average_parameters, second forward"
            assert torch.equal(model(x), live), "after average_parameters"
            with wrapper.ema.average_parameters():       # the tracked ones: the same
                assert torch.equal(model(x), expected), "average_parameters()"
            assert torch.equal(model(x), live), "after average_parameters()"
            assert torch.equal(wrapper.eval()(x), expected), "EMAModule eval"
            assert torch.equal(wrapper(x), expected), "EMAModule eval, second forward"
            wrapper.train()
            assert torch.equal(model(x), live), "after EMAModule eval"
            copy = sharded_model(1, reshard_after_forward)
            copy(x)                                      # unsharded copies to go stale
            wrapper.ema.copy_to(copy)
            assert torch.equal(copy(x), expected), "copy_to"
        # the next training step is bitwise the one without the evaluations
        for m, optimizer in zip((model, control), optimizers):
            train_step(m, optimizer, rank, 2)
        for (name, a), (_, b) in zip(model.named_parameters(), control.named_parameters()):
            assert isinstance(a, DTensor) and torch.equal(a.to_local(), b.to_local()), name
    # FSDP1 is refused with a clear message, changing nothing
    from torch.distributed.fsdp import FullyShardedDataParallel
    fsdp1 = FullyShardedDataParallel(plain_model(), use_orig_params=True,
                                     device_id=torch.device("cpu"))
    ema = ExponentialMovingAverage(DECAY)
    try:
        ema.apply(fsdp1)
    except TypeError as error:
        assert "FSDP1" in str(error) and "fully_shard" in str(error), error
    else:
        raise AssertionError("FSDP1 was averaged")
    # its parameters handed over as pairs or a dict, flat (use_orig_params=False) or views
    flat = FullyShardedDataParallel(plain_model(), device_id=torch.device("cpu"))
    for given in (list(fsdp1.named_parameters()), dict(flat.named_parameters())):
        try:
            ema.apply(given)
        except TypeError as error:
            assert "FSDP1" in str(error) and "fully_shard" in str(error), error
        else:
            raise AssertionError(f"FSDP1's parameters were averaged: {list(dict(given))}")
    assert ema.state_dict() == {}


class FullyShardTest(unittest.TestCase):
    def test_local_shards_exact_in_place_and_dcp_resumes_on_2_and_1_ranks(self):
        import torch.distributed.checkpoint as dcp
        with tempfile.TemporaryDirectory() as tmp:
            _ranks.run(fsdp_scenario, tmp)
            for tag in (True, False, "torch path"):
                # 2 -> 1: the sharded checkpoint into a bare model's plain averages
                full = torch.load(os.path.join(tmp, f"full_{tag}.pt"))
                model = plain_model()
                ema = ExponentialMovingAverage(DECAY, num_updates="auto")
                ema.apply(model)
                state = {"ema": ema.state_dict()}
                dcp.load(state, checkpoint_id=os.path.join(tmp, f"dcp_{tag}"))
                ema.load_state_dict(state["ema"])
                self.assertEqual(sorted(ema.state_dict()), sorted(full))
                for key, value in full.items():
                    self.assertTrue(torch.equal(ema.state_dict()[key], value), key)


class FullyShardEvaluationTest(unittest.TestCase):
    def test_evaluations_give_the_averaged_model_and_leave_training_as_it_was(self):
        with tempfile.TemporaryDirectory() as tmp:
            _ranks.run(fsdp_eval_scenario, tmp)


if __name__ == "__main__":
    unittest.main()
