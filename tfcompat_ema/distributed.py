"""What averaging needs from ``torch.distributed``: one set of averages across DDP ranks, and
TF's cross-replica mean of fed per-rank values.

**DDP.** ``DistributedDataParallel`` broadcasts rank 0's parameters when it wraps a model,
but averages made before (``ema.apply(model)`` and then ``DDP(model)``) started at each
rank's own initial weights and would stay different forever. So the first ``apply`` that
goes through a DDP wrapper (``ema.apply(ddp)``, ``EMAModule(ddp).update()``) broadcasts the
averages of that wrapper's parameters from its group's rank 0, once per wrapper; later
``apply`` calls are local (the parameters are identical on every rank, and so is the
arithmetic). Every rank of the DDP group must make that call, as it makes DDP's forward.
``apply(ddp.module)`` (the bare model) never communicates: call it on every rank or on one.

**FSDP2 evaluation.** ``fully_shard`` keeps the sharded DTensor parameters (which the
averages mirror) and, between an all-gather and a reshard, unsharded copies registered in
their place: after a forward with ``reshard_after_forward=False`` (the root's default) the
next forward reuses them without a new all-gather. So ``average_parameters``, ``copy_to``
and ``EMAModule``'s eval reshard the model first (the unsharded copies go; the sharded
parameters are registered again), swap the averages into the local shards, and reshard
again at the end of the block, so that no unsharded copy of the averages outlives it. The
next training forward all-gathers the restored shards: bitwise the weights it would have
used. Resharding is not a collective; the forward inside the block is.

**Fed tensors.** Under TF's ``MirroredStrategy``, ``assign_moving_average`` given a
per-replica tensor (a per-replica loss) averages the *mean over replicas*: ``merge_call``
reduces it with ``ReduceOp.MEAN``, which on CPU devices is ``add_n`` of the replicas' values
followed by ``/ n`` in the value's dtype (``ReductionToOneDevice``; on GPUs TF reduces
with its cross-device ops instead, not compared here). ``apply_tensors(...,
reduce="mean")`` does the same with ``all_reduce(SUM)`` and then ``/ world_size`` in the
dtype. With two ranks the sum is one correctly rounded addition and the division by 2
is exact (short of subnormals), so the mean is bitwise TF's; with more ranks the sum's
order is the backend's (gloo, NCCL), which need not be TF's ``add_n`` order.
"""
from __future__ import annotations

import hashlib
import sys
import weakref
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from . import wrappers

Tensor = torch.Tensor
#: ``apply_tensors``' reductions of fed per-rank values.
REDUCTIONS = ("mean",)


def data_parallel_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The ``DistributedDataParallel`` modules in ``model``, with their unwrapped paths."""
    found, paths = [], set()
    for raw, sub in model.named_modules(remove_duplicate=False):
        if isinstance(sub, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            path = wrappers.unwrapped_name(raw, paths)
            paths.add(path)
            if isinstance(sub, nn.parallel.DistributedDataParallel):
                found.append((path, sub))
    return found


def fsdp_modules(models: Sequence[nn.Module]) -> List[nn.Module]:
    """The ``fully_shard`` (FSDP2) modules in ``models``, each once."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    cls = getattr(fsdp, "FSDPModule", None)
    if cls is None:
        return []
    found, seen = [], set()
    for model in models:
        for module in model.modules():
            if isinstance(module, cls) and id(module) not in seen:
                seen.add(id(module))
                found.append(module)
    return found


def reshard(modules: Sequence[nn.Module]) -> None:
    """Free FSDP2's unsharded parameters and register the sharded ones (local, no collective)."""
    for module in modules:
        module.reshard()


def new_synced() -> "weakref.WeakSet[nn.Module]":
    """The set of DDP wrappers whose averages were broadcast (one per EMA, not pickled)."""
    return weakref.WeakSet()


def broadcast_once(synced, modules: Sequence[Tuple[str, nn.Module]], slots,
                   count: Optional[int] = None) -> None:
    """Broadcast, from each DDP group's rank 0, the averages of that wrapper's parameters,
    the first time an update goes through it (``synced`` remembers the wrappers).

    The ranks first check that they hold the same averages in the same order and, where
    the EMA counts its updates (``count``), the same count: a rank that loaded a state the
    others did not would otherwise decay differently from then on."""
    for path, ddp in modules:
        if ddp in synced:
            continue
        group = ddp.process_group
        source = dist.get_global_rank(group, 0)
        prefix = path + "." if path else ""
        shadows = [(slot.name, slot.shadow) for slot in slots
                   if slot.var is not None and slot.name.startswith(prefix)]
        check_same_on_every_rank("the averages (names, shapes, dtypes, order) and the "
                                 "update count", (signature(shadows), count), group,
                                 [shadow for _, shadow in shadows])
        for _, shadow in shadows:
            dist.broadcast(shadow, src=source, group=group)
        synced.add(ddp)


