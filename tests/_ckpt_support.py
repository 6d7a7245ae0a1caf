"""Shared helpers of the checkpoint tests: TF as the judge, and TF made unimportable."""
import os
import sys

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture
def no_tensorflow(monkeypatch):
    """`import tensorflow` raises ImportError while the test runs (TF may be loaded already;
    our reader must not reach for it)."""
    for name in list(sys.modules):
        if name == "tensorflow" or name.startswith("tensorflow."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ImportError):
        import tensorflow  # noqa: F401
    yield


def tf_module():
    return pytest.importorskip("tensorflow")


def tf_values(prefix):
    """Every entry TF's own reader gives, as numpy arrays."""
    tf = tf_module()
    reader = tf.train.load_checkpoint(str(prefix))
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_dtype_map()}


def bits(value) -> bytes:
    """The bytes of a value: numpy (ml_dtypes included), torch, or a bytes array."""
    if hasattr(value, "detach"):
        import torch
        value = value.detach()
        if value.dtype.is_floating_point and value.element_size() <= 2:
            value = value.view(torch.uint8 if value.element_size() == 1 else torch.int16)
        value = value.numpy()
    value = np.asarray(value)
    if value.dtype == object:
        return b"|".join(bytes(v) for v in value.reshape(-1)) + repr(value.shape).encode()
    return value.tobytes() + repr(value.shape).encode()
