"""``ExponentialMovingAverage``: TF's class, on PyTorch tensors.

Checks live in :mod:`tfcompat_ema.validation`, the averages and ``apply``'s prepared
batches in :mod:`tfcompat_ema.plan`, the arithmetic in :mod:`tfcompat_ema.tf_math`, and
``copy_to``/``average_parameters``/``variables_to_restore`` in :mod:`tfcompat_ema.evaluation`,
``state_dict``/``load_state_dict``/``to`` in :mod:`tfcompat_ema.state`. Every
public method validates everything it was given before it changes anything, and holds the
object's lock while it reads or writes the averages, so calls from several threads take
turns instead of tearing an update.
"""
from __future__ import annotations

import threading
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from . import distributed, dtensors, kernels, tf_math, validation as check
from .evaluation import EvaluationMixin
from .plan import Plan, Slot, groups
from .state import AUTO, NUM_UPDATES_KEY, StateMixin, ordinary_tensors  # noqa: F401 (re-exported)
from .validation import VarList, named_tensors

Tensor = torch.Tensor


class ExponentialMovingAverage(EvaluationMixin, StateMixin):
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
        xla: update as TF does when XLA compiles it for this machine's CPU
            (``jit_compile=True``), see :func:`tfcompat_ema.tf_math.assign_moving_average_`.

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
                 name: str = "ExponentialMovingAverage", xla: bool = False):
        if not callable(decay):
            check.check_decay(decay)
        if not (num_updates is None or _is_auto(num_updates) or callable(num_updates)):
            check.check_num_updates(num_updates)
        check.check_zero_debias(zero_debias)
        check.check_name(name)
        if not isinstance(xla, bool):
            raise TypeError(f"xla must be a bool, got {type(xla).__name__}")
        self._xla = xla
        self._decay = decay
        self._num_updates = AUTO if _is_auto(num_updates) else num_updates
        self._zero_debias = bool(zero_debias)
        self._name = name
        self._slots: Dict[str, Slot] = {}
        self._names_by_id: Dict[int, str] = {}       # id(variable) -> name, for lookups by tensor
        self._plans: Dict[Optional[Tuple[str, ...]], Plan] = {}   # apply's prepared batches
        self._modules: List[nn.Module] = []          # applied modules, for variables_to_restore
        self._loaded: Dict[str, Tensor] = {}         # loaded averages waiting for their variable
        self._update_count = 0                       # the "auto" num_updates
        self._synced = distributed.new_synced()      # DDP wrappers whose averages were broadcast
        self._lock = threading.RLock()

    # A lock and raw pointers do not survive copying: a copy gets a new lock and re-plans.
    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_lock"], state["_plans"], state["_names_by_id"], state["_synced"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__.setdefault("_xla", False)
        self._lock = threading.RLock()
        self._synced = distributed.new_synced()
        self._plans = {}
        self._names_by_id = {id(s.var): n for n, s in self._slots.items() if s.var is not None}

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
        names to tensors, or an iterable of ``(name, tensor)`` pairs, each name once. None
        updates every tracked variable, which is also the fastest way to update them all:
        after the first call, ``apply()`` only checks that each variable and average still
        has its memory, shape, strides and dtype before the update.
        """
        pairs = None if var_list is None else named_tensors(var_list)
        self._apply(pairs, var_list if isinstance(var_list, nn.Module) else None)

    def _apply(self, pairs: Optional[List[Tuple[str, Tensor]]],
               module: Optional[nn.Module]) -> None:
        """``apply`` of named variables (None: the tracked ones), from ``module`` if given."""
        key = None if pairs is None else tuple(name for name, _ in pairs)
        with self._lock:
            decay = self._read_decay()
            plan = self._plans.get(key)
            # another module re-plans: the first update through a DDP wrapper broadcasts
            if plan is None or plan.module is not module or not plan.holds_for(
                    None if pairs is None else [tensor for _, tensor in pairs]):
                plan = self._plan(pairs, module)
                self._plans[key] = plan
            if plan.data_parallel:      # the first update through a DDP wrapper
                count = self._update_count if self._num_updates == AUTO else None
                distributed.broadcast_once(self._synced, plan.data_parallel, plan.slots, count)
            for dtype, batch in plan.batches:
                tf_math.assign_moving_average_(batch, tf_math.update_weight(decay, dtype),
                                               self._xla)
            self._update_count += 1

    def _plan(self, pairs: Optional[List[Tuple[str, Tensor]]],
              module: Optional[nn.Module]) -> Plan:
        """Check an update of variables, create their averages, and group them for the kernels."""
        if pairs is None:
            pairs = [(n, s.var) for n, s in self._slots.items() if s.var is not None]
            if not pairs:
                raise RuntimeError("apply() with no argument updates the tracked variables, "
                                   "but none are tracked yet: pass a module or tensors first")
        self._check_update(pairs, variables=True)
        new_slots = {name: self._new_slot(name, var, var=var)
                     for name, var in pairs if name not in self._slots}
        # Checked and allocated: from here on nothing fails.
        self._add_slots(new_slots)
        for name, var in pairs:
            slot = self._slots[name]
            if slot.var is not var:     # the same memory seen through another tensor object
                self._names_by_id.pop(id(slot.var), None)
                slot.var = var
                self._plans.clear()
            self._names_by_id[id(var)] = name
        if module is not None and all(module is not m for m in self._modules):
            self._modules.append(module)
        plan = Plan([self._slots[name] for name, _ in pairs])
        plan.module = module
        plan.data_parallel = [] if module is None else distributed.data_parallel_modules(module)
        return plan

    @torch.no_grad()
    def apply_tensors(self, tensors, reduce: Optional[str] = None, group=None) -> None:
        """Update the averages of non-variable tensors (TF's graph-mode tensors, e.g. a loss).

        ``tensors``: a mapping of names to tensors. A tensor's average starts at zero; with
        ``zero_debias=True`` it is debiased with TF's ``biased`` and ``local_step`` state.
        The tensors are read now, not tracked. ``reduce="mean"``: average each tensor's mean
        over the ranks of ``group`` (default: all), as TF's ``MirroredStrategy`` averages
        per-replica values (see :mod:`tfcompat_ema.distributed`); every rank must call.
        """
        if not isinstance(tensors, Mapping):
            raise TypeError(f"apply_tensors takes a mapping of names to tensors, "
                            f"got {type(tensors).__name__}")
        pairs = [(name, value.detach()) for name, value in named_tensors(tensors)]
        with self._lock:
            self._check_update(pairs, variables=False)
            distributed.check_reduce(reduce, group, pairs)
            decay = self._read_decay()
            if reduce is not None:
                pairs = distributed.mean_across_ranks(pairs, group)
            self._add_slots({name: self._new_slot(name, value, var=None)
                             for name, value in pairs if name not in self._slots})
            values = dict(pairs)
            for (_, dtype, debias), group in groups([self._slots[n] for n, _ in pairs]).items():
                d = tf_math.update_weight(decay, dtype)
                batch = kernels.Batch([s.shadow for s in group], [values[s.name] for s in group],
                                      biased=[s.biased for s in group] if debias else None)
                if debias:
                    tf_math.zero_debias_(batch, [s.local_step for s in group], d, self._xla)
                else:
                    tf_math.assign_moving_average_(batch, d, self._xla)
            self._update_count += 1

    def _check_update(self, pairs: List[Tuple[str, Tensor]], variables: bool) -> None:
        """Every check of an update, done before anything changes."""
        kind = "variable" if variables else "tensor"
        names_by_id: Dict[int, str] = {}
        for name, value in pairs:
            check.check_tensor(name, value, what=kind, dtensor=variables)
            if self._xla:
                kernels.check_xla(name, value)
            if variables:       # one variable, one average (TF keys averages by variable)
                other = names_by_id.setdefault(id(value), name)
                tracked = self._names_by_id.get(id(value))
                if other == name and tracked not in (None, name) and \
                        self._slots[tracked].var is value:
                    other = tracked
                if other != name:
                    raise ValueError(f"{name!r} is the tensor averaged as {other!r}: one "
                                     "variable has one average")
            slot = self._slots.get(name)
            if slot is None:
                self._check_new(name, value, variables)
                continue
            for average in slot.state().values():
                check.check_storage(name, average, what="the average of")
            if (slot.var is not None) != variables:
                other = "a variable (use apply)" if slot.var is not None else \
                    "a fed tensor (use apply_tensors)"
                raise ValueError(f"{name!r} is already averaged as {other}")
            if variables:
                check.check_same_variable(name, slot.var, value)
            check.check_like(name, slot.shadow, value, what=f"the average of {name!r}")
            if value.device != slot.shadow.device:
                raise ValueError(f"{name!r} is on {value.device} but its average is on "
                                 f"{slot.shadow.device}: move the averages with ema.to(device)")

    def _check_new(self, name: str, value: Tensor, variable: bool) -> None:
        """A first sight of ``name``: if a state was loaded, it must hold a fitting average."""
        if not self._loaded:
            return
        kind = "variable" if variable else "tensor"
        average_name = self.average_name(name)
        loaded = self._loaded.get(average_name)
        if loaded is None:
            raise ValueError(f"a state was loaded, but it has no average for the new {kind} "
                             f"{name!r} (waiting for their variables: "
                             f"{check.preview(self._loaded)})")
        check.check_like(name, loaded, value, what=f"its loaded average {average_name!r}")
        has_debias_state = average_name + "/biased" in self._loaded
        debiased = not variable and self._zero_debias
        if has_debias_state != debiased:
            raise ValueError(
                f"the loaded average {average_name!r} "
                f"{'has' if has_debias_state else 'has no'} zero-debias state (biased, "
                f"local_step), but the {kind} {name!r} {'is' if debiased else 'is not'} "
                f"debiased here (zero_debias={self._zero_debias}, "
                f"{'a variable' if variable else 'a fed tensor'}): load it into an EMA "
                "made like the one that saved it")

    def _read_decay(self):
        decay = self._decay() if callable(self._decay) else self._decay
        check.check_decay(decay)
        if self._num_updates == AUTO:
            num_updates = self._update_count
            if num_updates >= check.MAX_COUNT:
                raise ValueError("the automatic count is at 2**63 - 1, TF's int64 limit")
        elif callable(self._num_updates):
            num_updates = self._num_updates()
        else:
            num_updates = self._num_updates
        if num_updates is not None:
            check.check_num_updates(num_updates)
        return tf_math.float32_decay(_detached(decay), _detached(num_updates))

    def _new_slot(self, name: str, value: Tensor, var: Optional[Tensor]) -> Slot:
        """A new average (not stored yet), started at the loaded state if there is one."""
        average_name = self.average_name(name)
        debias = var is None and self._zero_debias
        # Averages are ordinary tensors even when made under inference_mode, so that
        # later updates outside it can write them.
        with ordinary_tensors():
            def state(suffix: str, initial) -> Tensor:
                loaded = self._loaded.get(average_name + suffix)
                if loaded is not None:
                    return loaded.to(device=value.device, dtype=value.dtype, copy=True)
                return initial()

            zeros = lambda: dtensors.zeros_like(value)  # noqa: E731
            return Slot(
                name, average_name, var,    # a DTensor's average: a DTensor laid out alike
                shadow=state("", (lambda: dtensors.clone(value)) if var is not None else zeros),
                biased=state("/biased", zeros) if debias else None,
                local_step=state("/local_step", lambda: value.new_zeros(())) if debias
                else None)

    def _add_slots(self, new_slots: Dict[str, Slot]) -> None:
        for name, slot in new_slots.items():
            self._slots[name] = slot
            for key in slot.state():
                self._loaded.pop(key, None)
        if new_slots:
            self._plans.clear()

    # ------------------------------------------------------------------ TF's accessors
    def average(self, var: Union[str, Tensor]) -> Optional[Tensor]:
        """The average of ``var`` (a tracked tensor or a name); None for an untracked tensor.

        A name also finds an average loaded by ``load_state_dict`` that waits for its
        variable; an unknown name raises ``KeyError``.
        """
        if isinstance(var, str):
            loaded = self._loaded.get(self.average_name(var))
            return loaded if loaded is not None else self._slot_named(var).shadow
        slot = self._slot_of(_tensor_arg(var, "average"))
        return None if slot is None else slot.shadow

    def average_name(self, var: Union[str, Tensor]) -> str:
        """The name of ``var``'s average: ``"<variable name>/<ema name>"``.

        A name works before ``apply`` too, as in TF; a tensor must be tracked (or belong to
        an applied module), since only then is its name known.
        """
        if isinstance(var, str):
            slot = self._slots.get(var)
            return slot.average_name if slot is not None else f"{var}/{self._name}"
        return f"{self._name_of(_tensor_arg(var, 'average_name'))}/{self._name}"

    def _slot_named(self, name: str) -> Slot:
        slot = self._slots.get(name)
        if slot is None:
            raise KeyError(f"no average named {name!r} is kept; averaged: "
                           f"{check.preview(self._slots)}")
        return slot

    def _slot_of(self, tensor: Tensor) -> Optional[Slot]:
        slot = self._slots.get(self._names_by_id.get(id(tensor)))
        if slot is not None and slot.var is tensor:
            return slot
        for slot in self._slots.values():
            if slot.var is not None and check.same_tensor(slot.var, tensor):
                return slot
        return None

# ---------------------------------------------------------------------- helpers
def _is_auto(num_updates) -> bool:
    return isinstance(num_updates, str) and num_updates == AUTO


def _tensor_arg(var, method: str) -> Tensor:
    if not isinstance(var, Tensor):
        raise TypeError(f"{method}() takes a tensor or its name, got {type(var).__name__}")
    return var


def _detached(x):
    return x.detach().reshape(()) if isinstance(x, Tensor) else x
