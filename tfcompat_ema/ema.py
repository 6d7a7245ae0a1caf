"""``ExponentialMovingAverage``: TF's class, on PyTorch tensors."""
from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from . import kernels, tf_math

Tensor = torch.Tensor
VarList = Union[nn.Module, Mapping[str, Tensor], Iterable[Tuple[str, Tensor]]]

#: Pass as ``num_updates`` to count updates automatically (see the class docstring).
AUTO = "auto"
#: The ``state_dict`` key of the automatic update count.
NUM_UPDATES_KEY = "num_updates"


@dataclass
class _Slot:
    """The average of one variable (``var`` tracked by reference) or fed tensor (``var`` None)."""
    name: str
    average_name: str
    var: Optional[Tensor]
    shadow: Tensor
    biased: Optional[Tensor] = None      # zero_debias state of fed tensors, as in TF
    local_step: Optional[Tensor] = None

    def state(self) -> Dict[str, Tensor]:
        state = {self.average_name: self.shadow}
        if self.biased is not None:
            state[self.average_name + "/biased"] = self.biased
            state[self.average_name + "/local_step"] = self.local_step
        return state


@dataclass
class _Plan:
    """An ``apply`` prepared once: its variables' averages grouped into kernel batches.

    It holds while the same variables keep their memory and shapes; anything else
    (a new variable, a variable given new storage) sends ``apply`` through its full checks.
    """
    slots: List[_Slot]
    batches: List[Tuple[torch.dtype, "kernels.Batch"]]

    def __post_init__(self):
        self.variables = [slot.var for slot in self.slots]
        self.pointers = list(map(Tensor.data_ptr, self.variables))
        self.shapes = [v.shape for v in self.variables]

    def matches(self, pairs: Optional[List[Tuple[str, Tensor]]]) -> bool:
        if pairs is not None and not all(v is var for (_, v), var in zip(pairs, self.variables)):
            return False
        return (list(map(Tensor.data_ptr, self.variables)) == self.pointers
                and [v.shape for v in self.variables] == self.shapes)


def _groups(slots: Iterable[_Slot]) -> Dict[Tuple[torch.device, torch.dtype, bool], List[_Slot]]:
    """Slots by device, dtype and whether they are debiased: one kernel batch each."""
    groups: Dict[Tuple[torch.device, torch.dtype, bool], List[_Slot]] = {}
    for slot in slots:
        key = (slot.shadow.device, slot.shadow.dtype, slot.biased is not None)
        groups.setdefault(key, []).append(slot)
    return groups


