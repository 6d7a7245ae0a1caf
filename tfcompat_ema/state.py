"""The state side of ``ExponentialMovingAverage``: ``state_dict``, ``load_state_dict``, ``to``.

A mixin of :class:`tfcompat_ema.ExponentialMovingAverage`; each method checks everything
before it changes anything, under the object's lock.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Mapping

import torch

from . import validation as check

Tensor = torch.Tensor

#: The ``state_dict`` key of the automatic update count.
NUM_UPDATES_KEY = "num_updates"
#: Pass as ``num_updates`` to count updates automatically.
AUTO = "auto"


class StateMixin:
    """``state_dict``, ``load_state_dict`` and ``to``."""

    def state_dict(self) -> Dict[str, Tensor]:
        """The averages under their TF names, with zero-debias state and the automatic count.

        Keys: ``"<name>/<ema name>"`` for each average, ``"<average name>/biased"`` and
        ``"<average name>/local_step"`` for debiased ones, and ``"num_updates"`` with
        ``num_updates="auto"``. The values are the live tensors, as ``nn.Module.state_dict``
        returns them: clone them to keep a snapshot.
        """
        with self._lock:
            state = self._state()
            if not self._slots and not self._loaded:
                # remembered: a state without averages handed back while this EMA still has
                # none (this dict or a copy of it) is what torch.distributed.checkpoint
                # leaves when it had no averages to load into
                self._gave_empty_state = True
            return state

    def _state(self) -> Dict[str, Tensor]:
        """``state_dict()``'s entries (the caller holds the lock), remembering nothing."""
        state: Dict[str, Tensor] = {}
        for slot in self._slots.values():
            state.update((k, v.detach()) for k, v in slot.state().items())
        state.update(self._loaded)
        if self._num_updates == AUTO:
            state[NUM_UPDATES_KEY] = torch.tensor(self._update_count, dtype=torch.int64)
        return state

    def load_state_dict(self, state_dict) -> None:
        """Load a ``state_dict``; refuse (changing nothing) on any missing, extra or odd entry.

        Averages of variables not applied yet wait for them, matched by name at their first
        ``apply``/``apply_tensors``, and checked against them there.

        Through ``torch.distributed.checkpoint``, which loads into the tensors it is given,
        create the averages first (``ema.apply(model)``), then load into
        ``ema.state_dict()``. A state without averages, loaded into an EMA that gave its
        ``state_dict()`` while it had no averages and still has none, is refused: that is
        what DCP leaves when it had nothing to load into (the next ``apply`` would silently
        start the averages afresh). Into an EMA that never gave its state, a state without
        averages loads (a count to start from, a save made before the first ``apply``).
        """
        self._load_state(state_dict)

    def _load_state(self, state_dict, holder: str = "EMA") -> None:
        """``load_state_dict``; ``holder`` words the refusal of the empty state handed back
        (``"EMAModule"``: its extra state, whose averages its ``update()`` creates)."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"load_state_dict takes a mapping, got {type(state_dict).__name__}")
        state = dict(state_dict)
        with self._lock:
            handed_back_empty = getattr(self, "_gave_empty_state", False) and not self._loaded
            count = None
            if self._num_updates == AUTO:
                if NUM_UPDATES_KEY not in state:
                    raise KeyError(f"state has no {NUM_UPDATES_KEY!r} entry, "
                                   "which num_updates='auto' needs")
                count = check.check_count(NUM_UPDATES_KEY, state.pop(NUM_UPDATES_KEY))
            elif NUM_UPDATES_KEY in state:
                raise KeyError(f"state has a {NUM_UPDATES_KEY!r} entry, but this object does "
                               "not count updates (num_updates='auto')")
            for key, value in state.items():
                check.check_state_value(key, value)
            current = self._state()          # not state_dict(): a refused template stays refused
            current.pop(NUM_UPDATES_KEY, None)
            if self._slots:
                missing = sorted(set(current) - set(state))
                extra = sorted(set(state) - set(current))
                if missing or extra:
                    raise KeyError(f"state does not match the averages kept: missing {missing}, "
                                   f"unexpected {extra}")
                for key, value in state.items():
                    check.check_like(key, current[key], value, what="the average kept")
            else:
                if not state and handed_back_empty:
                    create, into = ("ema.apply(model)", "ema") if holder == "EMA" else \
                        ("one update() of the EMAModule", "the EMAModule's")
                    raise ValueError(
                        f"this state holds no averages, and this {holder}, which gave its state "
                        "while it had none, still holds no averages: torch.distributed.checkpoint "
                        "had nothing to load into, and the next update would start the "
                        "averages afresh. "
                        f"Create the averages first ({create}), then load into "
                        f"{into}.state_dict()")
                check.check_loaded_structure(state, self._name)
                debiased = [k for k in state if k.endswith("/biased")]
                if debiased and not self._zero_debias:
                    raise ValueError(f"the state has zero-debias state ({debiased[0]!r}, ...), "
                                     "but this EMA has zero_debias=False: load it into an EMA "
                                     "made like the one that saved it")
            # Everything is checked: from here on nothing can fail half-way.
            with ordinary_tensors():
                loaded = {}
                for key, value in state.items():
                    if key in current and key not in self._loaded:
                        current[key].copy_(value)
                    else:
                        loaded[key] = value.detach().clone()
                self._loaded = loaded
            if count is not None:
                self._update_count = count

    def to(self, device) -> "StateMixin":
        """Move every average (and its debias state) to ``device``; returns self.

        Only devices: an average's dtype is its variable's, so dtypes are refused.
        """
        if isinstance(device, torch.dtype) or not isinstance(device, (str, torch.device, int)) \
                or isinstance(device, bool):
            raise TypeError(f"to() moves the averages to a device (a str, torch.device or "
                            f"index), got {device!r}: an average's dtype is its variable's")
        device = torch.device(device)
        if device.type == "meta":
            raise ValueError("to('meta') would drop every average's values")
        with self._lock:
            moved = {name: {key: value.to(device) for key, value in vars(slot).items()
                            if key in ("shadow", "biased", "local_step") and value is not None}
                     for name, slot in self._slots.items()}
            loaded = {k: v.to(device) for k, v in self._loaded.items()}
            for name, tensors in moved.items():
                for key, value in tensors.items():
                    setattr(self._slots[name], key, value)
            self._loaded = loaded
            self._plans.clear()
        return self


@contextlib.contextmanager
def ordinary_tensors() -> Iterator[None]:
    """Make ordinary tensors without autograd history, also inside ``inference_mode``."""
    with torch.inference_mode(False), torch.no_grad():
        yield
