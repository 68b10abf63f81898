"""Policy node over real rclpy + DDS with the real engine on a tiny checkpoint:
data flow, message content, joint-limit clamp, diagnostics, every lifecycle transition."""

import gc
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
from policy_harness import (  # noqa: F401 - fixtures
    CAMERAS, action_names, joint_names, make_graph, tiny_checkpoint, tiny_spec,
    trajectory_joints, wait_until)
from rclpy.lifecycle import TransitionCallbackReturn

from flashrt_ros.launcher import lifecycle_state

pytestmark = pytest.mark.ros

SUCCESS, FAILURE = TransitionCallbackReturn.SUCCESS, TransitionCallbackReturn.FAILURE


def stamp_ns(stamp) -> int:
    return stamp.sec * 1_000_000_000 + stamp.nanosec


def seconds(duration) -> float:
    return duration.sec + duration.nanosec * 1e-9


def activate(graph):
    assert graph.policy.trigger_configure() == SUCCESS
    assert graph.policy.trigger_activate() == SUCCESS


def test_cameras_and_joints_in_chunks_and_trajectories_out(make_graph, tiny_spec, action_names,
                                                           trajectory_joints):
    graph = make_graph(parameters={"action_dt": 0.04, "trajectory_velocities": True})
    activate(graph)
    assert wait_until(lambda: len(graph.recorder.snapshot().trajectories) >= 6, timeout=20)
    got = graph.recorder.snapshot()
    horizon, action_dim = tiny_spec.action_horizon, tiny_spec.action_dim
    expected_names = action_names
    sequences = [c.sequence for c in got.chunks]
    assert sequences == list(range(sequences[0], sequences[0] + len(sequences)))
    by_stamp = {stamp_ns(c.header.stamp): c for c in got.chunks}
    for chunk in got.chunks:
        assert (chunk.model, chunk.horizon, chunk.action_dim) == ("pi05", horizon, action_dim)
        assert list(chunk.names) == expected_names
        assert len(chunk.data) == horizon * action_dim and np.isfinite(chunk.data).all()
        assert chunk.step_dt == pytest.approx(0.04)
        assert chunk.inference_time > 0 and chunk.observation_age >= 0
        # The observation time is the stamp of an input the robot really sent.
        assert stamp_ns(chunk.header.stamp) in graph.robot.published_stamps
    for trajectory in got.trajectories:
        assert list(trajectory.joint_names) == trajectory_joints
        times = [seconds(p.time_from_start) for p in trajectory.points]
        np.testing.assert_allclose(times, 0.04 * np.arange(1, horizon + 1), atol=1e-9)
        assert all(b > a for a, b in zip(times, times[1:]))
        chunk = by_stamp.get(stamp_ns(trajectory.header.stamp))
        if chunk is None:  # its chunk was sent before the recorder matched
            continue
        actions = np.asarray(chunk.data).reshape(horizon, action_dim)
        columns = [expected_names.index(name) for name in trajectory_joints]
        positions = np.array([p.positions for p in trajectory.points])
        np.testing.assert_allclose(positions, actions[:, columns], rtol=1e-6)
        velocities = np.array([p.velocities for p in trajectory.points])
        np.testing.assert_allclose(velocities[:-1], np.gradient(positions, 0.04, axis=0)[:-1],
                                   rtol=1e-5, atol=1e-6)
        assert not velocities[-1].any()


def test_joint_limits_clamp_every_published_value(make_graph, joint_names, trajectory_joints):
    n = len(joint_names)
    graph = make_graph(parameters={"joint_limits_lower": [-0.01] * n,
                                   "joint_limits_upper": [0.02] * n})
    activate(graph)
    assert wait_until(lambda: len(graph.recorder.snapshot().trajectories) >= 3, timeout=20)
    got = graph.recorder.snapshot()
    positions = np.array([p.positions for t in got.trajectories for p in t.points])
    assert positions.min() >= -0.01 - 1e-9 and positions.max() <= 0.02 + 1e-9
    # Random weights give actions well outside +-0.02: the clamp is what holds them.
    assert np.isclose(positions, -0.01).any() or np.isclose(positions, 0.02).any()
    for chunk in got.chunks:  # every action named after a joint is clamped
        actions = np.asarray(chunk.data).reshape(chunk.horizon, chunk.action_dim)
        clamped = actions[:, [list(chunk.names).index(n) for n in trajectory_joints]]
        assert clamped.min() >= -0.01 - 1e-6 and clamped.max() <= 0.02 + 1e-6


