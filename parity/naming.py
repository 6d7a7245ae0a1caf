"""TF's naming (``average_name``, ``variables_to_restore``) against ours, key by key.

The same variables are built in a TF1 graph (variable scopes, trainable and
non-trainable variables, a non-variable tensor averaged with ``zero_debias``) and as a
PyTorch module whose entries carry the TF names.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from tfcompat_ema import ExponentialMovingAverage

from .tf_side import import_tf

#: name -> (shape, trainable, averaged)
VARIABLES = {
    "model/dense/kernel": ((3, 2), True, True),
    "model/dense/bias": ((2,), True, True),
    "prepro/u1/FW/BasicLSTMCell/Linear/Matrix": ((5, 8), True, True),
    "prepro/u1/FW/BasicLSTMCell/Linear/Bias": ((8,), True, True),
    "model/bn/moving_mean": ((2,), False, True),     # non-trainable, averaged explicitly
    "model/bn/moving_variance": ((2,), False, False),
    "global_step": ((), False, False),
}
TENSOR = "loss"


def tf_names() -> Dict[str, object]:
    tf = import_tf()
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        variables = {}
        for name, (shape, trainable, _) in VARIABLES.items():
            scope, _, leaf = name.rpartition("/")
            with v1.variable_scope(scope or v1.get_variable_scope()):
                dtype = tf.int64 if name == "global_step" else tf.float32
                variables[name] = v1.get_variable(leaf, shape, dtype=dtype, trainable=trainable)
        loss = tf.identity(tf.constant(1.0), name=TENSOR)
        ema = v1.train.ExponentialMovingAverage(0.999, zero_debias=True)
        ema.apply([v for n, v in variables.items() if VARIABLES[n][2]] + [loss])
        restore = {key: var.op.name for key, var in ema.variables_to_restore().items()}
        average_names = {n: ema.average_name(v) for n, v in variables.items()}
    return {"restore": restore, "average_names": average_names}


def our_names() -> Dict[str, object]:
    model = nn.Module()
    for name, (shape, trainable, _) in VARIABLES.items():
        if name == "global_step":
            model.register_buffer(name, torch.zeros(shape, dtype=torch.int64))
        elif trainable:
            model.register_parameter(name, nn.Parameter(torch.zeros(shape)))
        else:
            model.register_buffer(name, torch.zeros(shape))
    ema = ExponentialMovingAverage(0.999, zero_debias=True)
    ema.apply(model)                                   # the trainable ones
    state = model.state_dict(keep_vars=True)
    ema.apply({n: state[n] for n, (_, trainable, averaged) in VARIABLES.items()
               if averaged and not trainable})
    ema.apply_tensors({TENSOR: torch.tensor(1.0)})
    names_of = {t.data_ptr(): n for n, t in state.items()}
    names_of.update({t.data_ptr(): n for n, t in ema.state_dict().items()})
    restore = {key: names_of[t.data_ptr()] for key, t in ema.variables_to_restore().items()}
    average_names = {n: ema.average_name(n) for n in VARIABLES}
    return {"restore": restore, "average_names": average_names}


def compare_naming() -> Dict[str, object]:
    ours, theirs = our_names(), tf_names()
    problems = []
    for what in ("restore", "average_names"):
        a, b = theirs[what], ours[what]
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                problems.append(f"{what}[{key!r}]: TensorFlow {a.get(key)!r}, ours {b.get(key)!r}")
    keys = len(theirs["restore"]) + len(theirs["average_names"])
    return {"match": not problems, "keys": keys, "problems": problems,
            "tensorflow": theirs, "ours": ours}
