"""TensorFlow's moving-average arithmetic, op for op.

Each function mirrors a few lines of ``tensorflow/python/training/moving_averages.py``
(TF 2.21); the TF line it reproduces is quoted beside it. Every operation is
rounded in the dtype TF rounds it in, which is what makes the results bitwise
equal. In particular the update is *not* ``torch.lerp`` (a fused multiply-add
rounds once where TF rounds twice) and *not* ``decay * s + (1 - decay) * v``.

The functions on lists of tensors (``assign_moving_average_`` and
``zero_debias_``) hand the elementwise part to :mod:`tfcompat_ema.kernels`, which
does the same arithmetic in as few passes over memory as it can (and, on the CPU,
with denormals flushed to zero, as TF's CPU kernels run).

>>> import torch
>>> from tfcompat_ema import kernels, tf_math
>>> decay = tf_math.float32_decay(0.999, num_updates=5)   # min(0.999, 6/15)
>>> print(decay, decay.dtype)
0.4 float32
>>> d = tf_math.update_weight(decay, torch.float32)         # float32(1) - decay
>>> shadow, value = torch.tensor([1.0]), torch.tensor([0.0])
>>> tf_math.assign_moving_average_(kernels.Batch([shadow], [value]), d)
>>> shadow
tensor([0.4000])
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch

from . import kernels

#: The dtypes TF's ``ExponentialMovingAverage.apply`` accepts.
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def float32_decay(decay, num_updates=None):
    """The decay TF uses at one ``apply``, in float32.

    ``decay`` is a Python number or a 0-dim tensor; ``num_updates`` is None, an int or a
    0-dim integer tensor. Host numbers are computed as numpy float32 scalars (IEEE single
    precision, as TF's kernels, and far cheaper than tensor ops); with a tensor among the
    inputs, the result is a 0-dim float32 tensor on its device, read without a sync.
    """
    on_host = not isinstance(decay, torch.Tensor) and not isinstance(num_updates, torch.Tensor)
    # decay = ops.convert_to_tensor(self._decay, dtype=dtypes.float32)
    decay = np.float32(decay) if on_host else torch.as_tensor(decay).to(torch.float32)
    if num_updates is not None:
        # num_updates = math_ops.cast(self._num_updates, dtypes.float32)
        # (through int64, so counts above 2**24 round to nearest even as TF's cast does)
        n = np.float32(np.int64(num_updates)) if on_host else torch.as_tensor(
            num_updates, dtype=torch.int64, device=decay.device).to(torch.float32)
        # decay = math_ops.minimum(decay, (1.0 + num_updates) / (10.0 + num_updates))
        # (float32 constants: numpy 1.x promotes a Python float and a float32 scalar to float64)
        one, ten = (np.float32(1), np.float32(10)) if on_host else (1.0, 10.0)
        decay = (np.minimum if on_host else torch.minimum)(decay, (one + n) / (ten + n))
    return decay


def update_weight(decay, dtype: torch.dtype) -> torch.Tensor:
    """``1 - decay``, computed in float32 and then cast to the variable dtype (0-dim tensor).

    The result may be shared between calls (read it, don't modify it): a host decay
    repeats from step to step, so its weight is computed once.
    """
    if isinstance(decay, np.float32):
        return _host_update_weight(decay, dtype)
    # decay = ops.convert_to_tensor(1.0 - decay); decay = math_ops.cast(decay, variable.dtype)
    return torch.as_tensor(1.0 - decay).to(dtype)


@functools.lru_cache(maxsize=64)
def _host_update_weight(decay: np.float32, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(np.float32(1.0) - decay).to(dtype)


def assign_moving_average_(batch: kernels.Batch, d: torch.Tensor) -> None:
    """``shadow -= (shadow - value) * d`` for each pair of the batch, in place.

    ``d`` is a 0-dim tensor of the batch dtype (see :func:`update_weight`).
    """
    # state_ops.assign_sub(v, (v - value) * decay)
    batch.moving_average_(d)


def bias_correction(d: torch.Tensor, local_step: torch.Tensor) -> torch.Tensor:
    """TF's debiasing divisor ``1 - (1 - d) ** local_step``, in the variable dtype."""
    # bias_factor = 1 - math_ops.pow(1.0 - decay, update_local_step)
    return 1 - torch.pow(1.0 - d, local_step)


def zero_debias_(batch: kernels.Batch, local_steps: Sequence[torch.Tensor],
                 d: torch.Tensor) -> None:
    """TF's ``_zero_debias`` update for shadows of non-variable tensors, in place.

    The batch holds the shadows, their ``biased`` (zero-started) averages and the values;
    ``local_steps`` are the 0-dim step counts, kept in the variable dtype as TF keeps
    them (so float16 stops counting at 2048 and bfloat16 at 256).
    """
    factors = []
    for local_step in local_steps:
        # update_local_step = local_step.assign_add(1)
        local_step.add_(1)
        factors.append(bias_correction(d, local_step))
    # update_biased = state_ops.assign_sub(biased_var, (biased_var - value) * decay)
    # state_ops.assign(v, update_biased / bias_factor)
    batch.zero_debias_(d, factors)
