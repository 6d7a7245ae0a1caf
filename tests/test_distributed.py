"""Averages under torch.distributed on 2 CPU ranks (gloo), each in its own process with a hard
time limit (tests/_ranks.py), exact against numpy's per-op float32 arithmetic: DDP, the mean
over ranks of fed tensors (against TF's MirroredStrategy), the README's recipes, TF export
through DDP, torch.compile'd models under and over DDP (and under FSDP2). FSDP2's DTensor
averages: tests/test_dtensors.py; their checkpoints: tests/test_fsdp2_checkpoints.py."""
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import _ranks
from _ranks import DECAY, make_model, numpy_of, reference_step, same_on_every_rank, train_step
from _tf import require

from tfcompat_ema import (EMAModule, ExponentialMovingAverage, NameMap, Rule,
                          broadcast_averages, read_checkpoint, write_checkpoint)

NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]


def ddp_scenario(rank, world, tmp):
    model = make_model(seed=rank)              # different weights on each rank
    ema = ExponentialMovingAverage(DECAY)
    ema.apply(model)                           # averages made before wrapping: per rank
    ddp = nn.parallel.DistributedDataParallel(model)     # broadcasts rank 0's weights
    reference = {n: numpy_of(p) for n, p in make_model(seed=0).named_parameters()}
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(3):
        train_step(ddp, optimizer, rank, step)
        ema.apply(ddp)                         # the first one broadcasts rank 0's averages
        for name, parameter in model.named_parameters():
            reference[name] = reference_step(reference[name], numpy_of(parameter), DECAY)
    state = ema.state_dict()
    assert list(state) == [f"{n}/ExponentialMovingAverage" for n in NAMES], list(state)
    for name in NAMES:
        average = ema.average(name)
        assert np.array_equal(numpy_of(average), reference[name]), (rank, name)
        assert same_on_every_rank(average), name
    # TF export through the DDP wrapper, on each rank: the same checkpoint, byte for byte
    names = NameMap([Rule("{i}", "dense_{i}", "dense")])
    tf_vars = names.export(ddp, ema=ema)
    for name in NAMES:
        index, kind = name.split(".")
        key = f"dense_{index}/{'kernel' if kind == 'weight' else 'bias'}/ExponentialMovingAverage"
        assert np.array_equal(tf_vars[key].numpy(), reference[name].T), key   # kernel [in, out]
    write_checkpoint(os.path.join(tmp, f"tf{rank}", "model.ckpt"), tf_vars)
    dist.barrier()
    for suffix in (".index", ".data-00000-of-00001"):
        files = [Path(tmp, f"tf{r}", "model.ckpt" + suffix).read_bytes() for r in range(2)]
        assert files[0] == files[1], suffix

    # the same names through torch.compile's wrapper and on the bare model
    ema.apply(ddp.module)                      # the same names, the same tensors: no error
    assert list(ema.state_dict()) == list(state)

    # resume from rank 0's file, on the bare model, bitwise
    path = os.path.join(tmp, "ema.pt")
    if rank == 0:
        torch.save(ema.state_dict(), path)
    dist.barrier()
    resumed = ExponentialMovingAverage(DECAY)
    resumed.load_state_dict(torch.load(path))
    train_step(ddp, optimizer, rank, 3)
    ema.apply(ddp)
    resumed.apply(model)
    for key, value in ema.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key

    # updates that never go through the wrapper: broadcast_averages by hand
    by_hand = ExponentialMovingAverage(DECAY)
    by_hand.apply(make_model(seed=rank))
    assert not same_on_every_rank(by_hand.average("0.weight"))
    broadcast_averages(by_hand)
    for name in NAMES:
        assert same_on_every_rank(by_hand.average(name)), name
        assert np.array_equal(numpy_of(by_hand.average(name)),
                              numpy_of(dict(make_model(seed=0).named_parameters())[name]))

    # EMAModule over DDP: broadcast at its first update, evaluation runs the averages
    inner = make_model(seed=rank)
    wrapped = EMAModule(inner, DECAY)
    wrapped.update()                           # per-rank averages, before wrapping
    wrapped.module = nn.parallel.DistributedDataParallel(inner)
    wrapped.update()                           # broadcast from rank 0, then updated
    for name, parameter in wrapped.module.module.named_parameters():
        assert same_on_every_rank(wrapped.ema.average(name)), name
        assert torch.equal(wrapped.ema.average(name), parameter), name
    bare = EMAModule(make_model(seed=0), DECAY)
    bare.ema.load_state_dict(wrapped.ema.state_dict())
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(7))
    assert torch.equal(wrapped.eval()(x), bare.eval()(x))


