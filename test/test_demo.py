"""The built-in demo end to end (`flashrt-ros demo`, the README's first command): the
real engine on the tiny checkpoint, a synthetic robot, chunks printed, a summary."""

import os
import re
import subprocess

import pytest
from policy_harness import tiny_checkpoint  # noqa: F401 - fixture

pytestmark = pytest.mark.ros


def test_demo_prints_chunks_and_a_summary(flashrt_ros_command, tiny_checkpoint, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "pi05_tiny").symlink_to(tiny_checkpoint)
    env = dict(os.environ, FLASHRT_CACHE_DIR=str(tmp_path))
    result = subprocess.run([flashrt_ros_command, "demo", "--duration", "4"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    chunk_lines = re.findall(r"chunk #(\d+)\s+(\d+)x(\d+)", out)
    assert len(chunk_lines) >= 2, out
    sequences = [int(seq) for seq, _, _ in chunk_lines]
    assert sequences == sorted(sequences) and sequences[-1] > sequences[0]
    published = int(re.search(r"chunks published: (\d+) in", out).group(1))
    assert published > 10
    assert re.search(r"inference latency: p50 [\d.]+ ms, p99 [\d.]+ ms", out)
    assert re.search(r"observation to publish: p50 [\d.]+ ms, p99 [\d.]+ ms", out)
    assert re.search(r"skipped ticks: \d+", out)


def test_demo_writes_a_missing_checkpoint(tmp_path, monkeypatch):
    from flashrt_ros.demo import demo_checkpoint

    monkeypatch.setenv("FLASHRT_CACHE_DIR", str(tmp_path))
    path = demo_checkpoint("pi05")
    assert path == tmp_path / "checkpoints" / "pi05_tiny"
    assert (path / "config.json").is_file() and not path.with_name("pi05_tiny.tmp").exists()
