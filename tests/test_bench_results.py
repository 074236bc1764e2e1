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


def test_more_threads_write_their_own_factored_order_file(monkeypatch, tmp_path):
    """`docs/performance.md` quotes both thread counts: a two-thread run must not overwrite
    the one-thread figures."""
    import torch

    from bench import factored_order

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    before = torch.get_num_threads()
    tiny = ["--layers", "1", "--sizes", "1", "--repeats", "1"]
    try:
        factored_order.main(tiny)
        factored_order.main([*tiny, "--threads", "2"])
    finally:
        torch.set_num_threads(before)
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [
        "factored_order.json",
        "factored_order_2threads.json",
    ]


# Each result file the suite's summary reads, and text that names its targets.
SUMMARY_READS = {
    "generation": "base tok/s",
    "node_switch": "TTFT over the base model's",
    "multichannel": "merge cost excluded",
    "serving_batch": "serving path (nodes hot), 1 thread",
    "serving_batch_2threads": "serving path (nodes hot), 2 threads",
    "weight_layout": "weights stored input-major",
    "factored_order": "factored product on 8 rows per layer",
    "serving_logprob": "log π recorded while generating",
    "update_step": "SVF update on 4 samples",
    "train_vs_serve": "share the worker",
    "routing": "routing at 10k nodes",
    "redis_store": "Redis node load",
    "decode": "base decoding",
}


def test_the_summary_reads_every_kept_result():
    """The kept files in bench/results/ are in the format the scripts write today: the
    suite's summary finds its figures in each (a renamed column would raise here)."""
    from bench import run_all

    common.set_quick(False)
    rows = run_all.targets()
    for name, text in SUMMARY_READS.items():
        mine = [r for r in rows if text in r["target"]]
        assert mine, f"no target reads {name}.json"
        if (common.RESULTS / f"{name}.json").exists():
            assert all(r["measured"] != "not run" for r in mine), (name, mine)
