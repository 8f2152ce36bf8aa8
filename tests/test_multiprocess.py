"""Data parallelism over processes of one machine (``train.multiprocess``) and the toy
main job run in two processes."""

import multiprocessing
import os

import numpy as np
import pytest

from iresnet_jax.train import multiprocess, toy
from iresnet_jax.train.multiprocess import PeerFailedError, ProcessGroup

from test_toy import tiny_config

two_cpus = pytest.mark.skipif(len(multiprocess.available_cpus()) < 2,
                              reason="needs two CPUs")


# Targets of spawned processes: module level, so that the child can import them.
def _echo_worker(handle, queue):
    group = ProcessGroup.attach(handle)
    try:
        mean = group.mean(np.full(5, 10.0 * handle.rank, np.float32))
        tree = group.broadcast({"a": np.zeros((2, 3), np.float32),
                                "b": np.zeros((), np.int32),
                                "key": np.zeros((2,), np.uint32)})
        queue.put((handle.rank, mean.tolist(), tree["a"].tolist(), int(tree["b"]),
                   tree["key"].tolist()))
        group.mean(np.zeros(1, np.float64))  # a second round in another dtype
    finally:
        group.close()


def _failing_worker(handle):
    group = ProcessGroup.attach(handle)
    try:
        raise RuntimeError("this worker fails on purpose")
    except BaseException:
        group.abort()
    finally:
        group.close()


def _vanishing_worker(handle):
    ProcessGroup.attach(handle)
    os._exit(3)  # no abort flag: the others must notice that it is gone


def test_mean_and_broadcast_are_the_same_in_every_process():
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    group = ProcessGroup.create(3, 1024)
    try:
        multiprocess.spawn(_echo_worker, group, (queue,))
        mean = group.mean(np.full(5, 0.0, np.float32))
        sent = {"a": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
                "b": np.asarray(-12345, np.int32),
                "key": np.asarray([4294967295, 17], np.uint32)}  # not representable in f32
        tree = group.broadcast(sent)
        results = sorted(queue.get(timeout=60) for _ in range(2))
        group.mean(np.zeros(1, np.float64))
    finally:
        group.close()
    np.testing.assert_array_equal(mean, np.full(5, 10.0, np.float32))  # (0 + 10 + 20) / 3
    for out in (tree, {"a": np.asarray(results[0][2], np.float32), "b": results[0][3],
                       "key": np.asarray(results[0][4], np.uint32)}):
        np.testing.assert_array_equal(out["a"], sent["a"])
        assert int(out["b"]) == -12345
        np.testing.assert_array_equal(out["key"], sent["key"])
    assert [r[0] for r in results] == [1, 2]
    for r in results:
        assert r[1] == mean.tolist()
        assert r[2:] == results[0][2:]
    assert all(w.exitcode == 0 for w in group.workers)


@pytest.mark.parametrize("target,what", [(_failing_worker, "failed"),
                                         (_vanishing_worker, "exited")])
def test_a_failed_or_vanished_process_stops_the_others(target, what):
    group = ProcessGroup.create(2, 64)
    try:
        multiprocess.spawn(target, group)
        with pytest.raises(PeerFailedError, match=what):
            group.mean(np.ones(4, np.float32))
    finally:
        group.close()


def test_bad_group_arguments_are_refused():
    with pytest.raises(ValueError, match="2 to"):
        ProcessGroup.create(1, 64)
    with pytest.raises(ValueError, match="slot_bytes"):
        ProcessGroup.create(2, 0)


def test_payload_larger_than_the_slots_is_refused():
    group = ProcessGroup.create(2, 64)
    try:
        with pytest.raises(ValueError, match="exceeds"):
            group.mean(np.ones(17, np.float32))
    finally:
        group.close()


@two_cpus
def test_two_process_toy_run_matches_one_process_run(tmp_path):
    """Same global batch, split over two processes: the same training (the gradients are
    averaged in another order, so agreement to float rounding, not bits)."""
    one = toy.train_and_evaluate(tiny_config(processes=1, num_steps=6), str(tmp_path / "one"),
                                 print_fn=lambda s: None)
    lines = []
    two = toy.train_and_evaluate(tiny_config(processes=2, num_steps=6), str(tmp_path / "two"),
                                 print_fn=lines.append)
    assert one["processes"] == 1 and two["processes"] == 2
    assert any("in 2 processes" in line for line in lines)
    assert two["steps"] == 6
    assert two["test_nll"] == pytest.approx(one["test_nll"], abs=1e-5)
    assert (tmp_path / "two" / "checkerboard_iresnet.png").exists()


@pytest.mark.parametrize("overrides,match", [
    ({"processes": 0}, "processes must be a positive integer"),
    ({"processes": 3, "batch_size": 64}, "not divisible"),
])
def test_bad_process_settings_fail_at_once(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        toy.train_and_evaluate(tiny_config(**overrides), str(tmp_path))


def test_more_processes_than_cpus_are_reduced(monkeypatch):
    monkeypatch.setattr(multiprocess, "available_cpus", lambda: [0])
    lines = []
    assert toy.resolve_processes(tiny_config(processes=2), lines.append) == 1
    assert "1 CPU(s) available; using 1" in lines[0]
