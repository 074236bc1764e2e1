"""Crash tests: kill the training worker or redis-server mid-flight; nothing may be lost
and nothing applied twice."""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest

from gesal_core.engine import Engine, EngineConfig
from gesal_core.generate import SamplingConfig
from gesal_core.guard import GuardConfig
from gesal_core.records import ChannelConfig, Node, Reply
from gesal_core.store import StoreUnavailableError
from gesal_core.store.redis_store import RedisStore
from gesal_core.svf import SVFConfig, SVFModel

from .conftest import make_tiny_llama
from .redis_server import run, start_test_server
from .redis_trainer import CRASH_EXIT, Zygote

CH = "discord:9:9"


@pytest.fixture
def svf(tiny_tokenizer):
    return SVFModel(make_tiny_llama(len(tiny_tokenizer)), "tiny", SVFConfig(progress=False))


@pytest.fixture(scope="module")
def zygote(redis_server):
    """Warm worker factory on the session server (workers' lock TTL 1 s, claim 200 ms)."""
    z = Zygote(redis_server.url, CH, "--lock-ttl", "1.0", "--claim-ms", "200")
    yield z
    z.close()


def test_worker_killed_between_computed_and_committed(svf, tiny_tokenizer, redis_url, zygote):
    """The worker computes every update, dies before the commit; a new worker applies
    each vote exactly once."""
    cfg = EngineConfig(
        train_round=1,  # one reply makes a round: train on every vote
        sampling=SamplingConfig(max_new_tokens=4),
        guard=GuardConfig(enabled=False),
        channel_defaults=ChannelConfig(threshold=0.9999),
    )

    async def setup():
        eng = Engine(svf, tiny_tokenizer, RedisStore(redis_url, cfg.channel_defaults), cfg)
        outs = [
            await eng.respond(CH, [{"role": "user", "content": t}])
            for t in ["hello world", "fox 0123", "what is the capital of France?"]
        ]
        for i, o in enumerate(outs):
            for user in ["ann", "bob"][: i + 1]:
                await eng.vote(CH, o.reply_id, user, 1 if i != 1 else -1)
        nodes = {n.node_id: n for n in await eng.store.load_nodes(CH)}
        eng.close()
        return outs, nodes, await eng.store.pending_count(CH)

    outs, before, pending = run(setup())
    assert len(before) == 3 and pending == 5

    assert zygote.wait(zygote.spawn("crash")) == CRASH_EXIT
    assert any('"crashing": 5' in line for line in zygote.output)

    async def state():
        s = RedisStore(redis_url)
        nodes = {n.node_id: n for n in await s.load_nodes(CH)}
        return nodes, await s.pending_count(CH), await s.meta(CH)

    nodes, pending, _ = run(state())
    assert pending == 5  # nothing acknowledged
    assert all(nodes[i].to_dict() == before[i].to_dict() for i in before)  # nothing applied

    time.sleep(1.1)  # the dead worker's lock expires
    assert zygote.wait(zygote.spawn("train")) == 0
    assert zygote.wait(zygote.spawn("train")) == 0  # a second run finds nothing to do
    nodes, pending, meta = run(state())
    assert pending == 0 and meta["trained_events"] == 5
    for o in outs:
        n = nodes[o.node_id]
        assert n.rated == 1  # one reply each, counted once
        assert n.version == n.updates == 1  # updated once, not twice
    assert sorted(n.reward_sum for n in nodes.values()) == [-2.0, 1.0, 1.0]


