"""Pauses of the host itself, seen from a process of their own.

A skipped tick has two kinds of cause: the node's own latency (inference, GIL
contention, its executor), or the host stopping it (the kernel scheduler, a
hypervisor taking the vCPU, a power-state change). From inside the node both look
the same. A probe in another process tells them apart: it shares no GIL and no
executor with the node, and wakes on a fixed grid (cyclictest-style); a wake-up that
comes more than a threshold late is a pause of the host, and a skip right after one
was the host's.

`probe()` runs the loop; `HostPauseProbe` runs it in a spawned process for as long as
a `with` block lasts (the demo wraps its active window in one), and `attribute()`
matches skipped ticks to the pauses just before them. Times are time.monotonic(),
which is CLOCK_MONOTONIC on Linux: the same clock in every process.

Cost: one process waking every PERIOD_S, about 1-2% of a core.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path

PERIOD_S = 0.001      # wake-up grid
THRESHOLD_S = 0.005   # a wake-up this late is a pause
PAUSES_KEPT = 10_000
_SPAWN = multiprocessing.get_context("spawn")  # never fork a process running DDS threads


@dataclass(frozen=True)
class Pause:
    started: float   # time.monotonic() of the grid point the probe should have woken at
    seconds: float   # how late it woke

    @property
    def ended(self) -> float:
        return self.started + self.seconds


@dataclass
class ProbeResult:
    wakeups: int
    late_p50_s: float | None
    late_p99_s: float | None
    late_max_s: float | None
    pauses: list[Pause]
    steal_percent: float | None = None          # hypervisor steal over the run, all CPUs
    cpu_pressure_percent: float | None = None   # PSI: share of time some task waited for a CPU

    @property
    def longest_s(self) -> float:
        return max((p.seconds for p in self.pauses), default=0.0)


def cpu_counters() -> dict[str, float]:
    """Host-wide counters that explain a pause: steal jiffies (the hypervisor ran
    something else while this VM had work) and PSI CPU pressure (us some task waited
    for a CPU). Missing files (not Linux, no PSI) leave their keys out."""
    counters: dict[str, float] = {}
    try:
        jiffies = [int(f) for f in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        counters["total_jiffies"] = float(sum(jiffies))
        counters["steal_jiffies"] = float(jiffies[7]) if len(jiffies) > 7 else 0.0
    except (OSError, ValueError, IndexError):
        pass
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some"):
                counters["pressure_some_us"] = float(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        pass
    return counters


def probe(duration_s: float | None = None, period_s: float = PERIOD_S, threshold_s: float = THRESHOLD_S,
          stop=None) -> ProbeResult:
    """Wake on a fixed grid every period_s until duration_s has passed or `stop` (an
    event) is set; every wake-up more than threshold_s late is a Pause. A pause covers
    the grid points it missed: the next wake-up is the first grid point after it."""
    if period_s <= 0 or threshold_s <= 0 or (duration_s is not None and duration_s <= 0):
        raise ValueError("period, threshold and duration must be positive")
    before = cpu_counters()
    start = time.monotonic()
    end = float("inf") if duration_s is None else start + duration_s
    lateness: list[float] = []
    pauses: list[Pause] = []
    next_wake = start + period_s
    while next_wake < end and not (stop is not None and stop.is_set()):
        delay = next_wake - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        now = time.monotonic()
        late = now - next_wake
        lateness.append(late)
        if late > threshold_s and len(pauses) < PAUSES_KEPT:
            pauses.append(Pause(next_wake, late))
        next_wake += period_s * (int(max(late, 0.0) / period_s) + 1)
    ran_s = time.monotonic() - start
    after = cpu_counters()
    lateness.sort()
    n = len(lateness)
    result = ProbeResult(wakeups=n, late_p50_s=lateness[n // 2] if n else None,
                         late_p99_s=lateness[int(0.99 * (n - 1))] if n else None,
                         late_max_s=lateness[-1] if n else None, pauses=pauses)
    if "steal_jiffies" in before and "steal_jiffies" in after:
        total = after["total_jiffies"] - before["total_jiffies"]
        result.steal_percent = 100.0 * (after["steal_jiffies"] - before["steal_jiffies"]) / total if total else 0.0
    if "pressure_some_us" in before and "pressure_some_us" in after and ran_s > 0:
        result.cpu_pressure_percent = (after["pressure_some_us"] - before["pressure_some_us"]) / (ran_s * 1e4)
    return result


def _probe_process(ready, stop, results, period_s: float, threshold_s: float) -> None:
    ready.set()
    results.put(probe(None, period_s, threshold_s, stop=stop))


class HostPauseProbe:
    """probe() in a spawned process between start() and stop() (or over a `with`
    block). stop() returns its ProbeResult (None if the process did not report) and
    may be called again, or without start()."""

    def __init__(self, period_s: float = PERIOD_S, threshold_s: float = THRESHOLD_S):
        self.result: ProbeResult | None = None
        self._ready = _SPAWN.Event()
        self._stop = _SPAWN.Event()
        self._results = _SPAWN.Queue()
        self._process = _SPAWN.Process(target=_probe_process, name="flashrt-host-probe", daemon=True,
                                       args=(self._ready, self._stop, self._results, period_s, threshold_s))

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def start(self, timeout_s: float = 10.0) -> HostPauseProbe:
        """Start the probe process and wait (up to timeout_s) until it is probing: a
        fresh interpreter takes a few hundred ms to get there."""
        self._process.start()
        self._ready.wait(timeout_s)
        return self

    def stop(self) -> ProbeResult | None:
        if self._process.pid is None or self._stop.is_set():
            return self.result
        self._stop.set()
        try:
            self.result = self._results.get(timeout=10.0)
        except Exception:  # noqa: BLE001 - queue.Empty, or the process died: no result
            self.result = None
        self._process.join(timeout=5.0)
        if self._process.is_alive():
            self._process.kill()
        return self.result

    def __enter__(self) -> HostPauseProbe:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def attribute(skip_times: list[float], pauses: list[Pause], grace_s: float) -> list[bool]:
    """For each skipped tick (time.monotonic() when it was counted), whether a host
    pause overlapped the grace_s before it: such a tick was skipped while, or just
    after, the host stopped its processes (a skip is counted when the node's next
    callback runs, so up to a couple of periods after the time it lost)."""
    return [any(p.started <= t and p.ended >= t - grace_s for p in pauses) for t in skip_times]
