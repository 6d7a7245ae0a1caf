"""The parity matrix: named, seeded scenarios, and the value sequences they feed.

A scenario fixes everything both frameworks see: dtype, whether the averaged things are
variables (``apply``) or non-variable tensors (``apply_tensors``, TF graph mode), TF's
execution mode, shapes, steps, the decay (constant or changed mid-run), ``num_updates``
(the counts, and how they are fed: a tensor, a host int, ``"auto"`` or a callable),
``zero_debias`` and the value regime. ``values(scenario)`` makes the sequences; both
sides get exactly the same numbers, already representable in the dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import torch

DTYPES = ("float32", "float64", "float16", "bfloat16")
COUNT_MODES = ("const", "step", "above_2**24", "2**24..2**31")
#: How our EMA is given ``num_updates``: a 0-dim int64 tensor filled at each step, a host
#: Python int (one count), ``"auto"`` (its own count, started with ``load_state_dict``) or a
#: callable returning a Python int. TF gets a Python int for "int", else an int64 variable
#: (eager) or placeholder (graph).
FEEDS = ("tensor", "int", "auto", "callable")
REGIMES = ("normal", "large", "tiny", "constant", "naninf", "overflow")
SHAPES_MIXED = ((), (5,), (3, 4), (0,), (2, 0, 3))
SHAPES_MANY_SMALL = tuple((i % 7 + 1,) for i in range(40))


@dataclass(frozen=True)
class Scenario:
    name: str
    dtype: str = "float32"
    kind: str = "variables"            # "variables" or "tensors"
    tf_mode: str = "graph"             # "eager", "function" or "graph" (tensors: graph only)
    steps: int = 300
    shapes: Tuple[Tuple[int, ...], ...] = SHAPES_MIXED
    decay: float = 0.99
    decay_later: Optional[float] = None   # set: decay is a tensor, changed at steps // 2
    num_updates: Optional[str] = None     # None or one of COUNT_MODES: the counts
    count_start: Optional[int] = None     # "const": the count; "step": the first count
    feed: str = "tensor"                  # one of FEEDS: how ours gets num_updates
    zero_debias: bool = False
    regime: str = "normal"
    seed: int = 0
    references: bool = False              # run the naive ports beside ours

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def decays(self) -> np.ndarray:
        """The decay at each step (float64 numbers; both sides round them to float32)."""
        decays = np.full(self.steps, self.decay)
        if self.decay_later is not None:
            decays[self.steps // 2:] = self.decay_later
        return decays

    def num_updates_at(self) -> Optional[List[int]]:
        """The ``num_updates`` at each step (Python ints), or None."""
        if self.num_updates is None:
            return None
        if self.num_updates == "const":
            counts = [100 if self.count_start is None else self.count_start] * self.steps
        elif self.num_updates == "step":      # consecutive, as "auto" counts
            counts = list(range(self.count_start or 0, (self.count_start or 0) + self.steps))
        elif self.num_updates == "above_2**24":   # crosses 2**24, then odd counts that round
            start = 2 ** 24 - self.steps // 2
            counts = [start + 3 * i for i in range(self.steps)]
        elif self.num_updates == "2**24..2**31":  # spread geometrically, odd: most round
            counts = [int(c) | 1 for c in np.geomspace(2 ** 24 - 1, 2 ** 31 + 1, self.steps)]
        else:
            raise ValueError(f"unknown num_updates mode {self.num_updates!r}")
        if self.feed == "int" and len(set(counts)) > 1:
            raise ValueError(f"{self.name}: a host int num_updates is one count, "
                             f"not {self.num_updates!r}")
        if self.feed == "auto" and counts != list(range(counts[0], counts[0] + self.steps)):
            raise ValueError(f"{self.name}: 'auto' counts one by one, not {self.num_updates!r}")
        return counts

    def with_steps(self, steps: int) -> "Scenario":
        return Scenario(**{**self.__dict__, "steps": steps})


def values(scenario: Scenario) -> List[np.ndarray]:
    """One float64 array ``[steps, *shape]`` per shape, every number exact in the dtype."""
    rng = np.random.default_rng(scenario.seed)
    dtype = scenario.torch_dtype
    info = torch.finfo(dtype)
    out = []
    for k, shape in enumerate(scenario.shapes):
        full = (scenario.steps,) + tuple(shape)
        regime = scenario.regime
        if regime in ("normal", "naninf"):
            start = rng.standard_normal(shape)
            walk = np.cumsum(0.05 * rng.standard_normal(full), axis=0)
            x = start + walk
            if regime == "naninf" and x[0].size:
                flat = x.reshape(scenario.steps, -1)
                flat[scenario.steps // 3, 0] = np.nan
                flat[(2 * scenario.steps) // 3, -1] = np.inf
                flat[(2 * scenario.steps) // 3 + 1, 0] = -np.inf
        elif regime == "large":     # big, but (s - v) stays finite
            x = rng.uniform(-0.25, 0.25, full) * float(info.max)
        elif regime == "tiny":      # around the smallest normal: subnormals and zeros
            x = rng.uniform(-4, 4, full) * float(info.tiny)
            x[rng.random(full) < 0.1] = 0.0
        elif regime == "constant":
            x = np.broadcast_to(rng.standard_normal(shape), full).copy()
        elif regime == "overflow":  # (s - v) overflows: signs alternate near the maximum
            sign = np.where(np.arange(scenario.steps) % 2 == 0, 1.0, -1.0)
            sign = sign.reshape((-1,) + (1,) * len(shape))
            x = sign * rng.uniform(0.55, 0.99, full) * float(info.max)
        else:
            raise ValueError(f"unknown regime {regime!r}")
        out.append(torch.from_numpy(x).to(dtype).to(torch.float64).numpy())
    return out


#: (feed, count mode, count_start, decay) of the host-count scenarios.
HOST_COUNTS = (
    ("int", "const", 9, 0.9999), ("int", "const", 4321, 0.9999),
    ("int", "const", 2 ** 24 + 1, 1.0), ("int", "const", 2 ** 31 + 7, 1.0),
    ("auto", "step", None, 0.9999), ("auto", "step", 2 ** 24 - 20, 1.0),
    ("auto", "step", 2 ** 31 - 20, 1.0),
    ("callable", "step", None, 0.9999), ("callable", "2**24..2**31", None, 1.0),
)


def _count_label(n: int) -> str:
    for p in (24, 31):
        if abs(n - 2 ** p) < 1000:
            return f"2**{p}{n - 2 ** p:+d}"
    return str(n)


def matrix(quick: bool = False) -> List[Scenario]:
    """The default matrix; ``quick`` keeps one slice of each axis, with fewer steps."""
    steps, long_steps = (60, 3000) if quick else (300, 10_000)
    out: List[Scenario] = []
    dtypes = DTYPES
    modes = [("variables", "eager"), ("variables", "function"), ("variables", "graph"),
             ("tensors", "graph")]
    for dtype in dtypes:
        for kind, mode in modes:
            for debias in ((False, True) if kind == "tensors" else (False,)):
                if quick and mode == "function" and dtype != "float32":
                    continue
                tag = "debias" if debias else "plain"
                out.append(Scenario(f"basic/{kind}-{mode}-{tag}", dtype, kind, mode, steps,
                                    zero_debias=debias, references=kind == "variables"))
    for dtype in dtypes:
        for decay in (0.9, 0.999, 0.9999, 0.0, 1.0):
            if quick and decay in (0.9999, 0.9):
                continue
            out.append(Scenario(f"decay/{decay}", dtype, steps=steps, decay=decay,
                                references=True))
        for kind, debias in (("variables", False), ("tensors", True)):
            out.append(Scenario(f"decay/tensor-changed-{kind}", dtype, kind, steps=steps,
                                decay=0.9, decay_later=0.999, zero_debias=debias))
        for mode in ("const", "step", "above_2**24"):
            decay = 1.0 if mode == "above_2**24" else 0.999
            out.append(Scenario(f"num_updates/{mode}", dtype, steps=steps, decay=decay,
                                num_updates=mode, references=True))
        # Host counts, the float64-promotion trap of numpy 1.x: a host int, "auto" and a
        # callable returning an int, across n = 9 at decay 0.9999 and far above 2**24.
        for feed, mode, start, decay in HOST_COUNTS:
            label = mode if start is None and mode != "step" else _count_label(start or 0) + (
                ".." if mode == "step" else "")
            out.append(Scenario(f"num_updates/{feed}:{label}@{decay}", dtype, steps=steps,
                                decay=decay, num_updates=mode, count_start=start, feed=feed,
                                references=feed == "int"))
        out.append(Scenario("num_updates/auto:0..@0.9999-tensors", dtype, "tensors", steps=steps,
                            decay=0.9999, num_updates="step", feed="auto", zero_debias=True))
        for regime in REGIMES[1:]:
            out.append(Scenario(f"values/{regime}", dtype, steps=steps, regime=regime,
                                decay=0.9, references=regime in ("tiny", "constant")))
            if not quick:
                out.append(Scenario(f"values/{regime}-tensors", dtype, "tensors", steps=steps,
                                    regime=regime, decay=0.9, zero_debias=True))
    # Long runs: float16 / bfloat16 local_step saturates (2048 / 256); many small tensors.
    for dtype in dtypes:
        if quick and dtype in ("float32", "float64"):
            continue
        out.append(Scenario("long/tensors-debias", dtype, "tensors", steps=long_steps,
                            shapes=((4,), (2, 3)), decay=0.999, zero_debias=True))
    out.append(Scenario("long/many-small", "float32", steps=long_steps // (3 if quick else 1),
                        shapes=SHAPES_MANY_SMALL, decay=0.999, num_updates="step",
                        references=True))
    # Counts up to a few thousand, fed as Python ints, at the decay they cap for 90,000 steps.
    for feed in ("auto", "callable"):
        out.append(Scenario(f"long/{feed}-0.9999", "float32", steps=long_steps, shapes=((4,),),
                            decay=0.9999, num_updates="step", feed=feed))
    out.append(Scenario("long/variables-bfloat16", "bfloat16", steps=long_steps,
                        shapes=((8,),), decay=0.99, references=True))
    return out


def select(scenarios: List[Scenario], patterns: List[str]) -> List[Scenario]:
    """Scenarios whose ``name`` or ``name[dtype]`` contains any pattern (all when none)."""
    if not patterns:
        return scenarios
    return [s for s in scenarios if any(p in f"{s.name}[{s.dtype}]" for p in patterns)]


@dataclass
class Outcome:
    """What one implementation gave against TF on one scenario."""
    scenario: str
    dtype: str
    impl: str
    steps: int
    exact: bool
    max_ulp: float
    max_abs: float
    first_diff_step: Optional[int]
    ulp_by_step: List[float] = field(default_factory=list, repr=False)