def broadcast_averages(ema, src: int = 0, group=None) -> None:
    """Copy the averages of ``ema``'s variables from rank ``src`` to every rank of ``group``.

    ``apply(ddp)`` does this by itself at its first update through a DDP wrapper; call it
    where updates never go through the wrapper (``apply(model)`` or ``apply()`` only) and
    the EMA was made before the ranks' parameters agreed. Every rank of the group must call
    it, with averages of the same names, shapes and dtypes in the same order: checked
    first with one small ``all_gather``, so that where a rank differs every rank raises
    ``ValueError`` before any average changes. DTensor averages are sharded, not
    replicated: they are refused.

    Example (on every rank: ``broadcast_averages(ema)``; without a process group it says so):
        >>> import torch
        >>> from tfcompat_ema import ExponentialMovingAverage, broadcast_averages
        >>> ema = ExponentialMovingAverage(0.9)
        >>> ema.apply({"w": torch.ones(2)})
        >>> broadcast_averages(ema)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        RuntimeError: broadcast_averages needs an initialised process group ...
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("broadcast_averages needs an initialised process group "
                           "(torch.distributed.init_process_group)")
    with ema._lock:
        slots = [slot for slot in ema._slots.values() if slot.var is not None]
        sharded = [slot.name for slot in slots if _is_dtensor(slot.shadow)]
        if sharded:
            raise TypeError(f"the averages of {sharded[:3]} are DTensors: each rank holds "
                            "its own shard, there is nothing to broadcast")
        if not slots:
            raise ValueError("the EMA keeps no averages of variables to broadcast")
        shadows = [slot.shadow for slot in slots]
        check_same_on_every_rank("the averages (names, shapes, dtypes, order)",
                                 signature([(slot.name, slot.shadow) for slot in slots]),
                                 group, shadows)
        for shadow in shadows:
            dist.broadcast(shadow, src=src, group=group)


def check_reduce(reduce: Optional[str], group, pairs: Sequence[Tuple[str, Tensor]]) -> None:
    """A reduction ``apply_tensors`` can do here, checked before anything changes."""
    if reduce is None:
        if group is not None:
            raise ValueError("group is the process group of reduce='mean': pass both or "
                             "neither")
        return
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be None or one of {REDUCTIONS}, got {reduce!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("reduce='mean' averages the mean over ranks, but no process group "
                           "is initialised (torch.distributed.init_process_group)")
    for name, value in pairs:
        if _is_dtensor(value):
            raise TypeError(f"{name!r} is a DTensor: reduce='mean' takes each rank's own "
                            "plain tensor")


def mean_across_ranks(pairs: Sequence[Tuple[str, Tensor]], group=None
                      ) -> List[Tuple[str, Tensor]]:
    """Each value replaced by its mean over the group's ranks: the sum, then ``/ n`` in the
    value's dtype, as TF's ``ReduceOp.MEAN``. The inputs are not changed.

    The ranks first check that they feed the same names, shapes and dtypes (one small
    ``all_gather``): otherwise every rank raises ``ValueError`` instead of summing
    different values together or waiting for a sum the others never join."""
    check_same_on_every_rank("the fed tensors (names, shapes, dtypes) of reduce='mean'",
                             signature(pairs), group, [value for _, value in pairs])
    size = dist.get_world_size(group)
    reduced = []
    for name, value in pairs:
        total = value.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        reduced.append((name, torch.div(total, size)))
    return reduced


def signature(pairs: Sequence[Tuple[str, Tensor]]) -> List[Tuple[str, tuple, str]]:
    """What every rank must agree on before a collective over these tensors."""
    return [(name, tuple(tensor.shape), str(tensor.dtype)) for name, tensor in pairs]


def check_same_on_every_rank(what: str, mine, group, tensors: Sequence[Tensor]) -> None:
    """Raise ``ValueError`` on every rank of ``group`` unless all passed the same ``mine``.

    One ``all_gather`` of a 32-byte digest, on the tensors' device (the group's backend
    may take only that one), so that ranks which disagree fail together and name each
    other, where a broadcast or sum over unlike tensors would mix them or wait forever.
    """
    digest = hashlib.sha256(repr(mine).encode()).digest()
    device = tensors[0].device if tensors else _collective_device(group)
    local = torch.tensor(list(digest), dtype=torch.uint8, device=device)
    everyone = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, local, group=group)
    others = [rank for rank, theirs in enumerate(everyone) if not torch.equal(theirs, local)]
    if others:
        shown = repr(mine)
        raise ValueError(f"{what} differ across ranks: this rank ({dist.get_rank(group)} in "
                         f"its group) disagrees with group ranks {others}; here: "
                         f"{shown[:300]}{'...' if len(shown) > 300 else ''}")


def _collective_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _is_dtensor(tensor: Tensor) -> bool:
    return type(tensor).__name__ == "DTensor"
