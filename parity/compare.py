"""Bitwise comparison, and distance in units in the last place (ULP)."""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch

from .scenarios import Outcome

_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float32: torch.int32, torch.float64: torch.int64}


def ordered_bits(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The dtype's bit patterns as integers that count up with the value (+0 and -0 both 0)."""
    bits = torch.from_numpy(np.ascontiguousarray(x)).to(dtype).view(_INT_VIEW[dtype])
    bits = bits.to(torch.int64)
    sign = torch.iinfo(_INT_VIEW[dtype]).min
    return torch.where(bits < 0, sign - bits, bits).numpy()


def same_bits(a: np.ndarray, b: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Elementwise: identical bit patterns in the dtype, or both NaN (any payload)."""
    view = _INT_VIEW[dtype]
    bits_a = torch.from_numpy(np.ascontiguousarray(a)).to(dtype).view(view).numpy()
    bits_b = torch.from_numpy(np.ascontiguousarray(b)).to(dtype).view(view).numpy()
    return (bits_a == bits_b) | (np.isnan(a) & np.isnan(b))


def ulp_distance(a: np.ndarray, b: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """ULPs between two arrays of one dtype (given as float64); NaN to NaN is 0, NaN to a
    number is infinite."""
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    dist = np.abs(ordered_bits(np.where(nan_a, 0, a), dtype).astype(np.float64)
                  - ordered_bits(np.where(nan_b, 0, b), dtype).astype(np.float64))
    dist[nan_a != nan_b] = np.inf
    dist[nan_a & nan_b] = 0
    return dist


def compare(scenario: str, dtype_name: str, impl: str, expected: List[np.ndarray],
            actual: List[np.ndarray]) -> Outcome:
    """How ``actual`` (per step, per shape) agrees with ``expected`` (TF)."""
    dtype = getattr(torch, dtype_name)
    steps = expected[0].shape[0]
    ulp_by_step = np.zeros(steps)
    differs = np.zeros(steps, dtype=bool)
    max_abs = 0.0
    for e, a in zip(expected, actual):
        if e[0].size == 0:
            continue
        ulps = ulp_distance(e, a, dtype).reshape(steps, -1)
        ulp_by_step = np.maximum(ulp_by_step, ulps.max(axis=1))
        differs |= ~same_bits(e, a, dtype).reshape(steps, -1).all(axis=1)
        with np.errstate(invalid="ignore"):
            diff = np.abs(e - a)
        diff[np.isnan(e) & np.isnan(a)] = 0
        diff[(e == a)] = 0
        if diff.size:
            max_abs = max(max_abs, float(np.nan_to_num(diff, nan=np.inf).max()))
    differing = np.flatnonzero(differs)
    first: Optional[int] = int(differing[0]) if differing.size else None
    return Outcome(scenario, dtype_name, impl, steps, exact=first is None,
                   max_ulp=float(ulp_by_step.max()) if steps else 0.0, max_abs=max_abs,
                   first_diff_step=first, ulp_by_step=ulp_by_step.tolist())