def compile_scenario(rank, world, tmp):
    """torch.compile under DDP and over it (and under FSDP2): averages named by the bare
    model's names. backend="eager" runs Dynamo's tracing, which is what wraps the model in
    an OptimizedModule (the "_orig_mod." names) and splits DDP's graph, without Inductor
    compiling C++ kernels (tens of seconds per rank here); the EMA reads the parameters
    after the optimizer step, whichever backend computed the gradients."""
    forms = {"DDP(compile)": lambda m: nn.parallel.DistributedDataParallel(
                 torch.compile(m, backend="eager")),
             "compile(DDP)": lambda m: torch.compile(nn.parallel.DistributedDataParallel(m),
                                                     backend="eager")}
    for form, wrap in forms.items():
        model = make_model(seed=rank)          # different weights on each rank
        ema = ExponentialMovingAverage(DECAY)
        ema.apply(model)                       # before wrapping: per-rank averages
        wrapped = wrap(model)
        assert "_orig_mod" in next(iter(wrapped.named_parameters()))[0], form
        reference = {n: numpy_of(p) for n, p in make_model(seed=0).named_parameters()}
        optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
        for step in range(3):
            train_step(wrapped, optimizer, rank, step)
            ema.apply(wrapped)                 # the first one broadcasts rank 0's averages
            for name, parameter in model.named_parameters():
                reference[name] = reference_step(reference[name], numpy_of(parameter), DECAY)
        state = ema.state_dict()
        assert list(state) == [f"{n}/ExponentialMovingAverage" for n in NAMES], list(state)
        for name in NAMES:
            assert np.array_equal(numpy_of(ema.average(name)), reference[name]), (form, name)
            assert same_on_every_rank(ema.average(name)), (form, name)
        if rank == 0:                          # resumed on a bare model in the test process
            torch.save({"state": state, "model": model.state_dict()},
                       os.path.join(tmp, f"{form}.pt"))
    # FSDP2 of a compiled submodule: "0._orig_mod.weight" averaged as "0.weight", exactly
    from torch.distributed.fsdp import fully_shard
    model = make_model(seed=0)
    model[0] = torch.compile(model[0], backend="eager")
    fully_shard(model[0])
    fully_shard(model)
    ema = ExponentialMovingAverage(DECAY)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference = None
    for step in range(3):
        train_step(model, optimizer, rank, step)
        ema.apply(model)
        shards = {n.replace("_orig_mod.", ""): numpy_of(p) for n, p in model.named_parameters()}
        reference = shards if reference is None else {
            n: reference_step(reference[n], shards[n], DECAY) for n in shards}
    assert [n for n, _ in model.named_parameters()][0] == "0._orig_mod.weight"
    assert sorted(reference) == sorted(NAMES)
    for name in NAMES:
        assert np.array_equal(numpy_of(ema.average(name)), reference[name]), (rank, name)


def reduce_scenario(rank, world, tmp):
    values = np.load(os.path.join(tmp, "values.npy"))            # [step, rank, n] float32
    for dtype_name in ("float32", "float16"):
        ema = ExponentialMovingAverage(DECAY)
        mine = []
        for step in range(values.shape[0]):
            loss = torch.from_numpy(values[step, rank]).to(getattr(torch, dtype_name))
            before = loss.clone()
            ema.apply_tensors({"loss": loss}, reduce="mean")
            assert torch.equal(loss, before)                     # the input is not changed
            mine.append(numpy_of(ema.average("loss")))
        np.save(os.path.join(tmp, f"ours_{dtype_name}_{rank}.npy"), np.stack(mine))
    debiased = ExponentialMovingAverage(DECAY, zero_debias=True)
    mine = []
    for step in range(values.shape[0]):
        debiased.apply_tensors({"loss": torch.from_numpy(values[step, rank])}, reduce="mean")
        mine.append(numpy_of(debiased.average("loss")))
    np.save(os.path.join(tmp, f"ours_debiased_{rank}.npy"), np.stack(mine))


def numpy_reduce_reference(values, dtype):
    """The mean over ranks (sum, then / 2, per op in the dtype) averaged from zero."""
    shadow, out = np.zeros(values.shape[2], dtype), []
    for step in range(values.shape[0]):
        mean = (values[step, 0].astype(dtype) + values[step, 1].astype(dtype)) / dtype(2)
        shadow = reference_step(shadow, mean, DECAY)
        out.append(shadow)
    return np.stack(out)


