"""PolicyHealth: what /diagnostics reports against what the node keeps (plain Python)."""

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
