"""The EMA side of the checkpoint bridge: which averages go into an EMA when resuming, its
step count, and which come out of it on export.

TF's EMA averages the variables it was given: the trainable ones, or all of
``model.variables`` (BatchNorm's moving statistics too). Resuming puts every average whose
variable has a PyTorch home, a parameter or a buffer, into the EMA; one the EMA cannot take
is named in the report (:attr:`~tfcompat_ema.Report.left_out`), an error in strict mode.
Which entries an EMA takes:

- a fresh :class:`~tfcompat_ema.ExponentialMovingAverage` (nothing applied yet): all of them.
  The averages of buffers wait for their tensors: apply the EMA to the buffers too
  (``ema.apply({**dict(model.named_parameters()), "1.running_mean": ...})``), as TF applied
  it to the moving statistics;
- an EMA that already tracks variables: exactly those;
- an :class:`~tfcompat_ema.EMAModule`: what its ``update()`` averages (the parameters that
  require grad, and with ``buffers="average"`` the floating buffers).

A TF variable split over several PyTorch entries, some frozen (TF1's LSTM bias: ``bias_ih``
and the constant ``forget_bias`` in a frozen ``bias_hh``), gives its average to the trainable
ones only; the frozen ones keep their values, as TF keeps no average of the constant.

The step count: TF's ``num_updates`` is usually ``global_step``. :func:`read_count` reads it
from the checkpoint and :func:`load_all` sets it as the EMA's count.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Set, Tuple

import torch
from torch import nn

from . import validation as check
from .ema import AUTO, NUM_UPDATES_KEY, ExponentialMovingAverage
from .ema_names import ema_state_key
from .module import EMAModule
from .report import MappingError, Report
from .rules import join
from .tf_names import TFNames

Tensor = torch.Tensor


def target(ema, model: nn.Module) -> Tuple[ExponentialMovingAverage, nn.Module,
                                              Optional[Set[str]], str]:
    """The EMA to load, the model whose weights are loaded, the PyTorch names the EMA takes
    (None: every average), and why an entry outside them is left out."""
    if isinstance(ema, EMAModule):
        if model is ema:
            model = ema.module
        elif model is not ema.module:
            raise ValueError("ema is an EMAModule that wraps another model: pass it as both "
                             "model and ema, or its .module as the model")
        taken = {name for name, _, _ in ema._averaged_entries()}   # own names
        why = "EMAModule(buffers='copy') keeps buffers live: make it with buffers='average'" \
            if ema.buffer_policy == "copy" else "the EMAModule does not average it"
        return ema.ema, model, taken, why
    if not isinstance(ema, ExponentialMovingAverage):
        raise TypeError(f"ema must be an ExponentialMovingAverage or an EMAModule, got "
                        f"{type(ema).__name__}")
    tracked = {n for n, s in ema._slots.items() if s.var is not None}
    return ema, model, tracked or None, \
        "the EMA tracks other variables (apply it to this one too, or load into a fresh EMA)"


def choose(mapped: Mapping[str, str], raw_fallbacks: Iterable[str], expected: Mapping,
           trainable: Set[str], taken: Optional[Set[str]], why: str
           ) -> Tuple[List[str], List[str]]:
    """The PyTorch entries whose averages go into the EMA, and messages for those left out.

    ``mapped``: PyTorch name -> its TF source in an averaged load (the average's name, or the
    raw variable's, listed in ``raw_fallbacks``, where none was saved).
    """
    raw = set(raw_fallbacks)
    groups: Dict[str, List[str]] = {}
    for name, source in mapped.items():
        if source not in raw and name in expected:
            groups.setdefault(source, []).append(name)
    chosen, left_out = [], []
    for source, group in groups.items():
        live = [name for name in group if name in trainable]
        for name in live or group:
            if taken is None or name in taken:
                chosen.append(name)
            else:
                left_out.append(f"{name} <- {source}: {why}")
    return chosen, left_out


def read_count(names: TFNames, name: str) -> Tuple[str, int]:
    """The step count saved under ``name`` (a TF name, or a TF2 object path): its entry's
    name and value, a non-negative integer that fits int64."""
    if not isinstance(name, str):
        raise TypeError(f"num_updates_from names a TF variable, got {type(name).__name__}")
    key = names.find(name)
    if key is None:
        scalars = [names.label(k) for k, v in names.tensors.items() if _integer_scalar(v)]
        raise ValueError(f"num_updates_from={name!r}: the checkpoint has no such variable "
                         f"(its integer scalars: {', '.join(scalars) or 'none'})")
    value = names.tensors[key]
    if not _integer_scalar(value):
        raise ValueError(f"num_updates_from={name!r}: {names.label(key)} is not an integer "
                         f"scalar ({list(value.shape)} {value.dtype})")
    return key, check.check_count(f"num_updates_from={name!r}", value)


def _integer_scalar(value) -> bool:
    return isinstance(value, Tensor) and value.dim() == 0 and not (
        value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool)


def check_count_target(ema: ExponentialMovingAverage, count: int) -> None:
    """``ema`` can take ``count`` as its count: ``"auto"``, or a 0-dim integer tensor that
    holds it (set in place); a fixed int, a callable or no count cannot be set."""
    current = ema._num_updates
    if isinstance(current, str) and current == AUTO:
        return
    if isinstance(current, Tensor):
        info = torch.iinfo(current.dtype)
        if not info.min <= count <= info.max:
            raise ValueError(f"num_updates_from: the step count {count} does not fit the EMA's "
                             f"num_updates tensor ({current.dtype})")
        return
    kind = "no count" if current is None else "a callable" if callable(current) else \
        f"the fixed count {current!r}"
    raise ValueError(f"num_updates_from sets the EMA's count, but this EMA has {kind}: make it "
                     "with num_updates='auto' or a 0-dim integer tensor, or set your own "
                     f"counter to the step count ({count}, report.num_updates)")


def load_all(loads, count_for: Optional[ExponentialMovingAverage] = None,
             count: Optional[int] = None) -> None:
    """``load_state_dict`` on each EMA, all or none: a later failure puts back the earlier.

    Each ``"auto"`` count keeps counting from where it is, except ``count_for``'s, which
    becomes ``count`` (a tensor count is filled with it once every load succeeded).
    """
    done = []
    try:
        for ema, state in loads:
            before = {key: value.clone() for key, value in ema.state_dict().items()}
            if ema.num_updates is not None:
                value = count if ema is count_for and count is not None else ema.num_updates
                state = {**state, NUM_UPDATES_KEY: torch.tensor(value)}
            ema.load_state_dict(state)
            done.append((ema, before))
    except Exception:
        for ema, before in reversed(done):
            ema.load_state_dict(before)
        raise
    if count_for is not None and count is not None and isinstance(count_for._num_updates,
                                                                   Tensor):
        with torch.no_grad():
            count_for._num_updates.fill_(count)


def settle(holder) -> None:
    """After a load: an EMAModule keeps its averages on its model's device."""
    if isinstance(holder, EMAModule):
        holder._move_averages()


def check_ema_names(ema: ExponentialMovingAverage, state: Mapping[str, Tensor]) -> None:
    """The EMA keeps averages, and every one belongs to an entry of the model (named by the
    model's own names, wrappers' parts dropped): averages kept under other names would
    otherwise be exported as none."""
    averaged = averaged_names(ema)
    if not averaged:
        raise MappingError(Report(missing=[
            "the EMA keeps no averages of variables (not applied, nothing loaded): exporting "
            "it would write a checkpoint without averages"]))
    foreign = [n for n in averaged if n not in state]
    if foreign:
        raise MappingError(Report(missing=[
            f"{n}: the EMA averages it, but the model has no entry of that name (averages "
            "of another model, or of tensors passed by hand under other names?)"
            for n in foreign]))


def averaged_names(ema: ExponentialMovingAverage) -> List[str]:
    """The variables ``ema`` keeps an average of: tracked, or loaded and waiting for ``apply``."""
    suffix = "/" + ema.name
    names = [n for n, s in ema._slots.items() if s.var is not None]
    names += [key[:-len(suffix)] for key in ema._loaded if key.endswith(suffix)]
    return names


def averages(ema: ExponentialMovingAverage, names) -> Dict[str, Tensor]:
    """The averages ``ema`` keeps of these names (also those loaded, waiting for ``apply``)."""
    averaged = set(averaged_names(ema))
    return {name: ema.average(name).detach() for name in names if name in averaged}


def fed_state(tensor_ema: ExponentialMovingAverage, state: Mapping[str, Tensor],
              tf_ema_name: str) -> Dict[str, Tensor]:
    """``tensor_ema``'s averages of fed tensors (not the model's entries in ``state``) and
    their debias state, copied, under TF's names for an EMA named ``tf_ema_name``."""
    fed = {}
    for key, value in tensor_ema.state_dict().items():
        found = ema_state_key(key, tensor_ema.name)
        if found is None or found[0] in state:      # the count, or a variable's
            continue
        base, _, leaf = found
        fed[join(f"{base}/{tf_ema_name}", leaf, "/")] = value.detach().clone()
    return fed
