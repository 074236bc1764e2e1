"""The Slack adapter: a real bolt `AsyncApp` served over HTTP on loopback, and a real
Socket Mode client, both talking to the fake Slack Web API in `fakes.slack`."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
import urllib.parse

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr
from slack_sdk.web.async_client import AsyncWebClient

from bot.metrics import Metrics
from bot.service import ChatService
from bot.settings import load_settings
from bot.slack_app import build_app, make_bot
from bot.slack_commands import RESET_CANCEL, RESET_CONFIRM, parse_command

from .fakes.slack import BOT_TOKEN, BOT_USER, TEAM, FakeSlack, event_callback
from .fakes.tiny import make_engine

SECRET = "test-signing-secret"
KEY = f"slack:{TEAM}:C1"
TEAM_FIELD = {"id": TEAM, "domain": "town"}  # a ``block_actions`` payload's ``team``


def undelivered(h: Harness, kind: str) -> float:
    """What ``gesal_undelivered_total{platform="slack", kind=...}`` reads now."""
    value = h.metrics.registry.get_sample_value(
        "gesal_undelivered_total", {"platform": "slack", "kind": kind}
    )
    return value or 0.0


def sign(body: str, ts: int | None = None, secret: str = SECRET) -> dict:
    ts = int(time.time()) if ts is None else ts
    base = f"v0:{ts}:{body}".encode()
    sig = "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": str(ts), "X-Slack-Signature": sig}


class Harness:
    """The bot's HTTP endpoint on loopback, wired to a fake Slack."""

    def __init__(self, engine, settings, fake: FakeSlack) -> None:
        self.engine, self.fake = engine, fake
        client = AsyncWebClient(token=BOT_TOKEN, base_url=fake.api_url)
        self.metrics = Metrics()
        self.service = ChatService(engine, settings, metrics=self.metrics)
        # the fake serves files on loopback: the only file host this bot may fetch from
        self.bot = make_bot(self.service, settings, client=client, file_origins=(fake.url,))
        self.app = self.bot.app
        self.n = 0

    async def __aenter__(self) -> Harness:
        self.runner = web.AppRunner(self.app.web_app(path="/slack/events"))
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001
        self.url = f"http://127.0.0.1:{port}/slack/events"
        self.http = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.close()
        await self.runner.cleanup()
        await self.bot.close()
        await self.service.close()

    async def post(self, body: str, headers: dict, content_type: str) -> tuple[int, str]:
        headers = {**headers, "Content-Type": content_type}
        async with self.http.post(self.url, data=body.encode(), headers=headers) as resp:
            return resp.status, await resp.text()

    async def event(
        self,
        event: dict,
        event_id: str | None = None,
        retry: int = 0,
        actor_team: str | None = None,
    ):
        body = self.event_body(event, event_id, actor_team)
        headers = sign(body)
        if retry:
            headers |= {"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"}
        return await self.post(body, headers, "application/json")

    def event_body(
        self, event: dict, event_id: str | None = None, actor_team: str | None = None
    ) -> str:
        """An Events API request body, as Slack sends it (see `event_callback`)."""
        self.n += 1
        return json.dumps(event_callback(event, event_id or f"Ev{self.n:04d}", actor_team))

    async def command(self, text: str, user: str = "U2", channel: str = "C1") -> tuple[int, str]:
        body = urllib.parse.urlencode(
            {
                "command": "/gesal",
                "text": text,
                "user_id": user,
                "channel_id": channel,
                "team_id": TEAM,
                # the URL names whom Slack delivers its answers to, for the fake to record
                "response_url": self.fake.url
                + "/response?"
                + urllib.parse.urlencode({"user": user, "channel": channel}),
                "trigger_id": "t1",
            }
        )
        return await self.post(body, sign(body), "application/x-www-form-urlencoded")

    async def click(
        self,
        blocks: list[dict],
        action_id: str,
        user: str,
        secret: str = SECRET,
        team: dict | None = TEAM_FIELD,
    ) -> tuple[int, str]:
        """Press a button of an ephemeral message: a signed ``block_actions`` request,
        built the way Slack builds it from the message's blocks. ``team=None`` is how an
        org-wide install's payload names it."""
        button = next(
            e
            for b in blocks
            if b["type"] == "actions"
            for e in b["elements"]
            if e["action_id"] == action_id
        )
        payload = {
            "type": "block_actions",
            "user": {"id": user, "username": user.lower(), "team_id": TEAM},
            "api_app_id": "A1",
            "token": "legacy",
            "container": {"type": "message", "channel_id": "C1", "is_ephemeral": True},
            "trigger_id": "t2",
            "team": team,
            "channel": {"id": "C1", "name": "general"},
            "response_url": self.fake.url + "/response",
            "actions": [
                {**button, "block_id": "gesal_reset", "action_ts": str(time.time())},
            ],
        }
        body = urllib.parse.urlencode({"payload": json.dumps(payload)})
        return await self.post(body, sign(body, secret=secret), "application/x-www-form-urlencoded")


async def until(predicate, timeout: float = 20.0):
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.fixture
def settings(monkeypatch):
    for name in ("DISCORD_TOKEN", "SLACK_APP_TOKEN", "SLACK_ADMIN_USERS", "SLACK_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLACK_BOT_TOKEN", BOT_TOKEN)
    monkeypatch.setenv("SLACK_SIGNING_SECRET", SECRET)
    return load_settings(None, slack_admin_users="U9")


@pytest.fixture
def engine(tiny_tokenizer):
    eng = make_engine(tiny_tokenizer)
    yield eng
    eng.close()


def mention_event(text: str, ts: str, user: str = "U2", **kw) -> dict:
    return {"type": "app_mention", "user": user, "text": text, "ts": ts, "channel": "C1", **kw}


def test_parse_command():
    assert parse_command("config threshold=0.8 reward_up=2") == (
        "config",
        {"threshold": "0.8", "reward_up": "2"},
        [],
    )
    assert parse_command("reset confirm") == ("reset", {}, ["confirm"])
    assert parse_command("") == ("help", {}, [])


