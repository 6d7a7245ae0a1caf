"""DTensors (FSDP2's ``fully_shard`` parameters) averaged shard by shard, without communication.

A DTensor is a global tensor of which each rank holds a local shard. The average of a
DTensor variable is a DTensor with the same mesh, placements, global shape and strides,
whose local shard is this rank's average of the variable's local shard: TF's update is
elementwise, so updating local shards (with the fused kernel on the CPU, zero-copy) is the
global update, with no all-gather and no global slicing, for even and uneven shards alike.

Everything that looks at memory (the kernel's pointers, layout checks, storage checks,
identity and aliasing checks) looks at the local shard: a DTensor's own ``data_ptr()`` is 0.

Nothing here communicates except :func:`gather_full`, which TF export needs (a TF
checkpoint holds full tensors): an all-gather per DTensor, on every rank.

No DTensor exists unless ``torch.distributed.tensor`` was imported, so this module does
not import it: ``is_dtensor`` is False until then, at no cost.
"""
from __future__ import annotations

import sys
from typing import Dict, Mapping, Optional

import torch

Tensor = torch.Tensor


def _dtensor_class():
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else getattr(module, "DTensor", None)


def is_dtensor(tensor) -> bool:
    """Whether ``tensor`` is a DTensor (an ``nn.Parameter`` holding one included)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (its memory, not a copy); any other tensor itself."""
    return tensor._local_tensor if is_dtensor(tensor) else tensor


def describe(tensor: Tensor) -> str:
    """The layout a DTensor is compared by, for error messages."""
    if not is_dtensor(tensor):
        return "a plain tensor"
    return (f"a DTensor on {tensor.device_mesh} with placements {tuple(tensor.placements)}, "
            f"local shape {tuple(tensor._local_tensor.shape)}")


def mismatch(reference: Tensor, value: Tensor) -> Optional[str]:
    """Why ``value`` cannot be averaged into (or copied from) ``reference`` shard by
    shard, or None: both plain, or both DTensors on the same mesh with the same
    placements, global strides and local shape."""
    ref_d, val_d = is_dtensor(reference), is_dtensor(value)
    if not ref_d and not val_d:
        return None
    if ref_d != val_d or reference.device_mesh != value.device_mesh \
            or tuple(reference.placements) != tuple(value.placements) \
            or reference.stride() != value.stride() \
            or reference._local_tensor.shape != value._local_tensor.shape:
        return f"{describe(value)}, but {describe(reference)}"
    return None


def new_like(value: Tensor, local_value: Tensor) -> Tensor:
    """A tensor laid out as ``value`` holding ``local_value``: a DTensor with ``value``'s
    mesh, placements, global shape and strides around this rank's shard, or
    ``local_value`` itself for a plain ``value``."""
    if not is_dtensor(value):
        return local_value
    return _dtensor_class().from_local(local_value, value.device_mesh, value.placements,
                                       run_check=False, shape=value.shape,
                                       stride=value.stride())


def clone(value: Tensor) -> Tensor:
    """A copy of ``value`` laid out as it is (a DTensor: its shard copied, no communication)."""
    return new_like(value, local(value).clone(memory_format=torch.preserve_format))


def zeros_like(value: Tensor) -> Tensor:
    return new_like(value, torch.zeros_like(local(value), memory_format=torch.preserve_format))


def check_gatherable(named: Mapping[str, Tensor], what: str) -> None:
    """Refuse, before any communication, the DTensors in ``named`` that :func:`gather_full`
    cannot make whole bitwise: only ``Shard`` and ``Replicate`` placements on a 1-D mesh
    (FSDP2's) are gathered. A ``Partial`` average is each rank's average of its addend,
    whose sum is not bitwise the average of the sum; meshes of more dims (HSDP, FSDP with
    tensor parallelism, ``_StridedShard``) are not tested here: both are errors naming
    the entry."""
    if _dtensor_class() is None:
        return
    from torch.distributed.tensor import Replicate, Shard
    refused = [f"{what} {name!r} is {describe(tensor)}" for name, tensor in named.items()
               if is_dtensor(tensor) and (tensor.device_mesh.ndim != 1 or not all(
                   type(p) in (Shard, Replicate) for p in tensor.placements))]
    if refused:
        raise ValueError(f"{'; '.join(refused[:3])}{' ...' if len(refused) > 3 else ''}: only "
                         "DTensors sharded or replicated on a 1-D mesh (FSDP2's) are gathered "
                         "into full tensors; gather the others yourself (full_tensor()) and "
                         "pass plain tensors")


def gather_full(named: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """``named`` with every DTensor replaced by its full tensor (a new plain tensor), others
    as they are. A collective (an all-gather per DTensor): every rank of the mesh must call
    it with the same names in the same order. Check with :func:`check_gatherable` first."""
    return {name: tensor.detach().full_tensor() if is_dtensor(tensor) else tensor
            for name, tensor in named.items()}