class ExponentialMovingAverage:
    """Moving averages of PyTorch tensors, bitwise equal to ``tf.train.ExponentialMovingAverage``.

    Each ``apply`` updates every shadow as TF does::

        decay = min(decay, (1 + num_updates) / (10 + num_updates))   # float32; cap only with num_updates
        shadow -= (shadow - value) * (1 - decay)                       # 1 - decay in float32, then cast

    Args:
        decay: a float in [0, 1], a 0-dim floating tensor (read at every ``apply``, like a
            TF ``Variable``) or a callable returning either.
        num_updates: None (no cap), an int, a 0-dim integer tensor (read at every
            ``apply``), a callable returning either, or ``"auto"``: the number of earlier
            ``apply`` and ``apply_tensors`` calls, counted by this object and saved in its
            ``state_dict``. (If you call both methods every step, pass your own step count.)
        zero_debias: debias the averages of tensors fed through ``apply_tensors``
            (they start at zero); variables' averages start at the variable and are never
            debiased, as in TF.
        name: the suffix of every average's name, ``"<variable name>/<name>"``.

    Variables are tracked by reference: ``apply`` reads their current values each time.

    Example:
        >>> import torch
        >>> from tfcompat_ema import ExponentialMovingAverage
        >>> model = torch.nn.Linear(2, 1)
        >>> ema = ExponentialMovingAverage(decay=0.9)
        >>> ema.apply(model)                      # shadows start at the weights
        >>> with torch.no_grad():
        ...     _ = model.bias.fill_(1.0)
        >>> ema.apply()                           # every tracked variable
        >>> ema.average_name(model.bias)
        'bias/ExponentialMovingAverage'
        >>> bool(ema.average("bias") != model.bias)
        True
    """

    def __init__(self, decay, num_updates=None, zero_debias: bool = False,
                 name: str = "ExponentialMovingAverage"):
        if not callable(decay):
            _check_decay(decay)
        if not (num_updates is None or num_updates == AUTO or callable(num_updates)):
            _check_num_updates(num_updates)
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self._decay = decay
        self._num_updates = num_updates
        self._zero_debias = bool(zero_debias)
        self._name = name
        self._slots: Dict[str, _Slot] = {}
        self._names_by_id: Dict[int, str] = {}       # id(variable) -> name, for lookups by tensor
        self._plans: Dict[Optional[Tuple[str, ...]], _Plan] = {}   # apply's prepared batches
        self._modules: List[nn.Module] = []          # applied modules, for variables_to_restore
        self._loaded: Dict[str, Tensor] = {}         # loaded averages waiting for their variable
        self._update_count = 0                       # the "auto" num_updates

    # ------------------------------------------------------------------ properties
    @property
    def name(self) -> str:
        """The name of this object, the suffix of its averages' names."""
        return self._name

    @property
    def num_updates(self) -> Optional[int]:
        """The automatic update count (``num_updates="auto"``), else None."""
        return self._update_count if self._num_updates == AUTO else None

    # ------------------------------------------------------------------ updates
    @torch.no_grad()
    def apply(self, var_list: Optional[VarList] = None) -> None:
        """Update the averages of variables, creating them on first sight.

        ``var_list``: an ``nn.Module`` (its parameters that require grad), a mapping of
        names to tensors, or an iterable of ``(name, tensor)`` pairs. None updates every
        tracked variable, which is also the fastest way to update them all: after the first
        call, ``apply()`` does no per-variable work beyond checking that each variable
        still has its memory and shape.
        """
        pairs = None if var_list is None else _named_tensors(var_list)
        key = None if pairs is None else tuple(name for name, _ in pairs)
        decay = self._read_decay()
        plan = self._plans.get(key)
        if plan is None or not plan.matches(pairs):
            plan = self._plans[key] = self._plan(pairs, var_list)
        for dtype, batch in plan.batches:
            tf_math.assign_moving_average_(batch, tf_math.update_weight(decay, dtype))
        self._update_count += 1

    def _plan(self, pairs: Optional[List[Tuple[str, Tensor]]], var_list) -> "_Plan":
        """Check an update of variables, create their averages, and group them for the kernels."""
        if pairs is None:
            pairs = [(n, s.var) for n, s in self._slots.items() if s.var is not None]
            if not pairs:
                raise RuntimeError("apply() with no argument updates the tracked variables, "
                                   "but none are tracked yet: pass a module or tensors first")
        self._check_update(pairs, variables=True)
        for name, var in pairs:
            slot = self._slots.get(name)
            if slot is None:
                slot = self._slots[name] = self._new_slot(name, var, var=var)
                self._plans.clear()
            elif slot.var is not var:   # the same memory seen through another tensor object
                self._names_by_id.pop(id(slot.var), None)
                slot.var = var
                self._plans.clear()
            self._names_by_id[id(var)] = name
        if isinstance(var_list, nn.Module) and all(var_list is not m for m in self._modules):
            self._modules.append(var_list)
        slots = [self._slots[name] for name, _ in pairs]
        return _Plan(slots, [(dtype, kernels.Batch([s.shadow for s in group],
                                                   [s.var for s in group]))
                             for (_, dtype, _), group in _groups(slots).items()])

    @torch.no_grad()
    def apply_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Update the averages of non-variable tensors (TF's graph-mode tensors, e.g. a loss).

        A tensor's average starts at zero; with ``zero_debias=True`` it is debiased with
        TF's ``biased`` and ``local_step`` state. The tensors are read now, not tracked.
        """
        if not isinstance(tensors, Mapping):
            raise TypeError(f"apply_tensors takes a mapping of names to tensors, "
                            f"got {type(tensors).__name__}")
        pairs = [(name, value.detach()) for name, value in _named_tensors(tensors)]
        self._check_update(pairs, variables=False)
        decay = self._read_decay()
        for name, value in pairs:
            if name not in self._slots:
                self._slots[name] = self._new_slot(name, value, var=None)
        values = dict(pairs)
        for (_, dtype, debias), group in _groups([self._slots[name] for name, _ in pairs]).items():
            d = tf_math.update_weight(decay, dtype)
            batch = kernels.Batch([s.shadow for s in group], [values[s.name] for s in group],
                                  biased=[s.biased for s in group] if debias else None)
            if debias:
                tf_math.zero_debias_(batch, [s.local_step for s in group], d)
            else:
                tf_math.assign_moving_average_(batch, d)
        self._update_count += 1

    def _check_update(self, pairs: List[Tuple[str, Tensor]], variables: bool) -> None:
        """Every check of an update, done before anything changes."""
        kind = "variable" if variables else "tensor"
        seen: Dict[str, Tensor] = {}
        for name, value in pairs:
            if value.dtype not in tf_math.SUPPORTED_DTYPES:
                raise TypeError(f"The {kind}s must be half, float, or double: "
                                f"{name!r} has dtype {value.dtype}")
            if name in seen and not _same_tensor(seen[name], value):
                raise ValueError(f"two different tensors are named {name!r}")
            seen[name] = value
            slot = self._slots.get(name)
            if slot is None:
                loaded = self._loaded.get(self.average_name(name))
                if loaded is None and self._loaded:
                    raise ValueError(
                        f"a state was loaded, but it has no average for the new {kind} {name!r} "
                        f"(waiting for their variables: {sorted(self._loaded)})")
                if loaded is not None:
                    _check_like(self.average_name(name), loaded, value, what=f"{kind} {name!r}")
                continue
            if (slot.var is not None) != variables:
                other = "a variable (use apply)" if slot.var is not None else \
                    "a fed tensor (use apply_tensors)"
                raise ValueError(f"{name!r} is already averaged as {other}")
            if variables and not _same_tensor(slot.var, value):
                raise ValueError(f"two different tensors are named {name!r}: the variable "
                                 "tracked under this name is another tensor")
            _check_like(name, slot.shadow, value, what=f"the average of {name!r}")
            if value.device != slot.shadow.device:
                raise ValueError(f"{name!r} is on {value.device} but its average is on "
                                 f"{slot.shadow.device}: move the averages with ema.to(device)")

    def _read_decay(self):
        decay = self._decay() if callable(self._decay) else self._decay
        _check_decay(decay)
        if self._num_updates == AUTO:
            num_updates = self._update_count
        elif callable(self._num_updates):
            num_updates = self._num_updates()
        else:
            num_updates = self._num_updates
        if num_updates is not None:
            _check_num_updates(num_updates)
        return tf_math.float32_decay(_detached(decay), _detached(num_updates))

    def _new_slot(self, name: str, value: Tensor, var: Optional[Tensor]) -> _Slot:
        average_name = self.average_name(name)
        loaded = {key[len(average_name):]: self._loaded.pop(key)
                  for key in [k for k in self._loaded
                              if k == average_name or k.startswith(average_name + "/")]}

        def state(suffix: str, initial: Tensor) -> Tensor:
            if suffix in loaded:
                return loaded[suffix].to(device=value.device, dtype=value.dtype, copy=True)
            return initial

        debias = var is None and self._zero_debias
        zeros = torch.zeros_like(value, memory_format=torch.preserve_format)
        return _Slot(
            name, average_name, var,
            shadow=state("", value.clone(memory_format=torch.preserve_format) if var is not None
                         else zeros),
            biased=state("/biased", zeros.clone()) if debias else None,
            local_step=state("/local_step", value.new_zeros(())) if debias else None)

    # ------------------------------------------------------------------ TF's accessors
    def average(self, var: Union[str, Tensor]) -> Optional[Tensor]:
        """The average of ``var`` (a tracked tensor or a name); None for an untracked tensor.

        A name also finds an average loaded by ``load_state_dict`` that waits for its variable.
        """
        if isinstance(var, str):
            loaded = self._loaded.get(self.average_name(var))
            return loaded if loaded is not None else self._slot_named(var).shadow
        slot = self._slot_of(var)
        return None if slot is None else slot.shadow

    def average_name(self, var: Union[str, Tensor]) -> str:
        """The name of ``var``'s average: ``"<variable name>/<ema name>"``.

        A name works before ``apply`` too, as in TF; a tensor must be tracked, since only
        then is its name known.
        """
        if isinstance(var, str):
            slot = self._slots.get(var)
            return slot.average_name if slot is not None else f"{var}/{self._name}"
        slot = self._slot_of(var)
        if slot is None:
            raise KeyError("this tensor is not tracked, so its name is unknown: "
                           "pass its name instead")
        return slot.average_name

    def variables_to_restore(self, moving_avg_variables=None) -> Dict[str, Tensor]:
        """TF's restore map: which saved entry to load into which tensor.

        Every averaged variable (or those in ``moving_avg_variables``, tensors or names)
        under its average name; then, unless the key is taken, every other entry under
        its own name: the state (parameters and buffers) of the applied modules, the
        tracked variables, and this object's own state (the averages of fed tensors and
        their debias state). Loading a checkpoint's entries into these tensors gives a
        model its averaged weights, as TF's ``Saver(ema.variables_to_restore())`` does.

        Example:
            >>> import torch
            >>> from tfcompat_ema import ExponentialMovingAverage
            >>> model = torch.nn.BatchNorm1d(2)
            >>> ema = ExponentialMovingAverage(0.9)
            >>> ema.apply(model)
            >>> sorted(ema.variables_to_restore())[:3]
            ['bias/ExponentialMovingAverage', 'num_batches_tracked', 'running_mean']
        """
        if moving_avg_variables is None:
            averaged = [s for s in self._slots.values() if s.var is not None]
        else:
            averaged = [self._slot_named(v) if isinstance(v, str) else self._tracked_slot(v)
                        for v in moving_avg_variables]
        name_map = {slot.average_name: slot.var for slot in averaged}
        averaged_names = {slot.name for slot in averaged}
        others: List[Tuple[str, Tensor]] = []
        for module in self._modules:
            others.extend(module.state_dict(keep_vars=True).items())
        others.extend((n, s.var) for n, s in self._slots.items() if s.var is not None)
        for slot in self._slots.values():
            others.extend(slot.state().items())
        for name, tensor in others:
            if name not in averaged_names and name not in name_map:
                name_map[name] = tensor
        return name_map

    def _slot_named(self, name: str) -> _Slot:
        slot = self._slots.get(name)
        if slot is None:
            raise KeyError(f"no average named {name!r} is kept; averaged: "
                           f"{_preview(self._slots)}")
        return slot

    def _slot_of(self, tensor: Tensor) -> Optional[_Slot]:
        slot = self._slots.get(self._names_by_id.get(id(tensor)))
        if slot is not None and slot.var is tensor:
            return slot
        for slot in self._slots.values():
            if slot.var is not None and _same_tensor(slot.var, tensor):
                return slot
        return None

    def _tracked_slot(self, tensor: Tensor) -> _Slot:
        slot = self._slot_of(tensor)
        if slot is None:
            raise KeyError("a tensor in moving_avg_variables is not tracked")
        return slot

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def copy_to(self, var_list: Optional[VarList] = None) -> None:
        """Copy the averages into their variables (all tracked ones, or those in ``var_list``)."""
        for slot in self._variable_slots(var_list):
            slot.var.copy_(slot.shadow)

    @contextlib.contextmanager
    def average_parameters(self, var_list: Optional[VarList] = None) -> Iterator[None]:
        """Swap the averages into the variables for the block, and the live values back after.

        The live values come back bit for bit, also when the block raises.

        Example:
            >>> import torch
            >>> from tfcompat_ema import ExponentialMovingAverage
            >>> model = torch.nn.Linear(2, 1)
            >>> ema = ExponentialMovingAverage(0.5)
            >>> ema.apply(model)
            >>> live = model.weight.detach().clone()
            >>> with torch.no_grad():
            ...     _ = model.weight.add_(1.0)
            >>> ema.apply(model)
            >>> with ema.average_parameters(model):
            ...     torch.equal(model.weight, ema.average(model.weight))
            True
            >>> torch.equal(model.weight, live + 1.0)
            True
        """
        slots = self._variable_slots(var_list)
        with torch.no_grad():
            saved = [slot.var.clone(memory_format=torch.preserve_format) for slot in slots]
            for slot in slots:
                slot.var.copy_(slot.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for slot, live in zip(slots, saved):
                    slot.var.copy_(live)

    def _variable_slots(self, var_list: Optional[VarList]) -> List[_Slot]:
        if var_list is None:
            return [slot for slot in self._slots.values() if slot.var is not None]
        slots = []
        for name, tensor in _named_tensors(var_list):
            slot = self._slot_named(name)
            if slot.var is None:
                raise ValueError(f"{name!r} is a fed tensor, not a variable")
            slots.append(slot)
        return slots

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Tensor]:
        """The averages under their TF names, with zero-debias state and the automatic count.

        Keys: ``"<name>/<ema name>"`` for each average, ``"<average name>/biased"`` and
        ``"<average name>/local_step"`` for debiased ones, and ``"num_updates"`` with
        ``num_updates="auto"``. The values are the live tensors, as ``nn.Module.state_dict``
        returns them: clone them to keep a snapshot.
        """
        state: Dict[str, Tensor] = {}
        for slot in self._slots.values():
            state.update((k, v.detach()) for k, v in slot.state().items())
        state.update(self._loaded)
        if self._num_updates == AUTO:
            state[NUM_UPDATES_KEY] = torch.tensor(self._update_count, dtype=torch.int64)
        return state

    def load_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load a ``state_dict``; refuse (changing nothing) on any missing, extra or odd entry.

        Averages of variables not applied yet wait for them, matched by name at their first
        ``apply``/``apply_tensors``, and checked against them there.
        """
        state = dict(state_dict)
        for key, value in state.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"state entry {key!r} is a {type(value).__name__}, not a tensor")
        count = None
        if self._num_updates == AUTO:
            if NUM_UPDATES_KEY not in state:
                raise KeyError(f"state has no {NUM_UPDATES_KEY!r} entry, "
                               "which num_updates='auto' needs")
            count = state.pop(NUM_UPDATES_KEY)
            if count.dim() != 0 or count.dtype.is_floating_point or int(count) < 0:
                raise ValueError(f"state entry {NUM_UPDATES_KEY!r} must be a 0-dim non-negative "
                                 f"integer, got {count!r}")
        current = self.state_dict()
        current.pop(NUM_UPDATES_KEY, None)
        if self._slots:
            missing = sorted(set(current) - set(state))
            extra = sorted(set(state) - set(current))
            if missing or extra:
                raise KeyError(f"state does not match the averages kept: missing {missing}, "
                               f"unexpected {extra}")
            for key, value in state.items():
                _check_like(key, current[key], value, what="the average kept")
        else:
            _check_loaded_structure(state, self._name)
        # Everything is checked: from here on nothing can fail half-way.
        with torch.no_grad():
            loaded = {}
            for key, value in state.items():
                if key in current and key not in self._loaded:
                    current[key].copy_(value)
                else:
                    loaded[key] = value.detach().clone()
            self._loaded = loaded
        if count is not None:
            self._update_count = int(count)

    def to(self, device) -> "ExponentialMovingAverage":
        """Move every average (and its debias state) to ``device``; returns self."""
        for slot in self._slots.values():
            slot.shadow = slot.shadow.to(device)
            if slot.biased is not None:
                slot.biased = slot.biased.to(device)
                slot.local_step = slot.local_step.to(device)
        self._loaded = {k: v.to(device) for k, v in self._loaded.items()}
        self._plans.clear()
        return self


