"""The training scheduler, and the whole loop end to end on a real Redis:
mention → reply → 👎 votes → early scheduled training → the same prompt answered by the
updated node."""

from __future__ import annotations

import asyncio

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
