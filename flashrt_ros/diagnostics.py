"""Health figures of the policy node and their diagnostic_msgs form.

diagnostic_updater is not available as a wheel, so the node keeps its own figures:
achieved publish rate, latency percentiles over a rolling window, skipped ticks by
reason (total and since the last report), the engine fault that stopped the node (if
any), and GPU memory when the engine is on CUDA. The node adds the garbage collector's
pauses (flashrt_ros/gc_pauses.py).
`PolicyHealth` is plain Python (thread-safe, testable without ROS);
`diagnostic_status` turns a report into a diagnostic_msgs/DiagnosticStatus.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field

import numpy as np

OK, WARN, ERROR = 0, 1, 2  # diagnostic_msgs/DiagnosticStatus levels
# Samples each /diagnostics percentile covers (the newest), however many the node keeps:
# a report's cost stays the same over a long run.
DIAGNOSTICS_WINDOW = 200
SKIP_TIMES_KEPT = 1000
# Policy.predict's timing keys, then the node's publishing after it.
INFERENCE_PHASES = ("preprocess", "model", "postprocess", "publish")


class RollingWindow:
    """The last `size` values of a series, with percentiles."""

    def __init__(self, size: int = DIAGNOSTICS_WINDOW):
        self._values = collections.deque(maxlen=size)

    def add(self, value: float) -> None:
        self._values.append(value)

    def percentile(self, q: float, newest: int | None = None) -> float | None:
        """q-th percentile of the values kept, or of only the `newest` ones."""
        if not self._values:
            return None
        values = self._values if newest is None else itertools.islice(reversed(self._values), newest)
        return float(np.percentile(np.fromiter(values, float), q))


@dataclass
class HealthReport:
    level: int
    message: str
    values: dict[str, str] = field(default_factory=dict)


class PolicyHealth:
    """Figures of one policy node. Times for rate and inference latency are host
    monotonic seconds; observation-to-publish latency is on the node clock."""

    def __init__(self, rate_window_s: float = 5.0, latency_window: int = DIAGNOSTICS_WINDOW):
        self._lock = threading.Lock()
        self._rate_window_s = rate_window_s
        self._publish_times = collections.deque()
        self.inference_latency = RollingWindow(latency_window)
        self.observation_latency = RollingWindow(latency_window)
        self.late_start_delay = RollingWindow(latency_window)
        # Where an inference's time goes (Policy.predict's own split) and the publishing
        # after it: to tell a slow GPU call from host work or waiting for the GIL.
        self.phases = {name: RollingWindow(latency_window) for name in INFERENCE_PHASES}
        self.late_starts = 0  # ticks that waited for the previous inference to end
        self.published = 0
        self.skipped: collections.Counter = collections.Counter()
        # (time.monotonic(), reason) of the newest skips: to line them up with other
        # events of the run (e.g. garbage collector pauses).
        self.skip_times: collections.deque = collections.deque(maxlen=SKIP_TIMES_KEPT)
        self._skipped_since_report: collections.Counter = collections.Counter()
        self._published_since_report = 0
        self._last_skip_detail: dict[str, str] = {}
        self.fault: tuple[str, str] | None = None  # (reason, advice) while the engine is stopped

    def record_fault(self, reason: str, advice: str) -> None:
        """The engine was stopped: every report is ERROR with the reason and the advice
        until clear_fault()."""
        with self._lock:
            self.fault = (reason, advice)

    def clear_fault(self) -> None:
        with self._lock:
            self.fault = None

    def record_published(self, inference_s: float, observation_to_publish_s: float,
                         now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self.published += 1
            self._published_since_report += 1
            self._publish_times.append(now)
            self.inference_latency.add(inference_s)
            self.observation_latency.add(observation_to_publish_s)

    def record_phases(self, seconds: dict[str, float]) -> None:
        """Durations of one tick's phases (keys of INFERENCE_PHASES; others ignored)."""
        with self._lock:
            for name, value in seconds.items():
                if name in self.phases:
                    self.phases[name].add(value)

    def record_late_start(self, delay_s: float) -> None:
        """A tick fired during an inference and started `delay_s` later, when it ended."""
        with self._lock:
            self.late_starts += 1
            self.late_start_delay.add(delay_s)

    def record_skipped(self, reason: str, detail: str = "") -> None:
        with self._lock:
            self.skipped[reason] += 1
            self.skip_times.append((time.monotonic(), reason))
            self._skipped_since_report[reason] += 1
            self._last_skip_detail[reason] = detail

    def rate(self, now: float | None = None) -> float:
        """Chunks published per second over the last `rate_window_s` seconds."""
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._publish_times and self._publish_times[0] < now - self._rate_window_s:
                self._publish_times.popleft()
            return len(self._publish_times) / self._rate_window_s

    def report(self, *, active: bool, engine: dict[str, str],
               now: float | None = None) -> HealthReport:
        """Figures since start plus the level of the period since the last report:
        ERROR while an engine fault is recorded, or when active and nothing was published
        but ticks were skipped (or the engine failed), WARN when some ticks were skipped,
        OK otherwise."""
        rate = self.rate(now)
        with self._lock:
            period_skips = self._skipped_since_report
            period_published = self._published_since_report
            self._skipped_since_report = collections.Counter()
            self._published_since_report = 0
            values = {
                "state": "active" if active else "inactive",
                "chunks published": str(self.published),
                "rate [Hz]": f"{rate:.2f}",
                "inference latency p50 [ms]": _ms(self.inference_latency.percentile(50, DIAGNOSTICS_WINDOW)),
                "inference latency p99 [ms]": _ms(self.inference_latency.percentile(99, DIAGNOSTICS_WINDOW)),
                "observation to publish p50 [ms]": _ms(self.observation_latency.percentile(50, DIAGNOSTICS_WINDOW)),
                "observation to publish p99 [ms]": _ms(self.observation_latency.percentile(99, DIAGNOSTICS_WINDOW)),
                "skipped ticks": str(sum(self.skipped.values())),
                "ticks started late": str(self.late_starts),
                "late start p99 [ms]": _ms(self.late_start_delay.percentile(99, DIAGNOSTICS_WINDOW)),
            }
            for name, window in self.phases.items():
                values[f"{name} p99 [ms]"] = _ms(window.percentile(99, DIAGNOSTICS_WINDOW))
            for reason, count in sorted(self.skipped.items()):
                values[f"skipped: {reason}"] = str(count)
            last_details = dict(self._last_skip_detail)
            fault = self.fault
        values.update(engine)
        if fault is not None:
            reason, advice = fault
            values.update({"engine fault": reason, "advice": advice})
            return HealthReport(ERROR, f"engine stopped: {reason}; {advice}", values)
        if not period_skips:
            return HealthReport(OK, "publishing" if active else "inactive", values)
        worst = period_skips.most_common(1)[0][0]
        detail = last_details.get(worst, "")
        text = f"{sum(period_skips.values())} ticks skipped, mostly '{worst}'" + (
            f" ({detail})" if detail else "")
        failing = "inference error" in period_skips or (active and period_published == 0)
        return HealthReport(ERROR if failing else WARN, text, values)


