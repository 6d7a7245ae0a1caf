"""Reading and writing TF checkpoints, through TensorFlow's own reader and writer.

The one module of the package that imports TensorFlow, and only when one of its functions
is called (``pip install tfcompat-ema[tf]``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Mapping

import numpy as np
import torch

Tensor = torch.Tensor

#: The key every object-based (TF2, ``tf.train.Checkpoint``) checkpoint has.
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


class CheckpointError(ValueError):
    """A path that is not a readable TF checkpoint (missing, not one, truncated, corrupt)."""


@dataclass
class TFCheckpoint:
    """A TF checkpoint read into memory.

    ``format`` is ``"TF1"`` (name-based, ``tf.compat.v1.train.Saver``) or ``"TF2"``
    (object-based, ``tf.train.Checkpoint``). ``tensors`` maps variable names to tensors;
    TF2 names lose their ``/.ATTRIBUTES/VARIABLE_VALUE`` ending, and TF2's bookkeeping
    (the object graph, ``save_counter``) is left out. ``skipped`` lists entries that are not
    numbers (strings), which PyTorch cannot hold.
    """
    prefix: str
    format: str
    tensors: Dict[str, Tensor]
    skipped: Dict[str, str]


def _tf():
    try:
        import tensorflow as tf
    except ImportError:
        raise ImportError("reading and writing TF checkpoints needs TensorFlow: "
                          "pip install 'tfcompat-ema[tf]'") from None
    return tf


def resolve_prefix(path) -> str:
    """The checkpoint prefix for ``path``: a prefix, its ``.index`` file, or a directory
    with a ``checkpoint`` state file (its latest checkpoint)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        latest = _tf().train.latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path}: a directory without a TF checkpoint in it")
        return latest
    if path.endswith(".index"):
        path = path[:-len(".index")]
    elif ".data-" in os.path.basename(path):
        path = path[:path.rindex(".data-")]
    if not os.path.exists(path + ".index"):
        if os.path.exists(path):
            raise CheckpointError(f"{path}: not a TF checkpoint (no {os.path.basename(path)}"
                                  ".index beside it)")
        raise CheckpointError(f"{path}: no such checkpoint")
    return path


def read_checkpoint(path) -> TFCheckpoint:
    """Read every variable of a TF1 or TF2 checkpoint with ``tf.train.load_checkpoint``.

    Raises :class:`CheckpointError` for a path that is not a readable checkpoint; every
    tensor is read here, so a truncated data file is found now, not later.

    Example:
        >>> import tempfile, torch
        >>> from tfcompat_ema import read_checkpoint, write_checkpoint
        >>> prefix = tempfile.mkdtemp() + "/model.ckpt"
        >>> write_checkpoint(prefix, {"dense/kernel": torch.ones(2, 3)})
        >>> ckpt = read_checkpoint(prefix)
        >>> ckpt.format, list(ckpt.tensors)
        ('TF1', ['dense/kernel'])
    """
    prefix = resolve_prefix(path)
    tf = _tf()
    try:
        reader = tf.train.load_checkpoint(prefix)
        dtypes = reader.get_variable_to_dtype_map()
        is_tf2 = OBJECT_GRAPH_KEY in dtypes
        tensors, skipped = {}, {}
        for key in sorted(dtypes):
            if key == OBJECT_GRAPH_KEY:
                continue
            name = key[:-len(_VALUE_SUFFIX)] if key.endswith(_VALUE_SUFFIX) else key
            if is_tf2 and name == "save_counter":
                continue
            if not (dtypes[key].is_floating or dtypes[key].is_integer or dtypes[key].is_bool):
                skipped[name] = dtypes[key].name
                continue
            tensors[name] = _to_torch(reader.get_tensor(key))
    except Exception as error:           # TF's reader raises several kinds for bad files
        message = getattr(error, "message", None) or str(error)
        raise CheckpointError(f"{prefix}: unreadable TF checkpoint "
                              f"({message.splitlines()[0] if message else type(error).__name__})"
                              ) from None
    return TFCheckpoint(prefix, "TF2" if is_tf2 else "TF1", tensors, skipped)


def write_checkpoint(prefix, tensors: Mapping[str, Tensor]) -> None:
    """Write ``tensors`` as a TF1 name-based checkpoint at ``prefix``, as ``Saver.save`` does.

    The bundle (``prefix.index``, ``prefix.data-00000-of-00001``) and the directory's
    ``checkpoint`` state file, so ``tf.train.latest_checkpoint`` finds it. Names are TF
    variable names; :meth:`tfcompat_ema.NameMap.export` gives them for a model and its EMA.
    """
    prefix = os.fspath(prefix)
    tf = _tf()
    names = sorted(tensors)
    for name in names:
        if not isinstance(tensors[name], Tensor):
            raise TypeError(f"{name!r} is a {type(tensors[name]).__name__}, not a tensor")
    values = [tf.constant(_to_numpy(tensors[name])) for name in names]
    directory = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(directory, exist_ok=True)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=values)
    # The state file Saver writes beside its checkpoints (a text proto), for latest_checkpoint.
    relative = os.path.relpath(os.path.abspath(prefix), directory)
    with open(os.path.join(directory, "checkpoint"), "w") as state:
        state.write(f'model_checkpoint_path: "{relative}"\n'
                    f'all_model_checkpoint_paths: "{relative}"\n')


def _to_torch(array: np.ndarray) -> Tensor:
    if array.dtype.name == "bfloat16":       # ml_dtypes' bfloat16: same bits as torch's
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


def _to_numpy(tensor: Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
