"""Run a function on several CPU ranks (gloo) in fresh processes, with a hard time limit.

Each rank calls ``fn(rank, world, *args)`` after ``init_process_group``; an exception on
any rank fails the caller with that rank's traceback, and ranks still running at the
deadline are killed (no test hangs on a collective that never completes).
"""
import datetime
import multiprocessing
import os
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

#: The decay of the distributed tests.
DECAY = 0.75
#: Seconds a collective may wait before it fails (well under the whole run's limit).
COLLECTIVE_TIMEOUT = 20

# Ranks fork from a server process that imported torch once (a fresh process, not this
# one with TensorFlow's threads): each run then starts in a fraction of a second.
multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "numpy", "tfcompat_ema"])


def _entry(rank, fn, world, store, args):
    torch.set_num_threads(1)            # two ranks share the machine's cores
    if os.environ.get("TFCOMPAT_WITHOUT_KERNEL"):     # as tests/conftest.py does here
        from tfcompat_ema import kernels, layout_guard
        kernels._fused, layout_guard._data_pointers = None, None
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run(fn, *args, world: int = 2, timeout: float = 60.0) -> None:
    """``fn(rank, world, *args)`` on ``world`` ranks; raises if any rank fails or runs late."""
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        context = mp.start_processes(_entry, args=(fn, world, store, args), nprocs=world,
                                     join=False, start_method="forkserver")
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__} ran over {timeout} s on {world} ranks")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()


def reference_step(shadow: np.ndarray, value: np.ndarray, decay: float) -> np.ndarray:
    """TF's update in numpy, each op rounded to the dtype: ``s - (s - v) * d`` with
    ``d = float32(1) - float32(decay)`` cast to the dtype (independent of our code)."""
    d = (np.float32(1) - np.float32(decay)).astype(shadow.dtype)
    return shadow - (shadow - value) * d


def numpy_of(tensor: torch.Tensor) -> np.ndarray:
    """A plain tensor (or a DTensor's local shard) as a numpy array, copied."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.detach().clone().numpy()


def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def train_step(model, optimizer, rank, step):
    generator = torch.Generator().manual_seed(100 * step + rank)   # each rank its own data
    x = torch.randn(4, 6, generator=generator)
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()


def same_on_every_rank(tensor):
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return all(torch.equal(g, gathered[0]) for g in gathered)
