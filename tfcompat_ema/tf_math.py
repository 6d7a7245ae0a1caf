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
    if on_host:
        return _host_float32_decay(decay, num_updates)
    # decay = ops.convert_to_tensor(self._decay, dtype=dtypes.float32)
    decay = torch.as_tensor(decay).to(torch.float32)
    if num_updates is not None:
        # num_updates = math_ops.cast(self._num_updates, dtypes.float32)
        # (an integer tensor is cast directly, unsigned ones included, as TF's cast does)
        n = num_updates.to(device=decay.device, dtype=torch.float32) if isinstance(
            num_updates, torch.Tensor) else torch.as_tensor(_host_count(num_updates),
                                                            device=decay.device)
        # decay = math_ops.minimum(decay, (1.0 + num_updates) / (10.0 + num_updates))
        decay = torch.minimum(decay, (1.0 + n) / (10.0 + n))
    return decay


def _host_float32_decay(decay, num_updates) -> np.float32:
    """:func:`float32_decay` on host numbers: every operand a numpy float32 scalar.

    Each constant is spelled ``np.float32(...)``: numpy 1.x promotes ``1.0 + float32`` to
    float64 (value-based casting) where numpy 2 keeps float32, and TF computes in float32.
    """
    decay = np.float32(decay)
    if num_updates is None:
        return decay
    return _capped(decay, _host_count(num_updates))


def _capped(decay: np.float32, n: np.float32) -> np.float32:
    """``min(decay, (1 + n) / (10 + n))`` on float32 scalars, each op rounded to float32."""
    # decay = math_ops.minimum(decay, (1.0 + num_updates) / (10.0 + num_updates))
    one, ten = np.float32(1.0), np.float32(10.0)
    return np.minimum(decay, np.float32(np.float32(one + n) / np.float32(ten + n)))


def _host_count(num_updates) -> np.float32:
    """A host step count as float32, rounded once from the integer as TF's cast rounds it.

    Signed counts go through int64 (TF's step dtype; larger ones are refused by the
    caller's checks), numpy unsigned scalars are cast directly as TF casts a uint64 tensor.
    """
    if isinstance(num_updates, np.unsignedinteger):
        return np.float32(num_updates)
    return np.float32(np.int64(num_updates))


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


def assign_moving_average_(batch: kernels.Batch, d: torch.Tensor, xla: bool = False) -> None:
    """``shadow -= (shadow - value) * d`` for each pair of the batch, in place.

    ``d`` is a 0-dim tensor of the batch dtype (see :func:`update_weight`). ``xla``: the
    update as XLA compiles it on the CPU (``tf.function(jit_compile=True)``, TF 2.21):

    * float32/float64: ``fma(-(shadow - value), d, shadow)``, rounded once;
    * float16: ``fma16(-r16(shadow - value), d, shadow)``: one fused multiply-add rounded
      once to half, on CPUs with half-precision FMA (AVX512-FP16); elsewhere every op
      rounded to half as without XLA (see :func:`xla_fuses`);
    * bfloat16: as without XLA (every op rounded to bfloat16).

    >>> import torch
    >>> from tfcompat_ema import kernels
    >>> d = update_weight(float32_decay(0.9), torch.float32)
    >>> eager, xla = torch.tensor([0.25]), torch.tensor([0.25])
    >>> value = torch.tensor([1.1])
    >>> assign_moving_average_(kernels.Batch([eager], [value]), d)
    >>> assign_moving_average_(kernels.Batch([xla], [value]), d, xla=True)
    >>> float(eager), float(xla)                  # two roundings, one
    (0.33500003814697266, 0.33500000834465027)
    """
    if not (xla and xla_fuses(d.dtype)):
        # state_ops.assign_sub(v, (v - value) * decay)
        batch.moving_average_(d)
    else:
        # XLA: subtract(v, multiply(subtract(v, value), decay)), contracted to one FMA
        batch.moving_average_(d, xla=True)


def xla_fuses(dtype: torch.dtype) -> bool:
    """Whether XLA, compiling for this machine's CPU, fuses the update's multiply and
    subtract into one FMA for ``dtype``.

    XLA:CPU compiles for the host, and LLVM contracts a multiply and a subtract only where
    the fused instruction exists for the type: float16 on a CPU without half-precision FMA
    is computed op by op in float32 and rounded to half after each, exactly the form
    without XLA (TF 2.21 on an AMD EPYC without AVX512-FP16: bitwise the eager form; an
    earlier machine gave one half-precision FMA, and that AVX512-FP16 is what decides is
    LLVM's x86 rule for contracting half-precision math). Where the CPU's instructions are
    not known (:func:`tfcompat_ema.kernels.native_fma_dtypes` is None), float32 and float64
    are taken as fused and float16 is refused by ``check_xla`` before any update.

    >>> xla_fuses(torch.bfloat16)
    False
    """
    if dtype == torch.bfloat16:
        return False
    native = kernels.native_fma_dtypes()
    return dtype != torch.float16 if native is None else dtype in native


def bias_correction(d: torch.Tensor, local_step: torch.Tensor) -> torch.Tensor:
    """TF's debiasing divisor ``1 - (1 - d) ** local_step``, in the variable dtype."""
    # bias_factor = 1 - math_ops.pow(1.0 - decay, update_local_step)
    return 1 - torch.pow(1.0 - d, local_step)