def test_signatures_url_verification_mentions_votes_and_retries(engine, settings):
    async def go():
        fake = await FakeSlack().start()
        try:
            async with Harness(engine, settings, fake) as h:
                body = json.dumps({"type": "url_verification", "challenge": "c-123", "token": "t"})
                status, text = await h.post(body, sign(body), "application/json")
                assert status == 200 and "c-123" in text
                # bad and stale signatures are refused before any listener runs
                assert (await h.post(body, sign(body, secret="wrong"), "application/json"))[
                    0
                ] == 401
                stale = sign(body, ts=int(time.time()) - 600)
                assert (await h.post(body, stale, "application/json"))[0] == 401

                q = fake.add_message("C1", text=f"<@{BOT_USER}> hello world", user="U2")
                ev = mention_event(f"<@{BOT_USER}> hello world", q["ts"])
                t0 = time.perf_counter()
                status, _ = await h.event(ev, event_id="EvMention")
                acked = time.perf_counter() - t0
                assert status == 200 and acked < 3.0
                await until(lambda: fake.called("chat.postMessage"))
                post = fake.called("chat.postMessage")[0]
                assert post["thread_ts"] == q["ts"] and post["channel"] == "C1"
                # Slack retries the same event: acked, but answered only once
                status, _ = await h.event(ev, event_id="EvMention", retry=1)
                assert status == 200
                await asyncio.sleep(0.5)
                assert len(fake.called("chat.postMessage")) == 1
                reply_ts = fake.messages["C1"][-1]["ts"]
                reply_id = await linked_reply(engine, reply_ts)
                # the thinking reaction was added to the question and removed again
                assert fake.called("reactions.add")[0]["name"] == "eyes"
                assert fake.called("reactions.remove")[0]["name"] == "eyes"

                def reaction(kind, name, user="U3"):
                    return {
                        "type": kind,
                        "user": user,
                        "reaction": name,
                        "item": {"type": "message", "channel": "C1", "ts": reply_ts},
                        "item_user": BOT_USER,
                        "event_ts": fake.next_ts(),
                    }

                async def votes():
                    return (await engine.store.get_reply(KEY, reply_id)).votes

                await h.event(reaction("reaction_added", "+1::skin-tone-3"))
                await h.event(reaction("reaction_added", "thumbsdown", user="U4"))
                await h.event(reaction("reaction_added", "+1", user=BOT_USER))  # the bot's own
                await h.event(reaction("reaction_added", "tada", user="U5"))
                await until(
                    lambda: engine.store._ch(KEY).replies[reply_id].votes == {"U3": 1, "U4": -1}
                )
                await h.event(reaction("reaction_removed", "+1::skin-tone-3"))
                await until(lambda: "U3" not in engine.store._ch(KEY).replies[reply_id].votes)
                assert await votes() == {"U4": -1}

                # a ✏️ correction in the thread, mentioning the bot
                fix = fake.add_message("C1", text="x", user="U3", thread_ts=q["ts"])
                ev = mention_event(
                    f"<@{BOT_USER}> better: Hi there!", fix["ts"], thread_ts=q["ts"], user="U3"
                )
                await h.event(ev)
                await until(lambda: engine.store._ch(KEY).replies[reply_id].corrections)
                await until(
                    lambda: any(
                        a["name"] == "white_check_mark" and a["timestamp"] == fix["ts"]
                        for a in fake.called("reactions.add")
                    )
                )
                corr = (await engine.store.get_reply(KEY, reply_id)).corrections
                assert corr[0]["text"] == "Hi there!" and corr[0]["user"] == "U3"
        finally:
            await fake.stop()

    asyncio.run(go())


def test_every_log_line_of_a_mention_carries_one_request_id(engine, settings, caplog):
    import logging

    from bot.logs import RequestIdFilter

    caplog.set_level(logging.INFO, logger="bot")
    caplog.handler.addFilter(RequestIdFilter())  # what configure_logging installs

    async def go():
        fake = await FakeSlack().start()
        try:
            async with Harness(engine, settings, fake) as h:
                for n in (1, 2):
                    q = fake.add_message("C1", text="hi", user="U2")
                    await h.event(mention_event(f"<@{BOT_USER}> hello {n}", q["ts"]))
                    await until(lambda n=n: len(fake.called("chat.postMessage")) == n)
                    await until(
                        lambda n=n: sum("posted" in r.getMessage() for r in caplog.records) == n
                    )
        finally:
            await fake.stop()

    asyncio.run(go())
    by_rid: dict[str, set[str]] = {}
    for r in caplog.records:
        if r.request_id != "-":
            by_rid.setdefault(r.request_id, set()).add(r.name)
    assert len(by_rid) == 2, by_rid
    for names in by_rid.values():
        assert "bot.service" in names
    # "replied in" when the engine has answered, "posted" after posting: one exchange
    for line in ("replied in", "posted"):
        found = [r for r in caplog.records if r.getMessage().startswith(line)]
        assert len(found) == 2 and {r.request_id for r in found} == set(by_rid), line


def test_slash_commands_admin_check_and_file_round_trip(engine, settings):
    async def go():
        fake = await FakeSlack(users={"UADMIN": {"is_admin": True}}).start()
        try:
            async with Harness(engine, settings, fake) as h:
                q = fake.add_message("C1", text="hi", user="U2")
                await h.event(mention_event(f"<@{BOT_USER}> hello world", q["ts"]))
                await until(lambda: fake.called("chat.postMessage"))

                for sub in ("stats", "export", "reset", "config threshold=0.1", "train"):
                    before = len(fake.responses)
                    status, _ = await h.command(sub, user="U2")
                    assert status == 200
                    await until(lambda b=before: len(fake.responses) > b)
                    said = fake.responses[-1]
                    assert "only admins" in said["text"] and said["user"] == "U2", sub
                assert not fake.uploads
                assert (await engine.stats(KEY))["nodes"] == 1

                # a workspace admin (users.info) exports: files_upload_v2 round trip
                await h.command("export", user="UADMIN")
                await until(lambda: any(u.get("completed") for u in fake.uploads.values()))
                await until(lambda: len([u for u in fake.uploads.values() if "data" in u]) == 2)
                by_name = {u["name"]: (fid, u) for fid, u in fake.uploads.items()}
                json_name = next(n for n in by_name if n.endswith(".json"))
                png_name = next(n for n in by_name if n.endswith(".png"))
                fid, upload = by_name[json_name]
                assert upload["channel"] == "C1" and upload["completed"]
                assert by_name[png_name][1]["data"].startswith(b"\x89PNG")
                data = json.loads(upload["data"])
                assert data["channel"] == KEY and len(data["nodes"]) == 1

                # the allow-listed user resets (with the button) and imports it back
                await h.command("reset", user="U9")
                await until(lambda: fake.responses and "blocks" in fake.responses[-1])
                assert (await engine.stats(KEY))["nodes"] == 1
                blocks = fake.responses[-1]["blocks"]
                before = len(fake.responses)
                assert (await h.click(blocks, RESET_CONFIRM, user="U9"))[0] == 200
                await until(lambda: len(fake.responses) > before)
                assert "has been reset" in fake.responses[-1]["text"]
                assert (await engine.stats(KEY))["nodes"] == 0
                await h.command(f"import {fid}", user="U9")
                await until(lambda: "Imported 1 nodes" in fake.responses[-1]["text"])
                assert (await engine.stats(KEY))["nodes"] == 1
                await h.command("import FNOTTHERE1", user="U9")
                await until(lambda: "file_not_found" in fake.responses[-1]["text"])
        finally:
            await fake.stop()

    asyncio.run(go())


