"""Message <-> numpy conversions on real ROS message classes."""

import math

import cv2
import numpy as np
import pytest
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Header

from flashrt_ros import conversions
from flashrt_ros.conversions import ConversionError

RNG = np.random.default_rng(7)
RGB = RNG.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)


def raw_image(pixels: np.ndarray, encoding: str, row_padding: int = 0) -> Image:
    height, width = pixels.shape[:2]
    rows = pixels.reshape(height, -1)
    padded = np.concatenate([rows, np.full((height, row_padding), 255, np.uint8)], axis=1)
    return Image(height=height, width=width, encoding=encoding, step=padded.shape[1],
                 data=padded.tobytes())


@pytest.mark.parametrize("encoding, pixels", [
    ("rgb8", RGB),
    ("bgr8", RGB[:, :, ::-1]),
    ("rgba8", np.dstack([RGB, np.full(RGB.shape[:2], 9, np.uint8)])),
    ("bgra8", np.dstack([RGB[:, :, ::-1], np.full(RGB.shape[:2], 9, np.uint8)])),
])
@pytest.mark.parametrize("row_padding", [0, 3])
def test_colour_encodings_give_rgb(encoding, pixels, row_padding):
    rgb = conversions.image_to_rgb(raw_image(pixels, encoding, row_padding))
    assert rgb.dtype == np.uint8 and rgb.shape == RGB.shape
    np.testing.assert_array_equal(rgb, RGB)


def test_rgb_messages_round_trip():
    image = conversions.rgb_to_image(RGB)
    assert (image.encoding, image.height, image.width, image.step) == ("rgb8", 5, 7, 21)
    np.testing.assert_array_equal(conversions.image_to_rgb(image), RGB)
    smooth = np.dstack([np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (16, 1))] * 3)
    smooth[..., 2] = 200  # colour order matters: a swap would move this channel
    jpeg = conversions.rgb_to_jpeg(smooth)
    assert jpeg.format == "jpeg"
    decoded = conversions.compressed_image_to_rgb(jpeg)
    assert decoded.shape == smooth.shape and np.abs(decoded.astype(int) - smooth).mean() < 4


def test_mono8_is_replicated_to_three_channels():
    grey = RGB[:, :, 0]
    rgb = conversions.image_to_rgb(raw_image(grey[:, :, None], "mono8", row_padding=1))
    np.testing.assert_array_equal(rgb, np.repeat(grey[:, :, None], 3, axis=2))


@pytest.mark.parametrize("encoding", ["16UC1", "yuv422", "bayer_rggb8", "32FC1", ""])
def test_unsupported_encoding_is_an_error(encoding):
    msg = raw_image(RGB, "rgb8")
    msg.encoding = encoding
    with pytest.raises(ConversionError, match="unsupported encoding"):
        conversions.image_to_rgb(msg)


def test_truncated_data_is_an_error():
    msg = raw_image(RGB, "rgb8")
    msg.data = bytes(msg.data)[:-1]
    with pytest.raises(ConversionError, match="truncated data"):
        conversions.image_to_rgb(msg)


def test_step_smaller_than_a_row_is_an_error():
    msg = raw_image(RGB, "rgb8")
    msg.step = RGB.shape[1] * 3 - 1
    with pytest.raises(ConversionError, match="step"):
        conversions.image_to_rgb(msg)


def test_empty_image_is_an_error():
    with pytest.raises(ConversionError, match="empty image"):
        conversions.image_to_rgb(Image(height=0, width=4, encoding="rgb8", step=12))


