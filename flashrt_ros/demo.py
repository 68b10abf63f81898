"""The built-in demo (`flashrt-ros demo`): a policy node on the tiny demo checkpoint,
fed by a synthetic robot (two cameras, one raw and one JPEG-compressed, plus joint
states) in the same process, printing the action chunks it publishes once a second
and a summary at the end (after `duration` seconds or Ctrl-C).

Everything is real ROS 2 (rclpy over DDS) and the real engine; only the robot and the
checkpoint's weights are synthetic.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
from rclpy.node import Node

from flashrt_ros import launcher
from flashrt_ros.params import POLICY_NODE_NAME

DEMO_CAMERAS = ["demo/camera/base/image_raw", "demo/camera/wrist/image_raw/compressed"]
DEMO_JOINT_TOPIC = "demo/joint_states"
DEMO_PROMPT = "pick up the red block"
ROBOT_RATE_HZ = 30.0
IMAGE_HEIGHT, IMAGE_WIDTH = 240, 320   # not the model's 224x224: the engine resizes


def demo_checkpoint(model: str) -> Path:
    """The tiny demo checkpoint (random weights, real layout), written if missing.
    scripts/setup.sh writes it to .cache/checkpoints/<model>_tiny; FLASHRT_CACHE_DIR
    moves the cache."""
    path = Path(os.environ.get("FLASHRT_CACHE_DIR", ".cache")) / "checkpoints" / f"{model}_tiny"
    if not path.is_dir():
        from flashrt_core.synthetic import write_checkpoint

        print(f"writing the demo checkpoint {path} ...", flush=True)
        tmp = path.with_name(path.name + ".tmp")
        write_checkpoint(model, tmp, size="tiny", seed=0)
        tmp.rename(path)
    return path


def joint_and_action_names(checkpoint: Path, model: str) -> tuple[list[str], list[str]]:
    """One joint per state value of the checkpoint (the synthetic robot publishes them),
    and action names: the joints' names while there are joints (actions are their
    position commands), then extra dimensions."""
    import flashrt_core

    policy = flashrt_core.load_policy(str(checkpoint), model=model, device="cpu",
                                      num_views=len(DEMO_CAMERAS))
    try:
        spec = policy.spec
    finally:
        policy.close()
    joints = [f"joint_{i}" for i in range(spec.state_dim)]
    extra = [f"action_{i}" for i in range(spec.state_dim, spec.action_dim)]
    return joints, (joints + extra)[:spec.action_dim]


class SyntheticRobot(Node):
    """Cameras (a moving colour gradient) and joint states (slow sines), stamped now."""

    def __init__(self, joint_names: list[str], rate_hz: float = ROBOT_RATE_HZ):
        super().__init__("demo_robot")
        from sensor_msgs.msg import CompressedImage, Image, JointState

        self.joint_names = joint_names
        self._raw = self.create_publisher(Image, DEMO_CAMERAS[0], 5)
        self._jpeg = self.create_publisher(CompressedImage, DEMO_CAMERAS[1], 5)
        self._joints = self.create_publisher(JointState, DEMO_JOINT_TOPIC, 10)
        self._started = time.monotonic()
        ramp = np.linspace(0, 255, IMAGE_WIDTH, dtype=np.float32)
        self._ramp = np.broadcast_to(ramp, (IMAGE_HEIGHT, IMAGE_WIDTH))
        self.create_timer(1.0 / rate_hz, self._publish)

    def _publish(self) -> None:
        import cv2
        from sensor_msgs.msg import CompressedImage, Image, JointState

        t = time.monotonic() - self._started
        stamp = self.get_clock().now().to_msg()
        frame = np.stack([(self._ramp + 40 * t) % 256, self._ramp[::-1],
                          np.full_like(self._ramp, 128 + 100 * np.sin(t))], axis=2).astype(np.uint8)
        image = Image(height=IMAGE_HEIGHT, width=IMAGE_WIDTH, encoding="rgb8",
                      step=IMAGE_WIDTH * 3, data=frame.tobytes())
        image.header.stamp = stamp
        self._raw.publish(image)
        jpeg = CompressedImage(format="jpeg", data=cv2.imencode(
            ".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))[1].tobytes())
        jpeg.header.stamp = stamp
        self._jpeg.publish(jpeg)
        phases = np.arange(len(self.joint_names))
        joints = JointState(name=self.joint_names,
                            position=(0.5 * np.sin(0.5 * t + phases)).tolist())
        joints.header.stamp = stamp
        self._joints.publish(joints)


class ChunkPrinter(Node):
    """Prints one line a second about the newest action chunk (times from its start)."""

    def __init__(self, policy_name: str):
        super().__init__("demo_chunk_printer")
        from flashrt_ros.msg import ActionChunk

        self._lock = threading.Lock()
        self._newest = None
        self._received = 0
        self._started = time.monotonic()
        self.create_subscription(ActionChunk, f"{policy_name}/action_chunk", self._keep, 10)
        self.create_timer(1.0, self._print)

    def _keep(self, chunk) -> None:
        with self._lock:
            self._newest = chunk
            self._received += 1

    def _print(self) -> None:
        with self._lock:
            chunk, received = self._newest, self._received
        elapsed = time.monotonic() - self._started
        if chunk is None:
            print(f"[{elapsed:5.1f} s] waiting for the first action chunk...", flush=True)
            return
        actions = np.asarray(chunk.data).reshape(chunk.horizon, chunk.action_dim)
        first = " ".join(f"{v:+.2f}" for v in actions[0, :4])
        more = " ..." if chunk.action_dim > 4 else ""
        print(f"[{elapsed:5.1f} s] chunk #{chunk.sequence:<4d} {chunk.horizon}x{chunk.action_dim}"
              f"  step 0: [{first}{more}]  inference {chunk.inference_time * 1e3:6.1f} ms"
              f"  observation age {chunk.observation_age * 1e3:5.1f} ms"
              f"  ({received} received)", flush=True)


def results(policy, active_seconds: float) -> dict:
    """The run's numbers (what summary() prints), for --json."""
    health = policy.health
    out = {"published": health.published, "active_seconds": active_seconds,
           "rate_hz": health.published / max(active_seconds, 1e-9),
           "target_hz": policy.get_parameter("rate_hz").value, "skipped": dict(health.skipped)}
    for key, window in (("inference", health.inference_latency), ("observation_to_publish",
                                                                     health.observation_latency)):
        for q in (50, 90, 99):
            value = window.percentile(q)
            out[f"{key}_p{q}_ms"] = None if value is None else value * 1e3
    return out