def test_reset_buttons_recheck_the_presser_on_the_server(engine, settings):
    """``/gesal reset`` shows Block Kit buttons; a click is a signed ``block_actions``
    request, and the bot re-checks who pressed it before deleting anything."""

    async def go():
        fake = await FakeSlack(users={"UADMIN": {"is_admin": True}}).start()
        try:
            async with Harness(engine, settings, fake) as h:
                q = fake.add_message("C1", text="hi", user="U2")
                await h.event(mention_event(f"<@{BOT_USER}> hello world", q["ts"]))
                await until(lambda: fake.called("chat.postMessage"))

                async def prompt(user: str) -> list[dict]:
                    before = len(fake.responses)
                    await h.command("reset", user=user)
                    await until(lambda: len(fake.responses) > before)
                    said = fake.responses[-1]
                    assert "cannot be undone" in said["text"] and said["user"] == user
                    blocks = said["blocks"]
                    return json.loads(blocks) if isinstance(blocks, str) else blocks

                async def pressed(blocks, action, user) -> str:
                    before = len(fake.responses)
                    status, _ = await h.click(blocks, action, user)
                    assert status == 200
                    await until(lambda: len(fake.responses) > before)
                    assert fake.responses[-1]["replace_original"] is True
                    return fake.responses[-1]["text"]

                blocks = await prompt("UADMIN")
                ids = [
                    e["action_id"] for b in blocks if b["type"] == "actions" for e in b["elements"]
                ]
                assert ids == [RESET_CONFIRM, RESET_CANCEL]
                # a forged signature never reaches the handler
                assert (await h.click(blocks, RESET_CONFIRM, "UADMIN", secret="wrong"))[0] == 401
                # someone else pressing the admin's button (e.g. a replayed payload)
                assert "Only the admin who asked" in await pressed(blocks, RESET_CONFIRM, "U2")
                assert "Nothing was reset" in await pressed(blocks, RESET_CANCEL, "UADMIN")
                assert (await engine.stats(KEY))["nodes"] == 1
                # the admin lost their rights between the prompt and the click
                fake.users["UADMIN"]["is_admin"] = False
                assert "only admins" in await pressed(blocks, RESET_CONFIRM, "UADMIN")
                assert (await engine.stats(KEY))["nodes"] == 1
                fake.users["UADMIN"]["is_admin"] = True
                assert "has been reset" in await pressed(blocks, RESET_CONFIRM, "UADMIN")
                assert (await engine.stats(KEY))["nodes"] == 0
                # non-admins never get the buttons
                before = len(fake.responses)
                await h.command("reset", user="U2")
                await until(lambda: len(fake.responses) > before)
                said = fake.responses[-1]
                assert "only admins" in said["text"] and not said.get("blocks")
        finally:
            await fake.stop()

    asyncio.run(go())


def test_reset_button_of_an_org_wide_install_with_a_null_team(engine, settings):
    async def go():
        fake = await FakeSlack().start()
        try:
            async with Harness(engine, settings, fake) as h:
                q = fake.add_message("C1", text="hi", user="U2")
                await h.event(mention_event(f"<@{BOT_USER}> hello world", q["ts"]))
                await until(lambda: fake.called("chat.postMessage"))
                await h.command("reset", user="U9")
                await until(lambda: fake.responses and "blocks" in fake.responses[-1])
                blocks = fake.responses[-1]["blocks"]
                before = len(fake.responses)
                status, _ = await h.click(blocks, RESET_CONFIRM, user="U9", team=None)
                assert status == 200
                await until(lambda: len(fake.responses) > before)
                assert "has been reset" in fake.responses[-1]["text"]
                assert (await engine.stats(KEY))["nodes"] == 0
        finally:
            await fake.stop()

    asyncio.run(go())


def test_a_failed_export_upload_is_told_to_the_admin_and_logged(engine, settings, caplog):
    import logging

    async def go():
        fake = await FakeSlack(upload_status=500).start()
        try:
            async with Harness(engine, settings, fake) as h:
                q = fake.add_message("C1", text="hi", user="U2")
                await h.event(mention_event(f"<@{BOT_USER}> hello world", q["ts"]))
                await until(lambda: fake.called("chat.postMessage"))
                with caplog.at_level(logging.WARNING, logger="bot"):
                    await h.command("export", user="U9")
                    await until(lambda: fake.responses)
                said = fake.responses[-1]
                assert said["user"] == "U9"
                assert "could not upload the export" in said["text"]
                assert not any(u.get("completed") for u in fake.uploads.values())
                assert any(
                    "could not upload the export" in r.getMessage() and "500" in r.getMessage()
                    for r in caplog.records
                )
        finally:
            await fake.stop()

    asyncio.run(go())


