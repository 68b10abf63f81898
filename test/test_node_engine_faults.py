"""Engine failures during ticks (flashrt_ros/engine_faults.py and the policy node).

A transient failure skips its tick and the node keeps publishing; failures in a row
(max_consecutive_engine_failures), or one that killed the CUDA context, stop the node:
it publishes the hold, reports ERROR on /diagnostics and deactivates itself, and
~/predict answers with the reason. The node tests run a real rclpy graph around the
real tiny policy wrapped to raise on chosen calls. The dead-context probe needs a GPU:
on the CPU it is replaced (the node's handling is what those tests check), and a GPU
test kills a CUDA context in a subprocess to check the probe itself.
"""

import collections
import os
import subprocess
import sys
import tempfile
import textwrap
import threading

import numpy as np
import pytest
from policy_harness import (  # noqa: F401 - fixtures
    action_names, joint_names, make_graph, tiny_checkpoint, tiny_spec, trajectory_joints,
    wait_until)

from flashrt_ros import engine_faults
from flashrt_ros.diagnostics import ERROR, PolicyHealth
from flashrt_ros.engine_faults import EngineFailures, looks_like_cuda_error

ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"


# ---------------------------------------------------------------- without ROS

def test_failures_in_a_row_make_a_fault_and_a_success_resets_the_count():
    failures = EngineFailures()
    assert failures.failed(RuntimeError("odd"), "cpu", limit=3) is None
    assert failures.failed(RuntimeError("odd"), "cpu", limit=3) is None
    failures.reset()  # a call succeeded
    assert failures.failed(RuntimeError("odd"), "cpu", limit=3) is None
    assert failures.failed(RuntimeError("odd"), "cpu", limit=3) is None
    fault = failures.failed(ValueError("third"), "cpu", limit=3)
    assert fault is not None and not fault.context_lost
    assert "3 calls in a row" in fault.reason and "ValueError: third" in fault.reason


def test_bad_input_is_not_an_engine_failure():
    from flashrt_core.errors import ImageError

    failures = EngineFailures()
    for _ in range(5):
        assert failures.failed(ImageError("wrong channels"), "cpu", limit=1) is None
    assert failures.consecutive == 0


def test_cuda_errors_are_recognised_by_type_or_message():
    import torch

    assert looks_like_cuda_error(torch.AcceleratorError("anything"))
    assert looks_like_cuda_error(RuntimeError(ILLEGAL_ACCESS))
    assert looks_like_cuda_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert not looks_like_cuda_error(torch.OutOfMemoryError("CUDA out of memory. Tried to "
                                                            "allocate 2.00 GiB"))
    assert not looks_like_cuda_error(ValueError("shapes do not match"))


def test_a_cuda_error_is_fatal_only_when_the_probe_fails(monkeypatch):
    # On the CPU nothing is probed: a CUDA-looking message alone stops nothing.
    assert engine_faults.cuda_context_alive("cpu")
    assert EngineFailures().failed(RuntimeError(ILLEGAL_ACCESS), "cpu", limit=3) is None
    monkeypatch.setattr(engine_faults, "cuda_context_alive", lambda device: False)
    assert EngineFailures().failed(ValueError("odd"), "cuda:0", limit=3) is None
    fault = EngineFailures().failed(RuntimeError(ILLEGAL_ACCESS), "cuda:0", limit=3)
    assert fault.context_lost and "restart the process" in fault.advice
    assert "illegal memory access" in fault.reason


def test_health_reports_error_with_reason_and_advice_until_cleared():
    health = PolicyHealth()
    health.record_published(0.01, 0.02)
    health.record_fault("CUDA context lost", "restart the process")
    for _ in range(2):  # every report, not only the first after the fault
        report = health.report(active=False, engine={})
        assert report.level == ERROR
        assert "CUDA context lost" in report.message and "restart the process" in report.message
        assert report.values["engine fault"] == "CUDA context lost"
    health.clear_fault()
    assert health.report(active=False, engine={}).level != ERROR


# ---------------------------------------------------------------- through ROS

