"""FP8 calibration at activation (fp8_calibrate_on_activation), over a real rclpy graph:
configure's warm-up on a blank frame leaves provisional scales; activation measures them
on the live observation and caches them, or, without a usable observation or when
calibrating fails, activates anyway with the provisional ones. On the CPU through the
graph runtime's CPU FP8 path (engine_checkpoints cpu_fp8); the main case also on a GPU."""

import threading

import pytest
from engine_checkpoints import cpu_fp8  # noqa: F401 - fixture
from policy_harness import (  # noqa: F401 - fixtures
    CAMERAS, action_names, joint_names, make_graph, tiny_checkpoint, tiny_spec, wait_until)
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter

from flashrt_core.runtime.precision import Linear, load_calibration
from flashrt_ros.launcher import lifecycle_state
from flashrt_ros.policy_node import CALIBRATION_INPUT_WAIT_S

pytestmark = pytest.mark.ros

SUCCESS = TransitionCallbackReturn.SUCCESS


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def fp8_device(request, monkeypatch, tmp_path) -> str:
    """The device of the fp8 node; FP8 calibration caches go to tmp_path."""
    if request.param == "cpu":
        request.getfixturevalue("cpu_fp8")
    else:
        monkeypatch.setenv("FLASHRT_CACHE_DIR", str(tmp_path))
    return request.param


@pytest.fixture
def fp8_graph(make_graph, cpu_fp8):  # noqa: F811
    """fp8_graph(parameters=..., **PolicyGraph kwargs): a policy graph in fp8 on the CPU."""
    def make(parameters=None, **kwargs):
        return make_graph(parameters={"precision": "fp8", **(parameters or {})}, **kwargs)
    return make


def engine_policy(graph):
    return graph.policy._engine.policy


def scales(policy) -> dict[str, float]:
    return policy._backend.calibration()


def every_stream_received(graph) -> bool:
    buffer = graph.policy._engine.buffer
    return wait_until(lambda: all(buffer.latest(stream) for stream in buffer.streams), timeout=10)


def configure_provisional(graph):
    """Configure; the warm-up left provisional scales, nothing cached."""
    assert graph.policy.trigger_configure() == SUCCESS
    policy = engine_policy(graph)
    assert policy.calibration_source == "provisional"
    assert not policy.calibration_file.exists()
    return policy


def assert_active_and_still_provisional(graph, policy, blank):
    assert graph.policy.trigger_activate() == SUCCESS
    assert lifecycle_state(graph.policy) == "active"
    assert policy.calibration_source == "provisional"
    assert scales(policy) == blank
    assert not policy.calibration_file.exists()


def test_activation_calibrates_on_the_live_observation_and_caches_it(make_graph, fp8_device):
    graph = make_graph(parameters={"precision": "fp8", "device": fp8_device})
    policy = configure_provisional(graph)
    blank = scales(policy)
    assert every_stream_received(graph)

    assert graph.policy.trigger_activate() == SUCCESS
    assert policy.calibration_source == "observations"
    measured = scales(policy)
    # Not every range moves: one can peak on a prompt token, the same in the warm-up.
    assert measured != blank
    assert load_calibration(policy.calibration_file) == measured
    # The ticks run on the measured scales.
    assert wait_until(lambda: len(graph.recorder.snapshot().chunks) >= 3, timeout=20)
    assert policy.calibration_source == "observations" and scales(policy) == measured


def test_without_camera_frames_the_first_complete_tick_calibrates(make_graph, fp8_device):
    """No camera frame through activation (as under launch's autostart, whose lifecycle
    service call holds the node's executor): activation keeps the provisional scales,
    ticks skip for the missing cameras, and the first tick that has every input measures
    the scales instead of inferring (counted as an 'fp8 calibration' skip); then chunks."""
    graph = make_graph(parameters={"precision": "fp8", "device": fp8_device}, robot_rate_hz=0)
    robot = graph.robot
    robot.paused.update(CAMERAS)  # joint states arrive, camera frames do not
    robot.timer = robot.create_timer(1 / 30, robot.publish_all)
    policy = configure_provisional(graph)
    blank = scales(policy)
    buffer = graph.policy._engine.buffer
    assert wait_until(lambda: buffer.latest(robot.joint_topic) is not None, timeout=10)

    assert_active_and_still_provisional(graph, policy, blank)
    assert not graph.recorder.snapshot().chunks  # ticks skip: cameras missing

    robot.paused.clear()
    assert wait_until(lambda: policy.calibration_source == "observations", timeout=20)
    assert scales(policy) != blank and load_calibration(policy.calibration_file) == scales(policy)
    assert wait_until(lambda: len(graph.recorder.snapshot().chunks) >= 3, timeout=20)
    assert graph.policy.health.skipped["fp8 calibration"] == 1


def test_activation_waits_for_a_camera_that_starts_during_it(fp8_graph):
    """Cameras silent at activation (as right after configure): activation waits up to
    CALIBRATION_INPUT_WAIT_S for their first frames and calibrates on them."""
    graph = fp8_graph(robot_rate_hz=0)
    robot = graph.robot
    robot.paused.update(CAMERAS)
    robot.timer = robot.create_timer(1 / 30, robot.publish_all)
    policy = configure_provisional(graph)
    buffer = graph.policy._engine.buffer
    assert wait_until(lambda: buffer.latest(robot.joint_topic) is not None, timeout=10)
    assert CALIBRATION_INPUT_WAIT_S >= 0.6
    cameras_start = threading.Timer(0.2, robot.paused.clear)
    cameras_start.start()
    try:
        assert graph.policy.trigger_activate() == SUCCESS
    finally:
        cameras_start.join()
    assert policy.calibration_source == "observations" and policy.calibration_file.exists()


def test_with_an_empty_prompt_the_first_tick_with_a_prompt_calibrates(fp8_graph):
    graph = fp8_graph(parameters={"prompt": ""})
    policy = configure_provisional(graph)
    blank = scales(policy)
    assert every_stream_received(graph)
    assert_active_and_still_provisional(graph, policy, blank)
    assert wait_until(lambda: graph.policy.health.skipped["empty prompt"] >= 2, timeout=10)
    assert policy.calibration_source == "provisional"

    graph.policy.set_parameters([Parameter("prompt", value="pick up the cube")])
    assert wait_until(lambda: policy.calibration_source == "observations", timeout=20)
    assert wait_until(lambda: len(graph.recorder.snapshot().chunks) >= 3, timeout=20)


def test_when_calibrating_fails_activation_goes_on_with_the_provisional_scales(fp8_graph):
    graph = fp8_graph()
    policy = configure_provisional(graph)
    blank = scales(policy)
    assert every_stream_received(graph)
    backend = policy._backend
    forward = backend._forward

    def forward_failing_while_calibrating(*args):
        if Linear.recording:
            raise RuntimeError("injected forward failure")
        return forward(*args)

    backend._forward = forward_failing_while_calibrating
    try:
        assert_active_and_still_provisional(graph, policy, blank)
        assert wait_until(lambda: len(graph.recorder.snapshot().chunks) >= 3, timeout=20)
    finally:
        del backend._forward


def test_activation_does_not_calibrate_when_the_parameter_is_off(fp8_graph):
    graph = fp8_graph(parameters={"fp8_calibrate_on_activation": False})
    policy = configure_provisional(graph)
    blank = scales(policy)
    assert every_stream_received(graph)
    assert_active_and_still_provisional(graph, policy, blank)
