"""The moving-average update ``s -= (s - v) * d`` over lists of tensors.

Two exact implementations of the same per-op formula:

* ``torch_moving_average_``: three ``torch._foreach_*`` passes, each op rounded in
  the tensors' dtype. Works on every device. It walks the lists in chunks of at
  most ``CHUNK_BYTES`` so that its temporaries stay small.
* the native fused kernel (:mod:`tfcompat_ema._fused`, built with the package),
  used for CPU tensors: one pass over memory, no temporaries, each op rounded as
  TF rounds it (compiled without floating-point contraction, so no FMA).
"""
from __future__ import annotations

from typing import Iterator, List, Sequence, Tuple

import torch

#: Upper bound on the bytes one chunk of the torch path touches per list.
CHUNK_BYTES = 16 << 20


def torch_moving_average_(shadows: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                          d: torch.Tensor) -> None:
    """``s -= (s - v) * d`` with one rounding per op, in chunks of ``CHUNK_BYTES``."""
    for shadow_chunk, value_chunk in _chunks(shadows, values):
        diffs = torch._foreach_sub(shadow_chunk, value_chunk)
        torch._foreach_mul_(diffs, d)
        torch._foreach_sub_(shadow_chunk, diffs)


def _chunks(shadows: Sequence[torch.Tensor], values: Sequence[torch.Tensor]
            ) -> Iterator[Tuple[List[torch.Tensor], List[torch.Tensor]]]:
    shadow_chunk: List[torch.Tensor] = []
    value_chunk: List[torch.Tensor] = []
    size = 0
    for shadow, value in zip(shadows, values):
        for s, v in _slices(shadow, value):
            nbytes = s.numel() * s.element_size()
            if shadow_chunk and size + nbytes > CHUNK_BYTES:
                yield shadow_chunk, value_chunk
                shadow_chunk, value_chunk, size = [], [], 0
            shadow_chunk.append(s)
            value_chunk.append(v)
            size += nbytes
    if shadow_chunk:
        yield shadow_chunk, value_chunk


def _slices(shadow: torch.Tensor, value: torch.Tensor) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """A large pair as flat slices of ``CHUNK_BYTES``, when both are contiguous."""
    step = max(1, CHUNK_BYTES // shadow.element_size())
    if shadow.numel() <= step or not (shadow.is_contiguous() and value.is_contiguous()):
        yield shadow, value
        return
    flat_shadow, flat_value = shadow.view(-1), value.view(-1)
    for start in range(0, flat_shadow.numel(), step):
        yield flat_shadow[start:start + step], flat_value[start:start + step]


def moving_average_(shadows: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                    d: torch.Tensor) -> None:
    """``s -= (s - v) * d`` for tensors of one device and dtype, by the fastest exact path."""
    if shadows:
        torch_moving_average_(shadows, values, d)
