"""``EMAModule``: a model and its moving average in one ``nn.Module``."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from . import distributed, wrappers
from .ema import NUM_UPDATES_KEY, ExponentialMovingAverage

BUFFER_POLICIES = ("copy", "average")


class EMAModule(nn.Module):
    """Wraps a model: live weights in train mode, averaged weights in eval mode.

    Call :meth:`update` after each optimizer step. In eval mode the forward pass runs
    the model with the averages in place of its parameters (``torch.func.functional_call``),
    so the live weights are never touched and nothing is copied. Under FSDP2
    (``fully_shard``), whose all-gather would overwrite swapped-in parameters, the
    averages are copied into the local shards for the forward and the live shards put
    back after it (``average_parameters``), the model resharded before and after.

    Buffers (BatchNorm running statistics and the like):
        ``buffers="copy"`` (default): the averaged model uses the live buffers, as if
        copied at every step, which is what TF does with the non-trainable variables
        it does not average. ``buffers="average"``: floating buffers are averaged like
        parameters; integer buffers (``num_batches_tracked``) are always live.

    Attributes:
        module: the wrapped model (its live weights).
        ema: the wrapped :class:`~tfcompat_ema.ExponentialMovingAverage`: its averages
            (``ema.average("0.weight")``), count (``ema.num_updates``) and ``state_dict``.
            Its state travels in this module's ``state_dict`` (as extra state), and
            ``.to()``/``.cuda()`` move it along.

    Checkpoints under FSDP2 (``torch.distributed.checkpoint``, on every rank): this
    module's ``state_dict()`` holds the averages as DTensors in its extra state, which DCP
    flattens (``_extra_state.0.weight/ExponentialMovingAverage``) and saves shard by shard
    like the weights. DCP loads into the tensors it is given, so a fresh EMAModule needs its
    averages first: ``wrapped.update()`` once, then ``state = wrapped.state_dict()``,
    ``dcp.load(state, checkpoint_id=...)``, ``wrapped.load_state_dict(state)`` (weights,
    averages and count replaced). Without that ``update()`` the load raises ``ValueError``
    rather than let the next update start the averages afresh. A checkpoint saved on N
    ranks loads on another number (a bare model on 1 rank included) the same way.

    Resuming from a TF checkpoint: ``NameMap.load(ckpt, wrapped, ema=wrapped)`` loads the raw
    weights into ``wrapped.module`` and the averages into ``wrapped.ema`` (with ``buffers=
    "average"``, BatchNorm statistics' averages too; see :mod:`tfcompat_ema.ema_transfer`).

    Example:
        >>> import torch
        >>> from tfcompat_ema import EMAModule
        >>> model = EMAModule(torch.nn.Linear(2, 1), decay=0.9)
        >>> model.update()                        # the averages start at the weights
        >>> with torch.no_grad():
        ...     _ = model.module.bias.add_(1.0)
        >>> model.update()
        >>> x = torch.ones(1, 2)
        >>> train_out = model.train()(x)
        >>> eval_out = model.eval()(x)            # averaged bias: 0.1 of the way
        >>> round(float((train_out - eval_out).detach()), 4)
        0.9
    """

    def __init__(self, module: nn.Module, decay, num_updates=None,
                 name: str = "ExponentialMovingAverage", buffers: str = "copy"):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"EMAModule wraps an nn.Module, got {type(module).__name__}")
        if buffers not in BUFFER_POLICIES:
            raise ValueError(f"buffers must be one of {BUFFER_POLICIES}, got {buffers!r}")
        self.module = module
        self.ema = ExponentialMovingAverage(decay, num_updates=num_updates, name=name)
        self.buffer_policy = buffers

    def _averaged_entries(self, model=None) -> List[Tuple[str, str, torch.Tensor]]:
        """(own name, name in ``model``, tensor) of what is averaged; ``model`` is the wrapped
        module (default) or a wrapper-free part of it. Own names drop wrappers' parts."""
        model = self.module if model is None else model
        rename = wrappers.renamer(model)
        entries = [(rename(n), n, p) for n, p in model.named_parameters() if p.requires_grad]
        if self.buffer_policy == "average":
            entries += [(rename(n), n, b) for n, b in model.named_buffers()
                        if b.is_floating_point()]
        return entries

    def update(self) -> None:
        """Update the averages from the live weights (and floating buffers, if averaged)."""
        with torch.no_grad():
            self.ema._apply([(name, tensor) for name, _, tensor in self._averaged_entries()],
                            self.module)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training:
            return self.module(*args, **kwargs)
        sharded = distributed.fsdp_modules([self.module])
        if sharded:     # FSDP2's all-gather would overwrite what functional_call swaps in
            distributed.reshard(sharded)
        model = wrappers.without_data_parallel(self.module)
        entries = self._averaged_entries(model)
        missing = [name for name, _, _ in entries if not self._has_average(name)]
        if len(missing) == len(entries) and not self._holds_averages():
            # Before the first update: the averages would start at the live weights.
            return self.module(*args, **kwargs)
        if missing:
            # Evaluating the live weights instead would be a silent wrong answer.
            raise RuntimeError(
                f"eval mode runs the averages, but {len(missing)} of {len(entries)} entries "
                f"have none: {missing[:5]}{' ...' if len(missing) > 5 else ''} (call update() "
                "after each optimizer step, or load a state saved from this same model)")
        if sharded:     # the averages in the shards for this forward, then the live weights
            with self.ema.average_parameters([(name, t) for name, _, t in entries]):
                try:
                    return self.module(*args, **kwargs)
                finally:
                    distributed.reshard(sharded)
        averages = {raw: self.ema.average(name) for name, raw, _ in entries}
        return torch.func.functional_call(model, averages, args, kwargs)

    def _holds_averages(self) -> bool:
        return any(key != NUM_UPDATES_KEY for key in self.ema.state_dict())

    def _has_average(self, name: str) -> bool:
        try:
            self.ema.average(name)
        except KeyError:
            return False
        return True

    def get_extra_state(self) -> Dict[str, torch.Tensor]:
        return self.ema.state_dict()

    def set_extra_state(self, state: Dict[str, torch.Tensor]) -> None:
        # A state saved before the first update (torch.save) restores exactly that; the
        # very dict get_extra_state() gave while there were no averages, handed back still
        # empty, is torch.distributed.checkpoint's load with nothing to load into: refused.
        self.ema._load_state(state, holder="EMAModule")
        self._move_averages()

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self._move_averages()
        return self

    def _move_averages(self) -> None:
        first = next(iter(self.module.parameters()), None)
        if first is not None:
            self.ema.to(first.device)
