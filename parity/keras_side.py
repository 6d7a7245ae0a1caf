"""Keras ``use_ema`` flavours: a real Keras 3 / tf_keras SGD optimizer (learning rate 1, so a
step subtracts the gradient) with ``use_ema=True``, fed the scenario's values as gradients,
eager and under XLA; ours replays the same SGD step in torch and calls ``KerasEMA.apply``."""
from __future__ import annotations

from dataclasses import replace
from typing import List

import numpy as np
import torch

from .scenarios import Scenario
from .tf_side import import_tf

SHAPES = ((), (5,), (16, 9))


def _flavour(scenario: Scenario) -> str:
    return scenario.name.split("/")[0]


def _frequency(scenario: Scenario):
    return 3 if "overwrite" in scenario.name else None


def tf_keras_run(scenario: Scenario, values: List[np.ndarray]) -> List[np.ndarray]:
    tf = import_tf()
    xla = "xla" in scenario.name
    if _flavour(scenario) == "keras3":
        import keras
        sgd = keras.optimizers.SGD
    else:
        import tf_keras
        sgd = tf_keras.optimizers.SGD
    opt = sgd(learning_rate=1.0, use_ema=True, ema_momentum=scenario.decay,
              ema_overwrite_frequency=_frequency(scenario))
    variables = [tf.Variable(np.full(v.shape[1:], 0.5, np.float32)) for v in values]
    if _flavour(scenario) == "keras3":
        opt.build(variables)
        step = lambda grads: opt.apply(grads, variables)  # noqa: E731
    else:
        opt.build(variables)
        step = lambda grads: opt.apply_gradients(zip(grads, variables))  # noqa: E731
    step = tf.function(step, jit_compile=xla)
    out = [np.empty(v.shape, np.float64) for v in values]
    averages = opt._model_variables_moving_average
    for t in range(scenario.steps):
        step([tf.constant(v[t], tf.float32) for v in values])
        for i, a in enumerate(averages):
            out[i][t] = np.asarray(a.numpy() if hasattr(a, "numpy") else a.value, np.float64)
    return out


def ours(scenario: Scenario, values: List[np.ndarray]) -> List[np.ndarray]:
    from tfcompat_ema import KerasEMA
    ema = KerasEMA(scenario.decay, _frequency(scenario), _flavour(scenario),
                   xla="xla" in scenario.name)
    variables = {f"v{i}": torch.full(v.shape[1:], 0.5) for i, v in enumerate(values)}
    ema.build(variables)
    out = [np.empty(v.shape, np.float64) for v in values]
    for t in range(scenario.steps):
        for (name, var), v in zip(variables.items(), values):
            var.sub_(torch.from_numpy(np.asarray(v[t])).float())        # SGD, learning rate 1
        ema.apply()
        for i, name in enumerate(variables):
            out[i][t] = ema.average(name).double().numpy()
    return out


def cases(quick: bool = False):
    from .flavours import Case
    steps = 30 if quick else 200
    out = []
    for flavour in ("keras3", "tf_keras"):
        for mode in ("eager", "xla"):
            for extra in ("", "-overwrite"):
                base = Scenario(f"{flavour}/use_ema-{mode}{extra}", "float32", steps=steps,
                                shapes=SHAPES, decay=0.99)
                out.append(Case(base.name, replace(base), tf_keras_run, ours))
    return out
