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


@pytest.fixture
def cpu_fp8(monkeypatch, tmp_path):
    """Policy in precision fp8 on the CPU, for tests: the graph runtime runs it through
    torch's CPU _scaled_mm, but Policy refuses it (resolve_precision wants an FP8 GPU, and
    "auto" picks the reference backend on the CPU), so both choices are overridden for
    fp8. FP8 calibration caches go to tmp_path, which is returned."""
    from flashrt_core import policy

    resolve, select = policy.resolve_precision, policy.select_backend

    def resolve_precision(precision, device, capability=None):
        return precision if precision == "fp8" else resolve(precision, device, capability)

    def select_backend(backend, device, precision, capability=None):
        return "graph" if precision == "fp8" else select(backend, device, precision, capability)

    monkeypatch.setattr(policy, "resolve_precision", resolve_precision)
    monkeypatch.setattr(policy, "select_backend", select_backend)
    monkeypatch.setenv("FLASHRT_CACHE_DIR", str(tmp_path))
    return tmp_path
