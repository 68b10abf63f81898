"""Garbage collector pauses: the monitor counts and times exactly the collections
between start() and stop(); the policy node freezes the heap at configure and at
activate, monitors while active, reports the figures on /diagnostics, and unfreezes
at cleanup (real rclpy graph, real engine on the tiny checkpoint)."""

import contextlib
import gc
import time

import pytest
from policy_harness import (  # noqa: F401 - fixtures
    action_names, joint_names, make_graph, tiny_checkpoint, tiny_spec, wait_until)
from rclpy.lifecycle import TransitionCallbackReturn

from flashrt_ros import gc_pauses
from flashrt_ros.gc_pauses import GcPauses

SUCCESS = TransitionCallbackReturn.SUCCESS
GC_KEYS = ("gc collections gen0", "gc collections gen1", "gc collections gen2",
           "gc pause p99 [ms]", "gc pause max [ms]", "gc pauses >= 1 ms")


@contextlib.contextmanager
def only_explicit_collections():
    """No automatic collection runs meanwhile: the test's gc.collect() calls are all."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_counts_the_collections_between_start_and_stop_by_generation():
    monitor = GcPauses()
    assert monitor.percentile(99) is None
    assert monitor.diagnostic_values()["gc pause p99 [ms]"] == "n/a"
    with only_explicit_collections():
        gc.collect()                       # before start: not counted
        monitor.start()
        monitor.start()                    # idempotent: one callback, counted once
        try:
            for generation in (0, 1, 2, 2):
                gc.collect(generation)
        finally:
            monitor.stop()
        gc.collect()                       # after stop: not counted
    assert monitor.collections == [1, 1, 2] and monitor.count == 4
    assert monitor._on_collection not in gc.callbacks
    assert 0 < monitor.percentile(50) <= monitor.percentile(99) <= monitor.longest_s
    values = monitor.diagnostic_values()
    assert set(values) == set(GC_KEYS)
    assert [values[f"gc collections gen{g}"] for g in range(3)] == ["1", "1", "2"]


def test_slow_pauses_are_kept_with_their_time_newest_last(monkeypatch):
    monkeypatch.setattr(gc_pauses, "SLOW_PAUSE_S", 0.0)   # every collection is slow
    monkeypatch.setattr(gc_pauses, "SLOW_PAUSES_KEPT", 3)
    monitor = GcPauses()
    with only_explicit_collections():
        monitor.start()
        try:
            started = time.monotonic()
            for generation in (0, 1, 2, 0, 1):
                gc.collect(generation)
            ended = time.monotonic()
        finally:
            monitor.stop()
    assert monitor.slow_count == 5
    slow = monitor.slow_pauses()
    assert [generation for _, generation, _ in slow] == [2, 0, 1]  # the newest three
    times = [at for at, _, _ in slow]
    assert times == sorted(times) and started <= times[0] and times[-1] <= ended
    assert all(0 < seconds <= monitor.longest_s for _, _, seconds in slow)


@pytest.mark.ros
def test_node_freezes_the_heap_monitors_while_active_and_reports_on_diagnostics(make_graph):
    graph = make_graph()
    node = graph.policy

    def unfrozen(obj) -> bool:
        return any(o is obj for o in gc.get_objects())

    assert node.trigger_configure() == SUCCESS
    assert gc.get_freeze_count() > 0          # the engine, torch, rclpy: out of reach
    made_while_inactive = [object()]
    assert unfrozen(made_while_inactive)
    gc.collect(1)
    assert node.gc_pauses.count == 0          # not monitored while inactive

    assert node.trigger_activate() == SUCCESS
    assert not unfrozen(made_while_inactive)  # activation froze what came since configure
    counted = node.gc_pauses.collections[1]
    gc.collect(1)
    assert node.gc_pauses.collections[1] > counted and node.gc_pauses.longest_s > 0

    def newest_values():
        diagnostics = graph.recorder.snapshot().diagnostics
        return {kv.key: kv.value for kv in diagnostics[-1].status[0].values} if diagnostics else {}

    assert wait_until(lambda: int(newest_values().get("gc collections gen1", 0)) >= 1, timeout=10)
    values = newest_values()
    for key in GC_KEYS:
        assert key in values, key
    assert float(values["gc pause max [ms]"]) >= float(values["gc pause p99 [ms]"]) >= 0

    assert node.trigger_deactivate() == SUCCESS
    counted = list(node.gc_pauses.collections)
    gc.collect()
    assert node.gc_pauses.collections == counted  # not monitored after deactivate
    assert node.trigger_cleanup() == SUCCESS
    assert gc.get_freeze_count() == 0         # the released engine can be collected