def test_commands_are_answered_where_the_bot_is_not_a_member(engine, settings, caplog):
    """``/gesal`` works in any conversation it can be typed in: the answer goes to the
    command's ``response_url``, which Slack delivers to the user who typed it, also
    where ``chat.postEphemeral`` answers ``channel_not_found``."""
    import logging

    async def go():
        fake = await FakeSlack(not_in={"COUT"}).start()
        try:
            async with Harness(engine, settings, fake) as h:
                assert (await h.command("stats", user="U9", channel="COUT"))[0] == 200
                await until(lambda: fake.responses)
                said = fake.responses[-1]
                assert said["user"] == "U9" and said["channel"] == "COUT"
                assert (
                    said["response_type"] == "ephemeral" and "Graph of this channel" in said["text"]
                )
                # when Slack refuses the answer too, the reason is logged and counted
                assert undelivered(h, "command") == 0
                fake.response_status = 404
                with caplog.at_level(logging.WARNING, logger="bot"):
                    await h.command("stats", user="U9", channel="COUT")
                    await until(lambda: undelivered(h, "command") == 1)
                said = next(
                    r.getMessage() for r in caplog.records if "not delivered" in r.getMessage()
                )
                assert "404" in said and "expired_url" in said
        finally:
            await fake.stop()

    asyncio.run(go())


def test_socket_mode_envelope_is_acked_and_answered(engine, settings):
    from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

    async def go():
        fake = await FakeSlack().start()
        try:
            client = AsyncWebClient(token=BOT_TOKEN, base_url=fake.api_url)
            app = build_app(ChatService(engine, settings), settings, client=client)
            handler = AsyncSocketModeHandler(app, "xapp-1-test")
            await handler.connect_async()
            try:
                await fake.wait_socket()
                q = fake.add_message("C1", text="hi", user="U2")
                envelope = {
                    "envelope_id": "env-1",
                    "type": "events_api",
                    "accepts_response_payload": False,
                    "payload": {
                        "team_id": TEAM,
                        "api_app_id": "A1",
                        "type": "event_callback",
                        "event_id": "EvSock1",
                        "event": mention_event(f"<@{BOT_USER}> hello world", q["ts"]),
                        "authorizations": [{"team_id": TEAM, "user_id": BOT_USER}],
                    },
                }
                ack = await fake.send_envelope(envelope)
                assert ack["envelope_id"] == "env-1"
                await until(lambda: fake.called("chat.postMessage"))
                assert fake.called("chat.postMessage")[0]["thread_ts"] == q["ts"]
            finally:
                await handler.close_async()
        finally:
            await fake.stop()

    asyncio.run(go())


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _check(get, ok: bool, detail: str = "") -> dict:
    """Poll /healthz until ``platform_slack`` has the wanted state; return that check."""
    for _ in range(200):
        status, body = await get()
        check = body["checks"].get("platform_slack")
        if check is not None and check["ok"] is ok and detail in check["detail"]:
            assert status == (200 if ok else 503) and body["ok"] is ok
            return check
        await asyncio.sleep(0.05)
    raise AssertionError(f"platform_slack never became ok={ok}: {body}")


@pytest.mark.parametrize("token", [BOT_TOKEN, "xoxb-revoked"])
def test_healthz_http_mode_reports_the_startup_auth_test(engine, settings, token):
    from bot.health import Health
    from bot.slack_app import run_slack

    from .fakes.health import serve_healthz

    async def go():
        fake = await FakeSlack().start()
        port = _free_port()
        cfg = settings.model_copy(update={"slack_http_host": "127.0.0.1", "slack_http_port": port})
        health = Health()
        client = AsyncWebClient(token=token, base_url=fake.api_url)
        task = asyncio.create_task(
            run_slack(ChatService(engine, cfg), cfg, "http", health=health, client=client)
        )
        try:
            async with serve_healthz(health) as get:
                good = token == BOT_TOKEN
                check = await _check(get, good, "auth.test ok" if good else "auth.test failed")
                assert fake.called("auth.test")
                if token == BOT_TOKEN:
                    assert "auth.test ok" in check["detail"] and TEAM in check["detail"]
                    # and the endpoint it reports on really serves Slack's requests
                    body = json.dumps({"type": "url_verification", "challenge": "c9"})
                    async with (
                        aiohttp.ClientSession() as http,
                        http.post(
                            f"http://127.0.0.1:{port}/slack/events",
                            data=body.encode(),
                            headers={**sign(body), "Content-Type": "application/json"},
                        ) as resp,
                    ):
                        assert resp.status == 200 and "c9" in await resp.text()
                else:
                    assert "invalid_auth" in check["detail"]
                    assert token not in json.dumps(check)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await fake.stop()

    asyncio.run(go())


def test_healthz_socket_mode_follows_the_websocket(engine, settings):
    from bot.health import Health
    from bot.slack_app import run_slack

    from .fakes.health import serve_healthz

    async def go():
        fake = await FakeSlack().start()
        cfg = settings.model_copy(
            update={"slack_app_token": SecretStr("xapp-1-test"), "slack_mode": "socket"}
        )
        health = Health()
        client = AsyncWebClient(token=BOT_TOKEN, base_url=fake.api_url)
        task = asyncio.create_task(
            run_slack(ChatService(engine, cfg), cfg, health=health, client=client)
        )
        try:
            async with serve_healthz(health) as get:
                await _check(get, ok=True, detail="Socket Mode connected")
                await fake.drop_sockets()  # Slack closes the connection
                await _check(get, ok=False, detail="Socket Mode not connected")
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await _check(get, ok=False)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await fake.stop()

    asyncio.run(go())


def test_manifest_matches_the_listeners():
    """deploy/slack-manifest.yml subscribes to every event the bot listens to."""
    from pathlib import Path

    import yaml

    manifest = yaml.safe_load(
        (Path(__file__).parent.parent / "deploy" / "slack-manifest.yml").read_text()
    )
    events = set(manifest["settings"]["event_subscriptions"]["bot_events"])
    assert {"app_mention", "reaction_added", "reaction_removed", "message.channels"} <= events
    assert [c["command"] for c in manifest["features"]["slash_commands"]] == ["/gesal"]
    assert manifest["settings"]["interactivity"]["is_enabled"]  # the reset buttons
    scopes = set(manifest["oauth_config"]["scopes"]["bot"])
    needed = {"app_mentions:read", "chat:write", "reactions:read", "commands", "users:read"}
    assert needed | {"files:write", "files:read", "channels:history"} <= scopes


# -- requests Slack did not sign ------------------------------------------------------------


