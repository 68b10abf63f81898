"""Real rclpy graphs around the policy node, shared by the policy node tests.

Each test gets its own rclpy Context (isolated, shut down at the end) on a domain id
private to the test process, a simulated robot publishing cameras + joint states, a
recorder of everything the node publishes, each node spun by its own executor in a
background thread (flashrt_ros.launcher.Spinner, the one the launcher uses; the kind
from $FLASHRT_EXECUTOR).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import rclpy
import rclpy.time
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, QoSReliabilityPolicy

from flashrt_ros.conversions import is_compressed_topic
from flashrt_ros.launcher import Spinner, bring_down
from flashrt_ros.policy_node import PolicyNode

CAMERAS = ["cam/base/image_raw", "cam/wrist/image_raw/compressed"]
JOINT_TOPIC = "robot/joint_states"
RELIABLE = QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE)
BEST_EFFORT = QoSProfile(depth=5, reliability=QoSReliabilityPolicy.BEST_EFFORT)


def domain_id() -> int:
    """The foundation's conftest exports ROS_DOMAIN_ID per session; else one from the pid."""
    if os.environ.get("ROS_DOMAIN_ID"):
        return int(os.environ["ROS_DOMAIN_ID"])
    return 1 + os.getpid() % 100


def rgb_frame(height=48, width=64, value=0) -> np.ndarray:
    frame = np.zeros((height, width, 3), np.uint8)
    frame[:, :, 0] = np.arange(width, dtype=np.uint8)[None, :] * 3
    frame[:, :, 1] = value % 256
    return frame


def image_message(stamp, frame: np.ndarray, encoding="rgb8"):
    from sensor_msgs.msg import Image

    msg = Image(height=frame.shape[0], width=frame.shape[1], encoding=encoding,
                step=frame.shape[1] * frame.shape[2], data=frame.tobytes())
    msg.header.stamp = stamp
    return msg


