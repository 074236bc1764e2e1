"""The training scheduler, and the whole loop end to end on a real Redis:
mention → replies → 👎 votes → a full round starts training at once → the same prompt
answered by the updated node."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import pytest

from bot.messages import Mention, Reaction
from bot.scheduler import JOB_ID, TrainingScheduler
from bot.service import ChatService
from bot.settings import load_settings

from .fakes.tiny import make_engine


@pytest.fixture
def settings(monkeypatch):
    for name in ("DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET"):
        monkeypatch.delenv(name, raising=False)
    # a long interval: only a full round can start training within the test
    return load_settings(None, gesal_train_interval=3600, gesal_train_round=2)


def _engine(tok, settings, **kw):
    """The tiny engine with the deployment's round, as `bot.runtime` builds it."""
    return make_engine(tok, train_round=settings.engine_config().train_round, **kw)


def test_job_options(tiny_tokenizer, settings):
    async def go():
        engine = _engine(tiny_tokenizer, settings)
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


def test_a_channels_round_starts_training_at_once(tiny_tokenizer, settings):
    """A round of 4 (GESAL_TRAIN_ROUND=4): a second vote on a reply does not make the
    round fuller; the fourth reply with feedback in the channel does, and starts a run
    at once, which trains both of the channel's nodes."""
    settings = settings.model_copy(update={"gesal_train_round": 4})

    async def go():
        engine = _engine(tiny_tokenizer, settings, threshold=0.9999)  # a prompt per node
        sched = TrainingScheduler(engine, settings)
        service = ChatService(engine, settings, on_feedback=sched.feedback_arrived)
        sched.start()
        try:
            asks = ("hello", "how do magnets work?", "hello", "hello")
            a, b, a2, a3 = [
                await service.handle_mention(Mention("discord", "g", "c", "u1", t, f"m{i}"))
                for i, t in enumerate(asks)
            ]
            assert all(p.ok for p in (a, b, a2, a3)) and a.node_id != b.node_id
            assert a.node_id == a2.node_id == a3.node_id
            for parts, msg in ((a, "ra"), (b, "rb"), (a2, "ra2"), (a3, "ra3")):
                await service.link_reply(parts, [msg])
            key = a.channel_key

            for user, msg in (("u2", "ra"), ("u2", "rb"), ("u3", "ra"), ("u2", "ra2")):
                r = Reaction("discord", "g", "c", user, msg, "👎", True)
                assert (await service.handle_reaction(r)).counted
            assert await engine.pending(key) == 4
            assert sched.new_feedback == {key: {a.reply_id, b.reply_id, a2.reply_id}}
            await asyncio.sleep(0.3)
            assert not sched.reports  # 3 replies with feedback: not a round

            await service.handle_reaction(Reaction("discord", "g", "c", "u3", "ra3", "👍", True))
            await asyncio.wait_for(sched.runs.wait(), 30)
            report = sched.reports[-1]
            assert report.events == 5, report.summary()
            assert {r.node_id for r in report.channels[key]} == {a.node_id, b.node_id}
            assert report.waiting == {} and not sched.new_feedback
            assert await engine.pending(key) == 0
        finally:
            sched.shutdown()
            engine.close()

    asyncio.run(go())