def warm_up_reports() -> None:
    """Make one report over samples, so that the node's first real one imports nothing:
    numpy's percentile loads numpy.ma on its first call, and compiling it (a
    site-packages without bytecode) took 59 ms with the GIL held on the H100 box, at the
    first /diagnostics after activation: rcl then dropped 2-3 periods of a 50 Hz timer."""
    health = PolicyHealth()
    health.record_published(0.01, 0.02)
    health.record_phases({name: 0.001 for name in INFERENCE_PHASES})
    health.record_late_start(0.001)
    health.record_skipped("busy")
    health.report(active=True, engine={})


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.1f}"


def gpu_memory(device: str) -> dict[str, str]:
    """Allocated / reserved GPU memory of a CUDA device (torch's allocator counters), as
    diagnostic values; empty for CPU devices. Host-side counters only: this runs on a
    periodic callback beside the realtime loop, and the driver's free-memory query holds
    the GIL while it waits on the driver (see gpu_free_memory)."""
    if not device.startswith("cuda"):
        return {}
    import torch  # the engine already imported it when the device is CUDA

    mib = 1024 ** 2
    return {
        "gpu memory allocated [MiB]": f"{torch.cuda.memory_allocated(device) / mib:.0f}",
        "gpu memory reserved [MiB]": f"{torch.cuda.memory_reserved(device) / mib:.0f}",
    }


def gpu_free_memory(device: str) -> dict[str, str]:
    """The device's free / total memory from the driver, for configure (torch's binding
    of cudaMemGetInfo keeps the GIL for the whole driver call, so it stays off the
    periodic path); empty for CPU devices."""
    if not device.startswith("cuda"):
        return {}
    import torch

    free, total = torch.cuda.mem_get_info(device)
    mib = 1024 ** 2
    return {"gpu memory free at configure [MiB]": f"{free / mib:.0f} of {total / mib:.0f}"}


def diagnostic_status(report: HealthReport, *, name: str, hardware_id: str):
    """diagnostic_msgs/DiagnosticStatus of a HealthReport."""
    from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

    status = DiagnosticStatus()
    status.level = bytes([report.level])
    status.name = name
    status.message = report.message
    status.hardware_id = hardware_id
    status.values = [KeyValue(key=k, value=v) for k, v in report.values.items()]
    return status