def compressed_message(stamp, frame: np.ndarray, fmt="jpeg"):
    from sensor_msgs.msg import CompressedImage

    ok, data = cv2.imencode(".jpg" if fmt == "jpeg" else ".png",
                            cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    assert ok
    msg = CompressedImage(format=fmt, data=data.tobytes())
    msg.header.stamp = stamp
    return msg


def joint_message(stamp, names, positions):
    from sensor_msgs.msg import JointState

    msg = JointState(name=list(names), position=[float(p) for p in positions])
    msg.header.stamp = stamp
    return msg


class RobotSim(Node):
    """Publishes every camera and the joint states at `rate_hz`, stamped with its clock.

    Knobs tests turn while it runs: `paused` (streams not published), `camera_override`
    (topic -> function(stamp) -> message), `joint_override` (function(stamp) -> message),
    `stamp_offset_s` (per-stream shift of the header stamp).
    """

    def __init__(self, context, joint_names, cameras=CAMERAS, joint_topic=JOINT_TOPIC,
                 qos=RELIABLE, rate_hz=30.0, **kwargs):
        super().__init__("robot_sim", context=context, **kwargs)
        from sensor_msgs.msg import CompressedImage, Image, JointState

        self.joint_names = list(joint_names)
        self.joint_topic = joint_topic
        self.positions = np.linspace(-0.5, 0.5, len(joint_names))
        self.paused: set[str] = set()
        self.camera_override: dict = {}
        self.joint_override = None
        self.stamp_offset_s: dict[str, float] = {}
        self.cameras = list(cameras)
        self._camera_pubs = {
            topic: self.create_publisher(
                CompressedImage if is_compressed_topic(topic) else Image, topic, qos)
            for topic in cameras}
        self._joint_pub = self.create_publisher(JointState, joint_topic, qos)
        self._frames = 0
        self.published_stamps: set[int] = set()  # header stamps [ns] of every message sent
        self.timer = self.create_timer(1.0 / rate_hz, self.publish_all) if rate_hz else None

    def stamp(self, stream):
        nanoseconds = (self.get_clock().now().nanoseconds
                       + int(self.stamp_offset_s.get(stream, 0.0) * 1e9))
        self.published_stamps.add(nanoseconds)
        return rclpy.time.Time(nanoseconds=nanoseconds).to_msg()

    def publish_all(self) -> None:
        self._frames += 1
        frame = rgb_frame(value=self._frames)
        for topic, pub in self._camera_pubs.items():
            if topic in self.paused:
                continue
            stamp = self.stamp(topic)
            if topic in self.camera_override:
                msg = self.camera_override[topic](stamp)
            elif is_compressed_topic(topic):
                msg = compressed_message(stamp, frame)
            else:
                msg = image_message(stamp, frame)
            pub.publish(msg)
        if self.joint_topic not in self.paused:
            stamp = self.stamp(self.joint_topic)
            msg = (self.joint_override(stamp) if self.joint_override else
                   joint_message(stamp, self.joint_names + ["unused_extra_joint"],
                                 list(self.positions) + [123.0]))
            self._joint_pub.publish(msg)


@dataclass
class Recorded:
    chunks: list = field(default_factory=list)
    trajectories: list = field(default_factory=list)
    diagnostics: list = field(default_factory=list)


class Recorder(Node):
    """Subscribes to everything the policy node publishes."""

    def __init__(self, context, policy_name="/flashrt_policy", qos=RELIABLE, **kwargs):
        super().__init__("recorder", context=context, **kwargs)
        from diagnostic_msgs.msg import DiagnosticArray
        from trajectory_msgs.msg import JointTrajectory

        from flashrt_ros.msg import ActionChunk

        self.got = Recorded()
        self._lock = threading.Lock()
        self.create_subscription(ActionChunk, f"{policy_name}/action_chunk",
                                 self._keep(self.got.chunks), qos)
        self.create_subscription(JointTrajectory, f"{policy_name}/joint_trajectory",
                                 self._keep(self.got.trajectories), qos)
        self.create_subscription(DiagnosticArray, "/diagnostics",
                                 self._keep(self.got.diagnostics), 10)

    def _keep(self, into: list):
        def keep(msg):
            with self._lock:
                into.append(msg)
        return keep

    def snapshot(self) -> Recorded:
        with self._lock:
            return Recorded(list(self.got.chunks), list(self.got.trajectories),
                            list(self.got.diagnostics))

    def clear(self) -> None:
        with self._lock:
            self.got.chunks.clear()
            self.got.trajectories.clear()
            self.got.diagnostics.clear()


def wait_until(predicate, timeout=10.0, interval=0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class PolicyGraph:
    """Policy node + RobotSim + Recorder spinning in one executor, in a fresh context."""

    def __init__(self, checkpoint, joint_names, *, parameters=None, robot_qos=RELIABLE,
                 recorder_qos=RELIABLE, robot_rate_hz=30.0, cameras=CAMERAS, robot_kwargs=None):
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id())
        values = {
            "checkpoint": str(checkpoint), "model": "pi05", "device": "cpu",
            "camera_topics": list(cameras), "joint_state_topic": JOINT_TOPIC,
            "joint_names": list(joint_names), "prompt": "pick up the cube",
            "rate_hz": 20.0, "max_observation_age": 0.5, "diagnostics_period": 0.2,
        }
        values.update(parameters or {})
        self.policy = PolicyNode(context=self.context, parameter_overrides=[
            Parameter(k, value=v) for k, v in values.items()])
        self.robot = RobotSim(self.context, joint_names, cameras=cameras, qos=robot_qos,
                              rate_hz=robot_rate_hz, **(robot_kwargs or {}))
        self.recorder = Recorder(self.context, qos=recorder_qos)
        self.spinner = Spinner([self.policy, self.robot, self.recorder], context=self.context)
        self.spinner.__enter__()

    def close(self) -> None:
        try:
            bring_down(self.policy)
        finally:
            self.spinner.__exit__(None, None, None)
            for node in (self.policy, self.robot, self.recorder):
                node.destroy_node()
            rclpy.shutdown(context=self.context)


# ---------------------------------------------------------------- fixtures
# Test modules import these names so pytest finds them.

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny Pi0.5 checkpoint with random weights in the real layout."""
    from flashrt_core.synthetic import write_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "pi05_tiny"
    write_checkpoint("pi05", path, size="tiny")
    return path


@pytest.fixture(scope="session")
def tiny_spec(tiny_checkpoint):
    import flashrt_core

    policy = flashrt_core.load_policy(str(tiny_checkpoint), model="pi05", device="cpu",
                                      num_views=len(CAMERAS))
    try:
        return policy.spec
    finally:
        policy.close()


@pytest.fixture(scope="session")
def joint_names(tiny_spec):
    return [f"joint_{i}" for i in range(tiny_spec.state_dim)]


@pytest.fixture(scope="session")
def action_names(tiny_spec, joint_names):
    """Action dimension names: the first joints (actions are their positions), then
    extra dimensions if the action is wider than the state."""
    extra = [f"extra_{i}" for i in range(tiny_spec.action_dim - len(joint_names))]
    return (joint_names + extra)[:tiny_spec.action_dim]


@pytest.fixture(scope="session")
def trajectory_joints(joint_names, action_names):
    return [name for name in joint_names if name in action_names]


@pytest.fixture
def make_graph(tiny_checkpoint, joint_names, action_names):
    """make_graph(**PolicyGraph kwargs) -> PolicyGraph, closed after the test."""
    graphs = []

    def make(checkpoint=None, parameters=None, **kwargs):
        parameters = {"action_names": action_names, **(parameters or {})}
        graph = PolicyGraph(checkpoint or tiny_checkpoint, joint_names,
                            parameters=parameters, **kwargs)
        graphs.append(graph)
        return graph

    yield make
    for graph in graphs:
        graph.close()