class FaultInjectingPolicy:
    """The real policy, whose predict raises the queued errors first (one per call),
    then `always` if set."""

    def __init__(self, policy):
        self._policy = policy
        self.spec = policy.spec
        self._lock = threading.Lock()
        self._queued = collections.deque()
        self.always: BaseException | None = None

    def fail_next(self, *errors: BaseException) -> None:
        with self._lock:
            self._queued.extend(errors)

    def pending(self) -> int:
        with self._lock:
            return len(self._queued)

    def predict(self, **kwargs):
        with self._lock:
            error = self._queued.popleft() if self._queued else self.always
        if error is not None:
            raise error
        return self._policy.predict(**kwargs)

    def close(self) -> None:
        self._policy.close()


@pytest.fixture
def faulty(monkeypatch):
    """Every policy the node loads is wrapped; yields a list that receives the wrapper."""
    import flashrt_core

    real_load = flashrt_core.load_policy
    loaded = []

    def load(*args, **kwargs):
        loaded.append(FaultInjectingPolicy(real_load(*args, **kwargs)))
        return loaded[-1]

    monkeypatch.setattr(flashrt_core, "load_policy", load)
    return loaded


def state(graph) -> str:
    from flashrt_ros.launcher import lifecycle_state

    return lifecycle_state(graph.policy)


def activate(graph):
    from rclpy.lifecycle import TransitionCallbackReturn

    assert graph.policy.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert graph.policy.trigger_activate() == TransitionCallbackReturn.SUCCESS


def chunk_count(graph) -> int:
    return len(graph.recorder.snapshot().chunks)


def flowing(graph, more=3) -> bool:
    start = chunk_count(graph)
    return wait_until(lambda: chunk_count(graph) >= start + more, timeout=20)


def inference_errors(graph) -> int:
    return graph.policy.health.skipped["inference error"]


def newest_diagnostic(graph):
    diagnostics = graph.recorder.snapshot().diagnostics
    return diagnostics[-1].status[0] if diagnostics else None


def predict(graph):
    from flashrt_ros.srv import Predict

    client = graph.recorder.create_client(Predict, "/flashrt_policy/predict")
    try:
        assert client.wait_for_service(timeout_sec=10.0)
        future = client.call_async(Predict.Request())  # the node's newest inputs
        assert wait_until(future.done, timeout=20)
        return future.result()
    finally:
        graph.recorder.destroy_client(client)


def assert_stopped_with_a_hold(graph, *, failures, reason_part, advice_part, robot_positions):
    """The node went inactive after exactly `failures` failed ticks, its last command is
    the hold, nothing after it, nothing non-finite, and /diagnostics says why."""
    assert wait_until(lambda: state(graph) == "inactive", timeout=10)
    assert inference_errors(graph) == failures
    assert wait_until(lambda: len(graph.recorder.snapshot().trajectories[-1].points) == 1,
                      timeout=5)
    got = graph.recorder.snapshot()
    hold = got.trajectories[-1]
    assert hold.header.stamp.sec == 0 and hold.header.stamp.nanosec == 0
    np.testing.assert_allclose(hold.points[0].positions, robot_positions, atol=1e-6)
    assert not any(hold.points[0].velocities)
    assert all(np.isfinite(c.data).all() for c in got.chunks)
    assert all(np.isfinite(p.positions).all() for t in got.trajectories for p in t.points)
    assert not wait_until(lambda: chunk_count(graph) > len(got.chunks), timeout=0.5)
    assert wait_until(lambda: (status := newest_diagnostic(graph)) is not None
                      and status.level == bytes([ERROR]) and reason_part in status.message
                      and advice_part in status.message, timeout=5)
    values = {kv.key: kv.value for kv in newest_diagnostic(graph).values}
    assert values["state"] == "inactive" and reason_part in values["engine fault"]
    response = predict(graph)
    assert not response.success
    assert "engine stopped" in response.message and advice_part in response.message


