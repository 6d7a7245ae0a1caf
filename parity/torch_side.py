"""Runs a scenario through tfcompat_ema, and through the naive ports users write by hand.

The naive ports are reference rows: they show how far a plain PyTorch port drifts from
TF. Each reads the same decay (capped by ``num_updates`` in Python floats, as such ports
do) and starts its shadow at the variable, as TF does.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from tfcompat_ema import ExponentialMovingAverage

from .scenarios import Scenario

Progress = Optional[Callable[[int], None]]


def _naive(shadow: torch.Tensor, value: torch.Tensor, decay: float) -> None:
    shadow.copy_(decay * shadow + (1 - decay) * value)


def _per_tensor(shadow: torch.Tensor, value: torch.Tensor, decay: float) -> None:
    shadow.sub_((1 - decay) * (shadow - value))


def _lerp(shadow: torch.Tensor, value: torch.Tensor, decay: float) -> None:
    shadow.lerp_(value, 1 - decay)


#: The seed-style ports, by report name.
NAIVE_UPDATES: Dict[str, Callable[[torch.Tensor, torch.Tensor, float], None]] = {
    "naive decay*s+(1-decay)*p": _naive,
    "per-tensor s-(1-decay)*(s-p)": _per_tensor,
    "torch.lerp_": _lerp,
}


def run_ours(scenario: Scenario, values: List[np.ndarray], progress: Progress = None,
             ema_class=ExponentialMovingAverage) -> List[np.ndarray]:
    """tfcompat_ema's average after every step, as float64 arrays like ``tf_side.run``."""
    dtype = scenario.torch_dtype
    decays, counts = scenario.decays(), scenario.num_updates_at()
    decay = torch.tensor(decays[0], dtype=torch.float32) \
        if scenario.decay_later is not None else float(scenario.decay)
    num_updates, count = _num_updates(scenario, counts)
    ema = ema_class(decay, num_updates=num_updates, zero_debias=scenario.zero_debias)
    if scenario.feed == "auto" and counts[0]:    # "auto" resumed at the first count
        ema.load_state_dict({"num_updates": torch.tensor(counts[0])})
    names = [f"v{i}" for i in range(len(values))]
    feeds = [torch.from_numpy(v).to(dtype) for v in values]
    variables = {n: f[0].clone() for n, f in zip(names, feeds)}
    out = [np.empty(v.shape, np.float64) for v in values]
    for t in range(scenario.steps):
        if scenario.decay_later is not None:
            decay.fill_(decays[t])
        if counts is not None:
            count[0] = counts[t]
            if isinstance(num_updates, torch.Tensor):
                num_updates.fill_(counts[t])
            elif scenario.feed == "auto" and ema.num_updates != counts[t]:
                raise AssertionError(f"'auto' counted {ema.num_updates}, TF gets {counts[t]}")
        if scenario.kind == "tensors":
            ema.apply_tensors({n: f[t] for n, f in zip(names, feeds)})
        else:
            for n, f in zip(names, feeds):
                variables[n].copy_(f[t])
            ema.apply(variables if t == 0 else None)
        for i, n in enumerate(names):
            out[i][t] = ema.average(n).to(torch.float64).numpy()
        if progress:
            progress(t)
    return out


def _num_updates(scenario: Scenario, counts: Optional[List[int]]):
    """Our ``num_updates`` as the scenario feeds it, and the one-item list a callable reads."""
    if counts is None:
        return None, None
    count = [counts[0]]
    if scenario.feed == "tensor":
        return torch.tensor(counts[0], dtype=torch.int64), count
    if scenario.feed == "int":
        return int(counts[0]), count
    if scenario.feed == "auto":
        return "auto", count
    if scenario.feed == "callable":
        return (lambda: int(count[0])), count
    raise ValueError(f"unknown num_updates feed {scenario.feed!r}")


def run_naive(scenario: Scenario, values: List[np.ndarray], impl: str) -> List[np.ndarray]:
    """One of ``NAIVE_UPDATES`` on a variables scenario, as float64 arrays."""
    update = NAIVE_UPDATES[impl]
    dtype = scenario.torch_dtype
    decays, counts = scenario.decays(), scenario.num_updates_at()
    feeds = [torch.from_numpy(v).to(dtype) for v in values]
    shadows = [f[0].clone() for f in feeds]
    out = [np.empty(v.shape, np.float64) for v in values]
    for t in range(scenario.steps):
        decay = float(decays[t])
        if counts is not None:
            decay = min(decay, (1 + counts[t]) / (10 + counts[t]))
        for i, (shadow, f) in enumerate(zip(shadows, feeds)):
            update(shadow, f[t], decay)
            out[i][t] = shadow.to(torch.float64).numpy()
    return out
