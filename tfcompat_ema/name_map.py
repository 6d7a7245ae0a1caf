"""Rules between PyTorch parameter names and TF variable names, and the loads they drive.

A :class:`NameMap` is an ordered list of :class:`Rule`. A rule pairs a PyTorch module
path with a TF scope, written as patterns with named placeholders, and names the
:mod:`~tfcompat_ema.layouts` layout of the weights below them::

    Rule("highway.layers.{i}.trans", "highway/layer_{i}/trans", "dense",
         kernel="Matrix", bias="Bias")

maps ``highway.layers.0.trans.weight`` [out, in] to ``highway/layer_0/trans/Matrix``
[in, out] and back. Placeholders: ``{name}`` is one name segment; ``{name*}`` one or more
(``a.b`` in PyTorch is ``a/b`` in TF); ``{name:REGEX}`` text matching REGEX (on both
sides, given on either). Outside placeholders a pattern is literal text. The first rule
that matches a name wins. Regexes (here and in the ignore lists) are matched in linear
time (:mod:`tfcompat_ema.linear_regex`): no rule set can make a load hang.

Modules: :mod:`~tfcompat_ema.rules` (patterns and rules), :mod:`~tfcompat_ema.rules_file`
(rule sets as TOML or dicts), :mod:`~tfcompat_ema.report` (the report and its error);
this one applies a rule set to checkpoints, models and EMAs.

Loading is strict by default: every TF variable must be used (or ignored with
``ignore_tf``), every PyTorch entry must be found (or ignored with ``ignore_torch``), and
every shape and dtype must agree; all problems are reported together in one
:class:`MappingError`, raised before anything is changed.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import dtensors, ema_transfer, wrappers
from .ema import ExponentialMovingAverage
from .ema_names import DEFAULT_EMA_NAME, ema_state_key as _ema_state_key
from .report import MappingError, Report, describe as _describe
from .rules import Rule, join as _join, patterns as _patterns
from .rules_file import read_rules_file, rules_from_dict
from .tf_names import TFNames, tf_names

Tensor = torch.Tensor
__all__ = ["NameMap", "Rule", "Report", "MappingError", "DEFAULT_EMA_NAME"]


class NameMap:
    """An ordered rule set between a PyTorch model and a TF checkpoint's variable names.

    Args:
        rules: :class:`Rule` objects, tried in order.
        ignore_tf: regexes of TF names to leave out (``global_step``, optimizer slots, ...),
            matched against whole names; one string is one regex. The syntax is the regular
            subset of Python's (:mod:`tfcompat_ema.linear_regex`), matched in linear time.
        ignore_torch: regexes of PyTorch names to leave out (buffers TF has no variable for).
        ema_name: the TF EMA's name, the last part of its averages' names
            (``dense/kernel/ExponentialMovingAverage``); another EMA over the same
            variables got ``ExponentialMovingAverage_1``.

    Example (TF variables as a dict; :func:`tfcompat_ema.read_checkpoint` gives one):
        >>> import torch
        >>> from tfcompat_ema import NameMap, Rule
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2))
        >>> names = NameMap([Rule("{i}", "dense_{i}", "dense")])
        >>> tf_vars = {"dense_0/kernel": torch.ones(3, 2), "dense_0/bias": torch.zeros(2),
        ...            "dense_0/kernel/ExponentialMovingAverage": torch.full((3, 2), 0.5),
        ...            "dense_0/bias/ExponentialMovingAverage": torch.zeros(2)}
        >>> report = names.load(tf_vars, model)      # the averages, as TF's variables_to_restore
        >>> model[0].weight[0, 0].item()
        0.5
    """

    def __init__(self, rules: Sequence[Rule], ignore_tf: Union[str, Sequence[str]] = (),
                 ignore_torch: Union[str, Sequence[str]] = (),
                 ema_name: str = DEFAULT_EMA_NAME):
        self.rules = list(rules)
        for rule in self.rules:
            if not isinstance(rule, Rule):
                raise TypeError(f"rules must be Rule objects, got {type(rule).__name__}")
        self.ignore_tf = _patterns(ignore_tf, "ignore_tf")
        self.ignore_torch = _patterns(ignore_torch, "ignore_torch")
        if not isinstance(ema_name, str) or not ema_name or "/" in ema_name:
            raise ValueError(f"ema_name must be a name without '/', got {ema_name!r}")
        self.ema_name = ema_name

    @classmethod
    def from_dict(cls, spec: Mapping) -> "NameMap":
        """A rule set from plain data, as in a TOML rules file::

            ema_name = "ExponentialMovingAverage"
            ignore_tf = ["global_step"]

            [[rule]]
            torch = "highway.layers.{i}.trans"
            tf = "highway/layer_{i}/trans"
            layout = "dense"
            kernel = "Matrix"
            bias = "Bias"
        """
        rules, options = rules_from_dict(spec)
        return cls(rules, **options)

    @classmethod
    def from_file(cls, path) -> "NameMap":
        """A rule set from a TOML file (see :meth:`from_dict`); errors name the file."""
        spec = read_rules_file(path)
        try:
            return cls.from_dict(spec)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{os.fspath(path)}: {error}") from None

    # ------------------------------------------------------------------ TF -> PyTorch
    def to_torch(self, tf_vars, averaged: bool = True,
                 expected: Optional[Mapping[str, Tensor]] = None,
                 strict: bool = True, allow_raw: bool = False,
                 trainable: Optional[Iterable[str]] = None,
                 num_updates_from: Optional[str] = None) -> Tuple[Dict[str, Tensor], Report]:
        """TF variables as a PyTorch state dict: the averages (``averaged``) or raw values.

        ``tf_vars``: a mapping of TF names to tensors, or a :class:`~tfcompat_ema.TFCheckpoint`
        (TF2: its entries named by full name, object paths as aliases; see
        :mod:`tfcompat_ema.tf_names`). With ``expected`` (e.g. ``model.state_dict()``),
        entries are checked against it and those it has that nothing gives are reported
        missing. Strict: any problem raises :class:`MappingError`; otherwise the report
        lists them.

        Averages asked for but not saved are a problem, as in TF's
        ``Saver(ema.variables_to_restore())``, for the PyTorch entries in ``trainable``
        (all entries when it is None); others (buffers such as BatchNorm statistics, which
        TF restores raw too) take the raw value, listed in the report. ``allow_raw=True``
        takes the raw value everywhere, and the report's first line counts them.
        ``num_updates_from`` names the TF variable holding the step count (``global_step``;
        a name or an object path): its value is ``report.num_updates``, and it needs no rule.
        """
        names = tf_names(tf_vars)
        tf_vars = names.tensors
        report = Report()
        counted = None
        if num_updates_from is not None:
            counted, report.num_updates = ema_transfer.read_count(names, num_updates_from)
            report.num_updates_from = names.label(counted)
        trainable = None if trainable is None else set(trainable)
        state: Dict[str, Tensor] = {}
        failed = set()                       # PyTorch names already reported as mismatches
        for key in sorted(tf_vars):
            if self._ignored_tf(names, key) or key == counted and not self._rule_for(names, key):
                continue
            found = _ema_state_key(key, self.ema_name)
            unattributable = names.unattributable(key, self.ema_name)
            if unattributable:
                (report.ambiguous if averaged else report.skipped).append(unattributable)
            elif found is None:
                self._convert_variable(key, names, averaged, expected, state, report, failed)
            elif found[1] != self.ema_name or found[0] not in tf_vars:
                report.skipped.append(key)          # another EMA's, or a fed tensor's
        if expected is not None:
            report.missing.extend(name for name in expected if name not in state
                                  and name not in failed and not self.ignores_torch(name))
        if averaged and not allow_raw:
            report.raw_refused = [key for key in report.raw_fallbacks if trainable is None
                                  or any(n in trainable for n, s in report.mapped.items()
                                         if s == key)]
            # "<variable>/<name>" beside "<variable>": <name> is an EMA's, whatever it is.
            report.ema_names = sorted({key.rpartition("/")[2] for key in tf_vars
                                       if key.rpartition("/")[0] in tf_vars})
        if strict and not report.ok:
            raise MappingError(report)
        return state, report

    def _rule_for(self, names: TFNames, key: str):
        """``(index, rule, (part, PyTorch names))`` of the first rule matching any of the
        entry's names (a TF2 entry's full name before its object path), or None."""
        for index, rule in enumerate(self.rules, 1):
            for alias in names.aliases(key):
                matched = rule.match_tf(alias)
                if matched:
                    return index, rule, matched
        return None

    def _convert_variable(self, key, names, averaged, expected, state, report, failed):
        tf_vars = names.tensors
        found = self._rule_for(names, key)
        if found is None:
            shared = names.shared_name(key)
            note = "" if shared is None else f" (its full name {shared!r} is shared with " \
                f"other entries, so rules see its object path only)"
            report.unused.append(f"{names.label(key)} {_describe(tf_vars[key])}: no rule "
                                 f"matches it{note}")
            return
        index, rule, (part, torch_names) = found
        source = key
        if averaged:
            average = f"{key}/{self.ema_name}"
            if average in tf_vars:
                source = average
            else:
                report.raw_fallbacks.append(key)
        where = f"(rule {index} {rule!r})"
        try:
            values = part.to_torch(tf_vars[source])
        except ValueError as error:
            report.mismatches.append(f"{source} {_describe(tf_vars[source])}: {error} {where}")
            failed.update(torch_names)
            return
        for name, value in zip(torch_names, values):
            if name in state:
                report.mismatches.append(f"{name} comes from both {report.mapped[name]} and "
                                         f"{source} {where}")
                continue
            if expected is not None and not self.ignores_torch(name):
                if name not in expected:
                    report.unused.append(f"{source} -> {name}: the model has no {name!r} "
                                         f"{where}")
                    continue
                if value.shape != expected[name].shape or value.dtype != expected[name].dtype:
                    report.mismatches.append(
                        f"{name}: PyTorch has {_describe(expected[name])}, but TF {source} "
                        f"{_describe(tf_vars[source])} gives {_describe(value)} {where}")
                    failed.add(name)
                    continue
            state[name] = value
            report.mapped[name] = source

    # ------------------------------------------------------------------ PyTorch -> TF
    def to_tf(self, torch_state: Mapping[str, Tensor],
              strict: bool = True) -> Tuple[Dict[str, Tensor], Report]:
        """A PyTorch state dict as TF variables (raw names; averages: see :meth:`export`)."""
        report = Report()
        tf_vars: Dict[str, Tensor] = {}
        claimed = set()
        for key in torch_state:
            if key in claimed or self.ignores_torch(key):
                continue
            for index, rule in enumerate(self.rules, 1):
                matched = rule.match_torch(key)
                if matched:
                    break
            else:
                continue        # not a part's first entry: checked below
            part, names, tf_name = matched
            where = f"(rule {index} {rule!r})"
            if not tf_name:                 # TF's writer dies (SIGABRT) on an empty name
                claimed.update(names)
                report.mismatches.append(f"{key!r}: rule {index} {rule!r} gives it an empty TF "
                                         "name")
                continue
            absent = [name for name in names if name not in torch_state]
            claimed.update(names)
            if absent:
                report.missing.append(f"{', '.join(absent)}: needed with {key} for {tf_name} "
                                      f"{where}")
                continue
            try:
                value = part.to_tf(*(torch_state[name].detach() for name in names))
            except (ValueError, RuntimeError) as error:
                shapes = ", ".join(f"{n} {_describe(torch_state[n])}" for n in names)
                report.mismatches.append(f"{tf_name} from {shapes}: {error} {where}")
                continue
            if tf_name in tf_vars:
                report.mismatches.append(f"{tf_name} comes from two PyTorch entries {where}")
                continue
            tf_vars[tf_name] = value
            for name in names:
                report.mapped[name] = tf_name
        for key in torch_state:
            if key not in claimed and not self.ignores_torch(key):
                report.missing.append(self._unclaimed(key, torch_state[key]))
        if strict and not report.ok:
            raise MappingError(report)
        return tf_vars, report

    def _unclaimed(self, key: str, value: Tensor) -> str:
        for rule in self.rules:
            names = rule.tf_names(key)
            if names:
                return (f"{key} {_describe(value)}: goes into {names[0]} with entries the "
                        f"model lacks ({rule!r})")
        return f"{key} {_describe(value)}: no rule matches it"

    # ------------------------------------------------------------------ models and EMAs
    def load(self, tf_vars, model: nn.Module, ema=None,
             tensor_ema: Optional[ExponentialMovingAverage] = None,
             strict: bool = True, allow_raw: bool = False,
             num_updates_from: Optional[str] = None) -> Report:
        """Load a TF checkpoint's variables into ``model`` (and EMAs); all or nothing.

        ``tf_vars``: a mapping of TF names to tensors, or a :class:`~tfcompat_ema.TFCheckpoint`
        (TF2 checkpoints: pass the checkpoint, whose object graph names the averages).
        Without ``ema``: the model gets the averaged weights, as TF's
        ``Saver(ema.variables_to_restore())`` gives a TF model (evaluation).
        With ``ema`` (an :class:`~tfcompat_ema.ExponentialMovingAverage`, or an
        :class:`~tfcompat_ema.EMAModule` wrapping ``model``, which may be given as ``model``
        too): the model gets the raw weights and the EMA every average whose variable has a
        PyTorch home, parameters and buffers (:mod:`tfcompat_ema.ema_transfer` says which an EMA
        takes; one it does not take is a problem, named in the report), to resume training.
        ``num_updates_from``: the TF variable holding TF's ``num_updates`` (usually
        ``global_step``, or a TF2 object path such as ``step``); the EMA's count (``"auto"``,
        or a 0-dim integer tensor, set in place) becomes its value, so the next ``apply`` uses
        the decay TF's next update would. ``tensor_ema`` gets the averages of TF's
        non-variable tensors (e.g. a loss), with their zero-debias state, under their TF names.

        Every check runs first; a failing load changes no parameter and no average.
        """
        names = tf_names(tf_vars)
        holder, taken, why = ema, None, ""
        if ema is not None:
            ema, model, taken, why = ema_transfer.target(ema, model)
        if num_updates_from is not None and ema is None:
            raise ValueError("num_updates_from sets an EMA's count: pass the EMA as ema=")
        expected = wrappers.state_dict(model)       # the model's own names, unwrapped
        trainable = [n for n, p in wrappers.named_parameters(model) if p.requires_grad]
        options = dict(expected=expected, allow_raw=allow_raw, trainable=trainable,
                       num_updates_from=num_updates_from)
        weights, report = self.to_torch(names, averaged=ema is None, strict=strict, **options)
        loads = []
        if ema is not None:
            averages, averaged = self.to_torch(names, averaged=True, strict=False, **options)
            report.ema_loaded, report.left_out = ema_transfer.choose(
                averaged.mapped, averaged.raw_fallbacks, expected, set(trainable), taken, why)
            report.skipped = [key for key in report.skipped if key not in averaged.ambiguous]
            for field in ("raw_fallbacks", "raw_refused", "ema_names", "ambiguous"):
                setattr(report, field, getattr(averaged, field))
            if report.num_updates is not None:
                ema_transfer.check_count_target(ema, report.num_updates)
            if strict and not report.ok:
                raise MappingError(report)
            loads.append((ema, {ema.average_name(n): averages[n] for n in report.ema_loaded}))
        if tensor_ema is not None:
            renames = self._fed_averages(names, tensor_ema.name)
            fed = {ours: names.tensors[key] for key, ours in renames.items()}
            report.skipped = [key for key in report.skipped if key not in renames]
            if loads and loads[0][0] is tensor_ema:
                loads[0][1].update(fed)
            else:
                loads.append((tensor_ema, fed))
        ema_transfer.load_all(loads, ema, report.num_updates)
        with torch.no_grad():
            for name, value in weights.items():
                expected[name].copy_(value)
        ema_transfer.settle(holder)
        return report

    def _fed_averages(self, names: TFNames, torch_ema_name: str) -> Dict[str, str]:
        """TF's keys of non-variable tensors' EMA state -> our keys, for an EMA named
        ``torch_ema_name``."""
        renames = {}
        for key in names.tensors:
            found = _ema_state_key(key, self.ema_name)
            if found and found[1] == self.ema_name and found[0] not in names.tensors \
                    and not self._ignored_tf(names, key):
                base, _, leaf = found
                renames[key] = _join(f"{base}/{torch_ema_name}", leaf, "/")
        return renames

    def export(self, model: nn.Module, ema: Optional[ExponentialMovingAverage] = None,
               tensor_ema: Optional[ExponentialMovingAverage] = None,
               strict: bool = True) -> Dict[str, Tensor]:
        """The model's weights (and EMAs' averages) as TF variables, for a TF1 checkpoint.

        Raw weights under their TF names; with ``ema``, the average of each variable under
        ``<TF name>/<ema_name>`` (a TF variable made of several PyTorch entries, like an LSTM
        kernel, takes the averages of those the EMA tracks and the raw value of the others);
        with ``tensor_ema``, its averages of fed tensors and their debias state. Write it
        with :func:`tfcompat_ema.write_checkpoint`; TF's ``Saver(ema.variables_to_restore())``
        then restores the averages into a TF model.

        FSDP2 (``fully_shard``): the weights and their averages are DTensors, of which each
        rank holds a shard; TF checkpoints hold full tensors, so every DTensor is gathered
        whole (an all-gather each, on every rank: full copies, in CPU or device memory as
        the shards are). That is a collective: **call** ``export`` **on every rank**, with
        the same model and EMA, then write the result on one rank only (``if
        dist.get_rank() == 0: write_checkpoint(...)``). DTensors other than FSDP2's (sharded
        or replicated on a 1-D mesh) are refused, on every rank, before any communication.
        Under DDP the weights and averages are plain and equal on every rank: export on any.
        """
        state = wrappers.state_dict(model)          # the model's own names, unwrapped
        averages: Dict[str, Tensor] = {}
        if ema is not None:
            ema_transfer.check_ema_names(ema, state)
            averages = ema_transfer.averages(ema, state)
        fed = {} if tensor_ema is None else ema_transfer.fed_state(tensor_ema, state,
                                                                   self.ema_name)
        # DTensors checked on every rank before the first all-gather, so that a refusal is
        # the same error everywhere, not a rank waiting for the others; the mapping's own
        # errors come after the gathers, the same on every rank (same model, same rules).
        parts = (("the model's entry", state), ("the average of", averages),
                 ("the fed tensors' average", fed))
        for what, named in parts:
            dtensors.check_gatherable(named, what)
        state, averages, fed = (dtensors.gather_full(named) for _, named in parts)
        tf_vars, report = self.to_tf(state, strict=strict)
        if averages:
            averaged_tf, _ = self.to_tf({**state, **averages}, strict=False)
            with_average = {report.mapped[n] for n in averages if n in report.mapped}
            for tf_name, value in averaged_tf.items():
                if tf_name in with_average:
                    tf_vars[f"{tf_name}/{self.ema_name}"] = value
        tf_vars.update(fed)
        return tf_vars

    def _ignored_tf(self, names: TFNames, key: str) -> bool:
        return any(p.fullmatch(alias) is not None for p in self.ignore_tf
                   for alias in names.aliases(key))

    def ignores_torch(self, name: str) -> bool:
        """Whether ``ignore_torch`` leaves this PyTorch entry out."""
        return any(p.fullmatch(name) is not None for p in self.ignore_torch)