def test_unsigned_and_future_requests_are_refused_and_not_handled(engine, settings):
    """No signature headers, a signature without its timestamp, or a timestamp beyond
    the five-minute window in the future: 401, and no listener runs. The same body,
    signed now, is answered: the refusals were about the signature alone."""

    async def go():
        fake = await FakeSlack().start()
        try:
            async with Harness(engine, settings, fake) as h:
                q = fake.add_message("C1", text="hi", user="U2")
                body = h.event_body(mention_event(f"<@{BOT_USER}> hello", q["ts"]), "EvUnsigned")
                now = int(time.time())
                refused = [
                    {},
                    {"X-Slack-Signature": sign(body)["X-Slack-Signature"]},
                    sign(body, ts=now + 301),
                    sign(body, ts=now + 3600),
                ]
                for headers in refused:
                    assert (await h.post(body, headers, "application/json"))[0] == 401, headers
                await asyncio.sleep(0.5)
                assert fake.calls == []  # no thinking reaction, no thread read, no answer
                assert (await engine.stats(KEY))["replies"] == 0
                # the same event id was not recorded as seen by the refused requests
                assert (await h.post(body, sign(body), "application/json"))[0] == 200
                await until(lambda: fake.called("chat.postMessage"))
        finally:
            await fake.stop()

    asyncio.run(go())


# -- votes by other bots ----------------------------------------------------------------------


def test_reactions_by_other_bots_do_not_count(engine, settings):
    async def go():
        fake = await FakeSlack(users={"UHELPER": {"is_bot": True}}).start()
        try:
            async with Harness(engine, settings, fake) as h:
                q = fake.add_message("C1", text="hi", user="U2")
                await h.event(mention_event(f"<@{BOT_USER}> hello world", q["ts"]))
                await until(lambda: fake.called("chat.postMessage"))
                reply_ts = fake.messages["C1"][-1]["ts"]
                reply_id = await linked_reply(engine, reply_ts)

                def reaction(user: str, name: str = "+1", **extra) -> dict:
                    return {
                        "type": "reaction_added",
                        "user": user,
                        "reaction": name,
                        "item": {"type": "message", "channel": "C1", "ts": reply_ts},
                        "event_ts": fake.next_ts(),
                        **extra,
                    }

                def looked_up(user: str) -> int:
                    return sum(c["user"] == user for c in fake.called("users.info"))

                await h.event(reaction("UHELPER"))  # users.info says is_bot
                await until(lambda: looked_up("UHELPER") == 1)
                await h.event(reaction("UHELPER", "-1"))  # remembered: no second lookup
                await h.event(reaction("UAPP", bot_id="B2"))  # the event itself names a bot
                await h.event(reaction(BOT_USER))  # the bot's own
                await asyncio.sleep(0.3)
                await h.event(reaction("U3"))  # a member
                await until(lambda: engine.store._ch(KEY).replies[reply_id].votes)
                await asyncio.sleep(0.2)
                assert (await engine.store.get_reply(KEY, reply_id)).votes == {"U3": 1}
                assert looked_up("UHELPER") == 1 and looked_up("U3") == 1
                assert looked_up("UAPP") == 0 and looked_up(BOT_USER) == 0
                assert await engine.pending(KEY) == 1
        finally:
            await fake.stop()

    asyncio.run(go())


async def linked_reply(engine, ts: str, timeout: float = 20.0, key: str = KEY) -> str:
    """The reply id the bot links to its message ``ts`` in channel ``key``, once the
    listener has linked it (that happens just after ``chat.postMessage`` returns)."""
    for _ in range(int(timeout / 0.05)):
        reply_id = await engine.reply_for_message(key, ts)
        if reply_id is not None:
            return reply_id
        await asyncio.sleep(0.05)
    raise AssertionError(f"no reply linked to {ts}")


def test_a_rate_limited_answer_is_posted_after_retry_after(engine, settings):
    """Slack refuses the answer's ``chat.postMessage`` once with 429 and ``Retry-After:
    1``: the client sends it again after that second, and the posted answer is linked to
    its message, so a 👍 on it counts."""

    async def go():
        fake = await FakeSlack(rate_limited={"chat.postMessage": 1}).start()
        try:
            async with Harness(engine, settings, fake) as h:
                q = fake.add_message("C1", text=f"<@{BOT_USER}> hello world", user="U2")
                await h.event(mention_event(f"<@{BOT_USER}> hello world", q["ts"]))
                await until(lambda: fake.messages["C1"][-1].get("user") == BOT_USER)
                assert len(fake.called("chat.postMessage")) == 2
                assert fake.rate_limited["chat.postMessage"] == 0
                reply_ts = fake.messages["C1"][-1]["ts"]
                reply_id = await linked_reply(engine, reply_ts)
                await h.event(
                    {
                        "type": "reaction_added",
                        "user": "U3",
                        "reaction": "+1",
                        "item": {"type": "message", "channel": "C1", "ts": reply_ts},
                        "item_user": BOT_USER,
                        "event_ts": fake.next_ts(),
                    }
                )
                await until(lambda: engine.store._ch(KEY).replies[reply_id].votes)
                assert (await engine.store.get_reply(KEY, reply_id)).votes == {"U3": 1}
        finally:
            await fake.stop()

    asyncio.run(go())


def test_a_correction_also_sent_to_the_channel_counts(engine, settings):
    """A ``better:`` reply posted with "also send to channel" arrives as a message of
    subtype ``thread_broadcast``: it corrects the answer like a plain thread reply. The
    bot's own broadcasts, edits, deletions and other bots' messages correct nothing."""

    async def go():
        fake = await FakeSlack().start()
        try:
            async with Harness(engine, settings, fake) as h:
                q = fake.add_message("C1", text=f"<@{BOT_USER}> hello world", user="U2")
                await h.event(mention_event(f"<@{BOT_USER}> hello world", q["ts"]))
                await until(lambda: fake.called("chat.postMessage"))
                reply_ts = fake.messages["C1"][-1]["ts"]
                reply_id = await linked_reply(engine, reply_ts)

                def message(text: str, stored: bool = False, **extra) -> dict:
                    """A message event in the answer's thread; ``stored``: the fake's
                    thread holds it too (the ignored ones stay out of it, so the answer
                    remains the bot's latest message above the correction)."""
                    msg = {"text": text, "thread_ts": q["ts"], "ts": fake.next_ts(), **extra}
                    if stored:
                        fake.add_message("C1", **msg)
                    return {"type": "message", "channel": "C1", "channel_type": "channel", **msg}

                ignored = [
                    message("better: from the bot", user=BOT_USER, bot_id="BBOT"),
                    message("better: no bot id", user=BOT_USER),
                    message("better: another app", bot_id="B2", subtype="bot_message"),
                ]
                for ev in ignored:
                    ev["subtype"] = ev.get("subtype", "thread_broadcast")
                edited = message("better: edited", user="U4")
                edited |= {"subtype": "message_changed", "message": {"text": "better: edited"}}
                deleted = message("better: deleted", user="U4", subtype="message_deleted")
                for ev in [*ignored, edited, deleted]:
                    await h.event(ev)
                await asyncio.sleep(0.5)
                assert not fake.called("reactions.add") or all(
                    a["name"] != "white_check_mark" for a in fake.called("reactions.add")
                )
                assert not (await engine.store.get_reply(KEY, reply_id)).corrections

                fix = message("better: Hi there!", True, user="U3", subtype="thread_broadcast")
                await h.event(fix)
                await until(
                    lambda: any(
                        a["name"] == "white_check_mark" and a["timestamp"] == fix["ts"]
                        for a in fake.called("reactions.add")
                    )
                )
                corr = (await engine.store.get_reply(KEY, reply_id)).corrections
                assert [(c["text"], c["user"]) for c in corr] == [("Hi there!", "U3")]
        finally:
            await fake.stop()

    asyncio.run(go())


