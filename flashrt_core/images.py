"""Camera images -> the model's uint8 [V, S, S, 3] batch and view mask.

Resizing follows openpi's policy input transform (`transforms.ResizeImages` ->
`openpi_client.image_tools.resize_with_pad`, PIL): keep the aspect ratio, scale so the
image fits (sizes truncated to int), PIL bilinear on uint8, paste centered (offsets
truncated) on a black canvas. Black is 0 in uint8, i.e. -1 after the model's x/255*2-1,
the pad value of the float variants of the same function. A missing camera is a black
image with its view masked out, as openpi's policies and LeRobot pad absent cameras.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .errors import ImageError


def resize_with_pad(image: np.ndarray, height: int, width: int) -> np.ndarray:
    cur_height, cur_width = image.shape[:2]
    if (cur_height, cur_width) == (height, width):
        return image
    ratio = max(cur_width / width, cur_height / height)
    resized_height, resized_width = int(cur_height / ratio), int(cur_width / ratio)
    resized = Image.fromarray(image).resize((resized_width, resized_height), resample=Image.BILINEAR)
    canvas = np.zeros((height, width, image.shape[2]), dtype=np.uint8)
    top, left = int((height - resized_height) / 2), int((width - resized_width) / 2)
    canvas[top:top + resized_height, left:left + resized_width] = np.asarray(resized)
    return canvas


def check_image(image, index: int) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ImageError(f"image {index}: expected uint8 RGB, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"image {index}: expected an H x W x 3 RGB array, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f"image {index}: empty image {image.shape}")
    return image


def prepare_images(images, num_views: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """list of num_views images (HxWx3 uint8, or None for a missing camera)
    -> uint8 [num_views, size, size, 3], bool view mask [num_views]."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if not isinstance(images, (list, tuple)):
        raise ImageError(f"images must be a list of {num_views} arrays, got {type(images).__name__}")
    if len(images) != num_views:
        raise ImageError(f"expected {num_views} images (one per camera, None for a missing one), got {len(images)}")
    if all(image is None for image in images):
        raise ImageError("all images are missing; at least one camera is required")
    batch = np.zeros((num_views, size, size, 3), dtype=np.uint8)
    mask = np.zeros(num_views, dtype=bool)
    for i, image in enumerate(images):
        if image is not None:
            batch[i] = resize_with_pad(check_image(image, i), size, size)
            mask[i] = True
    return batch, mask
