"""LayoutGuard: every change a cached plan relies on is seen, in C++ and in Python."""
from array import array

import pytest
import torch

from tfcompat_ema import layout_guard
from tfcompat_ema.layout_guard import LayoutGuard

CHANGES = {
    "transposed in place": lambda t: t.t_(),
    "resized, same storage": lambda t: t.resize_(2, 3),
    "resized, bigger": lambda t: t.resize_(40, 30),
    "restrided": lambda t: t.set_(t.untyped_storage(), 0, (3, 4), (1, 3)),
    "offset": lambda t: t.set_(t.untyped_storage(), 4, (2, 4), (4, 1)),
    "reinterpreted": lambda t: setattr(t, "data", t.data.view(torch.int32)),
    "reshaped": lambda t: setattr(t, "data", t.data.view(4, 3)),
    "replaced, same shape": lambda t: setattr(t, "data", torch.ones(3, 4)),
    "shared memory": lambda t: t.share_memory_(),
    "storage emptied": lambda t: t.untyped_storage().resize_(0),
    "another storage": lambda t: t.set_(torch.zeros(12).untyped_storage(), 0, (3, 4), (4, 1)),
    "float64": lambda t: setattr(t, "data", t.data.double()),
}


@pytest.fixture(params=["c++", "pointers in python", "layouts in python", "python"])
def path(request, monkeypatch):
    if request.param in ("python", "layouts in python"):
        monkeypatch.setattr(layout_guard, "_cpp_guard_trusted", lambda: False)
    elif not layout_guard.cpp_guard_in_use():
        pytest.skip("torch's TensorGuards is missing or not trusted here")
    if request.param in ("python", "pointers in python"):
        monkeypatch.setattr(layout_guard, "_pointer_reader", lambda: 0)
    elif not layout_guard._pointer_reader():
        pytest.skip("the _data_pointers extension is not built, or torch's reader not trusted")
    return "python" if request.param in ("python", "layouts in python") else "c++"  # layouts


def test_unchanged_holds(path):
    tensors = [torch.zeros(3, 4), torch.nn.Parameter(torch.zeros(5)), torch.zeros(()),
               torch.zeros(0, 2), torch.zeros(2, 3).t()]
    guard = LayoutGuard(tensors)
    for t in tensors:
        with torch.no_grad():
            t.add_(1)               # values change every step: that is not a layout change
    assert guard.holds(tensors)
    assert (guard._in_cpp is not None) == (path == "c++")


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_every_change_is_seen(path, change):
    tensors = [torch.zeros(7), torch.zeros(3, 4), torch.zeros(5)]
    guard = LayoutGuard(tensors)
    CHANGES[change](tensors[1])
    assert not guard.holds(tensors)


def test_another_tensor_with_the_same_layout_is_not_the_same_memory(path):
    a = torch.zeros(3, 4)
    guard = LayoutGuard([a])
    assert not guard.holds([torch.zeros(3, 4)])


def test_subclasses_are_checked_in_python():
    class Tagged(torch.Tensor):
        pass
    t = torch.zeros(3).as_subclass(Tagged)
    guard = LayoutGuard([t])
    assert guard._in_cpp is None and guard.holds([t])


needs_reader = pytest.mark.skipif(not layout_guard._pointer_reader(),
                                  reason="_data_pointers not built, or torch's reader not trusted")


@needs_reader
def test_the_pointer_reader_is_in_use_where_built():
    # the per-step check of 2,000 tensors depends on it (make bench, many-small)
    a, p = torch.zeros(3), torch.nn.Parameter(torch.zeros(2))
    expected = layout_guard.pointers([a, p])
    assert layout_guard._data_pointers.same_pointers(
        layout_guard._pointer_reader(), [a, p], layout_guard._EXACT_TYPES, expected)


@needs_reader
@pytest.mark.parametrize("junk", [[None], [3], ["x"], [torch.zeros(2).to_sparse()],
                                  [torch.zeros(2).as_subclass(torch.nn.Buffer)]])
def test_the_cpp_check_answers_false_for_anything_but_plain_tensors(junk):
    # never handed to torch's reader, which takes exactly Tensor or Parameter: no crash
    reader = layout_guard._pointer_reader()
    assert not layout_guard._data_pointers.same_pointers(
        reader, junk, layout_guard._EXACT_TYPES, array("Q", [0]))


@needs_reader
def test_the_cpp_check_refuses_a_wrong_count_or_a_null_reader():
    a = torch.zeros(3)
    check = layout_guard._data_pointers.same_pointers
    assert not check(layout_guard._pointer_reader(), [a], layout_guard._EXACT_TYPES,
                     array("Q", [a.data_ptr(), 0]))
    assert not check(0, [a], layout_guard._EXACT_TYPES, layout_guard.pointers([a]))


def test_a_subclass_pointer_is_compared_in_python():
    class Tagged(torch.Tensor):
        pass
    t = torch.zeros(3).as_subclass(Tagged)
    before = layout_guard.pointers([t])
    assert layout_guard.same_pointers([t], before)
    t.share_memory_()
    assert not layout_guard.same_pointers([t], before)
