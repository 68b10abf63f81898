"""ROS messages <-> numpy for the policy node (no cv_bridge: numpy + OpenCV imdecode).

Inputs: sensor_msgs/Image and CompressedImage become HxWx3 uint8 RGB arrays (what
`Policy.predict` takes); sensor_msgs/JointState becomes the state vector in the
configured joint order. Outputs: flashrt_ros/ActionChunk and
trajectory_msgs/JointTrajectory built from an action array.

Every malformed input raises ConversionError with a message that says what is wrong;
the node turns it into a skipped tick. Message classes are imported inside the
builders so the decoding functions stay usable on any object with the same fields.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Raw encodings the policy node accepts: channels per pixel, and the index order that
# turns the pixel into R, G, B. All are 8-bit, so `is_bigendian` does not apply.
_RAW_ENCODINGS = {
    "rgb8": (3, (0, 1, 2)),
    "bgr8": (3, (2, 1, 0)),
    "rgba8": (4, (0, 1, 2)),
    "bgra8": (4, (2, 1, 0)),
    "mono8": (1, (0, 0, 0)),
}
SUPPORTED_RAW_ENCODINGS = tuple(_RAW_ENCODINGS)
SUPPORTED_COMPRESSED_FORMATS = ("jpeg", "png")


class ConversionError(ValueError):
    """A message cannot be turned into model input (the text says why)."""


def stamp_to_seconds(stamp) -> float:
    """builtin_interfaces/Time -> float seconds."""
    return stamp.sec + stamp.nanosec * 1e-9


def stamp_to_ns(stamp) -> int:
    """builtin_interfaces/Time -> integer nanoseconds (exact)."""
    return stamp.sec * 1_000_000_000 + stamp.nanosec


def image_to_rgb(msg) -> np.ndarray:
    """sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8) -> HxWx3 uint8 RGB.

    Rows are read with the message's `step` (row stride in bytes), so padded rows work.
    """
    encoding = msg.encoding.strip().lower()
    if encoding not in _RAW_ENCODINGS:
        raise ConversionError(
            f"unsupported encoding '{msg.encoding}' (supported: "
            f"{', '.join(SUPPORTED_RAW_ENCODINGS)}, or a '/compressed' topic)")
    channels, rgb_order = _RAW_ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ConversionError(f"empty image ({width}x{height})")
    row_bytes = width * channels
    if step < row_bytes:
        raise ConversionError(
            f"step {step} is smaller than width*channels = {row_bytes} for {encoding}")
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size < height * step:
        raise ConversionError(
            f"truncated data: {data.size} bytes for a {width}x{height} {encoding} image "
            f"with step {step} (needs {height * step})")
    rows = data[:height * step].reshape(height, step)[:, :row_bytes]
    pixels = rows.reshape(height, width, channels)
    return np.ascontiguousarray(pixels[:, :, list(rgb_order)])


def compressed_image_to_rgb(msg) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg or png, colour or grey) -> HxWx3 uint8 RGB."""
    fmt = msg.format.strip().lower()
    if "compresseddepth" in fmt:
        raise ConversionError(f"depth images are not supported (format '{msg.format}')")
    if fmt and not any(name in fmt for name in ("jpeg", "jpg", "png")):
        raise ConversionError(
            f"unsupported compressed format '{msg.format}' (supported: jpeg, png)")
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size == 0:
        raise ConversionError("empty compressed image data")
    import cv2  # deferred: only nodes with compressed topics need OpenCV

    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ConversionError(
            f"cannot decode {data.size} bytes of '{msg.format or 'unknown'}' data "
            "(corrupt or truncated)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def rgb_to_image(rgb: np.ndarray):
    """HxWx3 uint8 RGB -> sensor_msgs/Image (rgb8); header left to the caller."""
    from sensor_msgs.msg import Image

    height, width, _ = rgb.shape
    return Image(height=height, width=width, encoding="rgb8", step=width * 3,
                 data=np.ascontiguousarray(rgb, dtype=np.uint8).tobytes())


def rgb_to_jpeg(rgb: np.ndarray):
    """HxWx3 uint8 RGB -> sensor_msgs/CompressedImage (jpeg); header left to the caller."""
    import cv2
    from sensor_msgs.msg import CompressedImage

    encoded = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(rgb, dtype=np.uint8), cv2.COLOR_RGB2BGR))[1]
    return CompressedImage(format="jpeg", data=encoded.tobytes())


