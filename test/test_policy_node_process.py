"""`flashrt_ros.launcher.run_policy` (what `flashrt-ros run` calls) as its own process:
it brings the node up, publishes from live inputs, and on SIGINT / SIGTERM publishes
the hold and exits 0; a bad checkpoint exits 1 with a one-line error."""

import os
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import rclpy
from policy_harness import (  # noqa: F401 - fixtures
    CAMERAS, JOINT_TOPIC, Recorder, RobotSim, action_names, domain_id, joint_names,
    tiny_checkpoint, tiny_spec, trajectory_joints, wait_until)

from flashrt_ros.launcher import Spinner, packaged_parameters

pytestmark = pytest.mark.ros


def start_run_policy(checkpoint, joint_names, action_names) -> subprocess.Popen:
    overrides = {"device": "cpu", "camera_topics": CAMERAS, "joint_state_topic": JOINT_TOPIC,
                 "joint_names": joint_names, "action_names": action_names, "prompt": "pick",
                 "rate_hz": 20.0}
    code = ("import sys; from flashrt_ros.launcher import run_policy; "
            f"sys.exit(run_policy('pi05', {str(checkpoint)!r}, {overrides!r}))")
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain_id()))
    # Not from the repository root: `python -c` puts the cwd first on sys.path, and the
    # source tree's flashrt_ros has no generated messages (docs/ARCHITECTURE.md).
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tempfile.gettempdir(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture
def robot_and_recorder(joint_names):
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain_id())
    robot = RobotSim(context, joint_names)
    recorder = Recorder(context)
    with Spinner([robot, recorder], context=context):
        yield robot, recorder
    robot.destroy_node()
    recorder.destroy_node()
    rclpy.shutdown(context=context)


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_run_policy_serves_until_signal_then_holds(robot_and_recorder, tiny_checkpoint,
                                                   joint_names, action_names, trajectory_joints,
                                                   stop_signal):
    robot, recorder = robot_and_recorder
    process = start_run_policy(tiny_checkpoint, joint_names, action_names)
    try:
        assert wait_until(lambda: len(recorder.snapshot().chunks) >= 5, timeout=60), \
            process.stdout.read() if process.poll() is not None else "no chunks"
        process.send_signal(stop_signal)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert wait_until(lambda: len(recorder.snapshot().trajectories[-1].points) == 1, timeout=5)
    hold = recorder.snapshot().trajectories[-1]
    assert list(hold.joint_names) == trajectory_joints
    # run_policy starts from the packaged config (as the launch file): its joint limits
    # clamp the hold.
    packaged = packaged_parameters("pi05")
    n = len(trajectory_joints)
    expected = np.clip(robot.positions[:n], packaged["joint_limits_lower"][:n],
                       packaged["joint_limits_upper"][:n])
    assert not np.allclose(expected, robot.positions[:n])  # the clamp is visible
    np.testing.assert_allclose(hold.points[0].positions, expected, atol=1e-6)
    assert "cleaned up" in output


def test_run_policy_with_a_bad_checkpoint_exits_1(tmp_path, joint_names, action_names):
    process = start_run_policy(tmp_path / "missing", joint_names, action_names)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 1
    errors = [line for line in output.splitlines() if str(tmp_path / "missing") in line
              and "[ERROR]" in line]
    assert len(errors) == 1 and "CheckpointError" in errors[0], output
