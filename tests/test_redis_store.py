"""RedisStore against a real redis-server: layout, atomicity, exactly-once commits."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from redis.crc import key_slot

from gesal_core.records import ChannelConfig, Node, NodeUpdate, Reply
from gesal_core.store import ConflictError, UnknownReplyError
from gesal_core.store.layout import BadChannelError, Keys

from .redis_server import run

CH = "discord:1:2"


def node(node_id="n1", dim=4, z_size=8, **kw) -> Node:
    rng = np.random.default_rng(len(node_id))
    return Node(
        node_id,
        rng.standard_normal(dim).astype(np.float32),
        rng.standard_normal(z_size).astype(np.float32),
        **kw,
    )


def reply(reply_id="r1", node_id="n1", **kw) -> Reply:
    return Reply(reply_id, node_id, [1, 2, 3], [4, 5, 2], "hi", "hello", 0, **kw)


def update(node_id="n1", version=0, z=None, rated=1, reward=1.0) -> NodeUpdate:
    return NodeUpdate(node_id, version, z, 0.5, rated, reward, [reward], z is not None, False, [])


def test_every_channel_key_shares_one_hash_slot(make_redis_store, redis_client):
    async def go():
        s = make_redis_store()
        await s.save_node(CH, node())
        await s.put_reply(CH, reply())
        await s.link_message(CH, "r1", "m1")
        await s.set_vote(CH, "r1", "ann", 1)
        await s.add_correction(CH, "r1", "ann", "better", [7, 8])
        await s.set_config(CH, ChannelConfig(threshold=0.5))
        await s.set_meta(CH, last_train=1.0)
        await s.pending(CH, "t")
        await s.close()

    run(go())
    keys = sorted(k.decode() for k in redis_client.keys("*"))
    channel_keys = [k for k in keys if k != "gesal:channels"]
    assert len(channel_keys) >= 8
    assert all(k.startswith("gesal:{discord:1:2}:") for k in channel_keys), keys
    assert {key_slot(k.encode()) for k in channel_keys} == {key_slot(b"discord:1:2")}
    assert redis_client.smembers("gesal:channels") == {b"discord:1:2"}


def test_vectors_are_little_endian_float32_bytes(make_redis_store, redis_client):
    n = node()
    run(make_redis_store().save_node(CH, n))
    raw = redis_client.hget(Keys(CH).node("n1"), "z")
    assert raw == n.z.astype("<f4").tobytes() and len(raw) == 4 * n.z.size


def test_node_round_trip_is_exact(make_redis_store):
    n = node(count=3, version=2, baseline=0.1 + 0.2, reward_sum=-2 / 3, recent=[0.1, -2.0])
    n.neighbors = [("n2", 0.123456789)]
    n.downvoted = ["nope"]

    async def go():
        s = make_redis_store()
        await s.save_node(CH, n)
        got = await s.get_node(CH, "n1")
        assert got.to_dict() == n.to_dict()
        assert [x.node_id for x in await s.load_nodes(CH)] == ["n1"]
        assert await s.get_node("other", "n1") is None  # channels are separate

    run(go())


def test_nodes_keep_creation_order(make_redis_store):
    async def go():
        s = make_redis_store()
        for i in ["b", "a", "c"]:
            await s.save_node(CH, node(i))
        await s.save_node(CH, node("a", count=5))  # replacing keeps its place
        await s.delete_node(CH, "b")
        await s.save_node(CH, node("b"))  # re-created: goes last
        return [n.node_id for n in await s.load_nodes(CH)]

    assert run(go()) == ["a", "c", "b"]


def test_fifty_concurrent_observes_are_exact(make_redis_store):
    rng = np.random.default_rng(0)
    embs = rng.standard_normal((50, 16)).astype(np.float32)

    async def go():
        s = make_redis_store()
        await s.save_node(CH, node(dim=16))
        counts = await asyncio.gather(*(s.observe(CH, "n1", e) for e in embs))
        return counts, await s.get_node(CH, "n1")

    counts, n = run(go())
    assert sorted(counts) == list(range(1, 51))  # each call saw its own increment
    assert n.count == 50
    assert np.allclose(n.embedding, embs.mean(axis=0), atol=1e-5)


def test_observe_unknown_node_and_wrong_width(make_redis_store):
    async def go():
        s = make_redis_store()
        with pytest.raises(KeyError):
            await s.observe(CH, "ghost", np.ones(4, np.float32))
        await s.save_node(CH, node(dim=4))
        with pytest.raises(ValueError, match="embedding size"):
            await s.observe(CH, "n1", np.ones(5, np.float32))

    run(go())


def test_replies_votes_messages_and_retention(make_redis_store):
    async def go():
        s = make_redis_store(max_replies=3)
        for i in range(5):
            await s.put_reply(CH, reply(f"r{i}", created_at=1000.0 + i))
            await s.link_message(CH, f"r{i}", f"m{i}")
        assert [r.reply_id for r in await s.list_replies(CH)] == ["r2", "r3", "r4"]
        assert await s.reply_for_message(CH, "m4") == "r4"
        assert await s.reply_for_message(CH, "m0") is None  # mapping trimmed with it
        with pytest.raises(UnknownReplyError, match="older than the history"):
            await s.set_vote(CH, "r0", "ann", 1)
        with pytest.raises(UnknownReplyError):
            await s.link_message(CH, "r0", "m9")
        await s.set_vote(CH, "r4", "ann", 1)
        await s.set_vote(CH, "r4", "ann", -1)  # last write wins
        await s.set_vote(CH, "r4", "bob", 1)
        await s.set_vote(CH, "r4", "bob", None)  # retracted
        await s.add_correction(CH, "r4", "cat", "first try", [5])
        await s.add_correction(CH, "r4", "cat", "Better: é ✓", [9, 10])  # replaces cat's first
        got = await s.get_reply(CH, "r4")
        assert got.votes == {"ann": -1}
        assert got.corrections == [{"user": "cat", "text": "Better: é ✓", "ids": [9, 10]}]
        assert got.platform_message_id == "m4"
        events = await s.pending(CH, "t1")
        assert [(e.user, e.kind, e.value) for e in events] == [
            ("ann", "vote", 1),
            ("ann", "vote", -1),
            ("bob", "vote", 1),
            ("bob", "vote", None),
            ("cat", "correction", None),
            ("cat", "correction", None),
        ]
        assert events[-1].text == "Better: é ✓"
        assert await s.pending_count(CH) == 6
        with pytest.raises(UnknownReplyError):
            await s.set_vote("elsewhere", "r4", "ann", 1)

    run(go())


def test_a_dropped_reply_leaves_nothing_behind(make_redis_store):
    """An answer that could not be posted is dropped: record, message link and its place
    in the retention order go, on Redis and in memory alike; an unknown id is a no-op."""
    from gesal_core.store.memory import MemoryStore

    async def go():
        for s in (make_redis_store(), MemoryStore()):
            await s.put_reply(CH, reply("r1"))
            await s.put_reply(CH, reply("r2"))
            await s.link_message(CH, "r2", "m2")
            await s.drop_reply(CH, "r2")
            await s.drop_reply(CH, "nope")
            assert await s.get_reply(CH, "r2") is None
            assert await s.reply_for_message(CH, "m2") is None
            assert [r.reply_id for r in await s.list_replies(CH)] == ["r1"]
            assert await s.reply_count(CH) == 1

    run(go())


def test_commit_applies_and_acks_atomically(make_redis_store):
    async def go():
        s = make_redis_store()
        await s.save_node(CH, node(reward_sum=0.1))
        await s.put_reply(CH, reply())
        await s.set_vote(CH, "r1", "ann", 1)
        events = await s.pending(CH, "t1")
        z = np.full(8, 1.25, np.float32)
        u = update(z=z, reward=0.2)
        u.counted = {"r1": 1.0, "dropped-by-retention": -2.0}
        await s.commit(CH, [u], [e.event_id for e in events])
        assert (await s.get_reply(CH, "r1")).counted == 1.0  # with the update, atomically
        assert await s.get_reply(CH, "dropped-by-retention") is None  # not half-created
        n = await s.get_node(CH, "n1")
        assert n.version == 1 and np.array_equal(n.z, z)
        assert n.rated == 1 and n.updates == 1 and n.reward_sum == 0.1 + 0.2  # exact double
        assert await s.pending_count(CH) == 0 and await s.pending(CH, "t1") == []
        assert (await s.meta(CH))["trained_events"] == 1

    run(go())


def test_conflicting_commit_changes_nothing(make_redis_store):
    async def go():
        s = make_redis_store()
        await s.save_node(CH, node())
        await s.save_node(CH, node("n2"))
        await s.put_reply(CH, reply())
        await s.set_vote(CH, "r1", "ann", 1)
        ids = [e.event_id for e in await s.pending(CH, "t1")]
        before = [n.to_dict() for n in await s.load_nodes(CH)]
        z = np.full(8, 2.0, np.float32)
        # n2's version moved: neither n1 nor the events may change
        with pytest.raises(ConflictError, match="changed"):
            await s.commit(CH, [update("n1", 0, z), update("n2", 7, z)], ids)
        with pytest.raises(ConflictError, match="changed"):
            await s.commit(CH, [update("gone", 0, z)], ids)
        assert [n.to_dict() for n in await s.load_nodes(CH)] == before
        assert await s.pending_count(CH) == 1
        await s.commit(CH, [update("n1", 0, z)], ids)
        # the same batch again (a second trainer): refused although n2 never moved
        with pytest.raises(ConflictError, match="already applied"):
            await s.commit(CH, [update("n2", 0, None)], ids)
        assert (await s.get_node(CH, "n2")).rated == 0

    run(go())


def test_dead_consumers_entries_are_reclaimed(make_redis_store):
    async def go():
        s = make_redis_store(claim_idle_ms=60_000)
        await s.put_reply(CH, reply())
        for u in ["a", "b", "c"]:
            await s.set_vote(CH, "r1", u, 1)
        first = await s.pending(CH, "dead-worker", count=2)
        assert len(first) == 2
        # a live worker gets only the undelivered entry while the other's are fresh
        assert [e.user for e in await s.pending(CH, "live")] == ["c"]
        assert [e.user for e in await s.pending(CH, "live")] == ["c"]  # own PEL again
        quick = make_redis_store(claim_idle_ms=50)
        await asyncio.sleep(0.1)
        got = await quick.pending(CH, "live")
        assert [e.user for e in got] == ["a", "b", "c"]  # reclaimed with XAUTOCLAIM
        await quick.commit(CH, [], [e.event_id for e in got])
        assert await quick.pending(CH, "dead-worker") == []

    run(go())


def test_idle_consumers_are_forgotten(make_redis_store, redis_client, monkeypatch):
    from gesal_core.store import redis_store

    async def go():
        s = make_redis_store()
        await s.put_reply(CH, reply())
        await s.set_vote(CH, "r1", "a", 1)
        await s.pending(CH, "holds-one")
        await s.pending(CH, "holds-none")
        monkeypatch.setattr(redis_store, "CONSUMER_GC_MS", -1)
        await s.pending(CH, "me")

    run(go())
    names = {c["name"] for c in redis_client.xinfo_consumers(Keys(CH).feedback, "trainers")}
    assert names == {b"holds-one", b"me"}  # the one with a pending entry is kept


def test_trainer_lock_excludes_and_can_be_lost(make_redis_store, redis_client):
    async def go():
        a, b = make_redis_store(), make_redis_store()
        async with a.trainer_lock(CH, ttl=0.3) as held_a, b.trainer_lock(CH, ttl=5) as held_b:
            assert held_a and not held_b
        async with b.trainer_lock(CH, ttl=5) as held:
            assert held  # released on exit
        async with a.trainer_lock(CH, ttl=5) as held_a:
            redis_client.delete(Keys(CH).trainlock)  # as if it expired in a long stall
            async with b.trainer_lock(CH, ttl=5) as held_b:
                assert held_a and held_b  # so the commit checks must (and do) decide

    run(go())


def test_config_meta_channels_and_reset(make_redis_store, redis_client):
    async def go():
        s = make_redis_store(ChannelConfig(threshold=0.3))
        assert (await s.get_config(CH)).threshold == 0.3  # the default
        await s.set_config(CH, ChannelConfig(threshold=0.6, max_nodes=5))
        await s.set_meta(CH, merged={"a": "b"}, last_train=12.5)
        await s.save_node(CH, node())
        await s.save_node("slack:T1:C1", node())
        assert await s.channels() == [CH, "slack:T1:C1"]
        assert (await s.get_config(CH)).max_nodes == 5
        assert await s.meta(CH) == {"merged": {"a": "b"}, "last_train": 12.5}
        await s.reset(CH)
        assert await s.channels() == ["slack:T1:C1"]
        assert await s.load_nodes(CH) == [] and (await s.get_config(CH)).threshold == 0.3
        assert await s.load_nodes("slack:T1:C1")  # the other channel is untouched

    run(go())
    assert not redis_client.keys("gesal:{discord:1:2}:*")


def test_a_vote_is_acknowledged_only_once_redis_has_fsynced_it(tmp_path):
    """WAITAOF is what makes an acknowledged vote durable, and killing redis-server
    cannot show it (the page cache outlives the process). A server that never fsyncs
    (``appendfsync no``) can: the write is in its memory and its AOF's page cache, yet
    the store does not acknowledge the vote, because the server never confirms an
    fsync. A store that skipped WAITAOF would acknowledge it, and fail here."""
    from gesal_core.store import StoreUnavailableError
    from gesal_core.store.redis_store import RedisStore

    from .redis_server import start_test_server

    server = start_test_server(tmp_path / "r", extra=("--appendfsync", "no"))

    async def go():
        durable = RedisStore(server.url, fsync_timeout_ms=300)
        await durable.put_reply(CH, reply())
        t0 = time.perf_counter()
        with pytest.raises(StoreUnavailableError, match="could not confirm") as err:
            await durable.set_vote(CH, "r1", "ann", 1)
        waited = time.perf_counter() - t0
        # the same write without the wait: acknowledged although nothing is on disk
        trusting = RedisStore(server.url, fsync_votes=False)
        event = await trusting.set_vote(CH, "r1", "bob", 1)
        await durable.close()
        await trusting.close()
        return str(err.value), waited, event

    try:
        message, waited, event = run(go())
        assert "please try again" in message
        assert waited >= 0.3  # it waited for the fsync confirmation that never came
        assert event  # what a store without WAITAOF would have told the member
        assert server.client().info("persistence")["aof_enabled"] == 1
    finally:
        server.stop()


def test_bad_channel_keys_are_refused(make_redis_store):
    s = make_redis_store()
    for bad in ["", "a{b}", "has space", "x" * 300]:
        with pytest.raises(BadChannelError):
            run(s.load_nodes(bad))


def test_vote_waits_for_fsync_on_everysec_server(tmp_path):
    """With the production fsync policy a vote returns only after WAITAOF confirmed it."""
    from gesal_core.store.redis_store import RedisStore

    from .redis_server import start_test_server

    server = start_test_server(tmp_path / "r", extra=())

    async def go():
        s = RedisStore(server.url)
        await s.put_reply(CH, reply())
        t0 = time.perf_counter()
        ids = await asyncio.gather(*(s.set_vote(CH, "r1", f"u{i}", 1) for i in range(30)))
        took = time.perf_counter() - t0
        await s.close()
        return ids, took

    try:
        ids, took = run(go())
        info = server.client().info("persistence")
        assert info["aof_enabled"] == 1 and len(set(ids)) == 30
        assert took < 5.0  # concurrent votes share fsyncs (everysec: about a second each)
    finally:
        server.stop()
