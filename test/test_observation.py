"""Observation buffer: newest sample per stream, missing / stale / skew skip reasons."""

import threading

import pytest

from flashrt_ros.observation import ObservationBuffer, SkippedTick

S = 1_000_000_000  # nanoseconds per second
STREAMS = ["cam0", "cam1", "joints"]


def filled(now_ns: int, ages_s=(0.01, 0.02, 0.0)) -> ObservationBuffer:
    buffer = ObservationBuffer(STREAMS)
    for stream, age in zip(STREAMS, ages_s):
        buffer.put(stream, now_ns - int(age * S), f"{stream} message")
    return buffer


def test_snapshot_takes_the_newest_of_each_stream():
    now = 100 * S
    buffer = filled(now)
    buffer.put("cam0", now - S // 100, "newer cam0")
    obs = buffer.snapshot(now, max_age=0.5, max_skew=0.2)
    assert [obs.samples[s].message for s in STREAMS] == [
        "newer cam0", "cam1 message", "joints message"]
    assert obs.stamp_ns == now           # the joints sample is the newest
    assert obs.age_s == 0.0


def test_observation_stamp_is_the_newest_sample_and_age_is_from_it():
    now = 50 * S
    obs = filled(now, ages_s=(0.1, 0.2, 0.05)).snapshot(now, max_age=0.5, max_skew=0.2)
    assert obs.stamp_ns == now - S // 20
    assert obs.age_s == pytest.approx(0.05)


def test_missing_stream():
    buffer = ObservationBuffer(STREAMS)
    buffer.put("cam0", S, "x")
    with pytest.raises(SkippedTick) as skipped:
        buffer.snapshot(S, max_age=1.0, max_skew=1.0)
    assert skipped.value.reason == "missing cam1"


def test_stale_stream_and_recovery():
    now = 10 * S
    buffer = filled(now, ages_s=(0.01, 0.8, 0.0))
    with pytest.raises(SkippedTick) as skipped:
        buffer.snapshot(now, max_age=0.5, max_skew=10.0)
    assert skipped.value.reason == "stale cam1"
    assert "0.800 s old" in skipped.value.detail
    buffer.put("cam1", now, "fresh")
    assert buffer.snapshot(now, max_age=0.5, max_skew=10.0).samples["cam1"].message == "fresh"


def test_skew_between_streams():
    now = 10 * S
    buffer = filled(now, ages_s=(0.0, 0.3, 0.05))
    with pytest.raises(SkippedTick) as skipped:
        buffer.snapshot(now, max_age=1.0, max_skew=0.2)
    assert skipped.value.reason == "skew"
    assert "cam1 is 0.300 s behind cam0" in skipped.value.detail
    assert buffer.snapshot(now, max_age=1.0, max_skew=0.3).stamp_ns == now


def test_future_stamps_count_as_fresh():
    now = 10 * S
    obs = filled(now, ages_s=(-0.1, -0.1, -0.1)).snapshot(now, max_age=0.5, max_skew=0.2)
    assert obs.age_s == 0.0


def test_unknown_and_duplicate_streams_are_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        ObservationBuffer(["a", "a"])
    with pytest.raises(KeyError):
        ObservationBuffer(["a"]).put("b", 0, None)


def test_concurrent_puts_and_snapshots():
    buffer = ObservationBuffer(["a", "b"])
    stop = threading.Event()

    def writer(stream):
        i = 0
        while not stop.is_set():
            i += 1
            buffer.put(stream, i, i)

    threads = [threading.Thread(target=writer, args=(s,)) for s in "ab"]
    for t in threads:
        t.start()
    try:
        seen = 0
        while seen < 200:
            try:
                obs = buffer.snapshot(10 ** 12, max_age=1e9, max_skew=1e9)
            except SkippedTick:
                continue
            assert set(obs.samples) == {"a", "b"}
            seen += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
