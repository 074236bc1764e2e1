"""Benchmark result files: a smoke run never overwrites a full run's figures."""

from __future__ import annotations

import json

from bench import common


def test_quick_runs_write_beside_full_results(monkeypatch, tmp_path):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "QUICK_RESULTS", tmp_path / "quick")
    ap = common.base_args("test")
    rows = [{"figure": "x", "value": 1.0}]
    try:
        ap.parse_args([])
        full = common.report("demo", rows, {})
        ap.parse_args(["--quick"])
        quick = common.report("demo", [{"figure": "x", "value": 2.0}], {})
    finally:
        common.set_quick(False)
    assert full == tmp_path / "demo.json"
    assert quick == tmp_path / "quick" / "demo.json"
    assert json.loads(full.read_text())["rows"][0]["value"] == 1.0  # untouched by the smoke run
    assert json.loads(quick.read_text())["rows"][0]["value"] == 2.0
