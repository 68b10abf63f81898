"""Suite-wide pytest setup: markers, ROS isolation, shared fixtures.

Markers: `gpu` (skipped without a CUDA device), `ros` (skipped where rclpy is not
importable), `slow` (deselect with -m "not slow").

ROS isolation: every test session (every xdist worker, every parallel CI job on the
machine) claims a ROS_DOMAIN_ID nobody else on the machine holds, through a lock
file, before any test runs; DDS discovery is kept on this machine.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Domain ids 1..100: 0 is everyone's default, and above ~101 the DDS ports of a
# domain reach the ephemeral port range on Linux.
_DOMAIN_IDS = range(1, 101)
_domain_lock = None  # open lock file, held for the whole session


def _claim_ros_domain_id() -> int:
    """Lock and return a domain id no other test session on this machine holds."""
    global _domain_lock
    lock_dir = Path(tempfile.gettempdir()) / "flashrt_ros_test_domains"
    lock_dir.mkdir(exist_ok=True)
    start = os.getpid() % len(_DOMAIN_IDS)
    for offset in range(len(_DOMAIN_IDS)):
        domain_id = _DOMAIN_IDS[(start + offset) % len(_DOMAIN_IDS)]
        lock = open(lock_dir / f"{domain_id}.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        _domain_lock = lock
        return domain_id
    raise RuntimeError(f"all ROS domain ids {_DOMAIN_IDS.start}..{_DOMAIN_IDS.stop - 1} "
                       f"are held by other test sessions (locks in {lock_dir})")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "ros: needs rclpy (skipped where it is not importable)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    # Set before any test imports rclpy, and inherited by subprocesses under test.
    os.environ["ROS_DOMAIN_ID"] = str(_claim_ros_domain_id())
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    needs = {name: any(item.get_closest_marker(name) for item in items)
             for name in ("gpu", "ros")}
    skip = {}
    if needs["gpu"] and not _cuda_available():
        skip["gpu"] = pytest.mark.skip(reason="needs a CUDA device")
    if needs["ros"] and importlib.util.find_spec("rclpy") is None:
        skip["ros"] = pytest.mark.skip(reason="needs rclpy (run through scripts/test.sh)")
    for item in items:
        for name, mark in skip.items():
            if item.get_closest_marker(name):
                item.add_marker(mark)


@pytest.fixture(scope="session")
def ros_domain_id() -> int:
    """This session's private ROS_DOMAIN_ID (already in os.environ)."""
    return int(os.environ["ROS_DOMAIN_ID"])


@pytest.fixture
def rclpy_context(ros_domain_id):
    """An initialized rclpy Context of its own for one test, shut down afterwards."""
    import rclpy
    from rclpy.context import Context

    context = Context()
    rclpy.init(context=context, domain_id=ros_domain_id)
    yield context
    rclpy.try_shutdown(context=context)


@pytest.fixture(scope="session")
def flashrt_ros_command() -> str:
    """Path of the installed `flashrt-ros` command (on PATH after sourcing the workspace)."""
    path = shutil.which("flashrt-ros")
    if path is None:
        pytest.fail("flashrt-ros is not on PATH: run the tests through scripts/test.sh "
                    "(or `source scripts/env.sh` first)")
    return path
