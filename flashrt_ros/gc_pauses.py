"""Pauses of CPython's cyclic garbage collector, timed while the policy runs.

A collection holds the GIL from start to end, so every Python thread of the process
(ticks, input callbacks, the engine thread returning from the GPU) waits for it. The
policy node keeps the heap frozen on the realtime path (see its module docstring);
this monitor shows on /diagnostics and in the demo's numbers whether collections
still happen and how long they stop the process, so a skipped tick can be checked
against them.

The callback runs inside every collection of the process, on whichever thread
triggered it, so it stays cheap: two clock reads, a few counters and stores into
preallocated arrays, nothing the collector tracks. It takes no lock (a collection can
start inside any locked region, the monitor's reader included, and would deadlock on
it); collections never overlap, and a reader racing a store sees a figure one
collection old. A pause is the wall time from the collection's start to its end.
"""

from __future__ import annotations

import gc
import time

import numpy as np

GENERATIONS = 3
WINDOW = 1000            # pauses kept for the percentiles
SLOW_PAUSE_S = 1e-3      # pauses at least this long are kept with their time
SLOW_PAUSES_KEPT = 1000


class GcPauses:
    """Counts and times the collections that start between start() and stop()."""

    def __init__(self):
        self.collections = [0] * GENERATIONS   # per generation
        self.count = 0
        self.longest_s = 0.0
        self.slow_count = 0                    # pauses of SLOW_PAUSE_S or longer
        self._pauses = np.zeros(WINDOW)        # ring buffer of the newest pauses [s]
        # Ring buffer of the newest slow pauses: time.monotonic() at the end, generation, s.
        self._slow_ended = np.zeros(SLOW_PAUSES_KEPT)
        self._slow_generation = np.zeros(SLOW_PAUSES_KEPT, np.int8)
        self._slow_pause = np.zeros(SLOW_PAUSES_KEPT)
        self._started = 0.0
        self._running = False

    def start(self) -> None:
        if not self._running:
            self._running = True
            gc.callbacks.append(self._on_collection)

    def stop(self) -> None:
        if self._running:
            self._running = False
            gc.callbacks.remove(self._on_collection)

    def _on_collection(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        ended = time.perf_counter()
        pause = ended - self._started
        generation = info["generation"]
        self._pauses[self.count % WINDOW] = pause
        self.collections[generation] += 1
        self.count += 1
        if pause > self.longest_s:
            self.longest_s = pause
        if pause >= SLOW_PAUSE_S:
            slot = self.slow_count % SLOW_PAUSES_KEPT
            self._slow_ended[slot] = time.monotonic()
            self._slow_generation[slot] = generation
            self._slow_pause[slot] = pause
            self.slow_count += 1

    def percentile(self, q: float) -> float | None:
        """q-th percentile of the newest WINDOW pauses [s] (None: no collection yet)."""
        count = self.count
        if count == 0:
            return None
        return float(np.percentile(self._pauses[:min(count, WINDOW)], q))

    def slow_pauses(self) -> list[tuple[float, int, float]]:
        """(time.monotonic() at its end, generation, seconds) of the newest
        SLOW_PAUSES_KEPT collections that took SLOW_PAUSE_S or longer, oldest first."""
        kept = min(self.slow_count, SLOW_PAUSES_KEPT)
        order = np.argsort(self._slow_ended[:kept])
        return [(float(self._slow_ended[i]), int(self._slow_generation[i]),
                 float(self._slow_pause[i])) for i in order]

    def diagnostic_values(self) -> dict[str, str]:
        """The figures as /diagnostics key-values (pauses in ms)."""
        values = {f"gc collections gen{g}": str(n) for g, n in enumerate(self.collections)}
        p99 = self.percentile(99)
        values["gc pause p99 [ms]"] = "n/a" if p99 is None else f"{p99 * 1e3:.2f}"
        values["gc pause max [ms]"] = f"{self.longest_s * 1e3:.2f}"
        values[f"gc pauses >= {SLOW_PAUSE_S * 1e3:g} ms"] = str(self.slow_count)
        return values