def test_shared_channel_members_of_other_teams_share_one_channel_key(engine, settings):
    """Slack Connect: the question comes from a member of T_EXT, the vote from a member
    of T_THIRD; both belong to the channel of the workspace that installed the bot."""
    shared = f"slack:{TEAM}:C222"

    async def go():
        fake = await FakeSlack(users={"UADMIN": {"is_admin": True}}).start()
        try:
            async with Harness(engine, settings, fake) as h:
                q = fake.add_message("C222", text="hi", user="UEXT")
                ev = mention_event(f"<@{BOT_USER}> hello world", q["ts"], user="UEXT")
                ev["channel"] = "C222"
                await h.event(ev, actor_team="T_EXT")
                await until(lambda: fake.called("chat.postMessage"))
                reply_ts = fake.messages["C222"][-1]["ts"]
                reply_id = await linked_reply(engine, reply_ts, key=shared)
                vote = {
                    "type": "reaction_added",
                    "user": "UTHIRD",
                    "reaction": "+1",
                    "item": {"type": "message", "channel": "C222", "ts": reply_ts},
                    "item_user": BOT_USER,
                    "event_ts": fake.next_ts(),
                }
                await h.event(vote, actor_team="T_THIRD")
                await until(lambda: engine.store._ch(shared).replies[reply_id].votes)
                assert (await engine.store.get_reply(shared, reply_id)).votes == {"UTHIRD": 1}

                # the host workspace's admin sees that memory in /gesal stats
                before = len(fake.responses)
                await h.command("stats", user="UADMIN", channel="C222")
                await until(lambda: len(fake.responses) > before)
                assert "1 nodes" in fake.responses[-1]["text"]
        finally:
            await fake.stop()

    asyncio.run(go())


# -- importing a file: admins only, Slack's file host only, bounded --------------------------


class FileThief:
    """A web server on loopback that records every request: where a token must never go."""

    def __init__(self) -> None:
        self.requests: list[dict] = []

    async def __aenter__(self) -> FileThief:
        async def record(request: web.Request) -> web.Response:
            self.requests.append({"path": request.path, "headers": dict(request.headers)})
            return web.Response(body=b'{"format": "gesal-graph"}')

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # noqa: SLF001
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


def test_file_url_allow_list():
    from bot.slack_app import SLACK_FILE_ORIGINS
    from bot.slack_commands import file_url_allowed

    assert SLACK_FILE_ORIGINS == ("https://files.slack.com",)
    for url in (
        "https://files.slack.com/files-pri/T1-F1/download/gesal.json",
        "https://FILES.slack.com:443/files-pri/T1-F1/gesal.json",
    ):
        assert file_url_allowed(url), url
    for url in (
        "http://files.slack.com/files-pri/T1-F1/gesal.json",  # the token in clear text
        "https://files.slack.com.evil.example/x",
        "https://evil.example/files.slack.com/x",
        "https://evil.example/?u=https://files.slack.com/x",
        "https://files.slack.com:8443/x",
        "https://files.slack.com@evil.example/x",
        "https://user@files.slack.com/x",
        "https://files.slack.com:port/x",
        "//files.slack.com/x",
        "file:///etc/passwd",
        "",
    ):
        assert not file_url_allowed(url), url


def test_import_checks_admin_first_stays_on_slack_and_is_capped(engine, settings, monkeypatch):
    import bot.slack_commands as slack_commands

    monkeypatch.setattr(slack_commands, "MAX_DOWNLOAD_BYTES", 4096)

    async def go():
        fake = await FakeSlack().start()
        try:
            async with Harness(engine, settings, fake) as h, FileThief() as thief:

                async def said(text: str, user: str = "U9") -> str:
                    before = len(fake.responses)
                    await h.command(text, user=user)
                    await until(lambda: len(fake.responses) > before)
                    return fake.responses[-1]["text"]

                small = fake.add_file("gesal.json", b'{"format": "gesal-graph"}')
                # a member: refused before Slack is even asked about the file
                assert "only admins" in await said(f"import {small}", user="U2")
                assert fake.called("files.info") == [] and fake.downloads == []

                # files.info says it is too large: never downloaded
                big = fake.add_file("gesal.json", b"x" * 5000)
                answer = await said(f"import {big}")
                assert "too large" in answer and ". " not in answer  # one sentence
                assert len(fake.called("files.info")) == 1 and fake.downloads == []

                # files.info understates the size: the download stops past the cap
                liar = fake.add_file("gesal.json", b"x" * 300_000, size=10)
                assert "too large" in await said(f"import {liar}")
                assert fake.downloads == [liar]

                # files.info points somewhere else: nothing is sent there, token or not
                stolen = fake.add_file(
                    "gesal.json", b"{}", url_private_download=f"{thief.url}/steal.json"
                )
                assert "not on Slack's file host" in await said(f"import {stolen}")
                # Slack's host redirects elsewhere: not followed
                moved = fake.add_file("gesal.json", b"{}", redirect=f"{thief.url}/moved.json")
                assert "not on Slack's file host" in await said(f"import {moved}")
                assert fake.downloads == [liar, moved]
                assert thief.requests == []
                assert (await engine.stats(KEY))["replies"] == 0
                # an admin's file within the cap, on the allowed host, is fetched
                await said(f"import {small}")
                assert fake.downloads == [liar, moved, small]
        finally:
            await fake.stop()

    asyncio.run(go())


