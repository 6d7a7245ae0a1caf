"""How TF names an EMA's state: ``<variable>/<ema name>``, and ``/biased``, ``/local_step``
for debiased fed tensors. Torch-free (the CLI's ``inspect`` uses it)."""
from __future__ import annotations

import re
from typing import Optional, Tuple

DEFAULT_EMA_NAME = "ExponentialMovingAverage"
DEBIAS_LEAVES = ("biased", "local_step")


def ema_state_key(key: str, ema_name: str) -> Optional[Tuple[str, str, str]]:
    """``(base, ema, leaf)`` if ``key`` is EMA state, ``base/ema`` or ``base/ema/leaf`` with
    leaf ``biased`` or ``local_step``; ``ema`` is ``ema_name`` or a variant of it
    (``ExponentialMovingAverage_1``, made by a second EMA over the same variables).

    >>> ema_state_key("loss/ExponentialMovingAverage_1/biased", "ExponentialMovingAverage")
    ('loss', 'ExponentialMovingAverage_1', 'biased')
    >>> ema_state_key("dense/kernel", "ExponentialMovingAverage") is None
    True
    """
    parts = key.split("/")
    leaf = parts.pop() if len(parts) >= 3 and parts[-1] in DEBIAS_LEAVES else ""
    if len(parts) < 2:
        return None
    stem = re.sub(r"_\d+$", "", ema_name)
    if parts[-1] != ema_name and not re.fullmatch(re.escape(stem) + r"(_\d+)?", parts[-1]):
        return None
    return "/".join(parts[:-1]), parts[-1], leaf