def test_lifecycle_failing_configure_then_every_transition(make_graph, tmp_path, tiny_checkpoint,
                                                          trajectory_joints):
    checkpoint = tmp_path / "arrives_later"
    graph = make_graph(checkpoint=checkpoint)
    node, recorder = graph.policy, graph.recorder
    # Missing checkpoint: configure fails, the node stays unconfigured and alive.
    assert node.trigger_configure() == FAILURE
    assert lifecycle_state(node) == "unconfigured"
    # Malformed checkpoint (every file truncated): fails the same way.
    shutil.copytree(tiny_checkpoint, checkpoint)
    for path in checkpoint.rglob("*.safetensors"):
        path.write_bytes(path.read_bytes()[:100])
    assert node.trigger_configure() == FAILURE
    assert lifecycle_state(node) == "unconfigured"
    assert all("predict" not in name for name, _ in node.get_service_names_and_types_by_node(
        node.get_name(), node.get_namespace()))
    # A good checkpoint at the same path: configure succeeds.
    shutil.rmtree(checkpoint)
    shutil.copytree(tiny_checkpoint, checkpoint)
    assert node.trigger_configure() == SUCCESS
    assert lifecycle_state(node) == "inactive"
    assert not recorder.snapshot().chunks            # publishers stay off until activate
    assert node.trigger_activate() == SUCCESS
    assert wait_until(lambda: len(recorder.snapshot().chunks) >= 3, timeout=20)

    # Deactivate: inference stops and the last trajectory is a hold at the measured joints.
    assert node.trigger_deactivate() == SUCCESS
    assert wait_until(lambda: len(recorder.snapshot().trajectories[-1].points) == 1, timeout=5)
    hold = recorder.snapshot().trajectories[-1]
    assert stamp_ns(hold.header.stamp) == 0  # "start now"
    assert list(hold.joint_names) == trajectory_joints
    np.testing.assert_allclose(hold.points[0].positions,
                               graph.robot.positions[:len(trajectory_joints)], atol=1e-6)
    assert not any(hold.points[0].velocities)
    count = len(recorder.snapshot().chunks)
    assert not wait_until(lambda: len(recorder.snapshot().chunks) > count, timeout=0.6)

    # Activate again, then shut down from active: hold, then finalized.
    assert node.trigger_activate() == SUCCESS
    assert wait_until(lambda: len(recorder.snapshot().chunks) > count, timeout=20)
    assert node.trigger_deactivate() == SUCCESS
    policy = weakref.ref(node._engine.policy)
    assert node.trigger_cleanup() == SUCCESS
    assert lifecycle_state(node) == "unconfigured" and node._engine is None
    gc.collect()
    assert policy() is None  # nothing keeps the engine (and its memory) alive
    assert node.trigger_configure() == SUCCESS
    recorder.clear()
    assert node.trigger_activate() == SUCCESS
    # New publishers after cleanup: let the recorder match them before the hold.
    assert wait_until(lambda: len(recorder.snapshot().trajectories) > 0, timeout=20)
    recorder.clear()
    assert node.trigger_shutdown() == SUCCESS
    assert lifecycle_state(node) == "finalized"
    assert wait_until(lambda: any(len(t.points) == 1 for t in recorder.snapshot().trajectories),
                      timeout=5)
    assert node._engine is None