def test_the_default_allow_list_refuses_a_file_off_slack(engine, settings):
    """Built as in production (no file_origins given): the fake's loopback file URL is
    not Slack's, so an admin's import fetches nothing."""

    async def go():
        fake = await FakeSlack().start()
        try:
            client = AsyncWebClient(token=BOT_TOKEN, base_url=fake.api_url)
            service = ChatService(engine, settings)
            async with Harness(engine, settings, fake) as h:
                default = make_bot(service, settings, client=client).commands.file_origins
                h.bot.commands.file_origins = default
                fid = fake.add_file("gesal.json", b'{"format": "gesal-graph"}')
                await h.command(f"import {fid}", user="U9")
                await until(lambda: fake.responses)
                assert "not on Slack's file host" in fake.responses[-1]["text"]
                assert fake.downloads == []
        finally:
            await fake.stop()

    asyncio.run(go())


# -- retries across replicas ----------------------------------------------------------------


def test_retries_are_dropped_across_replicas_sharing_redis(tiny_tokenizer, settings, redis_url):
    """Two bot processes behind one Slack endpoint, one Redis: a retry that lands on the
    other replica is acknowledged but not answered again."""
    import redis as sync_redis

    from bot.slack_app import DEDUPE_PREFIX, DEDUPE_TTL_S, RedisEventDeduper
    from gesal_core.store.redis_store import RedisStore

    engines = [make_engine(tiny_tokenizer, store=RedisStore(redis_url)) for _ in range(2)]

    async def go():
        fake = await FakeSlack().start()
        try:
            async with (
                Harness(engines[0], settings, fake) as a,
                Harness(engines[1], settings, fake) as b,
            ):
                assert isinstance(a.bot.deduper, RedisEventDeduper)
                q = fake.add_message("C1", text="hi", user="U2")
                ev = mention_event(f"<@{BOT_USER}> hello world", q["ts"])
                assert (await a.event(ev, event_id="EvShared"))[0] == 200
                await until(lambda: fake.called("chat.postMessage"))
                assert (await b.event(ev, event_id="EvShared", retry=1))[0] == 200
                assert (await a.event(ev, event_id="EvShared", retry=2))[0] == 200
                await asyncio.sleep(0.5)
                assert len(fake.called("chat.postMessage")) == 1
                # the other replica answers events of its own
                q2 = fake.add_message("C1", text="hi", user="U3")
                await b.event(mention_event(f"<@{BOT_USER}> hello", q2["ts"]), event_id="EvB")
                await until(lambda: len(fake.called("chat.postMessage")) == 2)
        finally:
            await fake.stop()

    try:
        asyncio.run(go())
    finally:
        for eng in engines:
            eng.close()
    ttl = sync_redis.Redis.from_url(redis_url).ttl(DEDUPE_PREFIX + "EvShared")
    assert 0 < ttl <= DEDUPE_TTL_S


def test_in_process_dedup_without_redis(engine, settings):
    from bot.slack_app import EventDeduper

    async def go():
        fake = await FakeSlack().start()
        try:
            async with Harness(engine, settings, fake) as h:
                assert type(h.bot.deduper) is EventDeduper  # the store is in memory
                assert not await h.bot.deduper.seen("Ev1")
                assert await h.bot.deduper.seen("Ev1")
        finally:
            await fake.stop()

    asyncio.run(go())


# -- Redis down: what a member sees ---------------------------------------------------------

PASSWORD, USER = "Pa55-w0rd-xyz", "botuser"


def _unreachable_urls(port: int) -> list[str]:
    return [
        f"redis://{USER}:{PASSWORD}@127.0.0.1:{port}/0",
        f"redis://{PASSWORD}@127.0.0.1:{port}/0",  # a lone user-info part is a password
        f"redis://127.0.0.1:{port}/0?password={PASSWORD}",
        f"rediss://{USER}:{PASSWORD}@127.0.0.1:{port}/0"
        f"?ssl_ca_certs=/etc/gesal/redis-ca.crt&ssl_password={PASSWORD}",
        f"unix://{USER}:{PASSWORD}@/nonexistent/gesal/redis.sock?db=0",
    ]


@pytest.mark.parametrize("shape", range(5))
def test_redis_down_members_see_no_address_and_logs_no_password(
    tiny_tokenizer, settings, caplog, shape
):
    """A mention, an admin's /gesal stats and /healthz with Redis unreachable, for each
    shape of REDIS_URL: the chat says the bot's memory is unavailable, naming neither
    host, port, socket, user nor secret; the log names the server with the secret
    masked; /healthz names no server either."""
    import logging

    from bot.health import Health, engine_checks
    from gesal_core.store.redis_store import RedisStore

    port = _free_port()  # nothing listens there
    url = _unreachable_urls(port)[shape]
    caplog.set_level(logging.DEBUG)
    eng = make_engine(tiny_tokenizer, store=RedisStore(url, retries=0))

    async def go():
        fake = await FakeSlack().start()
        try:
            async with Harness(eng, settings, fake) as h:
                q = fake.add_message("C1", text="hi", user="U2")
                await h.event(mention_event(f"<@{BOT_USER}> hello world", q["ts"]))
                await until(lambda: fake.called("chat.postMessage"))
                await h.command("stats", user="U9")
                await until(lambda: fake.responses)
                health = Health()
                engine_checks(health, eng)
                ok, body = await health.report()
                assert not ok and not body["checks"]["redis"]["ok"]
                return (
                    fake.called("chat.postMessage")[0]["text"],
                    fake.responses[0]["text"],
                    json.dumps(body),
                )
        finally:
            await fake.stop()

    try:
        answer, stats, healthz = asyncio.run(go())
    finally:
        eng.close()
    for text in (answer, stats, healthz):
        assert "memory" in text and "not reachable" in text, text
        for leak in (PASSWORD, USER, "127.0.0.1", str(port), "redis.sock", "redis-ca.crt", "://"):
            assert leak not in text, (leak, text)
    logs = caplog.text
    assert PASSWORD not in logs
    # the operator's log names the server, secret masked
    where = "/nonexistent/gesal/redis.sock" if url.startswith("unix") else f"127.0.0.1:{port}"
    assert f"{where}" in logs and "***" in logs


