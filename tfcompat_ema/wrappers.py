"""A model's own names, whatever wraps it (DDP, ``torch.compile``, FSDP1, activation checkpointing).

Wrappers put their inner module under an attribute of their own, and that attribute shows
up in every name below them: ``DistributedDataParallel`` and ``DataParallel`` add
``module.``, ``torch.compile`` adds ``_orig_mod.``, FSDP1 ``_fsdp_wrapped_module.`` and
``checkpoint_wrapper`` ``_checkpoint_wrapped_module.``. Averages are named by the model's
own names, so the one rule here drops those parts: ``apply(ddp)`` and ``apply(ddp.module)``
name the same averages, and states move between wrapped and bare models. (FSDP1 itself is
refused: its parameters are pieces of per-rank flat shards. FSDP2's ``fully_shard``
renames nothing.)

The last three attribute names are private to PyTorch's wrappers and are dropped wherever
they appear; ``module`` is an ordinary attribute name (``EMAModule.module``, user models), so
it is dropped only directly below a ``DistributedDataParallel`` or ``DataParallel``.
The same rule reads ``state_dict`` keys, from which some wrappers already strip their part.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Set, Tuple

import torch
from torch import nn

Tensor = torch.Tensor

#: Attribute names that only PyTorch's wrappers use for the module they wrap.
PRIVATE_WRAPPER_PARTS = frozenset({"_orig_mod", "_fsdp_wrapped_module",
                                   "_checkpoint_wrapped_module"})
_DATA_PARALLEL = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def data_parallel_paths(model: nn.Module) -> Set[str]:
    """The unwrapped paths of the ``DistributedDataParallel``/``DataParallel`` modules in
    ``model`` ("" for the model itself): below each, one ``module`` part is dropped."""
    return _wrappers_in(model)[0]


def _wrappers_in(model: nn.Module) -> Tuple[Set[str], bool]:
    """(data-parallel paths, whether a wrapper's private part names a submodule)."""
    paths: Set[str] = set()
    private = False
    for raw, sub in model.named_modules(remove_duplicate=False):   # parents before children
        kind = _kind(type(sub))
        if kind == "fsdp1":
            raise TypeError(f"{raw or 'the model'} is FSDP1 (FullyShardedDataParallel): "
                            + _FSDP1_REFUSAL)
        if kind == "data parallel":
            paths.add(unwrapped_name(raw, paths))
        private = private or raw.rpartition(".")[2] in PRIVATE_WRAPPER_PARTS
    return paths, private


_FSDP1_REFUSAL = ("its parameters are per-rank pieces of flat shards, whose averages no "
                  "checkpoint can reshard. Use FSDP2 (torch.distributed.fsdp.fully_shard), "
                  "whose DTensor parameters are averaged shard by shard")


def refuse_fsdp1_pairs(pairs: List[Tuple[str, Tensor]]) -> None:
    """Refuse FSDP1's parameters handed over as (name, tensor) pairs, as its modules are:
    its flat parameters, or the views into them that ``use_orig_params=True`` names."""
    for name, tensor in pairs:
        if type(tensor).__name__ == "FlatParameter" or "_fsdp_wrapped_module" in \
                name.split(".") or name.rpartition(".")[2] == "_flat_param":
            raise TypeError(f"{name!r} comes from an FSDP1 (FullyShardedDataParallel) "
                            f"model: {_FSDP1_REFUSAL}")


@functools.lru_cache(maxsize=None)
def _kind(cls: type) -> str:
    """What a module class is to naming (once per class: this runs on every ``apply``)."""
    if any(c.__name__ == "FullyShardedDataParallel" for c in cls.__mro__):
        return "fsdp1"
    return "data parallel" if issubclass(cls, _DATA_PARALLEL) else ""


def unwrapped_name(name: str, data_parallel: Set[str]) -> str:
    """``name`` without the parts wrappers added.

    >>> unwrapped_name("module._orig_mod.layer.weight", {""})
    'layer.weight'
    >>> unwrapped_name("module.layer.weight", set())      # no DDP: a module named "module"
    'module.layer.weight'
    >>> unwrapped_name("module.module.weight", {""})      # DDP over a model with a .module
    'module.weight'
    """
    kept: List[str] = []
    dropped_at: Set[str] = set()
    for part in name.split("."):
        if part in PRIVATE_WRAPPER_PARTS:
            continue
        if part == "module" and data_parallel:
            here = ".".join(kept)
            if here in data_parallel and here not in dropped_at:
                dropped_at.add(here)
                continue
        kept.append(part)
    return ".".join(kept)


def renamer(model: nn.Module):
    """A function from ``model``'s names (of parameters, buffers, submodules) to its own."""
    paths, private = _wrappers_in(model)
    if not paths and not private:
        return _same        # no wrapper inside: every name is the model's own already
    return lambda name: unwrapped_name(name, paths)


def _same(name: str) -> str:
    return name


def without_data_parallel(model: nn.Module) -> nn.Module:
    """The module under any ``DistributedDataParallel``/``DataParallel`` at the top: what
    an evaluation runs (their forward adds gradient and buffer syncs, not arithmetic)."""
    while isinstance(model, _DATA_PARALLEL):
        model = model.module
    return model


def named_parameters(model: nn.Module) -> List[Tuple[str, Tensor]]:
    """The model's parameters under its own names (wrappers' parts dropped)."""
    rename = renamer(model)
    if rename is _same:
        return list(model.named_parameters())
    return [(rename(n), p) for n, p in model.named_parameters()]


def named_buffers(model: nn.Module) -> List[Tuple[str, Tensor]]:
    """The model's buffers under its own names (wrappers' parts dropped)."""
    rename = renamer(model)
    return [(rename(n), b) for n, b in model.named_buffers()]


def state_dict(model: nn.Module, keep_vars: bool = False) -> Dict[str, Tensor]:
    """``model.state_dict()`` under the model's own names; two keys meeting is an error.

    >>> import torch
    >>> ddp_like = torch.nn.DataParallel(torch.nn.Linear(2, 1))   # adds "module." as DDP does
    >>> sorted(ddp_like.state_dict())
    ['module.bias', 'module.weight']
    >>> sorted(state_dict(ddp_like))
    ['bias', 'weight']
    """
    rename = renamer(model)
    state: Dict[str, Tensor] = {}
    for key, value in model.state_dict(keep_vars=keep_vars).items():
        name = rename(key)
        if name in state:
            raise ValueError(f"two state entries of the model are named {name!r} once the "
                             f"wrappers' parts are dropped (one is {key!r})")
        state[name] = value
    return state
