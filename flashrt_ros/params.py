"""Every parameter of the policy node, declared once.

The table is plain Python (no rclpy import) so the `flashrt-ros` command can
validate a params YAML (unknown key, wrong type, out of range) before any ROS
machinery starts; the node turns each entry into a declared ROS parameter with a
ParameterDescriptor (description, range, read_only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

# Which rclpy executor spins the node (process-wide, not a node parameter): set by
# `flashrt-ros run / demo --executor`, read from the environment by the launcher, so
# launch files pass it on too. "single-threaded": rclpy's SingleThreadedExecutor (the
# default). "events": rclpy.experimental.EventsExecutor, which dispatches callbacks from
# C++ (~40% less executor CPU per callback in a CPU micro-benchmark; experimental in
# Jazzy).
EXECUTOR_ENV = "FLASHRT_EXECUTOR"
EXECUTORS = ("single-threaded", "events")


def executor_kind() -> str:
    """The executor named by $FLASHRT_EXECUTOR (unset or empty: the first of EXECUTORS)."""
    kind = os.environ.get(EXECUTOR_ENV, "") or EXECUTORS[0]
    if kind not in EXECUTORS:
        raise ValueError(f"{EXECUTOR_ENV}={kind!r}: expected one of {', '.join(EXECUTORS)}")
    return kind

STRING, INT, FLOAT, BOOL, STRING_ARRAY, FLOAT_ARRAY = (
    "string", "int", "float", "bool", "string_array", "float_array")


@dataclass(frozen=True)
class Param:
    name: str
    type: str                    # one of the type constants above
    default: Any
    description: str
    min: float | None = None     # inclusive range for int / float
    max: float | None = None
    choices: tuple[str, ...] | None = None  # allowed values for a string
    # read_only: takes effect only at configure (the engine is built from it).
    read_only: bool = False


POLICY_NODE_NAME = "flashrt_policy"
SUPPORTED_POLICY_MODELS = ("pi0", "pi05")

POLICY_PARAMETERS: tuple[Param, ...] = (
    Param("model", STRING, "pi05",
          "Policy family to run. Must match the checkpoint.",
          choices=SUPPORTED_POLICY_MODELS, read_only=True),
    Param("checkpoint", STRING, "",
          "Checkpoint directory (openpi/LeRobot model.safetensors + config.json + norm stats).",
          read_only=True),
    Param("device", STRING, "auto",
          "'auto' (first CUDA GPU, else CPU), 'cpu', 'cuda' or 'cuda:N'.", read_only=True),
    Param("precision", STRING, "auto",
          "'auto' (bf16 on GPU, fp32 on CPU), 'fp32', 'bf16' or 'fp8'.",
          choices=("auto", "fp32", "bf16", "fp8"), read_only=True),
    Param("fp8_calibrate_on_activation", BOOL, True,
          "FP8 only. When the activation scales are provisional (no cached calibration for "
          "this checkpoint and camera count, so configure's warm-up measured them on a blank "
          "frame), activation measures them on the live observation (cameras, joint state, "
          "prompt) before the first tick and caches them. Costs about one eager forward (a "
          "few hundred ms at full size on a GPU), plus up to 1 s waiting for a stream that "
          "has sent nothing yet. Without a usable observation or a prompt then, the first "
          "tick that has them measures the scales instead of inferring (a skipped tick, "
          "'fp8 calibration'); a failed calibration keeps them provisional until the next "
          "activation."),
    Param("num_steps", INT, 0,
          "Flow-matching integration steps; 0 uses the checkpoint's default (10).",
          min=0, max=100, read_only=True),
    Param("noise_seed", INT, -1,
          "Seed of the initial flow noise. -1: fresh noise every tick; >=0: the same "
          "noise every tick (bit-identical actions for identical observations).",
          min=-1, max=2**31 - 1),
    Param("rate_hz", FLOAT, 20.0,
          "Inference ticks per second while active.", min=0.1, max=1000.0),
    Param("camera_topics", STRING_ARRAY, ["camera/image_raw"],
          "Camera topics in the model's view order (base first, then wrists). A topic "
          "ending in '/compressed' is read as sensor_msgs/CompressedImage.", read_only=True),
    Param("joint_state_topic", STRING, "joint_states",
          "sensor_msgs/JointState topic the robot state is read from.", read_only=True),
    Param("joint_names", STRING_ARRAY, [],
          "Joints that form the state vector, in the model's order. Extra joints in the "
          "message are ignored; a missing one skips the tick.", read_only=True),
    Param("action_names", STRING_ARRAY, [],
          "Names of the action dimensions in ActionChunk. Empty: joint_names when they "
          "have the same length as the action, else a0..aN.", read_only=True),
    Param("prompt", STRING, "",
          "Task instruction. Also settable at runtime on the ~/prompt topic."),
    Param("max_observation_age", FLOAT, 0.5,
          "A tick is skipped when any input stream's newest sample is older than this [s].",
          min=0.0, max=3600.0),
    Param("max_observation_skew", FLOAT, 0.2,
          "A tick is skipped when input streams' newest samples are further apart than this [s].",
          min=0.0, max=3600.0),
    Param("action_dt", FLOAT, 0.05,
          "Time between consecutive action steps in a chunk [s] (the control period "
          "the policy was trained at).", min=1e-4, max=10.0),
    Param("joint_limits_lower", FLOAT_ARRAY, [],
          "Per-joint lower clamp for published actions (same order as joint_names); "
          "empty: no clamp.", read_only=True),
    Param("joint_limits_upper", FLOAT_ARRAY, [],
          "Per-joint upper clamp for published actions; empty: no clamp.", read_only=True),
    Param("publish_trajectory", BOOL, True,
          "Also publish trajectory_msgs/JointTrajectory on ~/joint_trajectory for "
          "joint_trajectory_controller (actions are taken as joint positions).", read_only=True),
    Param("trajectory_velocities", BOOL, False,
          "Fill JointTrajectory velocities by finite differences of the chunk.", read_only=True),
    Param("frame_id", STRING, "",
          "header.frame_id of published ActionChunk / JointTrajectory messages."),
    Param("max_consecutive_engine_failures", INT, 3,
          "After this many failed engine calls in a row (each skips its tick) the node "
          "deactivates itself, publishing the hold. A dead CUDA context deactivates it "
          "at the first failure.", min=1, max=1000),
    Param("gil_switch_interval_ms", FLOAT, 1.0,
          "While active: CPython's thread switch interval (sys.setswitchinterval). When "
          "the GPU work of a tick ends, the inference thread waits up to this long for "
          "the GIL held by another thread (camera conversion, executor); CPython's 5 ms "
          "default is a quarter of a 50 Hz period. Restored on deactivate.",
          min=0.05, max=10.0),
    Param("diagnostics_period", FLOAT, 1.0,
          "Seconds between /diagnostics messages.", min=0.05, max=60.0, read_only=True),
)

POLICY_PARAMETERS_BY_NAME = {p.name: p for p in POLICY_PARAMETERS}


class ParameterValueError(ValueError):
    """A parameter value has the wrong type or is out of range (message names it)."""


def check_value(param: Param, value: Any) -> Any:
    """Return `value` coerced to the parameter's type, or raise ParameterValueError."""
    where = f"parameter '{param.name}'"
    if param.type == BOOL:
        if not isinstance(value, bool):
            raise ParameterValueError(f"{where} must be true or false, got {value!r}")
    elif param.type == INT:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParameterValueError(f"{where} must be an integer, got {value!r}")
    elif param.type == FLOAT:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParameterValueError(f"{where} must be a number, got {value!r}")
        value = float(value)
    elif param.type == STRING:
        if not isinstance(value, str):
            raise ParameterValueError(f"{where} must be a string, got {value!r}")
    elif param.type == STRING_ARRAY:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ParameterValueError(f"{where} must be a list of strings, got {value!r}")
        value = list(value)
    elif param.type == FLOAT_ARRAY:
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ParameterValueError(f"{where} must be a list of numbers, got {value!r}")
        value = [float(v) for v in value]
    if param.min is not None and value < param.min:
        raise ParameterValueError(f"{where} must be >= {param.min}, got {value!r}")
    if param.max is not None and value > param.max:
        raise ParameterValueError(f"{where} must be <= {param.max}, got {value!r}")
    if param.choices is not None and value not in param.choices:
        raise ParameterValueError(
            f"{where} must be one of {', '.join(param.choices)}; got {value!r}")
    return value


def validate_overrides(values: dict[str, Any], table=POLICY_PARAMETERS_BY_NAME) -> dict[str, Any]:
    """Check a {name: value} dict against `table`; return the coerced values.

    Unknown names are an error (a typo in a YAML must not be silently ignored).
    """
    out = {}
    for name, value in values.items():
        if name not in table:
            known = ", ".join(sorted(table))
            raise ParameterValueError(f"unknown parameter '{name}' (known: {known})")
        out[name] = check_value(table[name], value)
    return out
