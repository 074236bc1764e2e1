"""/healthz, /metrics (`bot.health`, `bot.metrics`) and structured logs (`bot.logs`),
served by a real aiohttp server on loopback."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import aiohttp
import pytest
from aiohttp import web

from bot.health import (
    Check,
    Health,
    add_routes,
    bound_port,
    connection_check,
    engine_checks,
    start_server,
)
from bot.logs import JsonFormatter, RedactFilter, RequestIdFilter, request_context
from bot.messages import AdminCommand, Mention, Reaction
from bot.metrics import Metrics
from bot.service import ChatService
from bot.settings import load_settings
from gesal_core.engine import Engine, EngineConfig
from gesal_core.generate import SamplingConfig
from gesal_core.guard import GuardConfig
from gesal_core.records import ChannelConfig
from gesal_core.store import MemoryStore
from gesal_core.svf import SVFConfig, SVFModel

from .conftest import make_tiny_llama


@pytest.fixture
def engine(tiny_tokenizer):
    svf = SVFModel(make_tiny_llama(len(tiny_tokenizer)), "tiny", SVFConfig(progress=False))
    cfg = EngineConfig(
        train_round=1,  # one reply makes a round: train on every vote
        sampling=SamplingConfig(max_new_tokens=6, temperature=0.9),
        guard=GuardConfig(enabled=False),
        channel_defaults=ChannelConfig(threshold=0.9999),
    )
    eng = Engine(svf, tiny_tokenizer, MemoryStore(cfg.channel_defaults), cfg, model_name="tiny")
    yield eng
    eng.close()


def _sample(text: str, name: str, labels: str = "") -> float:
    """The value of one Prometheus sample line, e.g. name='gesal_votes_total'."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{key} not in metrics:\n{text}")


async def _serve(health: Health, metrics: Metrics, refresh=None):
    app = web.Application()
    add_routes(app, health, metrics, refresh)
    runner = await start_server(app, "127.0.0.1", 0)
    return runner, f"http://127.0.0.1:{bound_port(runner)}"


