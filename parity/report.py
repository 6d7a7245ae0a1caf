"""The parity report: a live terminal table, then JSON, Markdown and a plot in a folder."""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import List, Sequence

from .scenarios import Outcome

COLUMNS = ("scenario", "dtype", "impl", "steps", "bit-exact", "max ULP", "max abs diff",
           "first diff step")
WIDTHS = (40, 8, 28, 6, 9, 8, 12, 15)


def _cells(o: Outcome) -> List[str]:
    return [o.scenario, o.dtype, o.impl, str(o.steps), "yes" if o.exact else "NO",
            f"{o.max_ulp:g}", f"{o.max_abs:.3g}",
            "-" if o.first_diff_step is None else str(o.first_diff_step)]


class Table:
    """Prints rows as they come, aligned."""

    def __init__(self, stream=sys.stdout):
        self.stream = stream

    def header(self) -> None:
        self._line(COLUMNS)
        self._line(["-" * w for w in WIDTHS])

    def row(self, outcome: Outcome) -> None:
        self._line(_cells(outcome))

    def _line(self, cells: Sequence[str]) -> None:
        print("  ".join(c.ljust(w) for c, w in zip(cells, WIDTHS)).rstrip(), file=self.stream,
              flush=True)


def is_ours(outcome: Outcome) -> bool:
    return outcome.impl == "tfcompat_ema"


def summary(outcomes: List[Outcome], naming_ok: bool) -> str:
    ours = [o for o in outcomes if is_ours(o)]
    exact = sum(o.exact for o in ours)
    naive = [o for o in outcomes if not is_ours(o)]
    drift = sum(not o.exact for o in naive)
    return (f"tfcompat_ema: {exact}/{len(ours)} scenarios bit-exact with TensorFlow; naming "
            f"{'matches' if naming_ok else 'DIFFERS'}; naive ports: {drift}/{len(naive)} "
            "rows differ from TensorFlow")


def write(folder: Path, outcomes: List[Outcome], naming: dict, seconds: float,
          tf_version: str, torch_version: str, bidaf=None) -> List[Path]:
    """JSON, Markdown and a PNG plot under ``folder``; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"tensorflow": tf_version, "torch": torch_version, "python": platform.python_version(),
            "machine": platform.platform(), "seconds": round(seconds, 1)}
    rows = [{k: v for k, v in o.__dict__.items() if k != "ulp_by_step"} for o in outcomes]
    json_path = folder / "parity.json"
    port = None if bidaf is None else {**{k: v for k, v in bidaf.__dict__.items()
                                            if k != "config"}, "config": bidaf.config.__dict__}
    json_path.write_text(json.dumps({"meta": meta, "rows": rows, "naming": naming,
                                     "bidaf": port}, indent=1))
    md_path = folder / "parity.md"
    lines = [f"# Parity: tfcompat_ema against TensorFlow {tf_version}", "",
             f"torch {torch_version}, Python {meta['python']}, {meta['machine']}, "
             f"{meta['seconds']} s.", "", summary(outcomes, naming["match"]), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(o)) + " |" for o in outcomes]
    lines += ["", "## Naming", "", f"`average_name` and `variables_to_restore` for a TF1 graph: "
              f"{'identical' if naming['match'] else 'different'} "
              f"({naming['keys']} keys compared).", ""]
    for problem in naming["problems"]:
        lines.append(f"- {problem}")
    if bidaf is not None:
        from .bidaf import describe
        lines += ["", "## Checkpoints: the BiDAF-style port", "", "```", *describe(bidaf), "```"]
    md_path.write_text("\n".join(lines) + "\n")
    paths = [json_path, md_path]
    png = _plot(folder / "parity.png", outcomes)
    if png:
        paths.append(png)
    return paths


def _plot(path: Path, outcomes: List[Outcome]):
    """Max ULP against step for the naive ports and ours, on scenarios that have both."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    scenarios = [(o.scenario, o.dtype) for o in outcomes if not is_ours(o)]
    scenarios = list(dict.fromkeys(scenarios))
    scenarios.sort(key=lambda k: -max(o.steps for o in outcomes if (o.scenario, o.dtype) == k))
    picked = scenarios[:4]
    if not picked:
        return None
    fig, axes = plt.subplots(len(picked), 1, figsize=(9, 2.6 * len(picked)), squeeze=False)
    for ax, (name, dtype) in zip(axes[:, 0], picked):
        for o in outcomes:
            if (o.scenario, o.dtype) != (name, dtype):
                continue
            ulps = [u + 1 for u in o.ulp_by_step]     # +1: zero error shows on a log axis
            ax.plot(range(len(ulps)), ulps, label=o.impl, lw=2.5 if is_ours(o) else 1)
        ax.set_yscale("log")
        ax.set_title(f"{name} [{dtype}]", fontsize=9)
        ax.set_ylabel("max ULP + 1")
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