def is_compressed_topic(topic: str) -> bool:
    """image_transport naming: '<base>/compressed' carries sensor_msgs/CompressedImage."""
    return topic.rstrip("/").endswith("/compressed")


def camera_message_to_rgb(msg) -> np.ndarray:
    """Image or CompressedImage -> HxWx3 uint8 RGB (dispatch on the message's fields)."""
    if hasattr(msg, "format"):
        return compressed_image_to_rgb(msg)
    return image_to_rgb(msg)


def joint_positions(msg, joint_names: Sequence[str]) -> np.ndarray:
    """sensor_msgs/JointState -> float32 positions of `joint_names`, in that order.

    Joints in the message that are not in `joint_names` are ignored; a missing joint,
    a name/position length mismatch or a non-finite selected position is an error.
    """
    names = list(msg.name)
    positions = np.asarray(msg.position, dtype=np.float64)
    if positions.size != len(names):
        raise ConversionError(
            f"{len(names)} joint names but {positions.size} positions")
    index = {name: i for i, name in enumerate(names)}
    missing = [name for name in joint_names if name not in index]
    if missing:
        raise ConversionError(f"missing joints {', '.join(missing)}")
    selected = positions[[index[name] for name in joint_names]]
    bad = [name for name, value in zip(joint_names, selected) if not np.isfinite(value)]
    if bad:
        raise ConversionError(f"non-finite position for {', '.join(bad)}")
    return selected.astype(np.float32)


def _duration(seconds: float):
    from builtin_interfaces.msg import Duration

    nanoseconds = int(round(seconds * 1e9))
    return Duration(sec=nanoseconds // 1_000_000_000, nanosec=nanoseconds % 1_000_000_000)


def build_action_chunk(actions: np.ndarray, *, header, model: str, names: Sequence[str],
                       step_dt: float, sequence: int, inference_time: float,
                       observation_age: float):
    """flashrt_ros/ActionChunk from float actions [horizon, action_dim] (row-major data)."""
    from flashrt_ros.msg import ActionChunk

    horizon, action_dim = actions.shape
    if len(names) != action_dim:
        raise ValueError(f"{len(names)} action names for action_dim {action_dim}")
    msg = ActionChunk()
    msg.header = header
    msg.model = model
    msg.names = list(names)
    msg.horizon = horizon
    msg.action_dim = action_dim
    msg.step_dt = float(step_dt)
    msg.data = np.ascontiguousarray(actions, dtype=np.float32).ravel()
    msg.sequence = sequence
    msg.inference_time = float(inference_time)
    msg.observation_age = float(observation_age)
    return msg


def build_joint_trajectory(positions: np.ndarray, *, header, joint_names: Sequence[str],
                           step_dt: float, with_velocities: bool):
    """trajectory_msgs/JointTrajectory for joint_trajectory_controller.

    Point i (positions[i]) has time_from_start (i+1)*step_dt: action i is the target
    commanded during control period i and reached at its end, so no point sits at
    time 0 and the controller always interpolates from where it is. Velocities, when
    asked for, are finite differences of the positions (np.gradient) with the last
    point at rest, which joint_trajectory_controller requires unless
    allow_nonzero_velocity_at_trajectory_end is set.
    """
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] != len(joint_names):
        raise ValueError(
            f"positions of shape {positions.shape} for {len(joint_names)} joints")
    velocities = None
    if with_velocities:
        velocities = (np.gradient(positions, step_dt, axis=0) if len(positions) > 1
                      else np.zeros_like(positions))
        velocities[-1] = 0.0
    msg = JointTrajectory()
    msg.header = header
    msg.joint_names = list(joint_names)
    for i, row in enumerate(positions):
        point = JointTrajectoryPoint()
        point.positions = row.tolist()
        if velocities is not None:
            point.velocities = velocities[i].tolist()
        point.time_from_start = _duration((i + 1) * step_dt)
        msg.points.append(point)
    return msg
