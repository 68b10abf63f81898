"""The built-in demo end to end (`flashrt-ros demo`, the README's first command): the
real engine on the tiny checkpoint, a synthetic robot (in the node's process or its
own), chunks printed, a summary and its JSON numbers."""

import json
import os
import re
import subprocess

import pytest
from policy_harness import tiny_checkpoint  # noqa: F401 - fixture

pytestmark = pytest.mark.ros


@pytest.mark.parametrize("robot", ["same-process", "own-process"])
def test_demo_prints_chunks_and_a_summary(flashrt_ros_command, tiny_checkpoint, tmp_path, robot):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "pi05_tiny").symlink_to(tiny_checkpoint)
    env = dict(os.environ, FLASHRT_CACHE_DIR=str(tmp_path))
    result = subprocess.run([flashrt_ros_command, "demo", "--duration", "4", "--robot", robot,
                             "--json", str(tmp_path / "numbers.json")], env=env,
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
    assert re.search(r"observation to receive: p50 [\d.]+ ms, p99 [\d.]+ ms", out)
    assert re.search(r"skipped ticks: \d+", out)
    numbers = json.loads((tmp_path / "numbers.json").read_text())
    assert numbers["robot"] == robot and numbers["published"] == published
    # The consumer (in the robot's process when it has its own) got the chunks: all
    # but the ones in flight when it stopped.
    assert published - 3 <= numbers["received"] <= published
    for key in ("inference", "observation_to_publish", "observation_to_receive"):
        assert 0 < numbers[f"{key}_p50_ms"] <= numbers[f"{key}_p99_ms"], key
    assert numbers["rate_hz"] > 0 and numbers["target_hz"] == 20.0
    assert isinstance(numbers["skipped"], dict)
    assert numbers["late_starts"] >= 0 and (numbers["late_start_p50_ms"] is None) == (numbers["late_starts"] == 0)
    # Where an inference's time went: predict's own phases (they add up to at most the
    # inference wall time), then publishing.
    for phase in ("preprocess", "model", "postprocess", "publish"):
        assert 0 < numbers[f"{phase}_p50_ms"] <= numbers[f"{phase}_p99_ms"], phase
    assert numbers["model_p50_ms"] <= numbers["inference_p50_ms"]
    assert re.search(r"inference phases p50 / p99: preprocess [\d.]+ / [\d.]+ ms, model", out)
    # Garbage collector pauses while active, and when slow ones and skips happened.
    collections = [numbers[f"gc_collections_gen{g}"] for g in range(3)]
    assert all(n >= 0 for n in collections)
    assert (numbers["gc_pause_p99_ms"] is None) == (sum(collections) == 0)
    assert numbers["gc_pause_max_ms"] >= (numbers["gc_pause_p99_ms"] or 0)
    assert re.search(r"garbage collections while active \(gen 0/1/2\): \d+/\d+/\d+", out)
    for pause in numbers["gc_slow_pauses"]:
        assert 0 <= pause["at_s"] <= numbers["active_seconds"] + 1 and pause["ms"] >= 1
    assert numbers["gc_slow_pause_count"] == len(numbers["gc_slow_pauses"])
    assert len(numbers["skipped_at"]) == sum(numbers["skipped"].values())
    assert all(skip["reason"] in numbers["skipped"] for skip in numbers["skipped_at"])
    # The host-pause probe ran beside the node, over the active window.
    assert numbers["host_probe"] is True
    assert numbers["host_pause_count"] == len(numbers["host_pauses"]) <= 200
    assert all(-0.1 <= p["at_s"] <= numbers["active_seconds"] and p["ms"] > 5 for p in numbers["host_pauses"])
    assert numbers["host_pause_max_ms"] == max([p["ms"] for p in numbers["host_pauses"]], default=0)
    assert 0 <= numbers["skipped_after_host_pause"] <= sum(numbers["skipped"].values())
    assert sum(skip["after_host_pause"] for skip in numbers["skipped_at"]) == numbers["skipped_after_host_pause"]
    assert re.search(r"host pauses \(a probe process woke over 5 ms late\): \d+, longest [\d.]+ ms", out)


def test_demo_without_the_host_probe(flashrt_ros_command, tiny_checkpoint, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "pi05_tiny").symlink_to(tiny_checkpoint)
    env = dict(os.environ, FLASHRT_CACHE_DIR=str(tmp_path))
    result = subprocess.run([flashrt_ros_command, "demo", "--duration", "2", "--no-host-probe",
                             "--json", str(tmp_path / "numbers.json")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "host pauses" not in result.stdout
    assert json.loads((tmp_path / "numbers.json").read_text())["host_probe"] is False


def test_robot_runs_in_its_own_process_when_the_engine_is_on_cuda():
    from flashrt_ros.demo import resolve_robot

    assert resolve_robot("auto", "cuda") == resolve_robot("auto", "cuda:1") == "own-process"
    assert resolve_robot("auto", "cpu") == "same-process"
    assert resolve_robot("same-process", "cuda") == "same-process"
    assert resolve_robot("own-process", "cpu") == "own-process"
    with pytest.raises(ValueError, match="robot must be one of"):
        resolve_robot("thread", "cpu")


def test_demo_writes_a_missing_checkpoint(tmp_path, monkeypatch):
    from flashrt_ros.demo import demo_checkpoint

    monkeypatch.setenv("FLASHRT_CACHE_DIR", str(tmp_path))
    path = demo_checkpoint("pi05")
    assert path == tmp_path / "checkpoints" / "pi05_tiny"
    assert (path / "config.json").is_file() and not path.with_name("pi05_tiny.tmp").exists()


def test_host_results_mark_the_skips_that_followed_a_host_pause():
    """The demo's host figures: only pauses overlapping the active window count, and a
    skip is the host's when it came during a pause or within 3 periods after one."""
    from flashrt_ros.demo import host_results
    from flashrt_ros.host_pauses import Pause, ProbeResult

    active_since, active_seconds, rate_hz = 100.0, 10.0, 50.0   # grace 3 / 50 = 60 ms
    pauses = [Pause(99.0, 0.02),     # before activation: left out
              Pause(102.0, 0.03),    # ends 102.03
              Pause(105.0, 0.008),   # ends 105.008
              Pause(111.0, 0.5)]     # after the window: left out
    probe = ProbeResult(wakeups=10_000, late_p50_s=1e-4, late_p99_s=2e-4, late_max_s=0.5, pauses=pauses,
                        steal_percent=0.1, cpu_pressure_percent=None)
    skip_times = [(102.01, "executor stall"), (102.08, "busy"), (102.2, "busy"), (105.05, "executor stall")]
    skipped_at = [{"at_s": at - active_since, "reason": reason} for at, reason in skip_times]
    out = host_results(probe, skipped_at, active_since, active_seconds, rate_hz)
    assert out["host_probe"] is True and out["host_pause_count"] == 2
    assert out["host_pause_max_ms"] == pytest.approx(30.0)
    assert [p["at_s"] for p in out["host_pauses"]] == pytest.approx([2.0, 5.0])
    assert [s["after_host_pause"] for s in skipped_at] == [True, True, False, True]
    assert out["skipped_after_host_pause"] == 3
    assert host_results(None, skipped_at, active_since, active_seconds, rate_hz) == {"host_probe": False}
