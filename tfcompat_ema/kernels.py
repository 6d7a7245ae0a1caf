"""The elementwise part of TF's update, ``s -= (s - v) * d``, over many tensors at once.

Two exact implementations of the same per-op formula:

* the native fused kernel (:mod:`tfcompat_ema._fused`, compiled with the package), for
  CPU tensors: one pass over memory, no temporaries, each op rounded as TF rounds it
  (no floating-point contraction, so no FMA), denormals flushed to zero as on TF's CPU
  threads, split over ``torch.get_num_threads()`` threads (on Linux torch's own OpenMP
  threads: the kernel links no OpenMP runtime and uses the one torch has loaded; elsewhere a
  small pool of POSIX threads);
* ``torch_moving_average_``: three ``torch._foreach_*`` passes, for other devices, for
  layouts the flat kernel cannot walk, and where the kernel was not built. It walks the
  lists in chunks of at most ``CHUNK_BYTES`` so that its temporaries stay small.

With ``xla=True`` both compute TF's update as XLA compiles it on the CPU (see
:mod:`tfcompat_ema.tf_math`): one fused multiply-add for float32/float64 (C99 ``fma`` in the
kernel; on the torch path float32 is rounded to odd in float64 and then to float32, which is
exact, and float64 is refused); float16: the difference rounded to half, then one fused
multiply-add rounded once to half. Whether XLA fuses at all depends on the CPU
(:func:`native_fma_dtypes`; :mod:`tfcompat_ema.tf_math` decides).

A :class:`Batch` groups tensors of one device and dtype and prepares them once, so that
repeated updates of the same tensors do no per-tensor work in Python.
"""
from __future__ import annotations

import functools
import os
import platform
import sys
import warnings
from array import array
from typing import FrozenSet, Iterator, List, Optional, Sequence, Tuple

import torch

# The kernel is imported after torch: on Linux its OpenMP calls resolve to the OpenMP runtime
# torch has loaded (see _fused.c), so that both use one team of threads.
try:
    from . import _fused
    _FUSED_MISSING = None
except ImportError as error:  # not built (no C compiler), or no OpenMP runtime in this torch
    _fused, _FUSED_MISSING = None, error

#: Upper bound on the bytes one chunk of the torch path touches per list.
CHUNK_BYTES = 16 << 20

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def fused_available() -> bool:
    """Whether the compiled one-pass CPU kernel is installed.

    Without it (the package was installed where no C compiler was found), CPU updates take
    the pure-PyTorch path: exact per-op arithmetic, but several times slower, and denormals
    are not flushed to zero as TF's CPU kernels flush them.

    >>> from tfcompat_ema import fused_available
    >>> isinstance(fused_available(), bool)
    True
    """
    return _fused is not None


_warned_unfused = False
# this package's frames, and torch's (no_grad and other decorators around our methods)
_INTERNAL_DIRS = tuple(os.path.dirname(os.path.abspath(module.__file__)) + os.sep
                       for module in (sys.modules[__package__], torch))


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside this package and torch: the user's
    line, whichever of our entry points (apply, apply_tensors, a schedule, ...) got here."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def _warn_unfused() -> None:
    """Say once per process that CPU updates run without the compiled kernel."""
    global _warned_unfused
    if not _warned_unfused:
        _warned_unfused = True
        # --no-cache-dir: a plain reinstall would take the kernel-less wheel pip cached
        warnings.warn(f"tfcompat_ema's compiled CPU kernel is not available ({_FUSED_MISSING}; "
                      "no C compiler at install time?): CPU updates take the pure-PyTorch "
                      "path, several times slower, and denormals are not flushed to zero as "
                      "TF's CPU kernels do. Reinstall with a C compiler on PATH: pip install "
                      "--force-reinstall --no-cache-dir --no-binary tfcompat-ema tfcompat-ema; "
                      "tfcompat_ema.fused_available() tells.", RuntimeWarning,
                      stacklevel=_caller_stacklevel())


