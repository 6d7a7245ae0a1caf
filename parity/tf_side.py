"""Runs a scenario through real TensorFlow's ``tf.train.ExponentialMovingAverage``.

``num_updates`` reaches TF as a Python int where ours gets one (``feed="int"``), else as an
int64 variable (eager) or placeholder (graph), set to the count at each step: TF's own way of
feeding a changing count, as ``"auto"`` and callables are ours.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional

import numpy as np

from .scenarios import Scenario

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def import_tf():
    """TensorFlow, or a SystemExit that says how to get it."""
    try:
        import tensorflow as tf
    except ImportError:
        raise SystemExit("TensorFlow is not installed: the parity suite runs it side by side "
                         "with tfcompat_ema. Install it with `pip install tfcompat-ema[tf]` "
                         "(or run `make parity`, which does).") from None
    return tf


Progress = Optional[Callable[[int], None]]


def run(scenario: Scenario, values: List[np.ndarray], progress: Progress = None
        ) -> List[np.ndarray]:
    """TF's average after every step: one float64 array ``[steps, *shape]`` per shape."""
    if scenario.kind == "tensors":
        return _graph(scenario, values, tensors=True, progress=progress)
    if scenario.tf_mode == "graph":
        return _graph(scenario, values, tensors=False, progress=progress)
    return _eager(scenario, values, use_function=scenario.tf_mode == "function",
                  progress=progress)


def _tf_dtype(tf, scenario: Scenario):
    return getattr(tf, scenario.dtype)


def _eager(scenario: Scenario, values, use_function: bool, progress: Progress):
    tf = import_tf()
    dtype = _tf_dtype(tf, scenario)
    variables = [tf.Variable(tf.cast(v[0], dtype), name=f"v{i}") for i, v in enumerate(values)]
    decays, counts = scenario.decays(), scenario.num_updates_at()
    decay = tf.Variable(decays[0], dtype=tf.float32) if scenario.decay_later is not None \
        else float(scenario.decay)
    num_updates = None if counts is None else int(counts[0]) if scenario.feed == "int" \
        else tf.Variable(counts[0], dtype=tf.int64)
    ema = tf.train.ExponentialMovingAverage(decay, num_updates=num_updates)

    def step(new_values):
        for var, value in zip(variables, new_values):
            var.assign(tf.cast(value, dtype))
        ema.apply(variables)

    if use_function:
        step = tf.function(step)
    out = [np.empty(v.shape, np.float64) for v in values]
    for t in range(scenario.steps):
        if scenario.decay_later is not None:
            decay.assign(decays[t])
        if isinstance(num_updates, tf.Variable):
            num_updates.assign(counts[t])
        step([tf.constant(v[t], tf.float64) for v in values])
        for i, var in enumerate(variables):
            out[i][t] = tf.cast(ema.average(var), tf.float64).numpy()
        if progress:
            progress(t)
    return out


def _graph(scenario: Scenario, values, tensors: bool, progress: Progress):
    tf = import_tf()
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        dtype = _tf_dtype(tf, scenario)
        feeds = [v1.placeholder(tf.float64, v.shape[1:], name=f"feed{i}")
                 for i, v in enumerate(values)]
        decay = v1.placeholder(tf.float32, [], name="decay") \
            if scenario.decay_later is not None else float(scenario.decay)
        num_updates = None if scenario.num_updates is None else \
            int(scenario.num_updates_at()[0]) if scenario.feed == "int" else \
            v1.placeholder(tf.int64, [], name="num_updates")
        ema = v1.train.ExponentialMovingAverage(decay, num_updates=num_updates,
                                                zero_debias=scenario.zero_debias)
        if tensors:
            averaged = [tf.identity(tf.cast(f, dtype), name=f"t{i}") for i, f in enumerate(feeds)]
            update = ema.apply(averaged)
        else:
            averaged = [v1.get_variable(f"v{i}", initializer=tf.cast(v[0], dtype))
                        for i, v in enumerate(values)]
            assigns = [var.assign(tf.cast(f, dtype)) for var, f in zip(averaged, feeds)]
            with tf.control_dependencies(assigns):
                update = ema.apply(averaged)
        with tf.control_dependencies([update]):
            read = [tf.cast(tf.identity(ema.average(a).read_value()), tf.float64)
                    for a in averaged]
        init = v1.global_variables_initializer()
    decays, counts = scenario.decays(), scenario.num_updates_at()
    out = [np.empty(v.shape, np.float64) for v in values]
    with v1.Session(graph=graph) as session:
        session.run(init)
        for t in range(scenario.steps):
            feed = {f: v[t] for f, v in zip(feeds, values)}
            if scenario.decay_later is not None:
                feed[decay] = np.float32(decays[t])
            if num_updates is not None and scenario.feed != "int":
                feed[num_updates] = counts[t]
            for i, result in enumerate(session.run(read, feed)):
                out[i][t] = result
            if progress:
                progress(t)
    return out
