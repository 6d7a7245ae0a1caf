"""Finding a checkpoint (resolve_prefix) and keeping the state file's history."""
import os
import threading

import numpy as np
import pytest
import torch

from _ckpt_support import no_tensorflow, tf_module  # noqa: F401
from tfcompat_ema import CheckpointError, read_checkpoint, write_checkpoint
from tfcompat_ema.checkpoint.bundle import write_bundle
from tfcompat_ema.checkpoint.state import read_state
from tfcompat_ema.tf_checkpoint import resolve_prefix


def bundle(path):
    write_bundle(str(path), [("w", 1, (1,), np.ones(1, np.float32))])
    return str(path)


def test_directory_without_state_file(tmp_path, no_tensorflow):
    prefix = bundle(tmp_path / "model.ckpt-7")
    assert resolve_prefix(tmp_path) == prefix
    bundle(tmp_path / "model.ckpt-12")
    bundle(tmp_path / "model.ckpt-9")
    assert resolve_prefix(tmp_path) == str(tmp_path / "model.ckpt-12")       # highest step
    bundle(tmp_path / "other")
    with pytest.raises(CheckpointError, match="several checkpoints"):
        resolve_prefix(tmp_path)


def test_state_file_from_another_machine(tmp_path, no_tensorflow):
    bundle(tmp_path / "a")
    prefix = bundle(tmp_path / "model.ckpt-3")
    (tmp_path / "checkpoint").write_text(
        'model_checkpoint_path: "/home/someone/run/model.ckpt-3"\n'
        'all_model_checkpoint_paths: "/home/someone/run/model.ckpt-3"\n')
    assert resolve_prefix(tmp_path) == prefix
    assert read_checkpoint(tmp_path).prefix == prefix


def test_fifo_as_index_does_not_hang(tmp_path, no_tensorflow):
    os.mkfifo(tmp_path / "x.index")
    done = []
    worker = threading.Thread(target=lambda: done.append(_error(tmp_path / "x")), daemon=True)
    worker.start()
    worker.join(10)
    assert done and "not a regular file" in done[0]


def _error(path):
    try:
        read_checkpoint(path)
    except CheckpointError as error:
        return str(error)
    return "read"


def test_write_keeps_tf_savers_history(tmp_path):
    tf = tf_module()
    v1 = tf.compat.v1
    with tf.Graph().as_default():
        v1.get_variable("w", initializer=np.ones(2, np.float32))
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            saver = v1.train.Saver()
            for step in (1, 2):
                saver.save(sess, str(tmp_path / "model.ckpt"), global_step=step)
    write_checkpoint(tmp_path / "export", {"w": torch.zeros(2)})
    state = tf.train.get_checkpoint_state(str(tmp_path))
    assert os.path.basename(state.model_checkpoint_path) == "export"
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == \
        ["model.ckpt-1", "model.ckpt-2", "export"]
    assert tf.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / "export")
    write_checkpoint(tmp_path / "model.ckpt-1", {"w": torch.zeros(2)})        # moves to last
    assert [os.path.basename(p) for p in read_state(str(tmp_path))[1]] == \
        ["model.ckpt-2", "export", "model.ckpt-1"]


def test_write_keeps_tf2_manager_timestamps(tmp_path):
    tf = tf_module()
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(1.0)),
                                         str(tmp_path), max_to_keep=3)
    manager.save()
    write_checkpoint(tmp_path / "export", {"w": torch.zeros(2)})
    state = tf.train.get_checkpoint_state(str(tmp_path))
    assert len(state.all_model_checkpoint_timestamps) == 2
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == ["ckpt-1", "export"]


def test_umask_is_honoured_and_bad_state_file_refused(tmp_path, no_tensorflow):
    old = os.umask(0o027)
    try:
        write_checkpoint(tmp_path / "m", {"w": torch.zeros(2)})
    finally:
        os.umask(old)
    for name in ("m.index", "m.data-00000-of-00001", "checkpoint"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o640, name
    (tmp_path / "checkpoint").write_text("garbage that is not a state file\n")
    with pytest.raises(CheckpointError, match="checkpoint"):
        write_checkpoint(tmp_path / "n", {"w": torch.zeros(2)})
    assert not (tmp_path / "n.index").exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_paths_with_odd_characters_round_trip_through_tf(tmp_path):
    tf = tf_module()
    directory = tmp_path / "d 'q é"           # (TF's glob cannot take a backslash)
    write_checkpoint(directory / 'mod"el\té', {"w": torch.ones(1)})
    assert tf.train.latest_checkpoint(str(directory)) == str(directory / 'mod"el\té')
    assert read_checkpoint(directory).prefix == str(directory / 'mod"el\té')


def test_a_state_file_naming_a_missing_checkpoint_is_an_error(tmp_path):
    import torch
    from tfcompat_ema import write_checkpoint
    write_checkpoint(tmp_path / "m-1", {"a": torch.ones(2)})
    write_checkpoint(tmp_path / "m-2", {"a": torch.zeros(2)})
    os.remove(tmp_path / "m-2.index")
    with pytest.raises(CheckpointError, match="'m-2'"):
        resolve_prefix(tmp_path)


def test_a_prefix_naming_a_directory_is_refused(tmp_path):
    import torch
    from tfcompat_ema import write_checkpoint
    for prefix in ("", str(tmp_path) + os.sep):
        with pytest.raises(ValueError, match="names a directory"):
            write_checkpoint(prefix, {"a": torch.ones(2)})
    assert os.listdir(tmp_path) == []


def test_written_views_and_bad_tensors_name_the_entry(tmp_path):
    write_checkpoint(tmp_path / "m", {"c": torch.tensor([1 + 2j]).conj(),
                                      "n": torch._neg_view(torch.tensor([1.0, 2.0]))})
    tensors = read_checkpoint(tmp_path / "m").tensors
    assert torch.equal(tensors["c"], torch.tensor([1 - 2j]))
    assert torch.equal(tensors["n"], torch.tensor([-1.0, -2.0]))
    with pytest.raises(ValueError, match="'b': a tensor on the meta device"):
        write_checkpoint(tmp_path / "x", {"b": torch.ones(2, device="meta")})
