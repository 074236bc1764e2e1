"""Channels near a cap are flagged in admin stats and /healthz before the cap bites."""

from __future__ import annotations

import asyncio

import numpy as np

from bot.health import Health, engine_checks
from gesal_core import stats as stats_mod
from gesal_core.engine import capacity_warnings, channel_stats
from gesal_core.records import ChannelConfig, Node, Reply
from gesal_core.store import MemoryStore

from .fakes.tiny import make_engine

CH = "discord:1:2"


def _node(i: int) -> Node:
    rng = np.random.default_rng(i)
    return Node(f"n{i}", rng.standard_normal(4).astype(np.float32), np.ones(8, dtype=np.float32))


async def _fill(store: MemoryStore, nodes: int, replies: int, votes: int) -> None:
    await store.set_config(CH, ChannelConfig(max_nodes=10))
    for i in range(nodes):
        await store.save_node(CH, _node(i))
    for i in range(replies):
        await store.put_reply(CH, Reply(f"r{i}", "n0", [1], [2], "q", "a", 0))
    for i in range(votes):
        await store.set_vote(CH, "r0", f"user{i}", 1)


def test_capacity_warnings_start_at_ninety_percent_and_the_pending_threshold():
    assert capacity_warnings(nodes=8, max_nodes=10, pending=0) == []
    assert capacity_warnings(nodes=9, max_nodes=10, pending=0) != []
    assert capacity_warnings(nodes=0, max_nodes=10, pending=stats_mod.PENDING_WARN) != []
    assert capacity_warnings(nodes=0, max_nodes=10, pending=0, replies=1799, max_replies=2000) == []
    near = capacity_warnings(nodes=0, max_nodes=10, pending=0, replies=1800, max_replies=2000)
    assert near == ["1800 of 2000 replies kept: the oldest replies and their votes drop"]
    # a store without retention, or a caller that counts no replies, gets no reply warning
    assert capacity_warnings(nodes=0, max_nodes=10, pending=0, replies=5000) == []


def test_stats_flag_each_cap_a_channel_nears(monkeypatch):
    monkeypatch.setattr(stats_mod, "PENDING_WARN", 5)

    async def go(nodes, replies, votes):
        store = MemoryStore()
        store.max_replies = 10  # a small retention cap, as RedisStore(max_replies=10) has
        await _fill(store, nodes, replies, votes)
        return (await channel_stats(store, CH))["near_caps"]

    assert asyncio.run(go(8, 8, 4)) == []
    near = asyncio.run(go(9, 9, 5))
    assert len(near) == 3
    assert near[0].startswith("9 of 10 nodes")
    assert near[1].startswith("9 of 10 replies kept")
    assert near[2].startswith("5 feedback events pending")


class _CountsOnly(MemoryStore):
    """/healthz must not read node or reply records, only counts."""

    async def load_nodes(self, channel):
        raise AssertionError("healthz read the nodes")

    async def list_replies(self, channel):
        raise AssertionError("healthz read the replies")


async def _healthz(tiny_tokenizer, store) -> tuple[bool, dict]:
    """/healthz of an engine on ``store``: (healthy, body)."""
    eng = make_engine(tiny_tokenizer, store=store)
    try:
        health = Health(timeout=1.0)
        engine_checks(health, eng)
        return await health.report()
    finally:
        eng.close()


def test_healthz_lists_channels_near_a_cap_and_stays_healthy(monkeypatch, tiny_tokenizer):
    monkeypatch.setattr(stats_mod, "PENDING_WARN", 5)

    async def go():
        store = _CountsOnly()
        store.max_replies = 5  # a small retention cap, as RedisStore(max_replies=5) has
        await _fill(store, 9, 5, 5)
        await store.set_config("discord:1:3", ChannelConfig(max_nodes=10))
        await store.save_node("discord:1:3", _node(0))  # far from its caps
        return await _healthz(tiny_tokenizer, store)

    ok, body = asyncio.run(go())
    assert ok  # capacity is not ill health: /healthz stays 200
    near = body["warnings"]["near_caps"]
    assert list(near) == [CH]
    assert near[CH][0].startswith("9 of 10 nodes")
    assert near[CH][1].startswith("5 of 5 replies kept")
    assert near[CH][2].startswith("5 feedback events pending")


def test_redis_counts_the_replies_it_keeps(make_redis_store):
    """/healthz's reply count is the retention set's size (a ZCARD), whatever is trimmed."""

    async def go():
        store = make_redis_store(max_replies=3)
        try:
            await _fill(store, 1, 5, 0)
            return await store.reply_count(CH), len(await store.list_replies(CH))
        finally:
            await store.close()

    assert asyncio.run(go()) == (3, 3)


def test_healthz_has_no_warnings_when_no_channel_is_near_a_cap(tiny_tokenizer):
    async def go():
        store = MemoryStore()
        await _fill(store, 1, 1, 1)
        return await _healthz(tiny_tokenizer, store)

    ok, body = asyncio.run(go())
    assert ok and "warnings" not in body