class Batch:
    """Shadows (and, for debiasing, biased averages) with their values, of one device and dtype.

    The values are read where they lie at each update: a batch stays valid while the
    tensors keep their memory (the caller checks ``data_ptr`` to know).

    Example:
        >>> import torch
        >>> s, v = torch.ones(3), torch.zeros(3)
        >>> Batch([s], [v]).moving_average_(torch.tensor(0.25))
        >>> s
        tensor([0.7500, 0.7500, 0.7500])
    """

    def __init__(self, shadows: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                 biased: Optional[Sequence[torch.Tensor]] = None):
        self.shadows, self.values = list(shadows), list(values)
        self.biased = None if biased is None else list(biased)
        if _fused is None and self.shadows and self.shadows[0].device.type == "cpu":
            _warn_unfused()
        fused = [] if _fused is None or not self.shadows or \
            self.shadows[0].device.type != "cpu" else self._fusable()
        self._fused_index = fused
        self._torch_index = sorted(set(range(len(self.shadows))) - set(fused))
        if fused:
            pick = lambda tensors: [tensors[i] for i in fused]  # noqa: E731
            self._code = _DTYPE_CODES[self.shadows[0].dtype]
            self._numels = array("q", map(torch.Tensor.numel, pick(self.shadows)))
            self._pointers = [_pointers(pick(self.shadows)), _pointers(pick(self.values)),
                              None if biased is None else _pointers(pick(self.biased))]

    def _check_xla(self, xla: bool) -> None:
        if xla and self._torch_index:
            _check_xla_batch(self.shadows[0].dtype, torch_path=True)

    def _fusable(self) -> List[int]:
        """The pairs the flat kernel can walk: plain, non-empty tensors with memory of their
        own (a DTensor's address is 0), the value dense and laid out like its shadow."""
        biased = self.biased or [None] * len(self.shadows)
        return [i for i, (s, v, b) in enumerate(zip(self.shadows, self.values, biased))
                if all(t is None or (_plain(t) and t.data_ptr() != 0) for t in (s, v, b))
                and s.numel() > 0 and s.stride() == v.stride()
                and (v.is_contiguous() or _dense(v)) and (b is None or b.stride() == s.stride())]

    def moving_average_(self, d: torch.Tensor, xla: bool = False) -> None:
        """``s -= (s - v) * d`` for every pair; ``d`` is a 0-dim tensor of the batch dtype.

        ``xla``: XLA's form of the update (see the module docstring)."""
        self._check_xla(xla)
        if self._fused_index:
            shadows, values, _ = self._pointers
            _fused.update(self._code, shadows, None, values, self._numels, float(d), None,
                          torch.get_num_threads(), xla)
        if self._torch_index:
            update = torch_moving_average_xla_ if xla else torch_moving_average_
            update([self.shadows[i] for i in self._torch_index],
                   [self.values[i] for i in self._torch_index], d)

    def zero_debias_(self, d: torch.Tensor, factors: Sequence[torch.Tensor],
                     xla: bool = False) -> None:
        """``b -= (b - v) * d; s = b / factor`` for every triple (0-dim factors, one each)."""
        self._check_xla(xla)
        if self._fused_index:
            shadows, values, biased = self._pointers
            factor_values = array("d", (float(factors[i]) for i in self._fused_index))
            _fused.update(self._code, shadows, biased, values, self._numels, float(d),
                          factor_values, torch.get_num_threads(), xla)
        if self._torch_index:
            rest = self._torch_index
            update = torch_moving_average_xla_ if xla else torch_moving_average_
            update([self.biased[i] for i in rest], [self.values[i] for i in rest], d)
            for i in rest:
                torch.div(self.biased[i], factors[i], out=self.shadows[i])


def torch_moving_average_(shadows: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                          d: torch.Tensor) -> None:
    """``s -= (s - v) * d`` with one rounding per op, in chunks of ``CHUNK_BYTES``."""
    for shadow_chunk, value_chunk in _chunks(shadows, values):
        diffs = torch._foreach_sub(shadow_chunk, value_chunk)
        torch._foreach_mul_(diffs, d)
        torch._foreach_sub_(shadow_chunk, diffs)


def _check_xla_batch(dtype: torch.dtype, torch_path: bool) -> None:
    if torch_path and dtype == torch.float64:
        raise NotImplementedError(
            "xla=True on float64 needs the compiled CPU kernel (tfcompat_ema._fused) and "
            "dense CPU tensors laid out like their averages: the torch path has no exact "
            "float64 fused multiply-add")


