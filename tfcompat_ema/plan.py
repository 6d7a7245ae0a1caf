"""The averages an ``ExponentialMovingAverage`` keeps, and ``apply``'s prepared updates.

A :class:`Slot` is one average. A :class:`Plan` is one ``apply`` call's averages grouped into
kernel batches, prepared once and reused while nothing it relies on has changed. The fused
kernel receives raw pointers, so "nothing has changed" is checked at every reuse, for the
variables (memory, shape, strides, dtype) and for the averages (memory): a variable re-laid
out in place (``p.data = p.data.t()``), reinterpreted (``p.data = p.data.view(torch.int32)``),
or an average whose storage moved (``share_memory_()``, ``resize_``) sends ``apply`` back
through its full checks instead of handing the kernel stale pointers.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from . import dtensors, kernels
from .layout_guard import LayoutGuard, pointers, same_pointers

Tensor = torch.Tensor


@dataclass
class Slot:
    """The average of one variable (``var``, tracked by reference) or fed tensor (``var`` None)."""
    name: str
    average_name: str
    var: Optional[Tensor]
    shadow: Tensor
    biased: Optional[Tensor] = None      # zero_debias state of fed tensors, as in TF
    local_step: Optional[Tensor] = None

    def state(self) -> Dict[str, Tensor]:
        """This average's ``state_dict`` entries."""
        state = {self.average_name: self.shadow}
        if self.biased is not None:
            state[self.average_name + "/biased"] = self.biased
            state[self.average_name + "/local_step"] = self.local_step
        return state


class Plan:
    """An ``apply`` prepared once: its variables' averages grouped into kernel batches."""

    def __init__(self, slots: List[Slot]):
        self.slots = slots
        self.module = None                   # the module the update reads, if any
        self.data_parallel: List = []        # (path, DDP wrapper) the update goes through
        self.variables = [slot.var for slot in slots]
        # DTensors are updated and checked by their local shards (their own address is 0)
        self.sharded = any(map(dtensors.is_dtensor, self.variables))
        local = dtensors.local if self.sharded else _same
        # every variable a DTensor (FSDP2): read the shards with one attribute lookup each
        every = all(map(dtensors.is_dtensor, self.variables))
        self._locals = _LOCAL_TENSOR if every else dtensors.local
        self._spec_of = _SPEC if every else _spec
        self.shadows = [local(tensor) for slot in slots for tensor in slot.state().values()]
        self.specs = list(map(_spec, self.variables)) if self.sharded else None
        self.variable_layouts = LayoutGuard(list(map(local, self.variables)))
        self.shadow_pointers = pointers(self.shadows)
        self.batches = [(dtype, kernels.Batch([local(s.shadow) for s in group],
                                              [local(s.var) for s in group]))
                        for (_, dtype, _), group in groups(slots).items()]

    def holds_for(self, variables: Optional[List[Tensor]]) -> bool:
        """Whether this plan still describes these variables (None: the plan's own) and
        the averages still live where the plan's pointers point."""
        if variables is not None and not all(map(_is, variables, self.variables)):
            return False
        if self.sharded:        # a shard swapped under a DTensor, or a new layout (spec)
            return (self.variable_layouts.holds(list(map(self._locals, self.variables)))
                    and list(map(self._spec_of, self.variables)) == self.specs
                    and same_pointers(self.shadows, self.shadow_pointers))
        return (self.variable_layouts.holds(self.variables)
                and same_pointers(self.shadows, self.shadow_pointers))


def groups(slots: Iterable[Slot]) -> Dict[Tuple[torch.device, torch.dtype, bool], List[Slot]]:
    """Slots by device, dtype and whether they are debiased: one kernel batch each."""
    grouped: Dict[Tuple[torch.device, torch.dtype, bool], List[Slot]] = {}
    for slot in slots:
        key = (slot.shadow.device, slot.shadow.dtype, slot.biased is not None)
        grouped.setdefault(key, []).append(slot)
    return grouped


def _is(a, b) -> bool:
    return a is b


def _same(tensor: Tensor) -> Tensor:
    return tensor


_LOCAL_TENSOR = operator.attrgetter("_local_tensor")
_SPEC = operator.attrgetter("_spec")


def _spec(tensor: Tensor):
    """A DTensor's sharding spec (the same object, or an equal one), or None."""
    return getattr(tensor, "_spec", None)
