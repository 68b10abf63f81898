"""Camera frames converted on arrival (flashrt_ros.policy_node.camera_frame): the model
gets the same pixels the engine's own resize would give, and a frame that cannot be
converted is kept as its reason, skipping the tick that would use it as 'bad image
<topic>' without ever raising in the subscription callback."""

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from policy_harness import (  # noqa: F401 - fixtures
    CAMERAS, action_names, compressed_message, image_message, joint_names, make_graph,
    rgb_frame, tiny_checkpoint, tiny_spec, wait_until)
from rclpy.lifecycle import TransitionCallbackReturn

from flashrt_ros.conversions import camera_message_to_rgb
from flashrt_ros.launcher import lifecycle_state
from flashrt_ros.observation import CameraFrame, SkippedTick
from flashrt_ros.policy_node import camera_frame

RAW, COMPRESSED = CAMERAS
SIZE = (224, 224)
STAMP = Time(sec=1)


@pytest.mark.parametrize("make", [
    lambda frame: image_message(STAMP, frame),
    lambda frame: image_message(STAMP, np.ascontiguousarray(frame[:, :, ::-1]), encoding="bgr8"),
    lambda frame: compressed_message(STAMP, frame, fmt="png"),
], ids=["rgb8", "bgr8", "png"])
def test_frames_get_the_engines_resize(make):
    from flashrt_core.images import resize_with_pad

    frame = rgb_frame(height=240, width=320, value=77)
    frame[100:140, 50:90, 2] = 200  # something that moves if the resize is off
    msg = make(frame)
    converted = camera_frame(msg, SIZE)
    assert converted.error == ""
    np.testing.assert_array_equal(converted.image(RAW), resize_with_pad(frame, *SIZE))
    np.testing.assert_array_equal(converted.image(RAW),
                                  resize_with_pad(camera_message_to_rgb(msg), *SIZE))


@pytest.mark.parametrize("corrupt, reason", [
    (lambda msg: setattr(msg, "encoding", "16UC1"), "unsupported encoding '16UC1'"),
    (lambda msg: setattr(msg, "data", bytes(msg.data)[:100]), "truncated data"),
    (lambda msg: setattr(msg, "width", 0), "empty image"),
])
def test_bad_frames_carry_their_reason(corrupt, reason):
    msg = image_message(STAMP, rgb_frame())
    corrupt(msg)
    converted = camera_frame(msg, SIZE)
    assert converted.rgb is None and reason in converted.error
    with pytest.raises(SkippedTick) as skipped:
        converted.image(RAW)
    assert skipped.value.reason == f"bad image {RAW}" and reason in skipped.value.detail


def test_a_frame_too_thin_to_resize_is_a_bad_frame_not_an_exception():
    msg = image_message(STAMP, rgb_frame(height=1, width=600))  # resizes to 0 rows
    converted = camera_frame(msg, SIZE)
    assert isinstance(converted, CameraFrame) and converted.rgb is None and converted.error


@pytest.mark.ros
def test_unresizable_frame_skips_ticks_as_bad_image_and_the_node_keeps_running(make_graph):
    """Through a real graph: such a frame used to fail inside the engine (an 'inference
    error', counted towards stopping the node); it is bad input of that camera."""
    graph = make_graph()
    assert graph.policy.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert graph.policy.trigger_activate() == TransitionCallbackReturn.SUCCESS
    chunks = lambda: len(graph.recorder.snapshot().chunks)  # noqa: E731
    assert wait_until(lambda: chunks() >= 3, timeout=20)
    graph.robot.camera_override[RAW] = lambda stamp: image_message(
        stamp, rgb_frame(height=1, width=600))
    skipped = graph.policy.health.skipped
    assert wait_until(lambda: skipped[f"bad image {RAW}"] >= 5, timeout=10)
    assert skipped["inference error"] == 0
    graph.robot.camera_override.clear()
    count = chunks()
    assert wait_until(lambda: chunks() >= count + 3, timeout=20)
    assert lifecycle_state(graph.policy) == "active"