def test_configure_fails_without_opencv_for_a_compressed_camera(make_graph, monkeypatch):
    """The camera conversion is tried at configure (so OpenCV's load never stalls the
    running node): a compressed camera topic without OpenCV fails configure, the node
    stays alive, and configures once OpenCV can be imported."""
    graph = make_graph()  # one raw and one compressed camera
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` raises ImportError
    assert graph.policy.trigger_configure() == FAILURE
    assert lifecycle_state(graph.policy) == "unconfigured"
    monkeypatch.undo()
    assert graph.policy.trigger_configure() == SUCCESS


@pytest.mark.parametrize("state", ["unconfigured", "inactive"])
def test_shutdown_from_unconfigured_and_inactive(make_graph, state):
    graph = make_graph()
    if state == "inactive":
        assert graph.policy.trigger_configure() == SUCCESS
    assert graph.policy.trigger_shutdown() == SUCCESS
    assert lifecycle_state(graph.policy) == "finalized" and graph.policy._engine is None


def stall_publisher(graph, queued: int):
    """Activate, then block the node's publisher thread until `queued` ticks' chunks wait
    behind it; returns (the event that releases it, chunks published before)."""
    node = graph.policy
    activate(graph)
    assert wait_until(lambda: len(graph.recorder.snapshot().chunks) >= 2, timeout=20)
    stuck, holding = threading.Event(), threading.Event()

    def hold():
        holding.set()
        stuck.wait(20)

    node._publisher_thread.submit(hold)
    # Count once the publisher is held: a chunk queued before hold() still goes out.
    assert holding.wait(timeout=10)
    published = node.health.published
    assert wait_until(lambda: node._publisher_thread._work_queue.qsize() >= queued, timeout=20)  # ticks ran
    return stuck, published


def test_chunks_queued_for_publishing_at_deactivation_are_dropped_and_the_hold_comes_last(make_graph):
    """Publishing runs on its own thread: ticks that finished inference while it was
    stuck are queued there; deactivating then must drop them and send the hold after."""
    graph = make_graph()
    node, recorder = graph.policy, graph.recorder
    stuck, published = stall_publisher(graph, queued=2)

    deactivating = threading.Thread(target=lambda: node.trigger_deactivate())
    deactivating.start()
    time.sleep(0.3)  # deactivate now waits behind the queued chunks
    stuck.set()
    deactivating.join(timeout=30)
    assert not deactivating.is_alive() and lifecycle_state(node) == "inactive"
    assert node.health.published == published  # the queued chunks were not published
    assert wait_until(lambda: len(recorder.snapshot().trajectories[-1].points) == 1, timeout=5)
    count = len(recorder.snapshot().trajectories)
    assert not wait_until(lambda: len(recorder.snapshot().trajectories) > count, timeout=0.5)


def test_a_publisher_that_fell_behind_sends_the_newest_chunk_not_the_backlog(make_graph):
    graph = make_graph()
    node, recorder = graph.policy, graph.recorder
    stuck, published = stall_publisher(graph, queued=3)
    stuck.set()
    assert wait_until(lambda: node.health.published > published, timeout=10)
    newest = node._chunks_handed
    assert wait_until(lambda: node._publisher_thread._work_queue.qsize() == 0, timeout=10)
    assert node.health.skipped["publish lag"] >= 2  # the backlog was dropped...
    # ...and what went out right after the stall was at most one chunk per tick since.
    assert node.health.published - published <= node._chunks_handed - newest + 1
    sequences = [chunk.sequence for chunk in recorder.snapshot().chunks]
    assert sequences == sorted(sequences)
    assert graph.policy.trigger_deactivate() == SUCCESS


def test_activation_shortens_the_gil_switch_interval_and_deactivation_restores_it(make_graph):
    before = sys.getswitchinterval()
    graph = make_graph(parameters={"gil_switch_interval_ms": 0.25})
    assert graph.policy.trigger_configure() == SUCCESS
    assert sys.getswitchinterval() == before  # process-wide: only while the node runs
    assert graph.policy.trigger_activate() == SUCCESS
    assert sys.getswitchinterval() == pytest.approx(0.25e-3)
    assert graph.policy.trigger_deactivate() == SUCCESS
    assert sys.getswitchinterval() == before
    assert graph.policy.trigger_activate() == SUCCESS
    assert graph.policy.trigger_shutdown() == SUCCESS  # leaving active by shutdown restores it too
    assert sys.getswitchinterval() == before


def test_diagnostics_report_rate_latency_and_skips(make_graph):
    graph = make_graph()
    activate(graph)

    def newest_status():
        diagnostics = graph.recorder.snapshot().diagnostics
        return diagnostics[-1].status[0] if diagnostics else None

    def status_where(predicate):
        status = newest_status()
        return status is not None and predicate(status)

    assert wait_until(lambda: status_where(lambda s: s.level == b"\x00"
                                           and float(dict(kv(s))["rate [Hz]"]) > 0), timeout=20)
    values = dict(kv(newest_status()))
    assert newest_status().name == "/flashrt_policy: policy"
    for key in ("inference latency p50 [ms]", "inference latency p99 [ms]",
                "observation to publish p50 [ms]", "observation to publish p99 [ms]"):
        assert float(values[key]) > 0
    assert values["device"] == "cpu" and values["model"] == "pi05"
    assert int(values["ticks started late"]) >= 0
    # Starve one camera: the report turns to ERROR (nothing published) and names it.
    graph.robot.paused.add(CAMERAS[0])
    assert wait_until(lambda: status_where(
        lambda s: s.level == b"\x02" and f"stale {CAMERAS[0]}" in s.message), timeout=10)
    assert int(dict(kv(newest_status()))[f"skipped: stale {CAMERAS[0]}"]) > 0


def kv(status):
    return [(v.key, v.value) for v in status.values]


def test_parameters_are_declared_with_descriptors_and_checked_at_runtime(make_graph):
    from rcl_interfaces.msg import ParameterType
    from rclpy.parameter import Parameter

    from flashrt_ros.params import POLICY_PARAMETERS

    graph = make_graph()
    node = graph.policy
    descriptors = node.describe_parameters([p.name for p in POLICY_PARAMETERS])
    for param, descriptor in zip(POLICY_PARAMETERS, descriptors):
        assert descriptor.description.startswith(param.description)
        assert descriptor.read_only == param.read_only
        if param.type == "float" and param.min is not None:
            assert descriptor.floating_point_range[0].from_value == param.min
    assert descriptors[[p.name for p in POLICY_PARAMETERS].index("joint_names")].type == \
        ParameterType.PARAMETER_STRING_ARRAY
    assert node.has_parameter("use_sim_time")

    def rejected(name, value):
        return not node.set_parameters([Parameter(name, value=value)])[0].successful

    assert rejected("checkpoint", "/elsewhere")          # read-only: set at configure
    assert rejected("max_observation_age", -1.0)          # out of range
    assert rejected("rate_hz", "fast")                    # wrong type
    activate(graph)
    assert not rejected("rate_hz", 5.0)
    assert node._timer.timer_period_ns == 200_000_000     # takes effect while active


def test_configure_via_the_service_keeps_other_nodes_running(make_graph, monkeypatch):
    """Loading is long on a GPU; other nodes in the process must keep being served
    while it runs (configure occupies one executor thread, not the executor)."""
    import time

    import flashrt_core
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    real_load = flashrt_core.load_policy

    def slow_load(*args, **kwargs):
        time.sleep(1.5)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(flashrt_core, "load_policy", slow_load)
    graph = make_graph()
    client = graph.recorder.create_client(ChangeState, "/flashrt_policy/change_state")
    assert client.wait_for_service(timeout_sec=10)
    frames = graph.robot._frames
    future = client.call_async(ChangeState.Request(
        transition=Transition(id=Transition.TRANSITION_CONFIGURE)))
    assert wait_until(future.done, timeout=30) and future.result().success
    assert graph.robot._frames - frames >= 20  # the 30 Hz robot timer kept firing
    assert lifecycle_state(graph.policy) == "inactive"


ACTIVE_NODE_IMPORTS = textwrap.dedent("""
    import pathlib, sys, tempfile, time
    sys.path.insert(0, sys.argv[1])  # the test directory (policy_harness)
    import flashrt_core
    from flashrt_core.synthetic import write_checkpoint
    from policy_harness import CAMERAS, PolicyGraph
    from rclpy.lifecycle import TransitionCallbackReturn

    checkpoint = pathlib.Path(tempfile.mkdtemp()) / "pi05_tiny"
    write_checkpoint("pi05", checkpoint, size="tiny")
    spec = flashrt_core.load_policy(str(checkpoint), model="pi05", device="cpu", num_views=len(CAMERAS)).spec
    joints = [f"joint_{i}" for i in range(spec.state_dim)]
    actions = (joints + [f"extra_{i}" for i in range(spec.action_dim)])[:spec.action_dim]
    device, precision = sys.argv[2], sys.argv[3]
    graph = PolicyGraph(checkpoint, joints, parameters={"action_names": actions, "device": device,
                                                        "precision": precision})
    try:
        assert graph.policy.trigger_configure() == TransitionCallbackReturn.SUCCESS
        before = set(sys.modules)
        assert graph.policy.trigger_activate() == TransitionCallbackReturn.SUCCESS
        time.sleep(1.5)  # ticks, chunks, trajectories, /diagnostics reports with samples
        graph.robot.paused.update(CAMERAS)  # then skipped ticks (stale frames) and their logs
        time.sleep(1.0)
        graph.robot.paused.clear()
        time.sleep(1.0)
        published, skipped = graph.policy.health.published, sum(graph.policy.health.skipped.values())
        print(published, skipped, sorted(set(sys.modules) - before))
    finally:
        graph.close()
""")


@pytest.mark.parametrize("device, precision", [("cpu", "auto"), pytest.param("cuda", "bf16", marks=pytest.mark.gpu),
                                               pytest.param("cuda", "fp8", marks=pytest.mark.gpu)])
def test_an_active_node_imports_nothing(tmp_path, device, precision):
    """A module's first import holds the GIL (on the H100 box, numpy.ma's at the first
    /diagnostics report after activation: 59 ms, three 50 Hz ticks lost). Configure
    warms every path the active node runs, so from activation on nothing is imported:
    checked in a fresh interpreter over ticks, chunks, reports and skipped ticks, on the
    CPU and on CUDA (captured graphs; FP8 calibrates on the first live observation)."""
    # cwd: not the repository root, whose flashrt_ros lacks the generated messages
    result = subprocess.run([sys.executable, "-c", ACTIVE_NODE_IMPORTS, str(Path(__file__).resolve().parent),
                             device, precision], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    published, skipped, imported = result.stdout.strip().splitlines()[-1].split(" ", 2)
    assert int(published) > 10 and int(skipped) > 0, result.stdout
    assert imported == "[]", imported