@functools.lru_cache(maxsize=1)
def native_fma_dtypes() -> Optional[FrozenSet[torch.dtype]]:
    """The dtypes this machine's CPU has fused multiply-add instructions for, or None where
    that is not known (read on x86-64 Linux only, from the kernel's CPU flags).

    ``fma`` (FMA3) or ``fma4`` gives float32 and float64; ``avx512fp16`` gives float16
    (Intel since Sapphire Rapids). These are the instructions LLVM, which compiles XLA's
    CPU code, contracts a multiply and an add into.

    >>> kinds = native_fma_dtypes()
    >>> kinds is None or kinds <= {torch.float16, torch.float32, torch.float64}
    True
    """
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return None
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((set(line.split(":", 1)[1].split()) for line in cpuinfo
                          if line.startswith("flags")), None)
    except OSError:         # no /proc (a sandbox): not known
        return None
    if flags is None:
        return None
    kinds = {torch.float32, torch.float64} if flags & {"fma", "fma4"} else set()
    if "avx512fp16" in flags:
        kinds.add(torch.float16)
    return frozenset(kinds)


def check_xla(name: str, tensor: torch.Tensor) -> None:
    """Refuse (before anything changes) a tensor that ``xla=True`` cannot update exactly."""
    if tensor.dtype == torch.float16 and native_fma_dtypes() is None:
        # XLA fuses float16 only where the CPU has half-precision FMA: unknown here
        raise NotImplementedError(
            f"{name!r}: xla=True on float16 follows the CPU's half-precision FMA (x86-64 "
            f"AVX512-FP16), which is read on x86-64 Linux only; this is {sys.platform} "
            f"{platform.machine()}")
    if tensor.dtype == torch.float64 and not (
            fused_available() and tensor.device.type == "cpu" and _plain(tensor)
            and (tensor.is_contiguous() or _dense(tensor))):
        raise NotImplementedError(
            f"{name!r}: xla=True on float64 needs the compiled CPU kernel "
            f"(built: {fused_available()}) and a dense CPU tensor, got a "
            f"{type(tensor).__name__} on {tensor.device} with strides {tuple(tensor.stride())}")


def torch_moving_average_xla_(shadows: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                              d: torch.Tensor) -> None:
    """XLA's ``s -= (s - v) * d`` (see the module docstring) with torch ops."""
    for shadow, value in zip(shadows, values):
        if shadow.dtype == torch.float32:
            shadow.copy_(fma32(shadow - value, -d, shadow))
        elif shadow.dtype == torch.float16:
            diff = (shadow - value).double()         # rounded to half; below, exact in double
            shadow.copy_(_odd_float(shadow.double() - diff * d.double()).half())
        elif shadow.dtype == torch.bfloat16:
            torch_moving_average_([shadow], [value], d)
        else:
            _check_xla_batch(shadow.dtype, torch_path=True)


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a * b + c`` rounded once to float32 (float32 tensors, broadcast).

    The product is exact in float64; the sum is rounded to odd there (nearest, then one
    step toward the exact sum's TwoSum error when inexact and even), and round-to-odd in
    53 bits followed by round-to-nearest in 24 is one correct rounding (Boldo & Melquiond).

    >>> import torch
    >>> a = torch.tensor([1 + 2 ** -12]); c = torch.tensor([-(1 + 2 ** -11)])
    >>> float(fma32(a, a, c)) == 2.0 ** -24      # a*a + c is exactly 2**-24
    True
    """
    a64, b64, c64 = a.double(), b.double(), c.double()
    p = a64 * b64
    s = p + c64
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)
    return _to_odd(s, err).float()


def _to_odd(x: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
    """``x`` (rounded to nearest, ``err`` short of exact) rounded to odd instead."""
    bits = x.view(torch.int64 if x.dtype == torch.float64 else torch.int32)
    fix = (err != 0) & ((bits & 1) == 0) & torch.isfinite(x) & torch.isfinite(err)
    toward = torch.where(err > 0, torch.full_like(x, float("inf")), torch.full_like(x, -float("inf")))
    return torch.where(fix, torch.nextafter(x, toward), x)


def _odd_float(x: torch.Tensor) -> torch.Tensor:
    """A float64 tensor rounded to odd in float32 (then one rounding to a narrower type is
    a correct rounding of ``x``)."""
    f = x.float()
    return _to_odd(f, (x - f.double()).float())


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


def _pointers(tensors: Sequence[torch.Tensor]) -> array:
    return array("Q", map(torch.Tensor.data_ptr, tensors))


def _plain(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense, in any dimension order (channels_last and the like)."""
    size = 1
    for dim_size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if dim_size != 1 and stride != size:
            return False
        size *= dim_size
    return True