def zero_debias_(batch: kernels.Batch, local_steps: Sequence[torch.Tensor],
                 d: torch.Tensor, xla: bool = False) -> None:
    """TF's ``_zero_debias`` update for shadows of non-variable tensors, in place.

    The batch holds the shadows, their ``biased`` (zero-started) averages and the values;
    ``local_steps`` are the 0-dim step counts, kept in the variable dtype as TF keeps
    them (so float16 stops counting at 2048 and bfloat16 at 256). ``xla``: the biased
    update in XLA's form (see :func:`assign_moving_average_`); XLA leaves ``pow`` and the
    division as they are (TF1 graph under ``jit_scope``, TF 2.21, CPU).
    """
    factors = []
    for local_step in local_steps:
        # update_local_step = local_step.assign_add(1)
        local_step.add_(1)
        factors.append(bias_correction(d, local_step))
    # update_biased = state_ops.assign_sub(biased_var, (biased_var - value) * decay)
    # state_ops.assign(v, update_biased / bias_factor)
    # (XLA: the assign_sub contracted to one FMA as in assign_moving_average_)
    batch.zero_debias_(d, factors, xla=xla and xla_fuses(d.dtype))


# ---------------------------------------------------------------------- Keras use_ema
def keras_weights(ema_momentum: float, iterations: int, dtype: torch.dtype, flavour: str):
    """The momentum and ``1 - momentum`` of a Keras optimizer's EMA step, 0-dim ``dtype`` tensors.

    >>> keras_weights(0.99, 0, torch.float32, "keras3")       # first step copies
    (tensor(0.), tensor(1.))
    >>> m, w = keras_weights(0.99, 5, torch.float32, "tf_keras")
    >>> float(w) == float(torch.tensor(1 - 0.99, dtype=torch.float32))
    True
    """
    if flavour == "keras3":
        # momentum = ops.multiply(ops.cast(not_equal(iterations, 0), var.dtype), ema_momentum)
        m = torch.tensor(float(iterations != 0), dtype=dtype) * torch.tensor(ema_momentum,
                                                                             dtype=dtype)
        # ops.subtract(1, momentum)   (in the variable dtype)
        return m, torch.tensor(1, dtype=dtype) - m
    # tf_keras: self.ema_momentum * average + (1 - self.ema_momentum) * var  (Python floats)
    return torch.tensor(ema_momentum, dtype=dtype), torch.tensor(1 - ema_momentum, dtype=dtype)


def keras_average_(average: torch.Tensor, value: torch.Tensor, m: torch.Tensor,
                   w: torch.Tensor, xla: bool = False) -> None:
    """``average = m * average + w * value`` as Keras rounds it, in place.

    Eager: ``r(r(m * a) + r(w * v))``; XLA (float32 only): ``fma(m, a, r(w * v))``.
    """
    if not xla:
        # average.assign(ops.add(ops.multiply(momentum, average), ops.multiply(1 - m, var)))
        average.copy_(torch.add(torch.mul(m, average), torch.mul(w, value)))
    else:
        # XLA: add(multiply(m, a), multiply(w, v)) contracted into fma(m, a, multiply(w, v))
        average.copy_(kernels.fma32(m.expand_as(average), average, torch.mul(w, value)))


# ------------------------------------------------- TFA MovingAverage, Model Garden EMA optimizer
def step_decay(average_decay: np.float32, step: int, start_step: int,
               dynamic_decay: bool) -> np.float32:
    """The decay of TFA's ``MovingAverage`` and Model Garden's EMA optimizer at ``step``.

    ``average_decay`` is the float32 decay (TFA: with its ``num_updates`` cap already folded
    in, see :func:`float32_decay`); ``step`` the optimizer's ``iterations`` as the library
    reads it (TFA: before the step's increment; Model Garden: after it). Every op in float32,
    as both write it (``tensorflow_addons/optimizers/moving_average.py`` 0.23.0 ``_get_decay``,
    ``official/modeling/optimization/ema_optimizer.py`` ``update_average``).

    >>> print(step_decay(np.float32(0.99), 4, start_step=5, dynamic_decay=True))   # before start
    0.0
    >>> print(step_decay(np.float32(0.99), 6, start_step=5, dynamic_decay=True))   # 2 / 11
    0.18181819
    >>> print(step_decay(np.float32(0.99), 6, start_step=5, dynamic_decay=False))
    0.99
    """
    # step = tf.cast(step, tf.float32)
    step32 = _host_count(step)
    # Model Garden: tf.constant(start_step, tf.float32); TFA: the Python int, converted to
    # float32 by the comparison and the subtraction with a float32 tensor
    start32 = _host_count(start_step)
    # if step < start_step: return tf.constant(0.0, tf.float32)
    if step32 < start32:
        return np.float32(0.0)
    if not dynamic_decay:
        # return average_decay
        return average_decay
    # step_count = step - start_step
    # return tf.minimum(average_decay, (1.0 + step_count) / (10.0 + step_count))
    return _capped(average_decay, np.float32(step32 - start32))


@functools.lru_cache(maxsize=64)
def momentum_update_weight(decay: np.float32, dtype: torch.dtype) -> torch.Tensor:
    """``1 - momentum`` of tf_keras' ``backend.moving_average_update`` (TFA's update): the
    float32 decay cast to the variable dtype *first*, then subtracted from 1 in that dtype
    (:func:`update_weight` subtracts in float32, then casts). The same for float32; it
    differs for float16/bfloat16 (decay rounded to half first) and for float64 (``1 - d``
    exact where float32 rounds it, e.g. at decay 0.1). Shared between calls: read it only.

    >>> momentum_update_weight(np.float32(0.99), torch.float16)   # 1 - float16(0.99)
    tensor(0.0098, dtype=torch.float16)
    >>> update_weight(np.float32(0.99), torch.float16)            # float16(1 - 0.99)
    tensor(0.0100, dtype=torch.float16)
    """
    # momentum = tf.cast(momentum, x.dtype)
    momentum = torch.as_tensor(decay).to(dtype)
    # x.assign_sub((x - value) * (1 - momentum))   (the update itself: assign_moving_average_)
    return torch.tensor(1, dtype=dtype) - momentum