def readme_recipes():
    """The README's distributed recipes (the block that starts with their marker)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
              if b.startswith("# Distributed training recipes")]
    assert len(blocks) == 1, len(blocks)
    return blocks[0]


def readme_scenario(rank, world, tmp, code):
    recipes = {}
    exec(compile(code, "README.md", "exec"), recipes)
    batches = [torch.randn(4, 6, generator=torch.Generator().manual_seed(10 * i + rank * i))
               for i in range(3)]                   # the first (evaluated) one on every rank
    path = os.path.join(tmp, "ema.pt")
    for resume in (False, True):
        out, loss = recipes["train_ddp"](make_model(seed=rank), batches, path, resume)
        assert same_on_every_rank(out) and same_on_every_rank(loss.reshape(1))
    checkpoint, prefix = os.path.join(tmp, "dcp"), os.path.join(tmp, "tf", "model.ckpt")
    for resume in (False, True):
        out = recipes["train_fsdp2"](make_model(seed=0), batches, checkpoint, resume,
                                     prefix if resume else None)
        assert out.shape == (4, 3) and same_on_every_rank(out)
    dist.barrier()                                  # rank 0 wrote the TF checkpoint
    written = read_checkpoint(prefix).tensors
    assert sorted(written) == sorted(f"dense_{i}/{kind}{average}" for i in (0, 2)
                                     for kind in ("kernel", "bias")
                                     for average in ("", "/ExponentialMovingAverage"))
    assert written["dense_2/kernel/ExponentialMovingAverage"].shape == (8, 3)
    # EMAModule over an FSDP2 model, saved and resumed through DCP by the recipe
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard
    saved, resumed = (EMAModule(fully_shard(make_model(seed)), DECAY) for seed in (0, 1))
    saved.update()
    module_checkpoint = os.path.join(tmp, "dcp_module")
    dcp.save(saved.state_dict(), checkpoint_id=module_checkpoint)
    recipes["resume_ema_module"](resumed, module_checkpoint)
    for key, value in saved.ema.state_dict().items():
        assert torch.equal(resumed.ema.state_dict()[key].to_local(), value.to_local()), key


def hanging_scenario(rank, world, tmp):
    with open(os.path.join(tmp, f"pid{rank}"), "w") as f:
        f.write(str(os.getpid()))
    if rank == 1:
        time.sleep(120)                      # rank 0 waits in the barrier meanwhile
    dist.barrier()


TF_MIRRORED = textwrap.dedent("""
    import sys, numpy as np, tensorflow as tf
    from tensorflow.python.training import moving_averages
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    values = np.load(sys.argv[1])
    decay = tf.constant(float(sys.argv[4]), tf.float32)   # as ExponentialMovingAverage passes it
    for zero_debias in (False, True):
        with strategy.scope():
            average = tf.Variable(tf.zeros(values.shape[2]), trainable=False)
        # zero_debias makes its variables on the first call: a tf.function, as in TF2 code
        update = tf.function(lambda x: moving_averages.assign_moving_average(
            average, x, decay, zero_debias=zero_debias))
        out = []
        for step in range(values.shape[0]):
            per_replica = strategy.experimental_distribute_values_from_function(
                lambda context: tf.constant(values[step, context.replica_id_in_sync_group]))
            strategy.run(update, args=(per_replica,))
            assert np.array_equal(average.values[0].numpy(), average.values[1].numpy())
            out.append(average.values[0].numpy())
        np.save(sys.argv[2 + zero_debias], np.stack(out))
