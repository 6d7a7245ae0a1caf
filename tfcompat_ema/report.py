"""What a mapping between TF and PyTorch names did, and the error that carries it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List

if TYPE_CHECKING:            # torch is not imported for the report alone (the CLI's inspect)
    import torch


class MappingError(ValueError):
    """A checkpoint and a model do not fit the rules; ``report`` says everywhere they don't."""

    def __init__(self, report: "Report"):
        super().__init__(str(report))
        self.report = report


@dataclass
class Report:
    """What a mapping did, and every problem it found (``ok`` when there are none).

    >>> report = Report(mapped={"out.weight": "dense/kernel"})
    >>> report.ok, str(report)
    (True, '1 PyTorch entries mapped')
    """
    mapped: Dict[str, str] = field(default_factory=dict)     # PyTorch name -> TF source
    unused: List[str] = field(default_factory=list)          # TF variables nothing used
    missing: List[str] = field(default_factory=list)         # PyTorch entries nothing gave
    mismatches: List[str] = field(default_factory=list)      # shapes, dtypes, conversions
    raw_fallbacks: List[str] = field(default_factory=list)   # averaged load, no average saved
    skipped: List[str] = field(default_factory=list)         # EMA state not asked for

    @property
    def ok(self) -> bool:
        return not (self.unused or self.missing or self.mismatches)

    def __str__(self) -> str:
        lines = [f"{len(self.mapped)} PyTorch entries mapped"
                 + ("" if self.ok else "; the checkpoint and the model do not fit the rules")]
        for title, items in (("TF variables not used", self.unused),
                             ("PyTorch entries not found", self.missing),
                             ("shape/dtype mismatches", self.mismatches),
                             ("no average saved, raw value used", self.raw_fallbacks),
                             ("EMA state left out", self.skipped)):
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines.extend(f"  {item}" for item in items)
        return "\n".join(lines)


def describe(tensor: torch.Tensor) -> str:
    """``[3, 2] float32``: a tensor's shape and dtype, for messages."""
    return f"{list(tensor.shape)} {str(tensor.dtype).replace('torch.', '')}"