@pytest.mark.ros
def test_transient_engine_errors_skip_their_ticks_only(make_graph, faulty):
    import torch

    graph = make_graph()
    activate(graph)
    assert flowing(graph)
    policy = faulty[-1]
    # Two failures in a row (below the default limit of 3), then a CUDA-looking one on
    # a device whose context is fine (CPU: nothing to probe): each skips one tick.
    policy.fail_next(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                     RuntimeError("odd failure"))
    assert wait_until(lambda: policy.pending() == 0, timeout=5)
    assert flowing(graph)
    policy.fail_next(RuntimeError("CUDA error: invalid argument"))
    assert flowing(graph)
    assert inference_errors(graph) == 3 and state(graph) == "active"
    assert predict(graph).success


@pytest.mark.ros
@pytest.mark.parametrize("executor", ["single-threaded", "events"])
def test_failures_in_a_row_deactivate_with_a_hold_then_activate_again(
        make_graph, faulty, trajectory_joints, monkeypatch, executor):
    """Also under rclpy's EventsExecutor (which takes no guard conditions): the fault's
    deactivation, the hold, /diagnostics, ~/predict and the re-activation."""
    monkeypatch.setenv("FLASHRT_EXECUTOR", executor)
    graph = make_graph(parameters={"max_consecutive_engine_failures": 4})
    assert type(graph.spinner._spinning[0][0]).__name__ == (
        "EventsExecutor" if executor == "events" else "SingleThreadedExecutor")
    activate(graph)
    assert flowing(graph)
    policy = faulty[-1]
    policy.always = RuntimeError("kernel launch failed")
    assert_stopped_with_a_hold(
        graph, failures=4, reason_part="4 calls in a row", advice_part="activate to retry",
        robot_positions=graph.robot.positions[:len(trajectory_joints)])
    # The engine works again: activating clears the fault and ticks publish.
    policy.always = None
    graph.policy.trigger_activate()
    assert state(graph) == "active" and flowing(graph)
    assert wait_until(lambda: newest_diagnostic(graph).level != bytes([ERROR]), timeout=5)
    assert predict(graph).success


@pytest.mark.ros
def test_a_dead_cuda_context_deactivates_at_once_and_refuses_activation(
        make_graph, faulty, trajectory_joints, monkeypatch):
    import torch
    from rclpy.lifecycle import TransitionCallbackReturn

    graph = make_graph()
    activate(graph)
    assert flowing(graph)
    # What a GPU reports after an illegal address: the error, then a failing probe.
    monkeypatch.setattr(engine_faults, "cuda_context_alive", lambda device: False)
    faulty[-1].always = torch.AcceleratorError(ILLEGAL_ACCESS)
    assert_stopped_with_a_hold(
        graph, failures=1, reason_part="CUDA context lost", advice_part="restart the process",
        robot_positions=graph.robot.positions[:len(trajectory_joints)])
    assert graph.policy.trigger_activate() == TransitionCallbackReturn.FAILURE
    assert state(graph) == "inactive"
    assert graph.policy.trigger_cleanup() == TransitionCallbackReturn.SUCCESS


# ---------------------------------------------------------------- the real probe

@pytest.mark.gpu
def test_probe_on_a_gpu_tells_out_of_memory_from_a_dead_context():
    """In a subprocess (its CUDA context is destroyed): an out-of-memory error leaves
    the context alive, a device-side assert kills it and the probe says so."""
    code = textwrap.dedent("""
        import torch
        from flashrt_ros.engine_faults import EngineFailures, cuda_context_alive
        failures = EngineFailures()
        try:
            torch.empty(1 << 50, dtype=torch.uint8, device="cuda")
        except Exception as error:
            assert failures.failed(error, "cuda:0", limit=3) is None, error
        assert cuda_context_alive("cuda:0")
        x = torch.zeros(4, device="cuda")
        fault = None
        try:
            x[torch.tensor([1000], device="cuda")] = 1.0
            torch.cuda.synchronize()
        except Exception as error:
            fault = failures.failed(error, "cuda:0", limit=3)
        assert fault is not None and fault.context_lost, fault
        print("context lost:", fault.reason)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=tempfile.gettempdir(), env=dict(os.environ))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "context lost: CUDA context lost on cuda:0" in result.stdout
