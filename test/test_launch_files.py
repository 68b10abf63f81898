"""Packaged configs and launch files.

The configs are checked everywhere (every parameter present and valid, parsed by rcl's
own YAML parser into the node). The launch files need `launch` + `launch_ros`, which a
ROS install has and the PyPI wheels do not: those tests run where they are importable
(skipped otherwise) and start pi05.launch.py for real, autostart on and off."""

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import rclpy
import yaml
from policy_harness import (  # noqa: F401 - fixtures
    CAMERAS, JOINT_TOPIC, Recorder, RobotSim, action_names, domain_id, joint_names,
    tiny_checkpoint, tiny_spec, wait_until)

from flashrt_ros.cli import load_params_file
from flashrt_ros.launcher import Spinner, packaged_parameters
from flashrt_ros.params import POLICY_NODE_NAME, POLICY_PARAMETERS, validate_overrides
from flashrt_ros.policy_node import PolicyNode, parameter_value

REPO = Path(__file__).resolve().parent.parent
MODELS = ["pi0", "pi05"]
HAVE_LAUNCH_ROS = all(importlib.util.find_spec(m) for m in ("launch", "launch_ros"))


@pytest.mark.parametrize("model", MODELS)
def test_config_sets_every_parameter_validly(model):
    values = load_params_file(REPO / "config" / f"{model}.yaml")
    assert set(values) == {p.name for p in POLICY_PARAMETERS}
    validate_overrides(values)
    assert values["model"] == model
    assert len(values["joint_limits_lower"]) == len(values["joint_names"])
    assert len(values["joint_limits_upper"]) == len(values["joint_names"])


@pytest.mark.ros
@pytest.mark.parametrize("model", MODELS)
def test_config_reaches_the_node_through_rcl(model, ros_domain_id):
    path = REPO / "config" / f"{model}.yaml"
    expected = load_params_file(path)
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=ros_domain_id,
               args=["test", "--ros-args", "--params-file", str(path)])
    try:
        node = PolicyNode(context=context)
        assert {p.name: parameter_value(node, p.name) for p in POLICY_PARAMETERS} == expected
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)


@pytest.mark.ros
@pytest.mark.parametrize("model", MODELS)
def test_run_uses_the_packaged_config_like_the_launch_file(model):
    assert packaged_parameters(model) == load_params_file(REPO / "config" / f"{model}.yaml")


# ------------------------------------------------------------------ launch files

needs_launch_ros = pytest.mark.skipif(not HAVE_LAUNCH_ROS,
                                      reason="launch / launch_ros not importable")


# What `ros2 launch` does, without ros2cli: a LaunchService in its own process (it
# must own the main thread), stopped with SIGINT like Ctrl-C.
LAUNCH_PROCESS = """
import sys
from launch import LaunchDescription, LaunchService
from launch.actions import IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
service = LaunchService()
service.include_launch_description(LaunchDescription([IncludeLaunchDescription(
    PythonLaunchDescriptionSource(sys.argv[1]),
    launch_arguments=[argument.split(":=", 1) for argument in sys.argv[2:]])]))
sys.exit(service.run())
"""


def start_launch(arguments: dict[str, str]) -> subprocess.Popen:
    command = [sys.executable, "-c", LAUNCH_PROCESS, str(REPO / "launch" / "pi05.launch.py")]
    command += [f"{name}:={value}" for name, value in arguments.items()]
    # Own process group: a test that fails can kill launch and the node it started.
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, cwd=tempfile.gettempdir())


class StateQuery:
    """get_state of a lifecycle node, through one client kept for the whole test."""

    def __init__(self, client_node, name):
        from lifecycle_msgs.srv import GetState

        self._request = GetState.Request()
        self._client = client_node.create_client(GetState, f"{name}/get_state")

    def __call__(self) -> str | None:
        if not self._client.service_is_ready():
            return None
        future = self._client.call_async(self._request)
        return future.result().current_state.label if wait_until(future.done, 5) else None


@pytest.fixture
def launch_params_file(tmp_path, joint_names, action_names):
    # Absolute names: the node runs in a namespace, the test's robot does not.
    values = {"camera_topics": [f"/{t}" for t in CAMERAS],
              "joint_state_topic": f"/{JOINT_TOPIC}", "device": "cpu",
              "joint_names": joint_names, "action_names": action_names}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({POLICY_NODE_NAME: {"ros__parameters": values}}))
    return path


@needs_launch_ros
@pytest.mark.ros
@pytest.mark.parametrize("autostart", [True, False])
def test_pi05_launch_file(autostart, tiny_checkpoint, joint_names, launch_params_file):
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain_id())
    robot, recorder = RobotSim(context, joint_names), Recorder(
        context, policy_name=f"/launched/{POLICY_NODE_NAME}")
    process = start_launch({
        "checkpoint": str(tiny_checkpoint), "autostart": str(autostart).lower(),
        "params_file": str(launch_params_file), "namespace": "launched",
        "rate_hz": "10", "prompt": "launched"})
    state = StateQuery(recorder, f"/launched/{POLICY_NODE_NAME}")
    try:
        with Spinner([robot, recorder], context=context):
            if autostart:
                assert wait_until(lambda: state() == "active", timeout=60)
                assert wait_until(lambda: len(recorder.snapshot().chunks) >= 3, timeout=30)
                assert recorder.snapshot().chunks[-1].model == "pi05"
            else:
                assert wait_until(lambda: state() == "unconfigured", timeout=60)
                assert not wait_until(lambda: state() not in (None, "unconfigured"), timeout=3)
            process.send_signal(signal.SIGINT)
            output, _ = process.communicate(timeout=30)
            assert process.returncode == 0, output
            if autostart:  # launch's SIGINT brings the node down through the hold
                assert wait_until(lambda: len(recorder.snapshot().trajectories[-1].points) == 1,
                                  timeout=5), output
                assert "hold published" in output
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
        robot.destroy_node()
        recorder.destroy_node()
        rclpy.shutdown(context=context)