def test_metrics_follow_replies_votes_and_training(engine, monkeypatch):
    """The service counts what it handles; the gauges are read when /metrics is scraped."""
    for name in ("DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(None)

    async def go():
        metrics = Metrics()
        service = ChatService(engine, settings, metrics=metrics)
        health = Health()
        engine_checks(health, engine)
        runner, base = await _serve(health, metrics, lambda: metrics.refresh(engine))

        async def ask(text: str, message: str) -> None:
            parts = await service.handle_mention(Mention("local", "x", "demo", "u", text, "q"))
            await service.link_reply(parts, [message])

        async def react(user: str, message: str, emoji: str, added: bool = True) -> None:
            r = Reaction("local", "x", "demo", user, message, emoji, added)
            assert (await service.handle_reaction(r)).counted

        try:
            await ask("hello world", "a")
            await ask("0123456789 fox", "b")
            await react("ann", "a", "👍")
            await react("bob", "a", "👎")
            await react("ann", "b", "👍")
            await react("ann", "b", "👍", added=False)
            async with aiohttp.ClientSession() as http:
                async with http.get(base + "/metrics") as resp:
                    assert resp.status == 200
                    assert resp.headers["Content-Type"].startswith("text/plain")
                    before = await resp.text()
                train = AdminCommand("local", "x", "demo", "boss", "train", is_admin=True)
                assert (await service.handle_admin(train)).ok
                async with http.get(base + "/metrics") as resp:
                    after = await resp.text()
            return before, after
        finally:
            await runner.cleanup()
            await service.close()

    before, after = asyncio.run(go())
    assert _sample(before, "gesal_replies_total", 'platform="local"') == 2
    assert _sample(before, "gesal_reply_seconds_count", 'platform="local"') == 2
    assert _sample(before, "gesal_generation_tokens_per_second_count") == 2
    assert _sample(before, "gesal_votes_total", 'value="up"') == 2
    assert _sample(before, "gesal_votes_total", 'value="down"') == 1
    assert _sample(before, "gesal_votes_total", 'value="retract"') == 1
    assert _sample(before, "gesal_pending_feedback", 'channel="local:x:demo"') == 4
    assert _sample(before, "gesal_nodes", 'channel="local:x:demo"') == 2
    assert _sample(after, "gesal_pending_feedback", 'channel="local:x:demo"') == 0
    assert _sample(after, "gesal_update_seconds_count") == 1
    assert _sample(after, "gesal_last_train_timestamp_seconds") > 0
    statuses = [ln for ln in after.splitlines() if ln.startswith("gesal_node_updates_total{")]
    assert sum(float(ln.split()[-1]) for ln in statuses) == 2  # both nodes got a report


def test_healthz_reports_components_and_fails_when_the_worker_dies(engine):
    async def go():
        metrics, health = Metrics(), Health(timeout=0.5)
        engine_checks(health, engine, train_interval=300)
        connected = {"discord": True}
        health.add(*connection_check("discord", lambda: connected["discord"]))
        runner, base = await _serve(health, metrics)
        out = []
        try:
            async with aiohttp.ClientSession() as http:
                for step in ("ok", "disconnected", "worker-dead"):
                    if step == "disconnected":
                        connected["discord"] = False
                    if step == "worker-dead":
                        connected["discord"] = True
                        engine.close()
                    async with http.get(base + "/healthz") as resp:
                        out.append((resp.status, await resp.json()))
        finally:
            await runner.cleanup()
        return out

    (s1, ok), (s2, disc), (s3, dead) = asyncio.run(go())
    assert s1 == 200 and ok["ok"] is True
    assert set(ok["checks"]) == {"store", "model_worker", "platform_discord"}
    assert ok["last_training"] == {"age_seconds": None, "interval_seconds": 300}
    assert s2 == 503 and disc["checks"]["platform_discord"]["ok"] is False
    assert s3 == 503 and dead["checks"]["model_worker"]["ok"] is False


def test_a_hanging_or_crashing_check_is_reported_not_raised():
    async def hang() -> Check:
        await asyncio.sleep(10)
        return Check(True)

    async def boom() -> Check:
        raise ConnectionError("redis is gone")

    async def go():
        health = Health(timeout=0.2)
        health.add("slow", hang)
        health.add("redis", boom)
        return await health.report()

    ok, body = asyncio.run(go())
    assert ok is False
    assert "0.2s" in body["checks"]["slow"]["detail"]
    assert body["checks"]["redis"]["detail"] == "ConnectionError: redis is gone"


def test_json_logs_carry_the_request_id_and_mask_secrets():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RedactFilter(["xoxb-very-secret-token"]))
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.observability")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:

        async def mention(name: str) -> str:
            with request_context() as rid:
                await asyncio.sleep(0)
                logger.info("mention from %s", name, extra={"channel": "c1"})
                return rid

        async def two():
            return await asyncio.gather(mention("ann"), mention("bob"))

        rids = asyncio.run(two())
        logger.info("token is %s", "xoxb-very-secret-token")
        try:
            raise RuntimeError("auth failed for xoxb-very-secret-token")
        except RuntimeError:
            logger.exception("platform error")
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert len(rids) == 2 and rids[0] != rids[1]
    by_user = {ln["msg"]: ln for ln in lines[:2]}
    assert by_user["mention from ann"]["request_id"] == rids[0]
    assert by_user["mention from bob"]["request_id"] == rids[1]
    assert by_user["mention from ann"]["channel"] == "c1"
    assert lines[2]["request_id"] == "-" and lines[2]["msg"] == "token is ***"
    assert "xoxb-very-secret-token" not in stream.getvalue()
    assert "auth failed for ***" in lines[3]["exc"]