""")


def disagreement_scenario(rank, world, tmp):
    """Ranks that disagree on what a collective is about fail together, before anything
    changes, instead of mixing unlike tensors or waiting for each other."""
    def refused(call, *what):
        try:
            call()
        except ValueError as error:
            assert "differ across ranks" in str(error) and all(w in str(error) for w in what), \
                str(error)
        else:
            raise AssertionError(f"rank {rank}: accepted")

    # broadcast_averages over averages of different shapes (Linear(4, 3) vs Linear(4, 4))
    ema = ExponentialMovingAverage(DECAY)
    ema.apply(nn.Linear(4, 3 + rank))
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    refused(lambda: broadcast_averages(ema), "bias")
    assert all(torch.equal(before[k], v) for k, v in ema.state_dict().items())

    # reduce="mean" over different names, then different shapes
    fed = ExponentialMovingAverage(DECAY)
    refused(lambda: fed.apply_tensors({("loss", "acc")[rank]: torch.ones(2)}, reduce="mean"))
    refused(lambda: fed.apply_tensors({"loss": torch.ones(2 + rank)}, reduce="mean"))
    assert fed.state_dict() == {}
    fed.apply_tensors({"loss": torch.full((2,), float(rank))}, reduce="mean")   # agreeing
    assert float(fed.average("loss")[0]) == np.float32(0.5) * (np.float32(1) - np.float32(DECAY))

    # only rank 0 loaded a count: the first apply through DDP refuses on both ranks
    model = make_model(seed=0)
    counted = ExponentialMovingAverage(DECAY, num_updates="auto")
    counted.apply(model)
    if rank == 0:
        counted.load_state_dict({**counted.state_dict(), "num_updates": torch.tensor(5)})
    ddp = nn.parallel.DistributedDataParallel(model)
    before = {k: v.clone() for k, v in counted.state_dict().items()}
    refused(lambda: counted.apply(ddp), "update count")
    assert all(torch.equal(before[k], v) for k, v in counted.state_dict().items())


class HarnessTest(unittest.TestCase):
    def test_a_hanging_run_is_killed_at_its_deadline(self):
        start = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            with self.assertRaisesRegex(TimeoutError, "hanging_scenario ran over 2"):
                _ranks.run(hanging_scenario, tmp, timeout=2)
            self.assertLess(time.monotonic() - start, 15)
            for rank in range(2):
                with open(os.path.join(tmp, f"pid{rank}")) as f:
                    pid = int(f.read())
                with self.assertRaises(ProcessLookupError):      # gone, not left behind
                    os.kill(pid, 0)


class DDPTest(unittest.TestCase):
    def test_averages_are_exact_identical_across_ranks_and_resume(self):
        with tempfile.TemporaryDirectory() as tmp:
            _ranks.run(ddp_scenario, tmp)


class DisagreementTest(unittest.TestCase):
    def test_ranks_that_disagree_fail_together_and_change_nothing(self):
        with tempfile.TemporaryDirectory() as tmp:
            _ranks.run(disagreement_scenario, tmp, timeout=30)


class CompileTest(unittest.TestCase):
    def test_compiled_models_under_and_over_ddp_and_fsdp2_keep_the_bare_names(self):
        with tempfile.TemporaryDirectory() as tmp:
            _ranks.run(compile_scenario, tmp, timeout=30)
            for form in ("DDP(compile)", "compile(DDP)"):
                saved = torch.load(os.path.join(tmp, f"{form}.pt"))
                model = make_model(seed=1)                   # single process, bare
                model.load_state_dict(saved["model"])
                with torch.no_grad():
                    for parameter in model.parameters():
                        parameter.mul_(0.5)                  # one more "step"
                resumed = ExponentialMovingAverage(DECAY)
                resumed.load_state_dict(saved["state"])
                resumed.apply(model)
                for name, parameter in model.named_parameters():
                    expected = reference_step(
                        numpy_of(saved["state"][f"{name}/ExponentialMovingAverage"]),
                        numpy_of(parameter), DECAY)
                    self.assertTrue(np.array_equal(numpy_of(resumed.average(name)), expected),
                                    (form, name))


class ReadmeRecipesTest(unittest.TestCase):
    def test_the_readme_recipes_run_on_two_ranks(self):
        with tempfile.TemporaryDirectory() as tmp:
            _ranks.run(readme_scenario, tmp, readme_recipes())


class ReduceMeanTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        rng = np.random.RandomState(0)
        cls.values = (rng.randn(4, 2, 33) * np.float32(3)).astype(np.float32)
        np.save(os.path.join(cls.tmp.name, "values.npy"), cls.values)
        _ranks.run(reduce_scenario, cls.tmp.name)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def ours(self, dtype_name, rank):
        return np.load(os.path.join(self.tmp.name, f"ours_{dtype_name}_{rank}.npy"))

    def test_the_mean_over_ranks_is_averaged_as_per_op_arithmetic(self):
        for dtype_name, dtype in (("float32", np.float32), ("float16", np.float16)):
            expected = numpy_reduce_reference(self.values, dtype)
            for rank in range(2):
                self.assertTrue(np.array_equal(self.ours(dtype_name, rank), expected),
                                (dtype_name, rank))

    def test_matches_tf_mirrored_strategy_on_two_cpu_replicas(self):
        require()
        tf_out = [os.path.join(self.tmp.name, f"tf_{kind}.npy") for kind in ("plain", "debiased")]
        subprocess.run([sys.executable, "-c", TF_MIRRORED,
                        os.path.join(self.tmp.name, "values.npy"), *tf_out, str(DECAY)],
                       check=True, timeout=120, capture_output=True)
        for kind, path in zip(("float32", "debiased"), tf_out):
            expected = np.load(path)
            self.assertFalse(np.array_equal(expected[-1], self.values[-1, 0]))   # averaged
            for rank in range(2):
                self.assertTrue(np.array_equal(self.ours(kind, rank), expected), (kind, rank))

    def test_reduce_is_checked_before_anything_changes(self):
        ema = ExponentialMovingAverage(DECAY)
        with self.assertRaisesRegex(RuntimeError, "no process group"):
            ema.apply_tensors({"loss": torch.ones(2)}, reduce="mean")
        with self.assertRaisesRegex(ValueError, "reduce must be"):
            ema.apply_tensors({"loss": torch.ones(2)}, reduce="sum")
        with self.assertRaisesRegex(ValueError, "pass both or neither"):
            ema.apply_tensors({"loss": torch.ones(2)}, group=object())
        self.assertEqual(ema.state_dict(), {})


if __name__ == "__main__":
    unittest.main()
