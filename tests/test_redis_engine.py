"""The engine on RedisStore: the same behaviour as on MemoryStore, plus what only a
shared database has (concurrent requests, two trainers, exports across stores)."""

from __future__ import annotations

import asyncio
import inspect
import json

import numpy as np
import pytest

from gesal_core.engine import Engine, EngineConfig
from gesal_core.generate import SamplingConfig
from gesal_core.guard import GuardConfig
from gesal_core.records import ChannelConfig
from gesal_core.store import MemoryStore
from gesal_core.svf import SVFConfig, SVFModel
from gesal_core.worker import ModelWorker

from . import test_engine
from .conftest import make_tiny_llama
from .redis_server import run

# Every engine test that builds its engine with `make_engine` (so it goes through the
# store) runs again here, with the store swapped for a RedisStore on a real server.
ENGINE_TESTS = sorted(
    name
    for name, fn in vars(test_engine).items()
    if name.startswith("test_")
    and list(inspect.signature(fn).parameters) == ["svf", "tiny_tokenizer"]
    and "make_engine" in inspect.getsource(fn)
)


def test_the_mirror_covers_the_store_heavy_engine_tests():
    for name in [
        "test_routing_threshold_and_running_mean",
        "test_train_commits_and_next_reply_uses_new_z",
        "test_export_import_round_trip_is_exact_and_byte_stable",
        "test_two_channel_isolation_is_exact",
        "test_votes_last_write_wins_and_aggregate",
    ]:
        assert name in ENGINE_TESTS


@pytest.mark.parametrize("name", ENGINE_TESTS)
def test_engine_behaviour_on_redis(name, svf, tiny_tokenizer, make_redis_store, monkeypatch):
    monkeypatch.setattr(
        test_engine, "MemoryStore", lambda defaults=None: make_redis_store(defaults)
    )
    getattr(test_engine, name)(svf, tiny_tokenizer)


@pytest.fixture
def svf(tiny_tokenizer):
    return SVFModel(make_tiny_llama(len(tiny_tokenizer)), "tiny", SVFConfig(progress=False))


def config(threshold=-1.0) -> EngineConfig:
    return EngineConfig(
        train_round=1,  # one reply makes a round: train on every vote
        sampling=SamplingConfig(max_new_tokens=4, temperature=0.9),
        guard=GuardConfig(enabled=False),
        channel_defaults=ChannelConfig(threshold=threshold),
    )


def ask(text):
    return [{"role": "user", "content": text}]


def test_concurrent_responds_count_every_prompt(svf, tiny_tokenizer, make_redis_store):
    prompts = [f"hello world {i}" for i in range(24)]

    async def go():
        cfg = config(threshold=-1.0)  # everything routes to one node
        eng = Engine(svf, tiny_tokenizer, make_redis_store(cfg.channel_defaults), cfg)
        outs = await asyncio.gather(*(eng.respond("c", ask(p)) for p in prompts))
        node = await eng.store.get_node("c", outs[0].node_id)
        expected = np.mean([eng._embed(p) for p in prompts], axis=0)
        replies = await eng.store.list_replies("c")
        eng.close()
        return outs, node, expected, replies

    outs, node, expected, replies = run(go())
    assert len({o.node_id for o in outs}) == 1  # no race created a second node
    assert node.count == len(prompts)
    assert np.allclose(node.embedding, expected, atol=1e-5)
    assert len(replies) == len(prompts)


