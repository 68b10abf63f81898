"""Newest-sample-per-stream observation buffer with staleness and skew checks.

Subscription callbacks `put` what they received (the policy node converts a camera
frame on arrival and puts a CameraFrame: the model-sized image or why there is none);
the inference tick takes a `snapshot` at the node clock's "now". A snapshot is refused
with a SkippedTick whose `reason` is the counter key diagnostics use:

    'missing <stream>'   no sample received yet on that stream
    'stale <stream>'     its newest sample is older than max_observation_age
    'skew'               newest samples are further apart than max_observation_skew

The other reasons a tick is skipped are raised by the node with the same type (see
SKIP_REASONS). Times are float seconds on the node clock (ROS time, so sim time
works) against header stamps, kept as integer nanoseconds so the observation stamp
put on published messages is exactly the input's. No ROS import.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

# Every reason a tick can be skipped ('<stream>' is a topic name as configured).
SKIP_REASONS = (
    "busy",                  # inference still running and another tick already waiting for it
    "executor stall",        # the timer never fired: the executor was held up past a period (or sim time jumped)
    "missing <stream>",
    "stale <stream>",
    "skew",
    "bad image <stream>",    # detail: unsupported encoding, truncated data, undecodable
    "bad joint state",       # detail: missing joints, non-finite or mismatched positions
    "empty prompt",
    "bad prompt",            # the engine refused a non-empty prompt
    "inference error",       # detail: the engine's exception
    "non-finite actions",
    "publish lag",           # a newer chunk was ready before this one went out: only the newest is sent
    "fp8 calibration",       # the tick measured the FP8 scales (activation had no usable observation)
)
# ~/predict answers with the same type; it adds 'bad request' (images given twice or
# the wrong number of them).


class SkippedTick(Exception):
    """A tick (or a Predict request) produced nothing; `reason` is the counter key and
    `detail` the specifics for the log and the service response."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True)
class Sample:
    stamp_ns: int   # header stamp [ns]
    message: Any    # what the callback put: the message as received, or a CameraFrame


@dataclass(frozen=True)
class CameraFrame:
    """A camera message converted on arrival: the RGB image at the model's size, or the
    reason it could not be converted."""

    rgb: Any = None   # HxWx3 uint8 numpy array; None when the message was bad
    error: str = ""

    def image(self, stream: str):
        """The image, or SkippedTick('bad image <stream>') with the reason."""
        if self.rgb is None:
            raise SkippedTick(f"bad image {stream}", self.error)
        return self.rgb


@dataclass(frozen=True)
class Observation:
    samples: dict[str, Sample]  # stream -> newest sample, in the buffer's stream order
    stamp_ns: int               # newest stamp among the samples (the observation time)
    age_s: float                # now - stamp (clamped at 0) [s]


class ObservationBuffer:
    """Keeps the newest sample of each named stream; thread-safe."""

    def __init__(self, streams: list[str]):
        if len(set(streams)) != len(streams):
            raise ValueError(f"duplicate stream names in {streams}")
        self.streams = list(streams)
        self._latest: dict[str, Sample] = {}
        self._lock = threading.Lock()

    def put(self, stream: str, stamp_ns: int, message: Any) -> None:
        if stream not in self.streams:
            raise KeyError(f"unknown stream '{stream}'")
        with self._lock:
            self._latest[stream] = Sample(int(stamp_ns), message)

    def latest(self, stream: str) -> Sample | None:
        with self._lock:
            return self._latest.get(stream)

    def clear(self) -> None:
        with self._lock:
            self._latest.clear()

    def snapshot(self, now_ns: int, max_age: float, max_skew: float) -> Observation:
        """Newest sample of every stream at node time `now_ns`, or SkippedTick if one is
        missing or older than `max_age` seconds, or the streams are more than `max_skew`
        seconds apart."""
        with self._lock:
            latest = dict(self._latest)
        samples = {}
        for stream in self.streams:
            sample = latest.get(stream)
            if sample is None:
                raise SkippedTick(f"missing {stream}", "no message received yet")
            age_ns = now_ns - sample.stamp_ns
            if age_ns > round(max_age * 1e9):
                raise SkippedTick(
                    f"stale {stream}", f"newest sample is {age_ns * 1e-9:.3f} s old "
                    f"(max_observation_age {max_age:g} s)")
            samples[stream] = sample
        first = min(samples, key=lambda k: samples[k].stamp_ns)
        last = max(samples, key=lambda k: samples[k].stamp_ns)
        newest = samples[last].stamp_ns
        skew_ns = newest - samples[first].stamp_ns
        if skew_ns > round(max_skew * 1e9):
            raise SkippedTick(
                "skew", f"{first} is {skew_ns * 1e-9:.3f} s behind {last} "
                f"(max_observation_skew {max_skew:g} s)")
        return Observation(samples, newest, max(0.0, (now_ns - newest) * 1e-9))
