"""PolicyHealth: what /diagnostics reports against what the node keeps (plain Python)."""

import os
import subprocess
import sys
import textwrap

import pytest

from flashrt_ros.diagnostics import DIAGNOSTICS_WINDOW, PolicyHealth


def test_diagnostics_report_the_newest_samples_while_a_run_keeps_them_all():
    # A benchmark keeps the whole run; /diagnostics stays on the newest samples, so a
    # report costs the same at minute one and at hour ten.
    health = PolicyHealth(latency_window=10 * DIAGNOSTICS_WINDOW)
    samples = 3 * DIAGNOSTICS_WINDOW
    for i in range(1, samples + 1):
        health.record_published(i * 1e-3, i * 1e-3)
        health.record_phases({"model": i * 1e-3, "not a phase": 1.0})
    values = health.report(active=True, engine={}).values
    newest_median = samples - (DIAGNOSTICS_WINDOW - 1) / 2
    assert float(values["inference latency p50 [ms]"]) == round(newest_median, 1)
    assert float(values["observation to publish p50 [ms]"]) == round(newest_median, 1)
    assert health.inference_latency.percentile(50) * 1e3 == pytest.approx((samples + 1) / 2)  # the whole run
    assert health.phases["model"].percentile(50) * 1e3 == pytest.approx((samples + 1) / 2)


def test_after_the_warm_up_a_report_imports_nothing():
    """The node's realtime loop must not import: a first import holds the GIL (numpy's
    percentile loads numpy.ma on first use: 59 ms on the H100 box, enough to drop ticks).
    In a fresh interpreter, the warm-up the node runs at configure leaves a report over
    every kind of sample nothing to load."""
    script = textwrap.dedent("""
        import sys
        from flashrt_ros.diagnostics import INFERENCE_PHASES, PolicyHealth, warm_up_reports
        from flashrt_ros.gc_pauses import GcPauses
        warm_up_reports()
        before = set(sys.modules)
        health = PolicyHealth()
        for i in range(50):
            health.record_published(0.01 + i * 1e-4, 0.03)
            health.record_phases({name: 0.002 for name in INFERENCE_PHASES})
            health.record_late_start(0.003)
        health.record_skipped("executor stall", "2 period(s) never ran")
        health.report(active=True, engine={"device": "cpu"})
        pauses = GcPauses()
        pauses.start()
        import gc
        gc.collect(0)
        pauses.diagnostic_values()
        pauses.stop()
        print(sorted(set(sys.modules) - before))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