# ---------------------------------------------------------------------- helpers
def _named_tensors(var_list: VarList) -> List[Tuple[str, Tensor]]:
    if isinstance(var_list, nn.Module):
        return [(n, p) for n, p in var_list.named_parameters() if p.requires_grad]
    if isinstance(var_list, Tensor):
        raise TypeError("pass tensors with their names: a module, a mapping of names to "
                        "tensors, or (name, tensor) pairs")
    items = var_list.items() if isinstance(var_list, Mapping) else var_list
    pairs = []
    for item in items:
        try:
            name, tensor = item
        except (TypeError, ValueError):
            raise TypeError(f"expected (name, tensor) pairs, got {type(item).__name__}") from None
        if not isinstance(name, str) or not isinstance(tensor, Tensor):
            raise TypeError(f"expected a (str, Tensor) pair, got ({type(name).__name__}, "
                            f"{type(tensor).__name__})")
        pairs.append((name, tensor))
    return pairs


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """The same tensor object, or another view of exactly the same memory."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape
                      and a.stride() == b.stride() and a.dtype == b.dtype
                      and a.device == b.device)


def _check_like(name: str, reference: Tensor, value: Tensor, what: str) -> None:
    if value.shape != reference.shape or value.dtype != reference.dtype:
        raise ValueError(f"{name!r} has shape {tuple(value.shape)} and dtype {value.dtype}, "
                         f"but {what} has shape {tuple(reference.shape)} and dtype "
                         f"{reference.dtype}")


def _check_loaded_structure(state: Mapping[str, Tensor], ema_name: str) -> None:
    """A state loaded before its variables exist: each entry must be an average or its state."""
    suffix = "/" + ema_name
    for key, value in state.items():
        if key == NUM_UPDATES_KEY:
            raise KeyError(f"state has a {NUM_UPDATES_KEY!r} entry, but this object does not "
                           "count updates (num_updates='auto')")
        if key.endswith(suffix):
            if value.dtype not in tf_math.SUPPORTED_DTYPES:
                raise TypeError(f"state entry {key!r} has dtype {value.dtype}")
            continue
        base, _, leaf = key.rpartition("/")
        if leaf not in ("biased", "local_step") or not base.endswith(suffix):
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


def _check_decay(decay) -> None:
    if isinstance(decay, Tensor):
        if decay.numel() != 1 or decay.dim() > 1 or not decay.dtype.is_floating_point:
            raise ValueError(f"decay must be a 0-dim floating tensor, got shape "
                             f"{tuple(decay.shape)} and dtype {decay.dtype}")
        if decay.device.type != "cpu":
            return          # reading it would wait for the device
        value = float(decay)
    elif isinstance(decay, numbers.Real) and not isinstance(decay, bool):
        value = float(decay)
    else:
        raise TypeError(f"decay must be a float, a 0-dim tensor or a callable, got "
                        f"{type(decay).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {value}")


def _check_num_updates(num_updates) -> None:
    if isinstance(num_updates, Tensor):
        if num_updates.numel() != 1 or num_updates.dim() > 1 or \
                num_updates.dtype.is_floating_point or num_updates.dtype.is_complex or \
                num_updates.dtype == torch.bool:
            raise ValueError(f"num_updates must be a 0-dim integer tensor, got shape "
                             f"{tuple(num_updates.shape)} and dtype {num_updates.dtype}")
        if num_updates.device.type != "cpu":
            return
        value = int(num_updates)
    elif isinstance(num_updates, numbers.Integral) and not isinstance(num_updates, bool):
        value = int(num_updates)
    else:
        raise TypeError(f"num_updates must be None, 'auto', an int, a 0-dim integer tensor "
                        f"or a callable, got {num_updates!r}")
    if value < 0:
        raise ValueError(f"num_updates must be >= 0, got {value}")


def _detached(x):
    return x.detach().reshape(()) if isinstance(x, Tensor) else x


def _preview(names, limit: int = 8) -> str:
    names = list(names)
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more if names else "none"
