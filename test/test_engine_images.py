"""Image input: openpi's resize-with-pad (PIL bilinear, centered, black), view masks, bad input."""

import numpy as np
import pytest
from PIL import Image

from flashrt_core.errors import ImageError
from flashrt_core.images import prepare_images, resize_with_pad


def gradient(height, width):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1).astype(np.uint8)


def test_wide_image_is_scaled_to_width_and_padded_top_and_bottom():
    image = gradient(480, 640)
    out = resize_with_pad(image, 224, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # 640x480 -> 224x168 (ratio 640/224), 56 rows of padding split 28 / 28.
    expected = np.asarray(Image.fromarray(image).resize((224, 168), resample=Image.BILINEAR))
    np.testing.assert_array_equal(out[28:196], expected)
    assert not out[:28].any() and not out[196:].any()


def test_tall_odd_image_is_centered_with_truncated_offsets():
    image = gradient(301, 100)
    out = resize_with_pad(image, 224, 224)
    # ratio 301/224: width int(100 / ratio) = 74, left pad int(150 / 2) = 75, right pad 75.
    expected = np.asarray(Image.fromarray(image).resize((74, 224), resample=Image.BILINEAR))
    np.testing.assert_array_equal(out[:, 75:149], expected)
    assert not out[:, :75].any() and not out[:, 149:].any()


def test_224_images_pass_unchanged_and_missing_views_are_masked():
    images = [gradient(224, 224), None, gradient(100, 50)]
    batch, mask = prepare_images(images, 3, 224)
    assert batch.shape == (3, 224, 224, 3) and mask.tolist() == [True, False, True]
    np.testing.assert_array_equal(batch[0], images[0])
    assert not batch[1].any()


@pytest.mark.parametrize("images,match", [
    ([np.zeros((224, 224, 3), np.uint8)], "expected 2 images"),
    ([np.zeros((224, 224, 3), np.float32)] * 2, "uint8"),
    ([np.zeros((224, 224), np.uint8)] * 2, "H x W x 3"),
    ([np.zeros((224, 224, 4), np.uint8)] * 2, "H x W x 3"),
    ([np.zeros((3, 224, 224), np.uint8)] * 2, "H x W x 3"),
    ([np.zeros((0, 224, 3), np.uint8)] * 2, "empty"),
    ([None, None], "all images are missing"),
    (np.zeros((224, 224, 3), np.uint8), "list of 2"),
])
def test_bad_images(images, match):
    with pytest.raises(ImageError, match=match):
        prepare_images(images, 2, 224)
