"""Runs scenarios on both sides and compares them."""
from __future__ import annotations

import sys
from typing import Callable, Iterator, List, Optional

from . import compare, scenarios as sc, tf_side, torch_side
from .scenarios import Outcome, Scenario

#: Scenarios at least this long print progress while they run.
PROGRESS_STEPS = 2000


def _progress(scenario: Scenario, side: str) -> Optional[Callable[[int], None]]:
    if scenario.steps < PROGRESS_STEPS:
        return None
    quarter = scenario.steps // 4

    def report(t: int) -> None:
        if (t + 1) % quarter == 0:
            print(f"  ... {scenario.name} [{scenario.dtype}] {side}: step {t + 1}/"
                  f"{scenario.steps}", file=sys.stderr, flush=True)
    return report


def run_scenario(scenario: Scenario, ema_class=None) -> Iterator[Outcome]:
    """Ours (and the naive ports, where the scenario asks) against TF, as outcomes."""
    values = sc.values(scenario)
    expected = tf_side.run(scenario, values, _progress(scenario, "tensorflow"))
    kwargs = {} if ema_class is None else {"ema_class": ema_class}
    ours = torch_side.run_ours(scenario, values, _progress(scenario, "tfcompat_ema"), **kwargs)
    yield compare.compare(scenario.name, scenario.dtype, "tfcompat_ema", expected, ours)
    if scenario.references and scenario.kind == "variables":
        for impl in torch_side.NAIVE_UPDATES:
            naive = torch_side.run_naive(scenario, values, impl)
            yield compare.compare(scenario.name, scenario.dtype, impl, expected, naive)


def run_all(scenarios: List[Scenario], on_outcome: Callable[[Outcome], None]) -> List[Outcome]:
    outcomes = []
    for scenario in scenarios:
        for outcome in run_scenario(scenario):
            on_outcome(outcome)
            outcomes.append(outcome)
    return outcomes
