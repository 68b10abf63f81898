"""Tiny synthetic Pi checkpoints shared by the engine tests (written once per session).

Use: `from engine_checkpoints import tiny_checkpoint  # noqa: F401` (a pytest fixture), then
`tiny_checkpoint("pi05", layout="lerobot")` returns the directory.
"""

from __future__ import annotations

import numpy as np
import pytest

from flashrt_core.synthetic import write_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    written = {}

    def get(model="pi05", **options):
        key = (model, tuple(sorted(options.items())))
        if key not in written:
            written[key] = write_checkpoint(model, tmp_path_factory.mktemp(f"{model}_tiny"), "tiny", **options)
        return written[key]

    return get


def camera_images(num_views=2, seed=0, size=(224, 224)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(num_views)]
