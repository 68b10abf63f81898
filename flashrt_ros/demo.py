"""The built-in demo (`flashrt-ros demo`): a policy node on the tiny demo checkpoint,
fed by a synthetic robot (two cameras, one raw and one JPEG-compressed, plus joint
states), whose chunk consumer prints the newest action chunk once a second; a summary
at the end (after `duration` seconds or Ctrl-C).

Where the robot runs: in the node's process (its publishers and consumer spun on
threads beside the node), or in a process of its own (multiprocessing spawn, its own
rclpy context), as a real robot is. Its own process is the default when the engine runs
on CUDA: in-process, the robot's Python work (frame generation, JPEG encoding, chunk
handling) competes for the GIL with the engine thread and adds to every tick.

Numbers (summary and --json): chunks published, achieved rate, skipped ticks by reason,
and the node's own figures (flashrt_ros.diagnostics): inference latency (wall time of
the engine's predict call) and its phases (Policy.predict's preprocess / model /
postprocess, then the node's publishing), and observation -> publish (header stamp of
the newest input to the chunk's publication, node clock). The consumer adds
observation -> receive: the same stamp to the chunk's arrival at the robot, DDS
transport included (both processes read the same system clock). Percentiles are over
the whole run (the node keeps RUN_WINDOW samples; its /diagnostics still reports the
newest DIAGNOSTICS_WINDOW). The garbage collector's pauses while the node was active
(flashrt_ros/gc_pauses.py): collections per generation, pause percentiles and longest,
and the time of each pause of 1 ms or more beside the time of each skipped tick
(seconds since activation), to tell whether a skip followed a collection. The host's
own pauses (flashrt_ros/host_pauses.py: a probe in a process of its own, waking every
millisecond): how many, the longest, and which skipped ticks came during or within
HOST_PAUSE_GRACE_PERIODS policy periods after one, i.e. were the host's, not the node's.

Everything is real ROS 2 (rclpy over DDS) and the real engine; only the robot and the
checkpoint's weights are synthetic.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
from rclpy.node import Node

from flashrt_ros import conversions, launcher
from flashrt_ros.diagnostics import INFERENCE_PHASES, RollingWindow
from flashrt_ros.gc_pauses import SLOW_PAUSE_S
from flashrt_ros.host_pauses import THRESHOLD_S, HostPauseProbe, attribute
from flashrt_ros.params import POLICY_NODE_NAME

DEMO_CAMERAS = ["demo/camera/base/image_raw", "demo/camera/wrist/image_raw/compressed"]
DEMO_JOINT_TOPIC = "demo/joint_states"
DEMO_PROMPT = "pick up the red block"
ROBOT_RATE_HZ = 30.0
IMAGE_HEIGHT, IMAGE_WIDTH = 240, 320   # not the model's 224x224: the engine resizes
ROBOT_MODES = ("auto", "own-process", "same-process")
ROBOT_WHERE = {"own-process": "its own process", "same-process": "the node's process"}
CONNECT_TIMEOUT_S = 60.0  # for the robot to start and match the node's topics
# Latency samples the demo's percentiles cover: a whole run (ten minutes at 100 Hz), not
# the node's default window of the newest 200 that /diagnostics reports.
RUN_WINDOW = 60_000
_SPAWN = multiprocessing.get_context("spawn")  # never fork a process running DDS threads
# A skip is counted when the node's next callback runs after the time it lost: up to a
# couple of periods after a host pause that caused it.
HOST_PAUSE_GRACE_PERIODS = 3
HOST_PAUSES_LISTED = 200


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
        self._streams = (self._raw, self._jpeg, self._joints)
        self._started = time.monotonic()
        ramp = np.linspace(0, 255, IMAGE_WIDTH, dtype=np.float32)
        self._ramp = np.broadcast_to(ramp, (IMAGE_HEIGHT, IMAGE_WIDTH))
        self.create_timer(1.0 / rate_hz, self._publish)

    def connected(self) -> bool:
        """Every stream has a subscriber (the policy node's, once it is configured)."""
        return all(p.get_subscription_count() > 0 for p in self._streams)

    def _publish(self) -> None:
        from sensor_msgs.msg import JointState

        t = time.monotonic() - self._started
        stamp = self.get_clock().now().to_msg()
        frame = np.stack([(self._ramp + 40 * t) % 256, self._ramp[::-1],
                          np.full_like(self._ramp, 128 + 100 * np.sin(t))], axis=2).astype(np.uint8)
        image = conversions.rgb_to_image(frame)
        image.header.stamp = stamp
        self._raw.publish(image)
        jpeg = conversions.rgb_to_jpeg(frame)
        jpeg.header.stamp = stamp
        self._jpeg.publish(jpeg)
        phases = np.arange(len(self.joint_names))
        joints = JointState(name=self.joint_names,
                            position=(0.5 * np.sin(0.5 * t + phases)).tolist())
        joints.header.stamp = stamp
        self._joints.publish(joints)


class ChunkConsumer(Node):
    """The robot's side of the policy output: takes every action chunk, measures
    observation -> receive latency (header stamp to arrival here), and prints one line
    a second about the newest chunk once the policy is active. `active_since` is a
    shared multiprocessing Value: time.monotonic() at activation (the clock is the
    same in every process), 0 before."""

    def __init__(self, policy_name: str, active_since):
        super().__init__("demo_chunk_consumer")
        from flashrt_ros.msg import ActionChunk

        self._active_since = active_since
        self._lock = threading.Lock()
        self._newest = None
        self._received = 0
        self._receive_latency = RollingWindow(RUN_WINDOW)  # the whole run, as the node's figures
        self._subscription = self.create_subscription(
            ActionChunk, f"{policy_name}/action_chunk", self._keep, 10)
        self.create_timer(1.0, self._print)

    def connected(self) -> bool:
        return self._subscription.get_publisher_count() > 0

    def _keep(self, chunk) -> None:
        received_ns = self.get_clock().now().nanoseconds
        stamp_ns = conversions.stamp_to_ns(chunk.header.stamp)
        with self._lock:
            self._newest = chunk
            self._received += 1
            self._receive_latency.add((received_ns - stamp_ns) * 1e-9)

    def _print(self) -> None:
        active_since = self._active_since.value
        if not active_since:
            return
        with self._lock:
            chunk, received = self._newest, self._received
        elapsed = time.monotonic() - active_since
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

    def results(self) -> dict:
        """Chunks received and observation -> receive percentiles [ms] (None: no chunk)."""
        with self._lock:
            out = {"received": self._received}
            out.update(_percentiles_ms("observation_to_receive", self._receive_latency))
        return out


@contextlib.contextmanager
def spinning_robot(joint_names, robot_rate_hz, policy_name, active_since):
    """(SyntheticRobot, ChunkConsumer) spinning on their own threads in this process's
    default rclpy context until the block ends."""
    nodes = []
    try:
        nodes = [SyntheticRobot(joint_names, robot_rate_hz), ChunkConsumer(policy_name, active_since)]
        with launcher.Spinner(nodes):
            yield tuple(nodes)
    finally:
        for node in nodes:
            node.destroy_node()


class RobotInProcess:
    """The synthetic robot and the chunk consumer in the node's process."""

    def __init__(self, joint_names, robot_rate_hz, policy_name):
        self.active_since = _SPAWN.Value("d", 0.0)
        self._spinning = spinning_robot(joint_names, robot_rate_hz, policy_name, self.active_since)

    def __enter__(self) -> "RobotInProcess":
        self._robot, self._consumer = self._spinning.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._spinning.__exit__(*exc)

    def connected(self) -> bool:
        return self._robot.connected() and self._consumer.connected()

    def results(self) -> dict:
        return self._consumer.results()


def _robot_process_main(joint_names, robot_rate_hz, policy_name, connected, active_since, stop,
                        results) -> None:
    """Entry point of the robot's own process: its own rclpy context, until `stop`;
    then the consumer's results go back on the `results` queue."""
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's; it sets `stop`
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    try:
        with spinning_robot(joint_names, robot_rate_hz, policy_name, active_since) as nodes:
            while not stop.wait(0.02):
                if not connected.is_set() and all(node.connected() for node in nodes):
                    connected.set()
            results.put(nodes[1].results())
    finally:
        rclpy.try_shutdown()


class RobotProcessError(RuntimeError):
    """The robot's own process ended before it connected."""


class RobotProcess:
    """The synthetic robot and the chunk consumer in a process of their own."""

    def __init__(self, joint_names, robot_rate_hz, policy_name):
        self.active_since = _SPAWN.Value("d", 0.0)
        self._connected = _SPAWN.Event()
        self._stop = _SPAWN.Event()
        self._results = _SPAWN.Queue()
        self._process = _SPAWN.Process(
            target=_robot_process_main, name="demo-robot", daemon=True,
            args=(joint_names, robot_rate_hz, policy_name, self._connected, self.active_since,
                  self._stop, self._results))

    def __enter__(self) -> "RobotProcess":
        self._process.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._process.join(timeout=10.0)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join()

    def connected(self) -> bool:
        if not self._process.is_alive() and not self._connected.is_set():
            raise RobotProcessError(f"the robot process exited (code {self._process.exitcode})")
        return self._connected.is_set()

    def results(self) -> dict:
        """Stop the robot and return its consumer's results."""
        self._stop.set()
        return self._results.get(timeout=30.0)


def resolve_robot(robot: str, device: str) -> str:
    """'own-process' or 'same-process' for `robot` (one of ROBOT_MODES); 'auto' is its
    own process when the engine runs on CUDA (`device` cuda[:N], or auto with a GPU)."""
    if robot not in ROBOT_MODES:
        raise ValueError(f"robot must be one of {', '.join(ROBOT_MODES)}, got {robot!r}")
    if robot != "auto":
        return robot
    if device == "auto":
        import torch

        on_cuda = torch.cuda.is_available()
    else:
        on_cuda = device.startswith("cuda")
    return "own-process" if on_cuda else "same-process"


def results(policy, active_since: float, active_seconds: float, consumer: dict, robot: str,
            host_probe=None) -> dict:
    """The run's numbers (what summary() prints), for --json. active_since:
    time.monotonic() at activation; host_probe: the ProbeResult of a HostPauseProbe
    that ran over the active window (None: no probe, or it did not report)."""
    health = policy.health
    out = {"published": health.published, "active_seconds": active_seconds,
           "rate_hz": health.published / max(active_seconds, 1e-9),
           "target_hz": policy.get_parameter("rate_hz").value, "skipped": dict(health.skipped),
           "robot": robot,
           "received": consumer["received"]}
    out.update(_percentiles_ms("inference", health.inference_latency))
    out.update(_percentiles_ms("observation_to_publish", health.observation_latency))
    out["late_starts"] = health.late_starts  # ticks that waited for the previous inference
    out.update(_percentiles_ms("late_start", health.late_start_delay))
    for name, window in health.phases.items():
        out.update(_percentiles_ms(name, window))
    out.update({k: v for k, v in consumer.items() if k.startswith("observation_to_receive")})
    out.update(gc_results(policy.gc_pauses, health, active_since))
    out.update(host_results(host_probe, out["skipped_at"], active_since, active_seconds, out["target_hz"]))
    return out


def host_results(probe, skipped_at: list[dict], active_since: float, active_seconds: float,
                 rate_hz: float) -> dict:
    """The host's pauses over the active window (the probe process's view) and how
    many skipped ticks came during or just after one (see the module docstring); each
    entry of skipped_at ({"at_s": seconds since activation, ...}) gains an
    'after_host_pause' flag."""
    if probe is None:
        return {"host_probe": False}
    pauses = [p for p in probe.pauses if active_since <= p.ended and p.started <= active_since + active_seconds]
    flags = attribute([active_since + skip["at_s"] for skip in skipped_at], pauses,
                      grace_s=HOST_PAUSE_GRACE_PERIODS / rate_hz)
    for entry, flag in zip(skipped_at, flags):
        entry["after_host_pause"] = flag
    out = {"host_probe": True, "host_pause_threshold_ms": THRESHOLD_S * 1e3,
           "host_pause_count": len(pauses), "host_pause_max_ms": max((p.seconds for p in pauses), default=0) * 1e3,
           "host_late_p99_ms": None if probe.late_p99_s is None else probe.late_p99_s * 1e3,
           "host_steal_percent": probe.steal_percent, "host_cpu_pressure_percent": probe.cpu_pressure_percent,
           "host_pauses": [{"at_s": p.started - active_since, "ms": p.seconds * 1e3}
                           for p in pauses[:HOST_PAUSES_LISTED]],
           "skipped_after_host_pause": sum(flags)}
    return out


def gc_results(gc_pauses, health, active_since: float) -> dict:
    """The garbage collector's pauses while the node was active, and when each slow
    one and each skipped tick happened (seconds since activation), to line them up."""
    out = {f"gc_collections_gen{g}": n for g, n in enumerate(gc_pauses.collections)}
    out["gc_pause_max_ms"] = gc_pauses.longest_s * 1e3
    out["gc_slow_pause_count"] = gc_pauses.slow_count
    out.update(_percentiles_ms("gc_pause", gc_pauses))
    out["gc_slow_pauses"] = [{"at_s": ended - active_since, "generation": generation,
                              "ms": seconds * 1e3}
                             for ended, generation, seconds in gc_pauses.slow_pauses()]
    out["skipped_at"] = [{"at_s": at - active_since, "reason": reason}
                         for at, reason in health.skip_times]
    return out


def _percentiles_ms(key: str, window) -> dict:
    """{key_p50_ms, key_p90_ms, key_p99_ms} of a window of seconds (a RollingWindow or
    anything with its percentile(); None when empty)."""
    out = {}
    for q in (50, 90, 99):
        value = window.percentile(q)
        out[f"{key}_p{q}_ms"] = None if value is None else value * 1e3
    return out


def summary(numbers: dict) -> str:
    """The human-readable form of results()."""
    lines = [f"chunks published: {numbers['published']} in {numbers['active_seconds']:.1f} s "
             f"({numbers['rate_hz']:.1f} Hz, target {numbers['target_hz']:g} Hz); "
             f"robot in {ROBOT_WHERE[numbers['robot']]}, "
             f"{numbers['received']} chunks received"]
    for label, key in (("inference latency", "inference"),
                       ("observation to publish", "observation_to_publish"),
                       ("observation to receive", "observation_to_receive")):
        p50, p99 = numbers[f"{key}_p50_ms"], numbers[f"{key}_p99_ms"]
        if p50 is not None:
            lines.append(f"{label}: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    skipped = numbers["skipped"]
    reasons = ", ".join(f"{reason}: {n}" for reason, n in
                        sorted(skipped.items(), key=lambda item: -item[1]))
    lines.append(f"skipped ticks: {sum(skipped.values())}" + (f" ({reasons})" if reasons else ""))
    if numbers["model_p50_ms"] is not None:
        lines.append("inference phases p50 / p99: " + ", ".join(
            f"{name} {numbers[f'{name}_p50_ms']:.2f} / {numbers[f'{name}_p99_ms']:.2f} ms"
            for name in INFERENCE_PHASES))
    if numbers["late_starts"]:
        lines.append(f"ticks started late (waited for the previous inference): {numbers['late_starts']}, "
                     f"delay p50 {numbers['late_start_p50_ms']:.1f} ms, p99 {numbers['late_start_p99_ms']:.1f} ms")
    if numbers.get("host_probe"):
        skipped_total = sum(skipped.values())
        lines.append(f"host pauses (a probe process woke over {numbers['host_pause_threshold_ms']:g} ms late): "
                     f"{numbers['host_pause_count']}, longest {numbers['host_pause_max_ms']:.1f} ms"
                     + (f"; {numbers['skipped_after_host_pause']} of the {skipped_total} skipped ticks came "
                        f"during or just after one" if skipped_total else ""))
    collections = "/".join(str(numbers[f"gc_collections_gen{g}"]) for g in range(3))
    lines.append(f"garbage collections while active (gen 0/1/2): {collections}, longest pause "
                 f"{numbers['gc_pause_max_ms']:.1f} ms, {numbers['gc_slow_pause_count']} "
                 f"of {SLOW_PAUSE_S * 1e3:g} ms or more")
    return "\n".join(lines)


def main(duration: float = 10.0, model: str = "pi05", checkpoint: str | None = None, rate_hz: float = 20.0,
         device: str = "auto", precision: str = "auto", robot_rate_hz: float = ROBOT_RATE_HZ,
         json_path: str | None = None, robot: str = "auto", host_probe: bool = True) -> int:
    """Run the demo for `duration` seconds (or until Ctrl-C); returns the exit code.

    checkpoint: another checkpoint than the tiny demo one (e.g. a full-size synthetic one
    on a GPU: the node's latency at a real model's size); json_path: write the numbers;
    robot: one of ROBOT_MODES; host_probe: run the host-pause probe beside the node (see
    the module docstring)."""
    from rclpy.lifecycle import TransitionCallbackReturn

    from flashrt_ros.policy_node import PolicyNode

    robot = resolve_robot(robot, device)
    checkpoint = Path(checkpoint) if checkpoint else demo_checkpoint(model)
    joint_names, action_names = joint_and_action_names(checkpoint, model)
    overrides = {
        "model": model, "checkpoint": str(checkpoint), "camera_topics": DEMO_CAMERAS,
        "joint_state_topic": DEMO_JOINT_TOPIC, "joint_names": joint_names,
        "action_names": action_names, "device": device, "precision": precision,
        "prompt": DEMO_PROMPT, "rate_hz": float(rate_hz),
    }
    print(f"flashrt_ros demo: {model} on {checkpoint} (random weights), "
          f"{len(DEMO_CAMERAS)} cameras + {len(joint_names)} joints at {robot_rate_hz:g} Hz "
          f"(robot in {ROBOT_WHERE[robot]}), "
          f"policy at {rate_hz:g} Hz, prompt {DEMO_PROMPT!r}; {duration:g} s or Ctrl-C", flush=True)
    probe = HostPauseProbe() if host_probe else None
    with launcher.ros_process() as stop:
        policy = PolicyNode(POLICY_NODE_NAME, health_window=RUN_WINDOW,
                            parameter_overrides=launcher.parameter_overrides(overrides))
        policy_name = policy.get_fully_qualified_name()
        try:
            robot_class = RobotProcess if robot == "own-process" else RobotInProcess
            with launcher.Spinner([policy]), \
                    robot_class(joint_names, robot_rate_hz, policy_name) as robot_side:
                if policy.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                    print("demo failed: the policy node did not configure (see the log)")
                    return 1
                if probe is not None:
                    try:
                        probe.start()  # now: its process is up before activation
                    except OSError as error:  # a diagnostic: the demo runs without it
                        print(f"host-pause probe not started ({error}); running without it")
                        probe = None
                # Activate once the robot's streams reach the node (a process of its own
                # needs a moment to start), so no tick starts without inputs.
                try:
                    launcher.wait_for(stop, until=robot_side.connected, timeout=CONNECT_TIMEOUT_S)
                    connected = robot_side.connected()
                except RobotProcessError as error:
                    print(f"demo failed: {error}")
                    return 1
                if not connected:
                    print(f"demo failed: the synthetic robot did not connect within "
                          f"{CONNECT_TIMEOUT_S:g} s")
                    return 1
                started = time.monotonic()  # before: what activation starts comes after it
                if policy.trigger_activate() != TransitionCallbackReturn.SUCCESS:
                    print("demo failed: the policy node did not activate (see the log)")
                    return 1
                robot_side.active_since.value = started
                launcher.wait_for(stop, timeout=duration)
                active_seconds = time.monotonic() - started
                launcher.bring_down(policy)
                numbers = results(policy, started, active_seconds, robot_side.results(), robot,
                                  host_probe=None if probe is None else probe.stop())
        finally:
            if probe is not None:
                probe.stop()
            policy.destroy_node()
    print("summary\n" + summary(numbers), flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(numbers, indent=2))
    return 0 if policy.health.published > 0 else 1