def compressed(rgb: np.ndarray, fmt: str) -> CompressedImage:
    ok, data = cv2.imencode("." + fmt, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return CompressedImage(format=fmt, data=data.tobytes())


def test_png_round_trips_exactly():
    np.testing.assert_array_equal(conversions.compressed_image_to_rgb(compressed(RGB, "png")), RGB)


def test_jpeg_decodes_to_rgb_order():
    # Flat colour blocks survive JPEG; a swapped channel order would not.
    block = np.zeros((32, 32, 3), np.uint8)
    block[..., 0] = 200  # red
    msg = compressed(block, "jpg")
    msg.format = "rgb8; jpeg compressed bgr8"  # image_transport's format string
    rgb = conversions.compressed_image_to_rgb(msg)
    assert rgb.shape == (32, 32, 3)
    assert abs(int(rgb[..., 0].mean()) - 200) < 4 and rgb[..., 2].mean() < 4


def test_grey_png_becomes_three_channels():
    ok, data = cv2.imencode(".png", RGB[:, :, 0])
    rgb = conversions.compressed_image_to_rgb(CompressedImage(format="png", data=data.tobytes()))
    np.testing.assert_array_equal(rgb, np.repeat(RGB[:, :, :1], 3, axis=2))


def test_corrupt_compressed_data_is_an_error():
    msg = compressed(RGB, "png")
    msg.data = bytes(msg.data)[:20]
    with pytest.raises(ConversionError, match="cannot decode"):
        conversions.compressed_image_to_rgb(msg)


@pytest.mark.parametrize("fmt, match", [
    ("16UC1; compressedDepth png", "depth"),
    ("tiff", "unsupported compressed format"),
])
def test_unsupported_compressed_formats(fmt, match):
    msg = compressed(RGB, "png")
    msg.format = fmt
    with pytest.raises(ConversionError, match=match):
        conversions.compressed_image_to_rgb(msg)


def test_camera_dispatch_and_topic_naming():
    assert conversions.is_compressed_topic("/cam/image_raw/compressed")
    assert not conversions.is_compressed_topic("/cam/image_raw")
    np.testing.assert_array_equal(
        conversions.camera_message_to_rgb(compressed(RGB, "png")), RGB)
    np.testing.assert_array_equal(
        conversions.camera_message_to_rgb(raw_image(RGB, "rgb8")), RGB)


def joint_state(names, positions):
    return JointState(name=list(names), position=[float(p) for p in positions])


def test_joint_selection_follows_configured_order_and_ignores_extras():
    msg = joint_state(["c", "extra", "a", "b"], [3.0, 99.0, 1.0, 2.0])
    positions = conversions.joint_positions(msg, ["a", "b", "c"])
    assert positions.dtype == np.float32
    np.testing.assert_array_equal(positions, [1.0, 2.0, 3.0])


def test_missing_joint_is_an_error():
    with pytest.raises(ConversionError, match="missing joints b"):
        conversions.joint_positions(joint_state(["a"], [1.0]), ["a", "b"])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_selected_position_is_an_error(bad):
    with pytest.raises(ConversionError, match="non-finite position for b"):
        conversions.joint_positions(joint_state(["a", "b"], [1.0, bad]), ["a", "b"])


def test_non_finite_ignored_joint_is_fine():
    msg = joint_state(["a", "other"], [1.0, math.nan])
    np.testing.assert_array_equal(conversions.joint_positions(msg, ["a"]), [1.0])


def test_names_and_positions_of_different_length_is_an_error():
    msg = JointState(name=["a", "b"], position=[1.0])
    with pytest.raises(ConversionError, match="2 joint names but 1 positions"):
        conversions.joint_positions(msg, ["a"])


def test_trajectory_times_positions_and_velocities():
    positions = np.array([[0.0, 1.0], [0.1, 1.0], [0.3, 0.5]])
    header = Header(stamp=Time(sec=12, nanosec=5), frame_id="base")
    msg = conversions.build_joint_trajectory(positions, header=header, joint_names=["a", "b"],
                                             step_dt=0.05, with_velocities=True)
    assert msg.header.stamp == Time(sec=12, nanosec=5)
    assert msg.joint_names == ["a", "b"]
    times = [p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in msg.points]
    np.testing.assert_allclose(times, [0.05, 0.10, 0.15])
    np.testing.assert_allclose([p.positions for p in msg.points], positions)
    velocities = np.array([p.velocities for p in msg.points])
    np.testing.assert_allclose(velocities[0], [2.0, 0.0])       # forward difference
    np.testing.assert_allclose(velocities[1], [3.0, -5.0])      # central difference
    np.testing.assert_array_equal(velocities[-1], [0.0, 0.0])   # ends at rest for JTC


def test_trajectory_without_velocities_leaves_them_empty():
    msg = conversions.build_joint_trajectory(np.zeros((2, 1)), header=Header(),
                                             joint_names=["a"], step_dt=1.5,
                                             with_velocities=False)
    assert all(len(p.velocities) == 0 for p in msg.points)
    assert [(p.time_from_start.sec, p.time_from_start.nanosec) for p in msg.points] == [
        (1, 500_000_000), (3, 0)]


def test_action_chunk_is_row_major():
    actions = np.arange(6, dtype=np.float32).reshape(3, 2)
    msg = conversions.build_action_chunk(
        actions, header=Header(frame_id="f"), model="pi05", names=["x", "y"], step_dt=0.1,
        sequence=4, inference_time=0.02, observation_age=0.01)
    assert (msg.horizon, msg.action_dim, msg.sequence, msg.model) == (3, 2, 4, "pi05")
    assert list(msg.names) == ["x", "y"]
    np.testing.assert_array_equal(np.asarray(msg.data).reshape(3, 2), actions)
    with pytest.raises(ValueError, match="action names"):
        conversions.build_action_chunk(
            actions, header=Header(), model="pi05", names=["x"], step_dt=0.1, sequence=0,
            inference_time=0.0, observation_age=0.0)