def test_trigger_during_a_run_starts_another_run(tiny_tokenizer, settings):
    """max_instances=1 drops a trigger that fires while the job runs; the scheduler
    remembers it and runs again as soon as the current run has finished."""

    async def go():
        engine = _engine(tiny_tokenizer, settings)
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
        engine = _engine(tiny_tokenizer, settings, store=store)
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
            await service.handle_reaction(Reaction("discord", "g", "c", "u3", "r1", "👎🏾", True))
            await asyncio.sleep(0.3)
            assert not sched.reports  # two votes on one reply: not a round, no training
            # the interval run leaves them in the Redis stream, and reads them again later
            waited = await sched.run_once()
            assert waited.events == 0 and waited.waiting == {key: {first.node_id: 1}}
            assert await engine.pending(key) == 2

            second = await service.handle_mention(
                Mention("discord", "g", "c", "u1", "hello world", "m2")
            )
            assert second.node_id == first.node_id
            await service.link_reply(second, ["r2"])
            await service.handle_reaction(Reaction("discord", "g", "c", "u2", "r2", "👎", True))
            await _until(lambda: len(sched.reports) == 2, 60)

            report = sched.reports[-1]
            assert report.events == 3 and report.count("updated") == 1, report.summary()
            node = await store.get_node(key, first.node_id)
            assert node.version == 1 and not (node.z == before).all()
            assert await engine.pending(key) == 0

            again = await service.handle_mention(
                Mention("discord", "g", "c", "u1", "hello world", "m3")
            )
            assert again.ok and again.node_id == first.node_id and again.z_version == 1
        finally:
            sched.shutdown()
            engine.close()
            await store.close()

    asyncio.run(go())


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_poisoned_channel_never_stops_a_healthy_one_on_schedule(
    tiny_tokenizer, settings, kind, request
):
    """Scheduled runs reporting to the metrics, as `bot.runtime` wires them: the healthy
    channel trains on every run while the poisoned one fails, is counted, keeps its
    feedback and is parked after three runs (admin stats say so); an admin's
    ``/gesal train`` trains it once the poison is gone."""
    from bot.messages import AdminCommand
    from bot.metrics import Metrics

    settings = settings.model_copy(update={"gesal_train_round": 1})

    def admin(channel: str, name: str) -> AdminCommand:
        return AdminCommand("discord", "g", channel, "boss", name, True)

    async def go():
        store = request.getfixturevalue("make_redis_store")() if kind == "redis" else None
        raw = _engine(tiny_tokenizer, settings, store=store)
        metrics = Metrics()
        sched = TrainingScheduler(raw, settings, on_report=metrics.observe_train)
        service = ChatService(raw, settings, metrics=metrics)
        asked = [0]

        async def feedback(channel: str, emoji: str) -> str:
            asked[0] += 1
            parts = await service.handle_mention(
                Mention("discord", "g", channel, "u1", "hello world", f"m{asked[0]}")
            )
            await service.link_reply(parts, [f"r{asked[0]}"])
            react = Reaction("discord", "g", channel, "u2", f"r{asked[0]}", emoji, True)
            assert (await service.handle_reaction(react)).counted
            return parts.channel_key, parts.reply_id

        bad, poisoned = await feedback("bad", "👍")
        reply = await raw.store.get_reply(bad, poisoned)
        reply.text = 42  # what an export from a build that checked no types can hold
        await raw.store.put_reply(bad, reply)
        try:
            for n in (1, 2, 3, 4):
                good, _ = await feedback("good", "👎")
                report = await sched.run_once()
                assert report is not None and good in report.channels
                assert await raw.pending(good) == 0  # trained on every run
                assert await raw.pending(bad) == 1  # kept
                assert (bad in report.failed) == (n <= 3) and (bad in report.parked) == (n >= 3)
                failures = metrics.registry.get_sample_value(
                    "gesal_train_failures_total", {"channel": bad}
                )
                assert failures == min(n, 3)  # a parked channel stops counting
            stats = await service.handle_admin(admin("bad", "stats"))
            assert "Training is paused** after 3 failed runs" in stats.text
            assert "AttributeError" in stats.text and stats.data["train_parked"]

            retry = await service.handle_admin(admin("bad", "train"))
            assert not retry.ok and "Training failed (AttributeError" in retry.text
            reply.text = "hello"
            await raw.store.put_reply(bad, reply)
            fixed = await service.handle_admin(admin("bad", "train"))
            assert fixed.ok and fixed.data["events"] == 1, fixed.text
            assert await raw.pending(bad) == 0
            stats = await service.handle_admin(admin("bad", "stats"))
            assert "paused" not in stats.text and not stats.data["train_parked"]
            assert bad not in (await sched.run_once()).parked
        finally:
            raw.close()
            if store is not None:
                await store.close()

    asyncio.run(go())


def test_a_full_round_trains_its_channel_only_and_keeps_the_interval(tiny_tokenizer, settings):
    """The early run trains the channel whose round filled, not every channel; the other
    channel's feedback waits for the interval run, whose time the early run puts back.
    Every report reaches ``on_report``."""

    async def go():
        engine = _engine(tiny_tokenizer, settings, threshold=-1.0)
        got = []
        sched = TrainingScheduler(engine, settings, on_report=got.append)
        service = ChatService(engine, settings, on_feedback=sched.feedback_arrived)
        sched.start()
        try:
            interval = sched.scheduler.get_job(JOB_ID).next_run_time
            asked = {}
            for i, chan in enumerate(("full", "full", "quiet")):
                parts = await service.handle_mention(
                    Mention("discord", "g", chan, "u1", "hello", f"m{i}")
                )
                await service.link_reply(parts, [f"r{i}"])
                asked[chan] = parts.channel_key
            await service.handle_reaction(Reaction("discord", "g", "quiet", "u2", "r2", "👍", True))
            await asyncio.sleep(0.2)
            assert not sched.reports
            for i in (0, 1):  # a second reply with feedback: "full" has a round of 2
                await service.handle_reaction(
                    Reaction("discord", "g", "full", "u2", f"r{i}", "👎", True)
                )
            await asyncio.wait_for(sched.runs.wait(), 30)
            await asyncio.sleep(0.1)  # the interval run is put back after the run
            assert got == sched.reports and len(got) == 1
            assert list(got[0].channels) == [asked["full"]] and got[0].events == 2
            assert got[0].waiting == {}  # "quiet" was not even read
            assert await engine.pending(asked["quiet"]) == 1
            assert list(sched.new_feedback) == [asked["quiet"]]  # its count stays
            assert sched.scheduler.get_job(JOB_ID).next_run_time == interval
        finally:
            sched.shutdown()
            engine.close()

    asyncio.run(go())


def test_the_round_rule_counts_replies_or_the_wait():
    from gesal_core.training import RoundRule

    rule = RoundRule(size=3, max_wait=60.0)
    assert not rule.is_full(2, 59.0)
    assert rule.is_full(3, 0.0) and rule.is_full(1, 60.0)
