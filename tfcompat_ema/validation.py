"""Checks of what users hand an ``ExponentialMovingAverage``, each naming the culprit.

Every public call of the EMA runs its checks here before it changes anything, so that a
failed call leaves every average, variable and counter as it was.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, List, Mapping, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import dtensors, tf_math, wrappers

Tensor = torch.Tensor
VarList = Union[nn.Module, Mapping[str, Tensor], Iterable[Tuple[str, Tensor]]]

#: TF's step counts are int64: larger counts cannot be a TF ``num_updates``.
MAX_COUNT = 2 ** 63 - 1
#: The last part of a debiased average's state keys: an EMA name may not end so.
DEBIAS_LEAVES = ("biased", "local_step")


def named_tensors(var_list: VarList) -> List[Tuple[str, Tensor]]:
    """``(name, tensor)`` pairs from a module (its parameters that require grad, under the
    model's own names: see :mod:`tfcompat_ema.wrappers`), a mapping or pairs; each name at
    most once."""
    if isinstance(var_list, nn.Module):
        pairs = [(n, p) for n, p in wrappers.named_parameters(var_list) if p.requires_grad]
    elif isinstance(var_list, (Tensor, str, bytes)) or var_list is None:
        raise TypeError("pass tensors with their names: a module, a mapping of names to "
                        f"tensors, or (name, tensor) pairs; got {type(var_list).__name__}")
    else:
        try:
            items = list(var_list.items() if isinstance(var_list, Mapping) else var_list)
        except TypeError:
            raise TypeError(f"expected a module, a mapping or (name, tensor) pairs, got "
                            f"{type(var_list).__name__}") from None
        pairs = []
        for item in items:
            try:
                name, tensor = item
            except (TypeError, ValueError):
                raise TypeError(f"expected (name, tensor) pairs, got "
                                f"{type(item).__name__}") from None
            if not isinstance(name, str) or not isinstance(tensor, Tensor):
                raise TypeError(f"expected a (str, Tensor) pair, got ({type(name).__name__}, "
                                f"{type(tensor).__name__})")
            if not name:
                raise ValueError("a tensor's name is empty: its average would be named "
                                 "'/<ema name>'")
            pairs.append((name, tensor))
        wrappers.refuse_fsdp1_pairs(pairs)
    seen = set()
    for name, _ in pairs:
        if name in seen:
            raise ValueError(f"{name!r} is listed twice: each variable is averaged once a call")
        seen.add(name)
    return pairs


def check_tensor(name: str, tensor: Tensor, what: str, dtensor: bool = True) -> None:
    """A dense, materialised tensor of a dtype TF averages (plain, ``nn.Parameter``, or a
    DTensor of such local shards: see :mod:`tfcompat_ema.dtensors`)."""
    if dtensors.is_dtensor(tensor):
        if not dtensor:
            raise TypeError(f"{what} {name!r} is a DTensor: fed tensors are averaged as "
                            "plain tensors (pass its to_local() or full_tensor())")
        if type(tensor._local_tensor) not in (Tensor, nn.Parameter):
            raise TypeError(f"{what} {name!r} is a DTensor whose local shard is a "
                            f"{type(tensor._local_tensor).__name__}: only plain shards are "
                            "averaged")
    elif type(tensor) not in (Tensor, nn.Parameter):
        raise TypeError(f"{what} {name!r} is a {type(tensor).__name__}: only plain tensors, "
                        "nn.Parameter and DTensors are averaged (an uninitialised lazy "
                        "module? run one forward pass first)")
    tensor = dtensors.local(tensor)
    if tensor.layout != torch.strided or tensor.is_nested:
        raise TypeError(f"{what} {name!r} has layout {tensor.layout}"
                        f"{' (nested)' if tensor.is_nested else ''}: only dense tensors "
                        "are averaged")
    if tensor.device.type == "meta":
        raise ValueError(f"{what} {name!r} is on the meta device: it holds no values")
    if tensor.dtype not in tf_math.SUPPORTED_DTYPES:
        raise TypeError(f"{what} {name!r} has dtype {tensor.dtype}: only bfloat16, float16, "
                        "float32 and float64 are averaged, as in TF")
    check_storage(name, tensor, what)


def check_storage(name: str, tensor: Tensor, what: str) -> None:
    """The tensor's memory exists and covers every element it addresses (a storage freed
    or shrunk under it, as FSDP does with ``resize_(0)``, would be read out of bounds)."""
    tensor = dtensors.local(tensor)
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return
    extent = tensor.storage_offset() + 1 + sum(
        (size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    nbytes = tensor.untyped_storage().nbytes()
    if tensor.data_ptr() == 0 or nbytes < extent * tensor.element_size():
        raise RuntimeError(f"{what} {name!r}: its storage holds {nbytes} bytes, fewer than its "
                           f"elements need ({extent * tensor.element_size()}); was it freed or "
                           "resized under it?")


def check_target(name: str, tensor: Tensor, averages) -> None:
    """A tensor to copy an average into: writable element by element, and no average itself."""
    check_tensor(name, tensor, what="target")
    tensor = dtensors.local(tensor)
    if tensor.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(f"target {name!r} is an inference tensor: it cannot be written "
                         "outside torch.inference_mode()")
    if _may_overlap(tensor):
        raise ValueError(f"target {name!r} has elements that share memory (expanded?): "
                         "copy into a tensor of its own")
    storage = tensor.untyped_storage().data_ptr()
    if storage and any(dtensors.local(a).untyped_storage().data_ptr() == storage
                       for a in averages):
        raise ValueError(f"target {name!r} shares memory with an average: copying into it "
                         "would overwrite averages")


def _may_overlap(tensor: Tensor) -> bool:
    """Whether two elements may share memory: False is proven (each stride, smallest first,
    passes every offset the smaller dimensions reach), True may be conservative."""
    reach = 0
    for stride, size in sorted((st, sz) for sz, st in zip(tensor.shape, tensor.stride())
                               if sz > 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def check_like(name: str, reference: Tensor, value: Tensor, what: str) -> None:
    if value.shape != reference.shape or value.dtype != reference.dtype:
        raise ValueError(f"{name!r} has shape {tuple(value.shape)} and dtype {value.dtype}, "
                         f"but {what} has shape {tuple(reference.shape)} and dtype "
                         f"{reference.dtype}")
    mismatch = dtensors.mismatch(reference, value)
    if mismatch is not None:
        raise ValueError(f"{name!r} is {mismatch} is {what}: averages are updated and "
                         "copied shard by shard, without communication (a sharded state "
                         "loads through torch.distributed.checkpoint)")


def same_tensor(a: Tensor, b: Tensor) -> bool:
    """The same tensor object, or another plain view of exactly the same (non-empty) memory.

    Empty tensors all have address 0, so only identity tells them apart. DTensors are
    compared by their local shards and their layout (a DTensor's own address is 0).
    """
    if a is b:
        return True
    if dtensors.is_dtensor(a) or dtensors.is_dtensor(b):
        return dtensors.mismatch(a, b) is None and a.shape == b.shape and \
            same_tensor(dtensors.local(a), dtensors.local(b))
    return (a.data_ptr() == b.data_ptr() != 0 and a.shape == b.shape
            and a.stride() == b.stride() and a.dtype == b.dtype and a.device == b.device)


def check_same_variable(name: str, tracked: Tensor, value: Tensor) -> None:
    """``value``, given under ``name``, is the variable tracked under it."""
    if not same_tensor(tracked, value):
        hint = " (an FSDP2 model left unsharded by a forward? call its reshard())" \
            if dtensors.is_dtensor(tracked) and not dtensors.is_dtensor(value) else ""
        raise ValueError(f"two different tensors are named {name!r}: the variable tracked "
                         f"under this name is another tensor{hint}")


def check_name(name) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if name.rpartition("/")[2] in DEBIAS_LEAVES:
        raise ValueError(f"name {name!r} would collide with the keys of debiased averages "
                         f"('<average>/biased', '<average>/local_step'): choose another")


def check_zero_debias(zero_debias) -> None:
    if not isinstance(zero_debias, (bool, np.bool_)):
        raise TypeError(f"zero_debias must be True or False, got {zero_debias!r}")


def check_decay(decay) -> None:
    if isinstance(decay, Tensor):
        if decay.numel() != 1 or decay.dim() > 1 or not decay.dtype.is_floating_point:
            raise ValueError(f"decay must be a 0-dim floating tensor, got shape "
                             f"{tuple(decay.shape)} and dtype {decay.dtype}")
        if decay.device.type == "meta":
            raise ValueError("decay is a tensor on the meta device: it holds no value")
        if decay.device.type != "cpu":
            return          # reading it would wait for the device
        value = float(decay)
    elif isinstance(decay, numbers.Real) and not isinstance(decay, (bool, np.bool_)):
        try:
            value = float(decay)
        except OverflowError:
            raise ValueError(f"decay must be in [0, 1], got {_short(decay)}") from None
    else:
        raise TypeError(f"decay must be a float, a 0-dim tensor or a callable, got "
                        f"{type(decay).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {_short(decay)}")


def check_num_updates(num_updates) -> None:
    if isinstance(num_updates, Tensor):
        if num_updates.numel() != 1 or num_updates.dim() > 1 or \
                num_updates.dtype.is_floating_point or num_updates.dtype.is_complex or \
                num_updates.dtype == torch.bool:
            raise ValueError(f"num_updates must be a 0-dim integer tensor, got shape "
                             f"{tuple(num_updates.shape)} and dtype {num_updates.dtype}")
        if num_updates.device.type == "meta":
            raise ValueError("num_updates is a tensor on the meta device: it holds no value")
        if num_updates.device.type != "cpu":
            return
        unsigned = not num_updates.dtype.is_signed
        if num_updates.dtype == torch.uint64:      # read the bits: int() would overflow
            value = int(num_updates.view(torch.int64)) % 2 ** 64
        else:
            value = int(num_updates)
    elif isinstance(num_updates, numbers.Integral) and \
            not isinstance(num_updates, (bool, np.bool_)):
        value = int(num_updates)
        unsigned = isinstance(num_updates, np.unsignedinteger)
    else:
        raise TypeError(f"num_updates must be None, 'auto', an int, a 0-dim integer tensor "
                        f"or a callable, got {_short(num_updates)}")
    if value < 0:
        raise ValueError(f"num_updates must be >= 0, got {value}")
    if value > MAX_COUNT and not unsigned:
        raise ValueError(f"num_updates must fit TF's int64 step count, got {_short(value)}")


def _short(value) -> str:
    text = repr(value)
    if len(text) > 40:
        digits = math.floor(math.log10(abs(value))) if isinstance(value, int) and value else None
        return f"{text[:20]}... (about 10**{digits})" if digits else text[:40] + "..."
    return text


def preview(names, limit: int = 8) -> str:
    names = list(names)
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more if names else "none"


def check_count(key: str, count) -> int:
    """A saved automatic update count: a 0-dim, non-negative integer tensor."""
    if not isinstance(count, Tensor) or count.dim() != 0 or count.dtype.is_floating_point \
            or count.dtype.is_complex or count.dtype == torch.bool \
            or count.device.type == "meta" or count.layout != torch.strided:
        raise ValueError(f"state entry {key!r} must be a 0-dim integer tensor, got {count!r}")
    value = int(count.view(torch.int64)) % 2 ** 64 if count.dtype == torch.uint64 else int(count)
    if not 0 <= value <= MAX_COUNT:
        raise ValueError(f"state entry {key!r} must be in [0, 2**63), got {value}")
    return value


def check_state_value(key: str, value) -> None:
    """A loadable state entry: a dense, materialised tensor of an averaged dtype."""
    if not isinstance(value, Tensor):
        raise TypeError(f"state entry {key!r} is a {type(value).__name__}, not a tensor")
    check_tensor(key, value, what="state entry")


def check_loaded_structure(state: Mapping[str, Tensor], ema_name: str) -> None:
    """A state loaded before its variables exist: each entry an average or its debias state."""
    suffix = "/" + ema_name
    for key, value in state.items():
        if key.endswith(suffix):
            continue
        base, _, leaf = key.rpartition("/")
        if leaf not in DEBIAS_LEAVES or not base.endswith(suffix):
            raise KeyError(f"unexpected state entry {key!r}: not an average named '*{suffix}'")
        if base not in state:
            raise KeyError(f"state entry {key!r} has no average {base!r}")
        other = base + ("/local_step" if leaf == "biased" else "/biased")
        if other not in state:
            raise KeyError(f"state entry {key!r} comes without {other!r}")
        expected_shape = () if leaf == "local_step" else state[base].shape
        if value.shape != expected_shape or value.dtype != state[base].dtype:
            raise ValueError(f"state entry {key!r} has shape {tuple(value.shape)} and dtype "
                             f"{value.dtype}, expected {tuple(expected_shape)} and "
                             f"{state[base].dtype}")
