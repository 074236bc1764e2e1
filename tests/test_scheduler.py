"""The training scheduler, and the whole loop end to end on a real Redis:
mention → reply → 👎 votes → early scheduled training → the same prompt answered by the
updated node."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import pytest

from bot.scheduler import JOB_ID, TrainingScheduler
from bot.service import ChatService, Mention, Reaction
from bot.settings import load_settings

from .fakes.tiny import make_engine


@pytest.fixture
def settings(monkeypatch):
    for name in ("DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET"):
        monkeypatch.delenv(name, raising=False)
    # a long interval: only the early trigger can start training within the test
    return load_settings(None, gesal_train_interval=3600, gesal_train_early_votes=2)


def test_job_options(tiny_tokenizer, settings):
    async def go():
        engine = make_engine(tiny_tokenizer)
        sched = TrainingScheduler(engine, settings)
        sched.start()
        try:
            job = sched.scheduler.get_job(JOB_ID)
            assert job.coalesce and job.max_instances == 1
            assert job.misfire_grace_time == settings.gesal_train_misfire_grace
            assert job.trigger.interval.total_seconds() == 3600
        finally:
            sched.shutdown()
            engine.close()

    asyncio.run(go())


async def _until(predicate, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_early_trigger_counts_feedback_per_node(tiny_tokenizer, settings):
    """Two votes in a channel, one on each of two nodes, are not "a node's buffer
    reaching 2"; the second vote on the same node is."""

    async def go():
        engine = make_engine(tiny_tokenizer, threshold=0.9999)  # every prompt its own node
        sched = TrainingScheduler(engine, settings)
        service = ChatService(engine, settings, on_feedback=sched.feedback_arrived)
        sched.start()
        try:
            a = await service.handle_mention(Mention("discord", "g", "c", "u1", "hello", "m1"))
            b = await service.handle_mention(
                Mention("discord", "g", "c", "u1", "how do magnets work?", "m2")
            )
            assert a.ok and b.ok and a.node_id != b.node_id
            await service.link_reply(a, ["ra"])
            await service.link_reply(b, ["rb"])
            key = a.channel_key

            for user, msg in (("u2", "ra"), ("u2", "rb")):
                r = Reaction("discord", "g", "c", user, msg, "👎", True)
                assert (await service.handle_reaction(r)).counted
            assert await engine.pending(key) == 2  # the channel has 2, each node has 1
            assert sched.new_feedback == {(key, a.node_id): 1, (key, b.node_id): 1}
            await asyncio.sleep(0.3)
            assert not sched.reports

            await service.handle_reaction(Reaction("discord", "g", "c", "u3", "ra", "👍", True))
            await asyncio.wait_for(sched.runs.wait(), 30)
            report = sched.reports[-1]
            assert report.events == 3, report.summary()
            trained = {r.node_id for r in report.channels[key]}
            assert trained == {a.node_id, b.node_id}  # a run trains every pending node
            assert not sched.new_feedback and await engine.pending(key) == 0
        finally:
            sched.shutdown()
            engine.close()

    asyncio.run(go())


def test_trigger_during_a_run_starts_another_run(tiny_tokenizer, settings):
    """max_instances=1 drops a trigger that fires while the job runs; the scheduler
    remembers it and runs again as soon as the current run has finished."""

    async def go():
        engine = make_engine(tiny_tokenizer)
        real_train, calls, gate = engine.train, [], asyncio.Event()

        async def gated_train(channel=None):
            calls.append(channel)
            if len(calls) == 1:
                await gate.wait()
            return await real_train(channel)

        engine.train = gated_train
        sched = TrainingScheduler(engine, settings)
        sched.start()
        try:
            sched.trigger_now("first")
            await _until(lambda: len(calls) == 1)
            sched.trigger_now("while running")
            gate.set()
            await _until(lambda: len(sched.reports) == 2)
            assert len(calls) == 2
            job = sched.scheduler.get_job(JOB_ID)  # back on the hourly interval afterwards
            assert (job.next_run_time - datetime.now(timezone.utc)).total_seconds() > 3000
        finally:
            sched.shutdown()
            engine.close()

    asyncio.run(go())


def test_end_to_end_votes_train_the_node_on_redis(tiny_tokenizer, settings, make_redis_store):
    async def go():
        store = make_redis_store()
        engine = make_engine(tiny_tokenizer, store=store)
        sched = TrainingScheduler(engine, settings)
        service = ChatService(engine, settings, on_feedback=sched.feedback_arrived)
        sched.start()
        try:
            ask = Mention("discord", "g", "c", "u1", "hello world", "m1")
            first = await service.handle_mention(ask)
            assert first.ok and first.z_version == 0
            await service.link_reply(first, ["r1"])
            key = first.channel_key
            before = (await store.get_node(key, first.node_id)).z.copy()

            await service.handle_reaction(Reaction("discord", "g", "c", "u2", "r1", "👎", True))
            await asyncio.sleep(0.3)
            assert not sched.reports  # one vote: below the early threshold, no training
            await service.handle_reaction(Reaction("discord", "g", "c", "u3", "r1", "👎🏾", True))
            await asyncio.wait_for(sched.runs.wait(), 60)

            report = sched.reports[-1]
            assert report.events == 2 and report.count("updated") == 1, report.summary()
            node = await store.get_node(key, first.node_id)
            assert node.version == 1 and not (node.z == before).all()
            assert await engine.pending(key) == 0

            again = await service.handle_mention(
                Mention("discord", "g", "c", "u1", "hello world", "m2")
            )
            assert again.ok and again.node_id == first.node_id and again.z_version == 1
        finally:
            sched.shutdown()
            engine.close()
            await store.close()

    asyncio.run(go())
