"""Whether tensors still have the memory, shape, strides and dtype they had: cheaply, every step.

A cached update plan hands the fused kernel raw pointers, so before each reuse every
variable must be checked. Asked one tensor at a time from Python (``data_ptr()``,
``size()``, ``stride()``, ``dtype``), that costs about half a microsecond a tensor: on 2,000
small tensors, as much as the update itself. Shape, strides and dtype are checked here in one
C++ call through ``torch._C._dynamo.guards.TensorGuards``, the check ``torch.compile`` runs
before each compiled call (it compares sizes, strides, dtype, device and dispatch keys,
including ``requires_grad``); data pointers in one call of our own ``_data_pointers``
extension, through the C function torch exports to the code ``torch.compile`` generates.

Neither is public API, so each is trusted only after it has shown, on tensors made for the
purpose, that it tells every change we rely on (a transposed, resized, reshaped,
reinterpreted or restrided tensor; a moved, offset or emptied storage) from no change; where
one is missing or fails, the same checks run in Python. Either way a change is never missed: at worst the check is
slower, or a change we do not rely on (``requires_grad``, a dispatch key) costs a re-plan.
"""
from __future__ import annotations

import functools
from array import array
from typing import List, Sequence

import torch

try:
    from . import _data_pointers
except ImportError:     # not built (no C++ compiler): pointers are read in Python
    _data_pointers = None

Tensor = torch.Tensor

#: The only types whose pointers are read in C++: torch's reader takes exactly these.
_EXACT_TYPES = (Tensor, torch.nn.Parameter)


class LayoutGuard:
    """Remembers the layout of tensors; :meth:`holds` tells whether they still have it.

    >>> import torch
    >>> w = torch.zeros(2, 3)
    >>> guard = LayoutGuard([w])
    >>> guard.holds([w])
    True
    >>> _ = w.t_()
    >>> guard.holds([w])
    False
    """

    def __init__(self, tensors: Sequence[Tensor]):
        tensors = list(tensors)
        self._pointers = pointers(tensors)
        self._in_cpp = _cpp_guard(tensors) if _cpp_guard_trusted() else None
        self._layouts = None if self._in_cpp is not None else _python_layouts(tensors)

    def holds(self, tensors: Sequence[Tensor]) -> bool:
        """Whether each tensor has the data pointer, shape, strides and dtype it had."""
        if not same_pointers(list(tensors), self._pointers):
            return False
        if self._in_cpp is not None:
            return self._in_cpp.check(*tensors)
        return _python_layouts(tensors) == self._layouts


def pointers(tensors: Sequence[Tensor]) -> array:
    """The tensors' data pointers, as :func:`same_pointers` compares them."""
    return array("Q", map(Tensor.data_ptr, tensors))


def same_pointers(tensors: List[Tensor], expected: array) -> bool:
    """Whether each tensor still has the data pointer in ``expected`` (from :func:`pointers`).

    >>> w = torch.zeros(3)
    >>> before = pointers([w])
    >>> same_pointers([w], before)
    True
    >>> w.share_memory_() is w and same_pointers([w], before)
    False
    """
    reader = _pointer_reader()
    if reader and _data_pointers.same_pointers(reader, tensors, _EXACT_TYPES, expected):
        return True
    # not the same, or not a plain tensor or parameter (a subclass): answer in Python
    return pointers(tensors) == expected


def _python_layouts(tensors: Sequence[Tensor]) -> tuple:
    return (list(map(Tensor.size, tensors)), list(map(Tensor.stride, tensors)),
            [t.dtype for t in tensors])


def _cpp_guard(tensors: List[Tensor]):
    """A ``TensorGuards`` over these tensors (plain tensors and parameters only), or None."""
    if not all(type(t) in (Tensor, torch.nn.Parameter) for t in tensors):
        return None
    from torch._C._dynamo.guards import TensorGuards
    return TensorGuards(*tensors, dynamic_dims_sizes=[list(t.size()) for t in tensors],
                        dynamic_dims_strides=[list(t.stride()) for t in tensors])


@functools.lru_cache(maxsize=None)
def _cpp_guard_trusted() -> bool:
    """Whether ``TensorGuards`` exists here and tells apart every change a plan relies on."""
    try:
        from torch._C._dynamo.guards import TensorGuards  # noqa: F401
    except ImportError:
        return False
    changes = [lambda t: t.t_(), lambda t: t.resize_(4, 3), lambda t: t.resize_(2, 3),
               lambda t: t.set_(t.untyped_storage(), 0, (3, 4), (1, 3)),
               lambda t: t.set_(t.untyped_storage(), 0, (6,), (2,)),
               lambda t: setattr(t, "data", t.data.view(torch.int32)),
               lambda t: setattr(t, "data", t.data.view(4, 3)),
               lambda t: setattr(t, "data", t.data.double())]
    try:
        for change in changes:
            tensor = torch.zeros(3, 4)
            guard = _cpp_guard([tensor])
            if not guard.check(tensor):
                return False
            change(tensor)
            if guard.check(tensor):
                return False
        parameter = torch.nn.Parameter(torch.zeros(3, 4))
        return _cpp_guard([parameter]).check(parameter)
    except Exception:   # an API that changed shape is not trusted; the Python checks serve
        return False


@functools.lru_cache(maxsize=None)
def _pointer_reader() -> int:
    """The address of torch's C function that reads a tensor's data pointer, once it has
    agreed with ``data_ptr()`` on every kind of tensor a plan holds; 0 where it can't serve."""
    from torch._C._dynamo import guards
    address = getattr(guards, "_torchinductor_pyobject_tensor_data_ptr", None)
    # its signature, void *(PyObject *), is the one torch 2.x's generated code declares
    if _data_pointers is None or type(address) is not int or address <= 0 \
            or not torch.__version__.startswith("2."):
        return 0
    emptied = torch.zeros(4)
    emptied.untyped_storage().resize_(0)
    tensors = [torch.zeros(3, 4), torch.nn.Parameter(torch.zeros(5)), torch.zeros(10)[3:],
               torch.zeros(6).view(2, 3).t(), torch.zeros(0), emptied,
               torch.zeros(2, dtype=torch.float64), torch.zeros(2, device="meta")]
    for tensor in tensors:
        right, wrong = pointers([tensor]), array("Q", [tensor.data_ptr() + 8])
        if not _data_pointers.same_pointers(address, [tensor], _EXACT_TYPES, right) or \
                _data_pointers.same_pointers(address, [tensor], _EXACT_TYPES, wrong):
            return 0
    return address


def cpp_guard_in_use() -> bool:
    """Whether layout checks run in C++ (True) or in Python (False) in this process.

    >>> isinstance(cpp_guard_in_use(), bool)
    True
    """
    return _cpp_guard_trusted()


