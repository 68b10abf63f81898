"""The host-pause probe (flashrt_ros/host_pauses.py): a process of its own that sees
the host stop it, and the matching of skipped ticks to those pauses."""

import os
import signal
import time

import pytest

from flashrt_ros.host_pauses import HostPauseProbe, Pause, attribute, probe


def test_a_stopped_probe_process_reports_the_pause_where_it_happened():
    """SIGSTOP is what a host pause looks like to a process: not running for a while.
    The probe reports one pause covering the stop, at the time it began, on the clock
    the node's skip times use."""
    with HostPauseProbe() as host:  # returns once the probe process is probing
        time.sleep(0.1)
        stopped = time.monotonic()
        os.kill(host.pid, signal.SIGSTOP)
        time.sleep(0.3)
        os.kill(host.pid, signal.SIGCONT)
        resumed = time.monotonic()
        time.sleep(0.2)
    result = host.result
    assert result is not None and result.wakeups > 100
    long_ones = [p for p in result.pauses if p.seconds >= 0.25]
    assert len(long_ones) == 1, result.pauses
    pause = long_ones[0]
    # It began at most a grid step and a threshold before the stop and ended after the
    # resume (the probe wakes once it runs again).
    assert stopped - 0.01 <= pause.started <= stopped + 0.01
    assert resumed - 0.01 <= pause.ended <= resumed + 0.1
    assert result.longest_s == max(p.seconds for p in result.pauses)


def test_probe_keeps_its_grid_and_stops_on_time():
    started = time.monotonic()
    result = probe(0.3, period_s=0.002)
    assert 0.3 - 0.002 <= time.monotonic() - started < 1.0  # its last grid point is before the end
    # A grid of 2 ms over 0.3 s: ~150 wake-ups, fewer only by what pauses covered.
    assert 100 <= result.wakeups <= 150
    assert 0 <= result.late_p50_s <= result.late_p99_s <= result.late_max_s
    assert all(p.seconds > 0.005 for p in result.pauses)


def test_stop_without_start_and_twice_is_harmless():
    host = HostPauseProbe()
    assert host.stop() is None
    with host:
        time.sleep(0.5)
    first = host.result
    assert first is not None and host.stop() is first


@pytest.mark.parametrize("bad", [dict(period_s=0), dict(threshold_s=-1), dict(duration_s=0)])
def test_probe_rejects_nonsense_settings(bad):
    with pytest.raises(ValueError):
        probe(**{"duration_s": 0.1, **bad})


def test_skips_are_the_hosts_during_or_within_the_grace_after_a_pause():
    pauses = [Pause(started=10.0, seconds=0.05), Pause(started=20.0, seconds=0.01)]
    skips = [9.99,    # before any pause
             10.02,   # during the first
             10.10,   # 50 ms after its end: within a 60 ms grace
             10.12,   # 70 ms after: not
             20.05,   # 40 ms after the second
             30.0]
    assert attribute(skips, pauses, grace_s=0.06) == [False, True, True, False, True, False]
    assert attribute(skips, [], grace_s=0.06) == [False] * len(skips)