def test_export_moves_between_stores_exactly(svf, tiny_tokenizer, make_redis_store):
    """Memory -> Redis -> Memory: the same bytes every way, z vectors included."""

    async def go():
        cfg = config(threshold=0.9999)
        mem = Engine(svf, tiny_tokenizer, MemoryStore(cfg.channel_defaults), cfg, model_name="t")
        a = await mem.respond("c", ask("hello"))
        await mem.respond("c", ask("fox 0123"))
        await mem.vote("c", a.reply_id, "ann", 1)
        await mem.correct("c", a.reply_id, "bob", "Sure, here is a short answer!")
        await mem.link_message("c", a.reply_id, "msg-1")
        await mem.train()
        text = Engine.dumps(await mem.export("c"))

        red = Engine(svf, tiny_tokenizer, make_redis_store(), cfg, worker=mem.worker)
        red.model_name = "t"
        await red.import_graph("c", json.loads(text))
        from_redis = Engine.dumps(await red.export("c"))
        assert from_redis == Engine.dumps(await red.export("c"))  # byte-stable
        back = Engine(svf, tiny_tokenizer, MemoryStore(), cfg, worker=mem.worker)
        back.model_name = "t"
        await back.import_graph("c", json.loads(from_redis))
        again = Engine.dumps(await back.export("c"))
        assert await red.reply_for_message("c", "msg-1") == a.reply_id  # mapping restored
        mem.close()
        return text, from_redis, again

    text, from_redis, again = run(go())
    assert from_redis == text and again == text
    assert sorted(n["version"] for n in json.loads(text)["nodes"]) == [0, 1]  # trained z too


def test_two_trainers_never_apply_one_batch_twice(svf, tiny_tokenizer, make_redis_store):
    """Both trainers read the same batch (as after a lock expired); only one commits."""

    async def go():
        cfg = config()
        worker = ModelWorker()
        a = Engine(svf, tiny_tokenizer, make_redis_store(claim_idle_ms=0), cfg, worker=worker)
        b = Engine(svf, tiny_tokenizer, make_redis_store(claim_idle_ms=0), cfg, worker=worker)
        r = await a.respond("c", ask("hello"))
        for user in ["u1", "u2", "u3"]:
            await a.vote("c", r.reply_id, user, 1)
        # bypass the lock: the version and pending checks alone must decide
        results = await asyncio.gather(
            a.trainer.train_locked("c", False), b.trainer.train_locked("c", False)
        )
        node = await a.store.get_node("c", r.node_id)
        # and with the lock: a second trainer skips the channel while one holds it
        async with b.store.trainer_lock("c", ttl=30):
            await a.vote("c", r.reply_id, "u4", -1)
            skipped = await a.train("c")
        pending = await a.pending("c")
        worker.close()
        return results, node, skipped, pending

    results, node, skipped, pending = run(go())
    statuses = sorted(rep.status for reports, _, _ in results for rep in reports)
    assert statuses == ["conflict", "updated"]
    assert node.version == 1 and node.rated == 1 and node.updates == 1
    assert skipped.events == 0 and pending == 1


def test_engine_survives_redis_outage(svf, tiny_tokenizer, tmp_path):
    """Redis goes away: calls fail with a plain message; it comes back: all works again."""
    from gesal_core.store import StoreUnavailableError
    from gesal_core.store.redis_store import RedisStore

    from .redis_server import start_test_server

    server = start_test_server(tmp_path / "r")

    async def go():
        cfg = config()
        store = RedisStore(server.url, cfg.channel_defaults, retries=2)
        eng = Engine(svf, tiny_tokenizer, store, cfg)
        r = await eng.respond("c", ask("hello"))
        await eng.vote("c", r.reply_id, "ann", 1)
        await asyncio.to_thread(server.kill)
        with pytest.raises(StoreUnavailableError, match="not reachable") as err:
            await eng.respond("c", ask("hello again"))
        assert "try again" in str(err.value)
        with pytest.raises(StoreUnavailableError):
            await eng.vote("c", r.reply_id, "bob", 1)
        with pytest.raises(StoreUnavailableError):
            await eng.train()
        restarted = await asyncio.to_thread(start_test_server, tmp_path / "r")
        r2 = await eng.respond("c", ask("hello again"))  # reconnected by itself
        report = await eng.train()
        eng.close()
        await store.close()
        return restarted, r2, report

    restarted, r2, report = run(go())
    try:
        assert r2.reply_id and report.events == 1 and report.count("updated") == 1
    finally:
        restarted.stop()