def test_soak_votes_with_worker_killed_repeatedly(svf, tiny_tokenizer, redis_url, zygote):
    """≥1000 votes arrive while training workers are SIGKILLed at random moments (and
    some die exactly before their commit); every vote must be applied exactly once."""
    n_votes, n_nodes = 1000, 4
    rng = random.Random(7)
    vocab = len(tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    values = [1 if rng.random() < 0.6 else -1 for _ in range(n_votes)]

    async def build():
        s = RedisStore(redis_url)
        for k in range(n_nodes):
            emb = np.zeros(8, np.float32)
            emb[k] = 1.0
            await s.save_node(CH, Node(f"n{k}", emb, np.ones(svf.z_size, np.float32)))
        replies = []
        for i in range(n_votes):
            prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(3, 8))]
            response = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 4))] + [eos]
            replies.append(Reply(f"r{i}", f"n{i % n_nodes}", prompt, response, "p", "t", 0))
        for start in range(0, n_votes, 100):
            await asyncio.gather(*(s.put_reply(CH, r) for r in replies[start : start + 100]))
        await s.close()

    run(build())

    kills = crashes = events = 0
    t0 = time.perf_counter()

    async def vote_stream(acked: list[str]):
        s = RedisStore(redis_url)
        for start in range(0, n_votes, 50):
            # paced by the chaos, so a loaded machine still sees its kills mid-stream:
            # one kill or crash per four batches
            while events < start // 200 and time.perf_counter() - t0 < 300:
                await asyncio.sleep(0.05)
            batch = range(start, min(n_votes, start + 50))
            acked += await asyncio.gather(
                *(s.set_vote(CH, f"r{i}", f"user{i % 37}", values[i]) for i in batch)
            )
            await asyncio.sleep(0.4)
        await s.close()

    async def chaos(done: asyncio.Event):
        nonlocal kills, crashes, events
        s = RedisStore(redis_url)
        while not done.is_set():
            # every fourth worker dies right before its commit, and until one has, any
            # worker may. A crash worker with nothing pending has nothing to commit and
            # exits cleanly (on a quiet machine the worker killed before it may have trained
            # every vote, leaving no crash at all), so it only goes with work.
            wants_crash = events % 4 == 1 or (crashes == 0 and events > 0)
            if wants_crash and await s.pending_count(CH) > 0:
                code = await asyncio.to_thread(lambda: zygote.wait(zygote.spawn("crash")))
                crashes += code == CRASH_EXIT
            else:
                pid = await asyncio.to_thread(zygote.spawn, "loop")
                await asyncio.sleep(rng.uniform(0.2, 1.2))
                await asyncio.to_thread(zygote.kill, pid)
                kills += 1
            events += 1
        await s.close()

    async def storm():
        acked: list[str] = []
        done = asyncio.Event()
        killer = asyncio.create_task(chaos(done))
        await vote_stream(acked)
        # the stream is paced by events, and a crash counts as one: two kills and two
        # deaths before commit met the pacing in one run, so the chaos goes on (kills
        # need no pending work) until it has killed three workers too
        while kills < 3 and time.perf_counter() - t0 < 300:
            await asyncio.sleep(0.05)
        done.set()
        await killer
        return acked

    acked = run(storm())
    assert zygote.wait(zygote.spawn("drain")) == 0
    seconds = time.perf_counter() - t0

    async def final():
        s = RedisStore(redis_url)
        nodes = await s.load_nodes(CH)
        out = nodes, await s.pending_count(CH), await s.meta(CH)
        await s.close()
        return out

    nodes, pending, meta = run(final())
    applied = sum(n.rated for n in nodes)  # one vote per reply: one rated reply per vote
    lost, duplicated = max(0, n_votes - applied), max(0, applied - n_votes)
    print(
        f"\nsoak: {n_votes} votes acknowledged={len(set(acked))} applied={applied} "
        f"lost={lost} duplicated={duplicated} worker SIGKILLs={kills} "
        f"deaths before commit={crashes} pending={pending} in {seconds:.1f}s"
    )
    assert len(set(acked)) == n_votes
    assert kills >= 3 and crashes >= 1
    assert pending == 0 and lost == 0 and duplicated == 0
    assert meta["trained_events"] == n_votes
    expected_sum = sum(1.0 if v > 0 else -2.0 for v in values)
    assert sum(n.reward_sum for n in nodes) == pytest.approx(expected_sum, abs=1e-9)
    for n in nodes:
        assert n.version == n.updates  # each committed z bumped the version exactly once


def test_redis_killed_mid_stream_loses_no_acknowledged_vote(tmp_path):
    """kill -9 the server (production settings: AOF everysec) while votes pour in;
    after a restart every vote that was acknowledged is there."""
    directory = tmp_path / "redis"
    server = start_test_server(directory, extra=())  # everysec, as in production

    async def go():
        s = RedisStore(server.url, retries=1)
        await s.put_reply(CH, Reply("r", "n", [1], [2], "p", "t", 0))
        acked: dict[str, str] = {}
        refused = 0

        async def one(i: int):
            nonlocal refused
            try:
                acked[f"u{i}"] = await s.set_vote(CH, "r", f"u{i}", 1)
            except StoreUnavailableError:
                refused += 1

        # Kill once enough votes are acknowledged (not after a fixed count of sends:
        # on a loaded CI machine the acks lag far behind), then keep sending.
        tasks, i, killed_at = [], 0, None
        deadline = time.monotonic() + 60
        while killed_at is None or i < killed_at + 100:
            tasks.append(asyncio.create_task(one(i)))
            i += 1
            await asyncio.sleep(0.005)
            if killed_at is None and (len(acked) >= 60 or time.monotonic() > deadline):
                await asyncio.to_thread(server.kill)  # mid-stream, with writes in flight
                killed_at = i
        await asyncio.gather(*tasks)
        restarted = await asyncio.to_thread(start_test_server, directory, ())
        reply = await s.get_reply(CH, "r")  # the same client reconnects by itself
        ids = {e.event_id for e in await s.pending(CH, "after-restart", count=10_000)}
        await s.close()
        return restarted, acked, refused, reply, ids

    restarted, acked, refused, reply, ids = run(go())
    try:
        lost_votes = [u for u in acked if u not in reply.votes]
        lost_events = [e for e in acked.values() if e not in ids]
        print(
            f"\nredis kill -9: acknowledged={len(acked)} refused={refused} "
            f"lost votes={len(lost_votes)} lost events={len(lost_events)}"
        )
        assert len(acked) >= 50 and refused >= 1  # the kill really landed mid-stream
        assert lost_votes == [] and lost_events == []
    finally:
        restarted.stop()
