"""The predict benchmark runs and reports its numbers (timings are not asserted)."""

import json

from flashrt_core import bench


def test_bench_json_report(capsys):
    assert bench.main(["--model", "pi0", "--views", "2", "--iters", "3", "--warmup", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["iters"] == 3 and report["spec"]["model"] == "pi0" and report["spec"]["num_views"] == 2
    assert report["p90_ms"] >= report["p50_ms"] > 0 and report["hz"] > 0
    assert set(report["p50_split_ms"]) == {"preprocess", "model", "postprocess", "total"}
    assert report["device"] == "cpu" and report["torch"]


def test_bench_text_report(capsys):
    assert bench.main(["--iters", "2", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "predict: p50" in out and "Hz over 2 calls" in out
