"""The policy lifecycle node: cameras + joint states in, action chunks out.

Interface (DESIGN.md §3; parameters in flashrt_ros/params.py):

  subscriptions  <camera_topics>     sensor_msgs/Image, or CompressedImage for topics
                                     ending in '/compressed' (sensor-data QoS, depth 1)
                 <joint_state_topic> sensor_msgs/JointState (sensor-data QoS)
                 ~/prompt            std_msgs/String (reliable); newest of topic and
                                     the 'prompt' parameter wins
  publishers     ~/action_chunk      flashrt_ros/ActionChunk (reliable, depth 5)
                 ~/joint_trajectory  trajectory_msgs/JointTrajectory (if publish_trajectory)
                 /diagnostics        diagnostic_msgs/DiagnosticArray (while configured)
  service        ~/predict           flashrt_ros/Predict (while configured)

Lifecycle: configure loads and warms the engine and creates the interfaces (outputs
inactive), and runs the camera conversion and a /diagnostics report once, so that the
active node imports nothing (a first import holds the GIL for tens of ms); activate
starts the inference timer; deactivate stops it and publishes a hold; cleanup closes
the engine; shutdown works from any state. FP8 without a cached calibration: the
warm-up's blank frame gives provisional activation scales, and activation first
measures them on the live observation and caches them (fp8_calibrate_on_activation).

Threading: subscriptions keep the newest sample per stream. A camera frame is
converted as it arrives (decoded, made RGB, resized with pad to the model's image size:
the engine's own resize, so the model input is the same): that host work then runs
beside the inference in flight instead of in front of the next one, and the engine's
resize finds nothing left to do. A frame that cannot be converted is kept as its
reason and skips the tick that would use it ('bad image <topic>'). The timer tick
takes the observation and hands it to the engine thread (below), returning at once,
so inference never blocks the executor. A tick that fires while the previous
inference still runs waits for it and starts the moment the engine is free, with the
observation of that moment (a late start of a few ms, not a lost tick: timer jitter
alone would otherwise skip ticks whenever inference takes most of the period); only a
tick that finds another one already waiting is skipped as 'busy', so ticks never pile
up behind a slow engine. A period in which the timer never fired (the executor was held
up for longer than a period, and rcl's timer drops the periods it missed) is counted as
skipped too ('executor stall'): every period either publishes a chunk or is counted.
The engine is used by one caller at a time (tick or ~/predict) under a lock. ~/predict
waits for its inference on the executor thread (a one-shot, non-realtime call; ticks
resume after it). Any executor works; flashrt_ros.launcher spins each node on its own
single-threaded one, or EventsExecutor (FLASHRT_EXECUTOR=events): so the node creates
no guard condition, which EventsExecutor rejects.

Safety: a chunk with a non-finite value is never published; values are clamped to
joint_limits_lower/upper after that check (clamping would hide an inf).

Engine faults (flashrt_ros/engine_faults.py): a failing engine call skips its tick and
the node goes on; max_consecutive_engine_failures failures in a row, or one that left
the CUDA context dead, stop it: no further tick runs, /diagnostics turns ERROR with the
reason and advice, and the node deactivates itself (publishing the hold). The
transition runs on the executor (a guard condition the engine thread triggers, in the
callback group of the lifecycle services, so it never interleaves with a requested
transition), never on the engine thread. Until the node is activated again (refused
while the CUDA context is dead) or cleaned up, ~/predict answers with the fault.

Engine thread: every engine call (load, warm-up, predict, close) runs on one
dedicated thread, whichever executor thread asked for it. Per-thread state then stays
consistent: CUDA's current stream, and on the CPU the OpenMP team torch creates for
each calling thread (with predict hopping between executor threads, idle teams
spin-waited and stalled inference for seconds on a 2-core machine).

Garbage collection: after configure the process holds ~300k Python objects (torch,
rclpy, the model); a full cyclic collection over them stops every thread for ~150 ms
on a small CPU, several ticks at 20 Hz. Configure and activate therefore end with
gc.collect() + gc.freeze(), which moves everything alive into the permanent generation
that collections skip: on the realtime path a collection only walks objects made since
activation (a few hundred; measured well under a millisecond). Cleanup unfreezes and
collects so the released engine's memory is returned. All of it is process-wide (the
node is meant to own its process). While active, every collection is timed
(flashrt_ros/gc_pauses.py) and reported on /diagnostics.

GIL hand-over: inference blocks on the GPU with the GIL released and needs it back the
moment the forward is done; with CPython's default 5 ms switch interval another busy
thread (DDS callbacks, image decoding) can keep it that long, several times a tick.
While active the node sets the switch interval to gil_switch_interval_ms (1 ms;
process-wide, like the above; restored when it leaves active).

Publishing: the engine thread hands each chunk to a publisher thread and is free for
the next tick at once; building and publishing the messages (0.55 ms p50, 5-7 ms p99
on the H100 box, where other threads hold the GIL) stays off the inference cycle. One
publisher thread keeps the order, and the hold of a deactivation goes through it
after every chunk queued before (those are dropped: the node is no longer active). A
chunk with a newer one queued behind it is dropped too (skipped as 'publish lag'): a
publisher that falls behind sends the newest chunk, not a backlog of stale ones.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import numpy as np
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                SetParametersResult)
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.duration import Duration
from rclpy.exceptions import ParameterUninitializedException
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import (QoSDurabilityPolicy, QoSHistoryPolicy, QoSProfile, QoSReliabilityPolicy,
                       qos_profile_sensor_data)
from rclpy.time import Time

from flashrt_ros import conversions, params
from flashrt_ros.conversions import ConversionError
from flashrt_ros.diagnostics import (DIAGNOSTICS_WINDOW, PolicyHealth, diagnostic_status, gpu_free_memory,
                                     gpu_memory, warm_up_reports)
from flashrt_ros.engine_faults import EngineFailures, EngineFault, describe_error
from flashrt_ros.gc_pauses import GcPauses
from flashrt_ros.observation import CameraFrame, ObservationBuffer, Sample, SkippedTick

# Commands: reliable, a few deep (a late subscriber does not need old chunks).
OUTPUT_QOS = QoSProfile(depth=5, reliability=QoSReliabilityPolicy.RELIABLE,
                        durability=QoSDurabilityPolicy.VOLATILE)
# Cameras: sensor-data QoS (best effort, volatile: same compatibility), one frame deep.
# Only the newest frame is used, and each one is converted (decoded, resized) on the
# executor as it is taken: with sensor-data QoS's depth 5, an executor that fell behind
# converted the backlog first (1-4.5 ms a 320x240-640x480 frame on a 2-core CPU),
# stretching the stall that made the backlog.
CAMERA_QOS = QoSProfile(depth=1, history=QoSHistoryPolicy.KEEP_LAST,
                        reliability=QoSReliabilityPolicy.BEST_EFFORT,
                        durability=QoSDurabilityPolicy.VOLATILE)
# Volatile reliable is compatible with both volatile and transient-local publishers.
PROMPT_QOS = QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE)
SKIP_LOG_PERIOD_S = 5.0       # one warning per skip reason per period
ENGINE_WAIT_S = 30.0          # how long ~/predict and deactivate wait for a running inference
# FP8 calibration at activation waits this long for every input stream's first sample:
# configure creates the subscriptions, so an activation right after it may come before
# the first frames (a lifecycle service call blocks this node's executor thread, so
# there nothing arrives meanwhile and the wait just ends).
CALIBRATION_INPUT_WAIT_S = 1.0
HOLD_ACK_WAIT_S = 1.0         # how long deactivate waits for subscribers to acknowledge the hold

_PARAMETER_TYPES = {
    params.STRING: Parameter.Type.STRING,
    params.INT: Parameter.Type.INTEGER,
    params.FLOAT: Parameter.Type.DOUBLE,
    params.BOOL: Parameter.Type.BOOL,
    params.STRING_ARRAY: Parameter.Type.STRING_ARRAY,
    params.FLOAT_ARRAY: Parameter.Type.DOUBLE_ARRAY,
}


def _descriptor(param: params.Param) -> ParameterDescriptor:
    description = param.description
    if param.choices:
        description += f" One of: {', '.join(param.choices)}."
    descriptor = ParameterDescriptor(description=description, read_only=param.read_only)
    if param.type == params.FLOAT and param.min is not None:
        descriptor.floating_point_range = [FloatingPointRange(
            from_value=float(param.min), to_value=float(param.max), step=0.0)]
    elif param.type == params.INT and param.min is not None:
        descriptor.integer_range = [IntegerRange(
            from_value=int(param.min), to_value=int(param.max), step=0)]
    return descriptor


def declare_parameters(node, table=params.POLICY_PARAMETERS) -> None:
    """Declare every parameter of `table` on `node` with its descriptor.

    rclpy infers a byte array from an empty list, so parameters whose default is an
    empty list are declared by type: they read as "not set" until given a value, and
    `parameter_value` returns the table's default for them.
    """
    for param in table:
        default = param.default
        if isinstance(default, list) and not default:
            default = _PARAMETER_TYPES[param.type]
        node.declare_parameter(param.name, default, _descriptor(param))


def parameter_value(node, name: str):
    """Current value of a declared table parameter, checked against the table."""
    param = params.POLICY_PARAMETERS_BY_NAME[name]
    try:
        value = node.get_parameter(name).value
    except ParameterUninitializedException:  # declared by type and never set
        value = param.default
    return params.check_value(param, value)


def _freeze_heap() -> None:
    """Collect, then move every live object out of the collector's reach (see Garbage
    collection in the module docstring)."""
    gc.collect()
    gc.freeze()


def camera_frame(msg, image_size: tuple[int, int]) -> CameraFrame:
    """A camera message converted for the model (see Threading in the module docstring):
    RGB resized with pad to `image_size` (height, width). Never raises: a message that
    cannot be converted becomes a frame carrying the reason."""
    from flashrt_core.images import resize_with_pad

    try:
        return CameraFrame(resize_with_pad(conversions.camera_message_to_rgb(msg), *image_size))
    except ConversionError as error:
        return CameraFrame(error=str(error))
    except Exception as error:  # noqa: BLE001 - e.g. a 1-pixel-high frame resizes to nothing
        return CameraFrame(error=describe_error(error))


def warm_up_camera_conversion(compressed: bool, image_size: tuple[int, int]) -> None:
    """Convert one tiny synthetic frame as a camera topic's frames are converted, at
    configure, so that the first real frame finds OpenCV / PIL loaded: loading a module
    holds the GIL (on the H100 box the first compressed frame was seen loading OpenCV on
    the executor thread right after activation). Raises (configure fails) when the
    conversion cannot work, e.g. OpenCV missing for a compressed topic."""
    pixels = np.zeros((8, 8, 3), np.uint8)
    try:
        msg = conversions.rgb_to_jpeg(pixels) if compressed else conversions.rgb_to_image(pixels)
    except ImportError as error:
        raise RuntimeError(f"compressed camera topics need OpenCV (opencv-python-headless): {error}") from None
    frame = camera_frame(msg, image_size)
    if frame.rgb is None:
        raise RuntimeError(f"camera frames cannot be converted: {frame.error}")


def joint_state(engine: "_Engine", message) -> np.ndarray:
    """The state vector (engine.joint_names, in order) of a JointState message; raises
    SkippedTick('bad joint state')."""
    try:
        return conversions.joint_positions(message, engine.joint_names)
    except ConversionError as error:
        raise SkippedTick("bad joint state", str(error)) from None


def model_inputs(engine: "_Engine", observation) -> tuple[list, np.ndarray]:
    """A synchronized observation as the engine takes it: the camera images in view order
    and the state; raises SkippedTick for a bad image or joint state."""
    samples = observation.samples
    images = [samples[t].message.image(t) for t in engine.camera_topics]
    return images, joint_state(engine, samples[engine.joint_state_topic].message)


@dataclass
class _Engine:
    """Everything configure creates and cleanup destroys."""

    policy: object
    spec: object
    camera_topics: list[str]
    joint_state_topic: str
    joint_names: list[str]
    action_names: list[str]
    # Per action dimension clamp bounds (-inf/inf where no limit applies).
    action_lower: np.ndarray
    action_upper: np.ndarray
    # Joints of ~/joint_trajectory (joint_names entries that are action names, in
    # joint_names order), their action columns and limits; None: no trajectory.
    trajectory_joints: list[str] | None
    trajectory_columns: list[int] | None
    trajectory_lower: np.ndarray | None
    trajectory_upper: np.ndarray | None
    trajectory_velocities: bool
    buffer: ObservationBuffer
    failures: EngineFailures
    subscriptions: list = field(default_factory=list)
    service: object = None
    diagnostics_timer: object = None
    # The device's free memory once configured (diagnostic values; empty on CPU).
    gpu_free_at_configure: dict = field(default_factory=dict)
    chunk_publisher: object = None
    trajectory_publisher: object = None
    diagnostics_publisher: object = None


class ConfigurationError(ValueError):
    """Parameters that cannot work with the loaded checkpoint (message says why)."""


class PolicyNode(LifecycleNode):
    """Lifecycle node running a flashrt_core policy (see the module docstring)."""

    def __init__(self, node_name: str = params.POLICY_NODE_NAME, *, health_window: int = DIAGNOSTICS_WINDOW,
                 **kwargs):
        """health_window: latency samples kept (a benchmark run keeps its whole length);
        /diagnostics reports the newest DIAGNOSTICS_WINDOW of them either way."""
        super().__init__(node_name, **kwargs)
        declare_parameters(self)
        self.add_on_set_parameters_callback(self._check_parameters)
        self.add_post_set_parameters_callback(self._parameters_changed)
        self._engine: _Engine | None = None
        self._engine_lock = threading.Lock()
        # A tick that found the engine busy and starts when it is released (at most one);
        # _tick_mutex makes "engine busy -> wait" and "release -> hand over" atomic.
        self._tick_waiting = False
        self._tick_waiting_since = 0.0  # time.monotonic() of the waiting tick's timer call
        self._tick_mutex = threading.Lock()
        # Held while /diagnostics is published, so cleanup never destroys the publisher
        # under a running diagnostics callback.
        self._diagnostics_lock = threading.Lock()
        self._active = False
        self._timer = None
        self._next_tick_ns: int | None = None  # the timer's next call after the newest tick
        self._prompt = parameter_value(self, "prompt")
        self._sequence = 0
        self._chunks_handed = 0  # chunks the engine thread gave the publisher thread
        self.health = PolicyHealth(latency_window=health_window)
        self.gc_pauses = GcPauses()  # collections while active
        self._switch_interval_before: float | None = None  # CPython's, restored on leaving active
        self._last_skip_log: dict[str, float] = {}
        # Under a multi-threaded executor inputs, ticks and ~/predict may overlap: every
        # callback is short or waits on the engine lock, never on another callback.
        self._input_group = ReentrantCallbackGroup()
        self._tick_group = ReentrantCallbackGroup()
        self._service_group = ReentrantCallbackGroup()
        self._diagnostics_group = MutuallyExclusiveCallbackGroup()
        self._engine_thread = ThreadPoolExecutor(max_workers=1,
                                                 thread_name_prefix="flashrt-engine")
        # Chunks and the hold, in order, off the engine thread (see the module docstring).
        self._publisher_thread = ThreadPoolExecutor(max_workers=1,
                                                    thread_name_prefix="flashrt-publish")
        # Set on the engine thread when the engine must stop; see the module docstring.
        self._fault: EngineFault | None = None
        self._fault_timer = None  # one-shot: see _engine_failed
        # FP8: activation found no usable observation; the first tick that has one calibrates.
        self._fp8_calibration_pending = False

    def _on_engine_thread(self, function, *args, **kwargs):
        """Run `function` on the engine thread and return its result (see the module
        docstring); the calling thread waits."""
        return self._engine_thread.submit(function, *args, **kwargs).result()

    def _call_engine(self, engine: _Engine, function, *args):
        """A one-off engine call outside the ticks (~/predict, calibration at activation):
        `function` on the engine thread under the engine lock, after a running inference
        (at most ENGINE_WAIT_S); raises SkippedTick when the engine stays busy or was
        released meanwhile."""
        if not self._engine_lock.acquire(timeout=ENGINE_WAIT_S):
            raise SkippedTick("busy", f"engine still busy after {ENGINE_WAIT_S:g} s")
        try:
            if self._engine is not engine:
                raise SkippedTick("inference error", "engine released during the request")
            return self._on_engine_thread(function, *args)
        finally:
            self._release_engine_lock()

    def destroy_node(self):
        self._engine_thread.shutdown(wait=True)
        self._publisher_thread.shutdown(wait=True)
        return super().destroy_node()

    # ------------------------------------------------------------------ parameters

    def _check_parameters(self, changed: list[Parameter]) -> SetParametersResult:
        for parameter in changed:
            param = params.POLICY_PARAMETERS_BY_NAME.get(parameter.name)
            if param is None or parameter.value is None:
                continue
            try:
                params.check_value(param, parameter.value)
            except params.ParameterValueError as error:
                return SetParametersResult(successful=False, reason=str(error))
        return SetParametersResult(successful=True)

    def _parameters_changed(self, changed: list[Parameter]) -> None:
        for parameter in changed:
            if parameter.name == "prompt":
                self._prompt = parameter.value
            elif parameter.name == "rate_hz" and self._timer is not None:
                self._timer.timer_period_ns = int(1e9 / parameter.value)

    @property
    def prompt(self) -> str:
        return self._prompt

    # ------------------------------------------------------------------ lifecycle

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        log = self.get_logger()
        try:
            self._engine = self._on_engine_thread(self._build_engine)
            self._engine.gpu_free_at_configure = gpu_free_memory(self._engine.spec.device)
            self._create_interfaces(self._engine)
            warm_up_reports()  # the first report after activation then imports nothing
            _freeze_heap()
        except Exception as error:  # noqa: BLE001 - any failure leaves us unconfigured
            log.error(f"configure failed: {describe_error(error)}")
            self._release_engine()
            return TransitionCallbackReturn.FAILURE
        spec = self._engine.spec
        joints = self._engine.trajectory_joints
        log.info(f"configured: {spec.model} on {spec.device} ({spec.precision}, "
                 f"{spec.backend}), {spec.num_views} cameras, chunk "
                 f"{spec.action_horizon}x{spec.action_dim}, trajectory "
                 f"{'off' if joints is None else f'for {len(joints)} joints'}")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        fault = self._fault
        if fault is not None and fault.context_lost:
            self.get_logger().error(f"not activating: {fault.reason}; {fault.advice}")
            return TransitionCallbackReturn.FAILURE
        self._clear_fault()
        self._calibrate_fp8_on_live_observation(self._engine)
        rate_hz = parameter_value(self, "rate_hz")
        _freeze_heap()
        if self._switch_interval_before is None:
            self._switch_interval_before = sys.getswitchinterval()
        sys.setswitchinterval(parameter_value(self, "gil_switch_interval_ms") / 1e3)
        self.gc_pauses.start()
        self._active = True
        self._next_tick_ns = None
        self._timer = self.create_timer(1.0 / rate_hz, self._on_tick,
                                        callback_group=self._tick_group)
        self.get_logger().info(f"active: inference at {rate_hz:g} Hz")
        return super().on_activate(state)

    def _calibrate_fp8_on_live_observation(self, engine: _Engine) -> None:
        """FP8 with provisional scales (measured by configure's warm-up on a blank frame):
        measure them on the newest observation, as a tick would take it, and cache them
        (fp8_calibrate_on_activation). Never fails the activation. Without a complete
        observation or a prompt yet, the first tick that has both measures them instead of
        inferring (_calibrate_in_tick); a failed calibration keeps the provisional scales
        (the previous ones are put back) until the next activation."""
        self._fp8_calibration_pending = False
        if (engine.spec.precision != "fp8" or not parameter_value(self, "fp8_calibrate_on_activation")
                or engine.policy.calibration_source != "provisional"):
            return
        log = self.get_logger()
        try:
            images, state = model_inputs(engine, self._observation(engine, wait_s=CALIBRATION_INPUT_WAIT_S))
            prompt = self._calibration_prompt()
        except SkippedTick as skipped:
            self._fp8_calibration_pending = True
            log.warning(f"FP8 scales still provisional (blank warm-up frame): {skipped}; the first tick "
                        "with every input and a prompt measures them instead of inferring")
            return
        try:
            self._call_engine(engine, self._calibrate, engine, images, state, prompt)
        except Exception as error:  # noqa: BLE001 - activation goes on with the provisional scales
            reason = str(error) if isinstance(error, SkippedTick) else describe_error(error)
            log.warning(f"FP8 not calibrated on the live observation ({reason}): the scales stay "
                        "provisional (blank warm-up frame) until the next activation")

    def _calibration_prompt(self) -> str:
        if not self._prompt.strip():
            raise SkippedTick("empty prompt", "set the 'prompt' parameter or publish on ~/prompt")
        return self._prompt

    def _calibrate(self, engine: _Engine, images, state, prompt: str) -> None:
        """On the engine thread: measure and cache the FP8 scales on one observation."""
        started = time.monotonic()
        engine.policy.calibrate([{"images": images, "state": state, "prompt": prompt}])
        self.get_logger().info(f"FP8 calibrated on the live observation in {time.monotonic() - started:.2f} s; "
                               f"cached in {engine.policy.calibration_file}")

    def _calibrate_in_tick(self, engine: _Engine, images, state) -> None:
        """On the engine thread, a tick after an activation that found no usable observation:
        calibrate instead of inferring (nothing is published for this tick), then raise the
        SkippedTick that counts it. A failed calibration is not retried until the next
        activation."""
        prompt = self._calibration_prompt()
        self._fp8_calibration_pending = False
        try:
            self._calibrate(engine, images, state, prompt)
        except Exception as error:  # noqa: BLE001 - the node goes on with the provisional scales
            self.get_logger().warning(f"FP8 not calibrated on the live observation ({describe_error(error)}): "
                                      "the scales stay provisional until the next activation")
        raise SkippedTick("fp8 calibration", "this tick measured the FP8 scales instead of inferring")

    def _observation(self, engine: _Engine, wait_s: float = 0.0):
        """The newest synchronized observation, or the SkippedTick saying why there is
        none; while a stream has sent nothing yet, poll for up to `wait_s` first."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return engine.buffer.snapshot(
                    self.get_clock().now().nanoseconds,
                    parameter_value(self, "max_observation_age"),
                    parameter_value(self, "max_observation_skew"))
            except SkippedTick as skipped:
                if not skipped.reason.startswith("missing ") or time.monotonic() >= deadline:
                    raise
            time.sleep(0.02)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_and_hold()
        self.get_logger().info("inactive: inference stopped")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_engine()
        self._clear_fault()
        self.get_logger().info("cleaned up: engine released")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self._active:
            self._stop_and_hold()
            super().on_deactivate(state)
        self._release_engine()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = False
        self._leave_realtime()
        self._destroy_timer()
        self._release_engine()
        return TransitionCallbackReturn.SUCCESS

    def _build_engine(self) -> _Engine:
        """Load + warm the engine and check the parameters against its spec."""
        import flashrt_core

        values = {p.name: parameter_value(self, p.name) for p in params.POLICY_PARAMETERS}
        camera_topics = values["camera_topics"]
        joint_names = values["joint_names"]
        if not values["checkpoint"]:
            raise ConfigurationError("parameter 'checkpoint' is empty")
        if not camera_topics:
            raise ConfigurationError("parameter 'camera_topics' is empty")
        if not joint_names:
            raise ConfigurationError(
                "parameter 'joint_names' is empty (name the joints that form the state)")
        log = self.get_logger()
        log.info(f"loading {values['model']} checkpoint {values['checkpoint']} "
                 f"(device {values['device']}, precision {values['precision']}, "
                 f"{len(camera_topics)} cameras)...")
        started = time.monotonic()
        policy = flashrt_core.load_policy(
            values["checkpoint"], model=values["model"], device=values["device"],
            precision=values["precision"], num_views=len(camera_topics),
            num_steps=values["num_steps"] or None)
        try:
            spec = policy.spec
            log.info(f"loaded in {time.monotonic() - started:.1f} s; warming up...")
            engine = self._engine_for(policy, spec, values)
            started = time.monotonic()
            height, width = spec.image_size
            policy.predict(images=[np.zeros((height, width, 3), np.uint8)] * spec.num_views,
                           state=np.zeros(spec.state_dim, np.float32),
                           prompt=values["prompt"] or "warm up", seed=0)
            log.info(f"warm-up done in {time.monotonic() - started:.2f} s")
            return engine
        except BaseException:
            policy.close()
            raise

    def _engine_for(self, policy, spec, values) -> _Engine:
        joint_names = values["joint_names"]
        if len(joint_names) != spec.state_dim:
            raise ConfigurationError(
                f"joint_names has {len(joint_names)} joints but the checkpoint's state "
                f"has {spec.state_dim} values")
        action_names = values["action_names"]
        if not action_names:
            action_names = (list(joint_names) if len(joint_names) == spec.action_dim
                            else [f"a{i}" for i in range(spec.action_dim)])
        if len(action_names) != spec.action_dim:
            raise ConfigurationError(
                f"action_names has {len(action_names)} names but the checkpoint's actions "
                f"have {spec.action_dim} values")
        lower, upper = values["joint_limits_lower"], values["joint_limits_upper"]
        for name, limits in (("joint_limits_lower", lower), ("joint_limits_upper", upper)):
            if limits and len(limits) != len(joint_names):
                raise ConfigurationError(
                    f"{name} has {len(limits)} values for {len(joint_names)} joint_names")
        joint_lower = np.array(lower or [-np.inf] * len(joint_names))
        joint_upper = np.array(upper or [np.inf] * len(joint_names))
        if np.any(joint_lower > joint_upper):
            raise ConfigurationError("joint_limits_lower is above joint_limits_upper")
        # Actions named like a joint are that joint's position command: they get its
        # limits and go to the trajectory. Other action dimensions pass unclamped.
        columns = {name: i for i, name in enumerate(action_names)}
        mapped = [j for j, name in enumerate(joint_names) if name in columns]
        action_lower = np.full(spec.action_dim, -np.inf)
        action_upper = np.full(spec.action_dim, np.inf)
        for j in mapped:
            action_lower[columns[joint_names[j]]] = joint_lower[j]
            action_upper[columns[joint_names[j]]] = joint_upper[j]
        trajectory = values["publish_trajectory"]
        if trajectory and not mapped:
            raise ConfigurationError(
                f"publish_trajectory needs joint_names among the action names "
                f"({', '.join(action_names)}); set action_names, or publish_trajectory:=false")
        streams = list(values["camera_topics"]) + [values["joint_state_topic"]]
        return _Engine(
            policy=policy, spec=spec, camera_topics=list(values["camera_topics"]),
            joint_state_topic=values["joint_state_topic"], joint_names=list(joint_names),
            action_names=list(action_names), action_lower=action_lower,
            action_upper=action_upper,
            trajectory_joints=[joint_names[j] for j in mapped] if trajectory else None,
            trajectory_columns=[columns[joint_names[j]] for j in mapped] if trajectory else None,
            trajectory_lower=joint_lower[mapped] if trajectory else None,
            trajectory_upper=joint_upper[mapped] if trajectory else None,
            trajectory_velocities=values["trajectory_velocities"],
            buffer=ObservationBuffer(streams),
            failures=EngineFailures())

    def _create_interfaces(self, engine: _Engine) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from sensor_msgs.msg import CompressedImage, Image, JointState
        from std_msgs.msg import String
        from trajectory_msgs.msg import JointTrajectory

        from flashrt_ros.msg import ActionChunk
        from flashrt_ros.srv import Predict

        # The callbacks hold the buffer, not the engine: an executor may keep a destroyed
        # subscription (and its callback) referenced until it next wakes up.
        buffer = engine.buffer
        image_size = tuple(engine.spec.image_size)

        def store(stream):
            return lambda msg: buffer.put(stream, conversions.stamp_to_ns(msg.header.stamp), msg)

        def store_frame(topic):
            return lambda msg: buffer.put(topic, conversions.stamp_to_ns(msg.header.stamp),
                                          camera_frame(msg, image_size))

        for compressed in sorted({conversions.is_compressed_topic(topic) for topic in engine.camera_topics}):
            warm_up_camera_conversion(compressed, image_size)
        for topic in engine.camera_topics:
            msg_type = CompressedImage if conversions.is_compressed_topic(topic) else Image
            engine.subscriptions.append(self.create_subscription(
                msg_type, topic, store_frame(topic), CAMERA_QOS, callback_group=self._input_group))
        engine.subscriptions.append(self.create_subscription(
            JointState, engine.joint_state_topic, store(engine.joint_state_topic),
            qos_profile_sensor_data, callback_group=self._input_group))
        engine.subscriptions.append(self.create_subscription(
            String, "~/prompt", self._on_prompt, PROMPT_QOS,
            callback_group=self._input_group))
        engine.service = self.create_service(
            Predict, "~/predict", self._on_predict, callback_group=self._service_group)
        engine.chunk_publisher = self.create_lifecycle_publisher(
            ActionChunk, "~/action_chunk", OUTPUT_QOS)
        if engine.trajectory_joints is not None:
            engine.trajectory_publisher = self.create_lifecycle_publisher(
                JointTrajectory, "~/joint_trajectory", OUTPUT_QOS)
        # Diagnostics report while configured (also inactive), on a steady clock so
        # they keep coming when sim time stalls.
        engine.diagnostics_publisher = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        engine.diagnostics_timer = self.create_timer(
            parameter_value(self, "diagnostics_period"), self._publish_diagnostics,
            callback_group=self._diagnostics_group, clock=Clock(clock_type=ClockType.STEADY_TIME))

    def _stop_and_hold(self) -> None:
        """Stop ticking, let a running inference finish, then publish the hold."""
        self._active = False
        self._destroy_timer()
        self._leave_realtime()
        got_engine = self._engine_lock.acquire(timeout=ENGINE_WAIT_S)
        if not got_engine:
            self.get_logger().error(
                f"inference still running after {ENGINE_WAIT_S:g} s; publishing the hold anyway")
        try:
            # Behind every chunk already handed to the publisher thread (dropped: the
            # node is no longer active), so the hold is the last trajectory sent.
            hold = self._publisher_thread.submit(self._publish_hold)
            try:
                hold.result(timeout=ENGINE_WAIT_S)
            except FutureTimeout:
                self.get_logger().error(
                    f"publisher thread stuck for {ENGINE_WAIT_S:g} s: the hold may not have been published")
        finally:
            if got_engine:
                self._release_engine_lock()

    def _leave_realtime(self) -> None:
        """Undo what activation set up for the realtime loop: the GC monitor and the
        thread switch interval (process-wide; other code in the process keeps CPython's)."""
        self.gc_pauses.stop()
        if self._switch_interval_before is not None:
            sys.setswitchinterval(self._switch_interval_before)
            self._switch_interval_before = None

    def _publish_hold(self) -> None:
        """Hold the robot where it is: a one-point trajectory to the newest measured
        joint positions (clamped), stamped 0 ("start now"), reached after one
        action_dt at zero velocity. That is what joint_trajectory_controller itself does
        on cancel, and it replaces whatever is left of the last chunk."""
        engine = self._engine
        if engine is None or engine.trajectory_publisher is None:
            return
        sample = engine.buffer.latest(engine.joint_state_topic)
        if sample is None:
            self.get_logger().warning("no joint state received: no hold published")
            return
        try:
            positions = conversions.joint_positions(sample.message, engine.trajectory_joints)
        except ConversionError as error:
            self.get_logger().warning(f"newest joint state unusable ({error}): no hold published")
            return
        positions = np.clip(positions, engine.trajectory_lower, engine.trajectory_upper)
        from std_msgs.msg import Header

        hold = conversions.build_joint_trajectory(
            positions[None, :], header=Header(frame_id=parameter_value(self, "frame_id")),
            joint_names=engine.trajectory_joints, step_dt=parameter_value(self, "action_dt"),
            with_velocities=True)
        engine.trajectory_publisher.publish(hold)
        # The hold is the last command: make sure subscribers have it before the
        # publisher may be destroyed (cleanup, shutdown).
        if not engine.trajectory_publisher.wait_for_all_acked(Duration(seconds=HOLD_ACK_WAIT_S)):
            self.get_logger().warning(
                f"hold not acknowledged by every subscriber within {HOLD_ACK_WAIT_S:g} s")
        self.get_logger().info("hold published at the current joint positions")

    def _destroy_timer(self) -> None:
        if self._timer is not None:
            self.destroy_timer(self._timer)
            self._timer = None

    def _release_engine(self) -> None:
        engine, self._engine = self._engine, None
        if engine is None:
            return
        for subscription in engine.subscriptions:
            self.destroy_subscription(subscription)
        if engine.service is not None:
            self.destroy_service(engine.service)
        with self._diagnostics_lock:
            if engine.diagnostics_timer is not None:
                self.destroy_timer(engine.diagnostics_timer)
            if engine.diagnostics_publisher is not None:
                self.destroy_publisher(engine.diagnostics_publisher)
        for publisher in (engine.chunk_publisher, engine.trajectory_publisher):
            if publisher is not None:
                self.destroy_lifecycle_publisher(publisher)
        with self._engine_lock:
            try:
                self._on_engine_thread(engine.policy.close)
            except Exception as error:  # noqa: BLE001 - e.g. a dead CUDA context; nothing to free
                self.get_logger().error(f"closing the engine failed: {describe_error(error)}")
        del engine
        gc.unfreeze()
        gc.collect()

    # ------------------------------------------------------------------ inputs

    def _on_prompt(self, msg) -> None:
        self._prompt = msg.data
        self.get_logger().info(f"prompt: {msg.data!r}")

    # ------------------------------------------------------------------ inference

    def _on_tick(self) -> None:
        """Timer callback: start a tick, or (engine busy) leave it waiting for the engine;
        a second one while one waits is skipped as busy (see the module docstring)."""
        self._count_dropped_periods()
        with self._tick_mutex:
            got_engine = self._engine_lock.acquire(blocking=False)
            if not got_engine and not self._tick_waiting:
                self._tick_waiting, self._tick_waiting_since = True, time.monotonic()
                return
        if not got_engine:
            self._record_skip(SkippedTick("busy", "previous inference still running, a tick already waiting"))
            return
        self._start_tick()

    def _count_dropped_periods(self) -> None:
        """Count the periods the timer dropped before this tick. rcl keeps the timer's
        calls on a fixed grid and, when a call comes more than a period late, moves the
        next one past every period already missed, which then never fires. The grid
        point after this call is read from the timer, so the count does not depend on
        how late the callbacks ran (on the node clock: sim time included)."""
        timer = self._timer
        until = None if timer is None else timer.time_until_next_call()
        if until is None:
            return
        next_ns = self.get_clock().now().nanoseconds + until
        previous, self._next_tick_ns = self._next_tick_ns, next_ns
        if previous is None:
            return
        dropped = round((next_ns - previous) / timer.timer_period_ns) - 1
        for _ in range(dropped):
            self._record_skip(SkippedTick("executor stall", f"{dropped} period(s) of the node clock passed without "
                                          "a tick: the executor was held up (or, in sim time, the clock jumped)"))

    def _start_tick(self) -> None:
        """With the engine lock held: take the observation and hand it to the engine
        thread, which releases the lock when done. Returns at once, so no executor thread
        waits on inference (see the module docstring)."""
        try:
            engine = self._engine
            if engine is None or not self._active or self._fault is not None:
                self._release_engine_lock()
                return
            self._engine_thread.submit(self._run_tick, engine, self._observation(engine))
        except SkippedTick as skipped:
            self._release_engine_lock()
            self._record_skip(skipped)
        except BaseException:
            self._release_engine_lock()
            raise

    def _release_engine_lock(self) -> None:
        """Release the engine, or hand it straight to a tick that waits for it."""
        with self._tick_mutex:
            waiting, self._tick_waiting = self._tick_waiting, False
            if not waiting:
                self._engine_lock.release()
                return
        self.health.record_late_start(time.monotonic() - self._tick_waiting_since)
        self._start_tick()

    def _run_tick(self, engine: _Engine, observation) -> None:
        """On the engine thread: inference and publishing for one tick."""
        try:
            images, state = model_inputs(engine, observation)
            if self._fp8_calibration_pending:
                self._calibrate_in_tick(engine, images, state)
            actions, inference_s = self._infer(engine, images, state, self._prompt)
            if self._active:
                self._chunks_handed += 1
                self._publisher_thread.submit(self._publish_chunk, engine, actions, observation.stamp_ns,
                                              inference_s, observation.age_s, self._chunks_handed)
        except SkippedTick as skipped:
            self._record_skip(skipped)
        except Exception as error:  # noqa: BLE001 - nothing else sees this thread's errors
            self.get_logger().error(f"tick failed: {describe_error(error)}")
        finally:
            self._release_engine_lock()

    def _infer(self, engine: _Engine, images, state, prompt: str):
        """Run the engine on converted images and the state vector; returns (clamped
        actions, seconds) or raises SkippedTick. Runs on the engine thread; the caller
        holds the engine lock."""
        from flashrt_core.errors import PromptError

        seed = parameter_value(self, "noise_seed")
        started = time.monotonic()
        try:
            result = engine.policy.predict(images=images, state=state, prompt=prompt,
                                           seed=None if seed < 0 else seed)
        except PromptError as error:
            reason = "bad prompt" if prompt.strip() else "empty prompt"
            raise SkippedTick(reason, str(error)) from None
        except Exception as error:  # noqa: BLE001 - an engine failure must not kill the node
            self._engine_failed(engine, error)
            raise SkippedTick("inference error", describe_error(error)) from None
        engine.failures.reset()
        inference_s = time.monotonic() - started
        self.health.record_phases(result.timing)
        actions = np.asarray(result.actions, dtype=np.float32)
        if not np.isfinite(actions).all():
            bad = int(np.size(actions) - np.isfinite(actions).sum())
            raise SkippedTick("non-finite actions", f"{bad} of {actions.size} values")
        return np.clip(actions, engine.action_lower, engine.action_upper), inference_s

    def _engine_failed(self, engine: _Engine, error: Exception) -> None:
        """Count a failed engine call (engine thread); stop the engine on a fault."""
        fault = engine.failures.failed(
            error, engine.spec.device, parameter_value(self, "max_consecutive_engine_failures"))
        if fault is None or self._fault is not None:
            return
        self._fault = fault
        self.health.record_fault(fault.reason, fault.advice)
        self.get_logger().error(f"engine stopped: {fault.reason}; {fault.advice}")
        # Deactivate on the executor thread, through a one-shot timer created here: the
        # same under every executor (rclpy's EventsExecutor takes no guard conditions).
        self._fault_timer = self.create_timer(0.0, self._deactivate_after_fault)

    def _deactivate_after_fault(self) -> None:
        """One-shot timer callback (executor thread): active -> inactive after a fault,
        the same transition as a requested deactivate (so the hold is published)."""
        timer, self._fault_timer = self._fault_timer, None
        if timer is not None:
            self.destroy_timer(timer)
        if self._fault is None or self._state_machine.current_state[1] != "active":
            return
        self.get_logger().error("deactivating after the engine fault")
        try:
            self.trigger_deactivate()
        except Exception as error:  # noqa: BLE001 - a transition requested meanwhile won
            self.get_logger().error(f"deactivating failed: {describe_error(error)}")

    def _clear_fault(self) -> None:
        self._fault = None
        self.health.clear_fault()
        if self._engine is not None:
            self._engine.failures.reset()

    def _header(self, stamp_ns: int):
        from std_msgs.msg import Header

        return Header(stamp=Time(nanoseconds=stamp_ns).to_msg(),
                      frame_id=parameter_value(self, "frame_id"))

    def _chunk(self, engine: _Engine, actions, stamp_ns, inference_s, age_s, sequence):
        return conversions.build_action_chunk(
            actions, header=self._header(stamp_ns), model=engine.spec.model,
            names=engine.action_names, step_dt=parameter_value(self, "action_dt"),
            sequence=sequence, inference_time=inference_s, observation_age=age_s)

    def _publish_chunk(self, engine: _Engine, actions, stamp_ns, inference_s, age_s, number: int) -> None:
        """On the publisher thread: one tick's chunk, unless the node left active (the
        hold is queued behind this) or released that engine since the tick ran, or a
        newer chunk is already waiting: a publisher that fell behind sends the newest
        chunk, never a backlog of stale ones (each dropped one is a skipped tick)."""
        if not self._active or self._engine is not engine:
            return
        if number != self._chunks_handed:
            self._record_skip(SkippedTick("publish lag", "a newer chunk was ready before this one went out"))
            return
        try:
            self._publish(engine, actions, stamp_ns, inference_s, age_s)
        except Exception as error:  # noqa: BLE001 - nothing else sees this thread's errors
            self.get_logger().error(f"publishing failed: {describe_error(error)}")

    def _publish(self, engine: _Engine, actions, stamp_ns, inference_s, age_s) -> None:
        started = time.monotonic()
        engine.chunk_publisher.publish(
            self._chunk(engine, actions, stamp_ns, inference_s, age_s, self._sequence))
        self._sequence += 1
        if engine.trajectory_publisher is not None:
            engine.trajectory_publisher.publish(conversions.build_joint_trajectory(
                actions[:, engine.trajectory_columns], header=self._header(stamp_ns),
                joint_names=engine.trajectory_joints, step_dt=parameter_value(self, "action_dt"),
                with_velocities=engine.trajectory_velocities))
        published_ns = self.get_clock().now().nanoseconds
        self.health.record_phases({"publish": time.monotonic() - started})
        self.health.record_published(inference_s, (published_ns - stamp_ns) * 1e-9)

    def _record_skip(self, skipped: SkippedTick) -> None:
        self.health.record_skipped(skipped.reason, skipped.detail)
        now = time.monotonic()
        if now - self._last_skip_log.get(skipped.reason, -np.inf) >= SKIP_LOG_PERIOD_S:
            self._last_skip_log[skipped.reason] = now
            self.get_logger().warning(f"tick skipped: {skipped}")

    # ------------------------------------------------------------------ ~/predict

    def _on_predict(self, request, response):
        engine, fault = self._engine, self._fault
        if engine is None or fault is not None:
            response.success = False
            response.message = ("node is not configured" if engine is None else
                                f"engine stopped: {fault.reason}; {fault.advice}")
            return response
        try:
            cameras = self._request_cameras(engine, request)
            images = [sample.message.image(topic)
                      for topic, sample in zip(engine.camera_topics, cameras)]
            joint_message = request.joint_state
            if not joint_message.name:
                joint_message = self._newest(engine, engine.joint_state_topic).message
            state = joint_state(engine, joint_message)
            prompt = request.prompt or self._prompt
            actions, inference_s = self._call_engine(engine, self._infer, engine, images, state, prompt)
        except SkippedTick as failed:
            response.success = False
            response.message = str(failed)
            return response
        now_ns = self.get_clock().now().nanoseconds
        stamp_ns = max([s.stamp_ns for s in cameras] + [conversions.stamp_to_ns(joint_message.header.stamp)])
        stamp_ns = stamp_ns or now_ns  # unstamped request: observation time is now
        response.chunk = self._chunk(engine, actions, stamp_ns, inference_s,
                                     max(0.0, (now_ns - stamp_ns) * 1e-9), sequence=0)
        response.success = True
        return response

    def _request_cameras(self, engine: _Engine, request) -> list[Sample]:
        """One sample per camera: the request's images (converted here), else the
        newest frames the node received."""
        if request.images and request.compressed_images:
            raise SkippedTick("bad request", "give images or compressed_images, not both")
        given = list(request.images) or list(request.compressed_images)
        if not given:
            return [self._newest(engine, topic) for topic in engine.camera_topics]
        if len(given) != len(engine.camera_topics):
            raise SkippedTick(
                "bad request", f"expected {len(engine.camera_topics)} images (one per "
                f"camera_topics entry), got {len(given)}")
        return [Sample(conversions.stamp_to_ns(msg.header.stamp), camera_frame(msg, engine.spec.image_size))
                for msg in given]

    @staticmethod
    def _newest(engine: _Engine, stream: str) -> Sample:
        sample = engine.buffer.latest(stream)
        if sample is None:
            raise SkippedTick(f"missing {stream}", "no message received yet")
        return sample

    # ------------------------------------------------------------------ diagnostics

    def _publish_diagnostics(self) -> None:
        with self._diagnostics_lock:
            engine = self._engine
            if engine is not None:
                self._publish_diagnostics_of(engine)

    def _publish_diagnostics_of(self, engine: _Engine) -> None:
        from diagnostic_msgs.msg import DiagnosticArray

        spec = engine.spec
        values = {"model": spec.model, "device": spec.device, "precision": spec.precision,
                  "backend": spec.backend, "prompt": self._prompt}
        try:
            values.update(gpu_memory(spec.device))
            values.update(engine.gpu_free_at_configure)
        except Exception as error:  # noqa: BLE001 - diagnostics must not take the node down
            values["gpu memory"] = f"unavailable: {describe_error(error)}"
        values.update(self.gc_pauses.diagnostic_values())
        report = self.health.report(active=self._active, engine=values)
        array = DiagnosticArray()
        array.header.stamp = self.get_clock().now().to_msg()
        array.status = [diagnostic_status(
            report, name=f"{self.get_fully_qualified_name()}: policy",
            hardware_id=spec.device)]
        engine.diagnostics_publisher.publish(array)


def main(args: list[str] | None = None) -> int:
    """Spin the node unconfigured (launch or a lifecycle manager drives it), e.g.
    `flashrt-ros node --ros-args --params-file p.yaml`, which launch files run.
    `args`: the arguments after the command (default: sys.argv[1:]), ROS arguments
    included. Returns the process exit code."""
    import sys

    from flashrt_ros import launcher

    argv = sys.argv[1:] if args is None else list(args)
    return launcher.serve(["flashrt-ros", *argv])


if __name__ == "__main__":
    raise SystemExit(main())