def summary(policy, active_seconds: float) -> str:
    health = policy.health
    lines = [f"chunks published: {health.published} in {active_seconds:.1f} s "
             f"({health.published / max(active_seconds, 1e-9):.1f} Hz, target "
             f"{policy.get_parameter('rate_hz').value:g} Hz)"]
    for label, window in (("inference latency", health.inference_latency),
                          ("observation to publish", health.observation_latency)):
        p50, p99 = window.percentile(50), window.percentile(99)
        if p50 is not None:
            lines.append(f"{label}: p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms")
    skipped = sum(health.skipped.values())
    reasons = ", ".join(f"{reason}: {n}" for reason, n in health.skipped.most_common())
    lines.append(f"skipped ticks: {skipped}" + (f" ({reasons})" if reasons else ""))
    return "\n".join(lines)


def main(duration: float = 10.0, model: str = "pi05", checkpoint: str | None = None, rate_hz: float = 20.0,
         device: str = "auto", precision: str = "auto", robot_rate_hz: float = ROBOT_RATE_HZ,
         json_path: str | None = None) -> int:
    """Run the demo for `duration` seconds (or until Ctrl-C); returns the exit code.

    checkpoint: another checkpoint than the tiny demo one (e.g. a full-size synthetic one
    on a GPU: the node's latency at a real model's size); json_path: write the numbers."""
    from flashrt_ros.policy_node import PolicyNode

    checkpoint = Path(checkpoint) if checkpoint else demo_checkpoint(model)
    joint_names, action_names = joint_and_action_names(checkpoint, model)
    overrides = {
        "model": model, "checkpoint": str(checkpoint), "camera_topics": DEMO_CAMERAS,
        "joint_state_topic": DEMO_JOINT_TOPIC, "joint_names": joint_names,
        "action_names": action_names, "device": device, "precision": precision,
        "prompt": DEMO_PROMPT, "rate_hz": float(rate_hz),
    }
    print(f"flashrt_ros demo: {model} on {checkpoint} (random weights), "
          f"{len(DEMO_CAMERAS)} cameras + {len(joint_names)} joints at {robot_rate_hz:g} Hz, "
          f"policy at {rate_hz:g} Hz, prompt {DEMO_PROMPT!r}; {duration:g} s or Ctrl-C", flush=True)
    with launcher.ros_process() as stop:
        policy = PolicyNode(POLICY_NODE_NAME,
                            parameter_overrides=launcher.parameter_overrides(overrides))
        nodes = [policy, SyntheticRobot(joint_names, robot_rate_hz)]
        try:
            with launcher.Spinner(nodes) as spinner:
                if not launcher.bring_up(policy):
                    print("demo failed: the policy node did not configure (see the log)")
                    return 1
                nodes.append(ChunkPrinter(policy.get_fully_qualified_name()))
                spinner.add_node(nodes[-1])
                started = time.monotonic()
                launcher.wait_for(stop, timeout=duration)
                active_seconds = time.monotonic() - started
                launcher.bring_down(policy)
        finally:
            for node in nodes:
                node.destroy_node()
    print("summary\n" + summary(policy, active_seconds), flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(results(policy, active_seconds), indent=2))
    return 0 if policy.health.published > 0 else 1