def thread_reply(fake: FakeSlack, thread: str, text: str, user: str = "U4") -> dict:
    """A member's reply in a thread, as the fake's history holds it and as the
    ``message`` event that announces it."""
    msg = fake.add_message("C1", text=text, user=user, thread_ts=thread)
    return {"type": "message", "channel": "C1", "channel_type": "channel", **msg}


def test_a_long_thread_is_read_from_its_newest_end(engine, settings):
    """213 messages, 30 s apart, read by an app whose pages hold 15 messages: the
    context of a question is the 10 messages just before it, a correction at the end
    corrects the bot's last answer (not one on the thread's first page), and a second
    question reads only what was posted since, in one request."""
    from decimal import Decimal

    seen: list[list[dict]] = []

    async def go():
        fake = await FakeSlack(replies_page_max=15, tick=Decimal(30)).start()
        try:
            async with Harness(engine, settings, fake) as h:
                build = h.service.build_messages

                def spy(m):
                    messages, cut = build(m)
                    seen.append(messages)
                    return messages, cut

                h.service.build_messages = spy  # type: ignore[method-assign]
                parent = fake.add_message("C1", text="a long discussion", user="U2")
                thread = parent["ts"]

                async def ask(text: str) -> str:
                    q = fake.add_message("C1", text=f"<@{BOT_USER}> {text}", user="U2")
                    q["thread_ts"] = thread
                    n = len(fake.called("chat.postMessage"))
                    await h.event(mention_event(q["text"], q["ts"], thread_ts=thread))
                    await until(lambda: len(fake.called("chat.postMessage")) == n + 1)
                    return fake.messages["C1"][-1]["ts"]

                first = await ask("what is redis?")
                for i in range(195):
                    thread_reply(fake, thread, f"chatter {i}")
                before = len(fake.called("conversations.replies"))
                last = await ask("and what is a stream?")
                reads = fake.called("conversations.replies")[before:]
                assert [m["content"] for m in seen[-1][-11:-1]] == [
                    f"U4: chatter {i}" for i in range(185, 195)
                ]
                assert seen[-1][-1]["content"] == "and what is a stream?"
                assert len(reads) <= 3, reads  # not the 14 pages from the thread's start
                for i in range(5):
                    thread_reply(fake, thread, f"more chatter {i}")
                fix = thread_reply(fake, thread, "better: Streams are append-only logs.", "U3")
                assert len(fake.messages["C1"]) == 1 + 2 * 2 + 195 + 6 == 206
                await h.event(fix)
                await until(lambda: fake.called("reactions.add")[-1]["timestamp"] == fix["ts"])
                fixed = await engine.store.get_reply(KEY, await linked_reply(engine, last))
                old = await engine.store.get_reply(KEY, await linked_reply(engine, first))
                assert [c["text"] for c in fixed.corrections] == ["Streams are append-only logs."]
                assert not old.corrections

                # the cache: a question after more replies costs one request, for them
                for i in range(6):
                    thread_reply(fake, thread, f"late {i}")
                before = len(fake.called("conversations.replies"))
                await ask("one more")
                reads = fake.called("conversations.replies")[before:]
                assert len(reads) == 1 and Decimal(reads[0]["oldest"]) >= Decimal(fix["ts"])
                assert [m["content"] for m in seen[-1][-11:-1]][-6:] == [
                    f"U4: late {i}" for i in range(6)
                ]
        finally:
            await fake.stop()

    asyncio.run(go())


def test_an_answer_slack_refuses_is_discarded_counted_and_flagged(engine, settings, caplog):
    """``chat.postMessage`` keeps failing (``not_in_channel``; then 429 more times than
    the client retries): the answer is not kept as a reply nobody can vote on, the
    failure is logged with Slack's reason and counted, and the question gets a
    :warning: so its author knows."""
    import logging

    async def go():
        fake = await FakeSlack(errors={"chat.postMessage": "not_in_channel"}).start()
        try:
            async with Harness(engine, settings, fake) as h:
                with caplog.at_level(logging.WARNING, logger="bot"):
                    q = fake.add_message("C1", text=f"<@{BOT_USER}> hello", user="U2")
                    await h.event(mention_event(q["text"], q["ts"]))
                    await until(lambda: undelivered(h, "answer") == 1)
                    await until(
                        lambda: any(a["name"] == "warning" for a in fake.called("reactions.add"))
                    )
                    assert await engine.store.reply_count(KEY) == 0
                    said = [r.getMessage() for r in caplog.records if "answer" in r.getMessage()]
                    assert any("not_in_channel" in s and "discarded" in s for s in said), said

                    del fake.errors["chat.postMessage"]
                    fake.rate_limited["chat.postMessage"] = 3  # the client retries twice
                    q = fake.add_message("C1", text=f"<@{BOT_USER}> again", user="U2")
                    await h.event(mention_event(q["text"], q["ts"]))
                    await until(lambda: undelivered(h, "answer") == 2, timeout=30)
                    assert len(fake.called("chat.postMessage")) == 1 + 3
                    assert await engine.store.reply_count(KEY) == 0
        finally:
            await fake.stop()

    asyncio.run(go())


def test_a_button_answer_falls_back_when_its_response_url_fails(engine, settings, caplog):
    """Pressing "Cancel" after the prompt's ``response_url`` expired (HTTP 404): the
    answer comes as a new ephemeral message; when that fails too, it is counted."""

    async def go():
        fake = await FakeSlack().start()
        try:
            async with Harness(engine, settings, fake) as h:
                await h.command("reset", user="U9")
                await until(lambda: fake.responses)
                blocks = fake.responses[-1]["blocks"]
                fake.response_status = 404
                assert (await h.click(blocks, RESET_CANCEL, "U9"))[0] == 200
                await until(lambda: fake.called("chat.postEphemeral"))
                said = fake.called("chat.postEphemeral")[-1]
                assert said["user"] == "U9" and said["text"] == "Nothing was reset."
                assert undelivered(h, "command") == 0
                fake.errors["chat.postEphemeral"] = "channel_not_found"
                await h.click(blocks, RESET_CANCEL, "U9")
                await until(lambda: undelivered(h, "command") == 1)
        finally:
            await fake.stop()

    asyncio.run(go())
