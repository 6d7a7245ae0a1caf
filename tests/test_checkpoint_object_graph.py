"""TF2 object-based checkpoints: the object graph decoded, TF2 naming, collisions refused."""
import numpy as np
import pytest

from _ckpt_support import bits, no_tensorflow, tf_module, tf_values  # noqa: F401
from tfcompat_ema import CheckpointError, read_checkpoint
from tfcompat_ema.checkpoint.bundle import BundleReader, write_bundle
from tfcompat_ema.checkpoint.object_graph import KEY


def test_nested_objects_and_optimizer_slots(tmp_path):
    tf = tf_module()
    tf_keras = pytest.importorskip("tf_keras")
    model = tf.Module()
    model.dense = tf.Module()
    model.dense.kernel = tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3))
    model.dense.bias = tf.Variable(np.zeros(3, np.float16))
    optimizer = tf_keras.optimizers.legacy.Adam(0.1)      # slots in the object graph
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model.dense.kernel ** 2)
    optimizer.apply_gradients(zip(tape.gradient(loss, [model.dense.kernel]),
                                  [model.dense.kernel]))
    prefix = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                 note=tf.Variable("text")).save(str(tmp_path / "ckpt"))
    judge = tf_values(prefix)
    ckpt = read_checkpoint(prefix)
    assert ckpt.format == "TF2"
    for key, value in judge.items():
        if key == KEY:
            continue
        name = key[:-len("/.ATTRIBUTES/VARIABLE_VALUE")] if \
            key.endswith("/.ATTRIBUTES/VARIABLE_VALUE") else key
        if name == "save_counter":
            assert name not in ckpt.tensors
        elif isinstance(value, bytes) or np.asarray(value).dtype == object:
            assert list(ckpt.strings[name].reshape(-1)) == list(np.asarray(value, object).reshape(-1))
        else:
            assert bits(ckpt.tensors[name]) == bits(value), name
        if name != "save_counter":
            assert ckpt.keys[name] == key
    graph = ckpt.object_graph
    paths = graph.paths()
    kernel_node = next(i for i, p in paths.items() if p == "model/dense/kernel")
    assert graph.nodes[kernel_node].attributes[0].full_name == "Variable"
    assert graph.nodes[kernel_node].attributes[0].checkpoint_key == \
        "model/dense/kernel/.ATTRIBUTES/VARIABLE_VALUE"
    slots = [s for node in graph.nodes for s in node.slot_variables]
    assert {s.slot_name for s in slots} == {"m", "v"}
    assert all(s.original_variable_node_id == kernel_node for s in slots)
    slot_keys = {a.checkpoint_key for s in slots for a in
                 graph.nodes[s.slot_variable_node_id].attributes}
    assert all(k in judge and ".OPTIMIZER_SLOT" in k for k in slot_keys)
    assert set(graph.full_names()) >= slot_keys
    from tensorflow.core.protobuf import trackable_object_graph_pb2
    theirs = trackable_object_graph_pb2.TrackableObjectGraph()
    theirs.ParseFromString(judge[KEY])
    assert [[(c.node_id, c.local_name) for c in n.children] for n in theirs.nodes] == \
        [n.children for n in graph.nodes]
    assert [[(a.name, a.full_name, a.checkpoint_key) for a in n.attributes]
            for n in theirs.nodes] == \
        [[(a.name, a.full_name, a.checkpoint_key) for a in n.attributes] for n in graph.nodes]
    assert [[(s.original_variable_node_id, s.slot_name, s.slot_variable_node_id)
             for s in n.slot_variables] for n in theirs.nodes] == \
        [[(s.original_variable_node_id, s.slot_name, s.slot_variable_node_id)
          for s in n.slot_variables] for n in graph.nodes]


def test_tf2_ema_averages_have_their_full_names(tmp_path):
    tf = tf_module()
    weights = [tf.Variable(np.ones((2, 2), np.float32), name="dense/kernel"),
               tf.Variable(np.zeros(2, np.float32), name="dense/bias")]
    ema = tf.train.ExponentialMovingAverage(0.9)
    ema.apply(weights)
    for w in weights:
        w.assign_add(tf.ones_like(w))
    ema.apply(weights)
    prefix = tf.train.Checkpoint(averaged_weights=[ema.average(v) for v in weights]).save(
        str(tmp_path / "ema"))
    ckpt = read_checkpoint(prefix)
    names = ckpt.object_graph.full_names()
    assert names["averaged_weights/0/.ATTRIBUTES/VARIABLE_VALUE"] == \
        "dense/kernel/ExponentialMovingAverage"
    assert names["averaged_weights/1/.ATTRIBUTES/VARIABLE_VALUE"] == \
        "dense/bias/ExponentialMovingAverage"
    assert bits(ckpt.tensors["averaged_weights/0"]) == bits(ema.average(weights[0]).numpy())


def graph_bundle(tmp_path, name, graph_bytes, extra=()):
    tensors = [(KEY, 7, (), [graph_bytes]), ("w/.ATTRIBUTES/VARIABLE_VALUE", 1, (1,),
                                             np.ones(1, np.float32))] + list(extra)
    write_bundle(str(tmp_path / name), tensors)
    return str(tmp_path / name)


def real_graph(tmp_path):
    tf = tf_module()
    prefix = tf.train.Checkpoint(w=tf.Variable([1.0])).save(str(tmp_path / "real"))
    return BundleReader(prefix).read(KEY)[()]


def test_a_graph_cut_short_is_refused(tmp_path, no_tensorflow):
    graph = bytes(real_graph_bytes)
    assert read_checkpoint(graph_bundle(tmp_path, "whole", graph)).object_graph.nodes
    for cut in range(1, len(graph)):
        with pytest.raises(CheckpointError, match="object graph"):
            read_checkpoint(graph_bundle(tmp_path, f"cut{cut}", graph[:cut]))


def test_a_data_file_cut_inside_the_graph_is_refused(tmp_path, no_tensorflow):
    prefix = graph_bundle(tmp_path, "g", bytes(real_graph_bytes))
    data = tmp_path / "g.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:10])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(prefix)


def test_tf2_suffix_collision_is_an_error_and_tf1_keeps_both(tmp_path, no_tensorflow):
    prefix = graph_bundle(tmp_path, "c", bytes(real_graph_bytes),
                          [("w", 1, (1,), np.zeros(1, np.float32))])
    with pytest.raises(CheckpointError, match="both give the name 'w'"):
        read_checkpoint(prefix)
    write_bundle(str(tmp_path / "tf1"), [("w", 1, (1,), np.zeros(1, np.float32)),
                                         ("w/.ATTRIBUTES/VARIABLE_VALUE", 1, (1,),
                                          np.ones(1, np.float32))])
    ckpt = read_checkpoint(tmp_path / "tf1")
    assert ckpt.format == "TF1"
    assert ckpt.tensors["w"].item() == 0 and ckpt.tensors["w/.ATTRIBUTES/VARIABLE_VALUE"] == 1


@pytest.fixture(autouse=True, scope="module")
def _graph(tmp_path_factory):
    global real_graph_bytes
    real_graph_bytes = real_graph(tmp_path_factory.mktemp("graph"))
