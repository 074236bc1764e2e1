"""discord.py's own 429 handling, end to end, against a loopback Discord.

simcord replaces ``HTTPClient.request``, where discord.py handles rate limits, so these
tests serve Discord's REST API from an aiohttp server on 127.0.0.1 instead (pointed to
by ``discord.http.Route.BASE``) and let the real HTTP client talk to it: login, fetching
the channel and the question, the typing indicator, and the replies, whose first
attempts answer 429 as Discord does (JSON body with ``retry_after``, ``X-RateLimit-*``
headers, and the ``Via`` header without which discord.py takes a 429 for a Cloudflare
ban and gives up at once).

What discord.py does (discord/http.py, ``HTTPClient.request``): on a 429 it sleeps
``retry_after`` and tries again, up to five attempts in all, then raises
`discord.HTTPException` (status 429). With ``max_ratelimit_timeout`` set it raises
`discord.RateLimited` instead of sleeping longer than that; the bot leaves it unset.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

import discord
import pytest
from aiohttp import web

from bot.discord_app import UNDELIVERED_FLAG, GesalDiscordBot
from bot.service import ChatService

from .fakes.tiny import make_engine
from .test_discord import discord_settings

BOT, APP, GUILD, CHANNEL, MEMBER, QUESTION = 100, 100, 300, 400, 200, 500
RETRY_AFTER = 0.05


def user(uid: int, name: str, bot: bool = False) -> dict:
    return {
        "id": str(uid),
        "username": name,
        "discriminator": "0",
        "global_name": None,
        "avatar": None,
        "bot": bot,
    }


def message(mid: int, author: dict, content: str, **extra) -> dict:
    return {
        "id": str(mid),
        "channel_id": str(CHANNEL),
        "guild_id": str(GUILD),
        "author": author,
        "content": content,
        "timestamp": "2025-01-01T00:00:00+00:00",
        "edited_timestamp": None,
        "tts": False,
        "mention_everyone": False,
        "mentions": [],
        "mention_roles": [],
        "attachments": [],
        "embeds": [],
        "pinned": False,
        "type": 0,
        "flags": 0,
        **extra,
    }


def reply_json(data, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """JSON as Discord sends it: discord.py decodes a body only when its content type is
    exactly ``application/json`` (aiohttp's `web.json_response` adds a charset)."""
    return web.Response(
        body=json.dumps(data).encode(),
        status=status,
        headers={**(headers or {}), "Content-Type": "application/json"},
    )


def limit_headers(remaining: int, reset_after: float) -> dict[str, str]:
    """The rate-limit headers Discord sends with every response of a bucket."""
    return {
        "X-RateLimit-Limit": "5",
        "X-RateLimit-Remaining": str(remaining),
        "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
        "X-RateLimit-Reset-After": f"{reset_after:.3f}",
        "X-RateLimit-Bucket": "7d1b4f0e2c3a",
        "Via": "1.1 google",
    }


class LoopbackDiscord:
    """Just the REST routes a mention's answer uses. ``limited(n)`` says whether the
    n-th POST of a message (from 0) is answered 429."""

    def __init__(self, limited: Callable[[int], bool]) -> None:
        self.limited = limited
        self.calls: list[tuple[str, str]] = []
        self.posted: list[dict] = []
        self.next_id = 900
        me = user(BOT, "gesal", bot=True)
        self.me = me
        app = web.Application()
        add = app.router.add_route
        add("GET", "/api/v10/users/@me", self.whoami)
        add("GET", "/api/v10/oauth2/applications/@me", self.application)
        add("PUT", f"/api/v10/applications/{APP}/commands", self.sync_commands)
        add("GET", "/api/v10/channels/{cid}", self.channel)
        add("GET", "/api/v10/channels/{cid}/messages/{mid}", self.question)
        add("POST", "/api/v10/channels/{cid}/typing", self.no_content)
        add("POST", "/api/v10/channels/{cid}/messages", self.create_message)
        add("PUT", "/api/v10/channels/{cid}/messages/{mid}/reactions/{emoji}/@me", self.no_content)
        app.middlewares.append(self.record)
        self.app = app

    @web.middleware
    async def record(self, request: web.Request, handler):
        self.calls.append((request.method, request.path))
        return await handler(request)

    async def whoami(self, request: web.Request) -> web.Response:
        return reply_json(self.me)

    async def sync_commands(self, request: web.Request) -> web.Response:
        return reply_json([])

    async def no_content(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def application(self, request: web.Request) -> web.Response:
        return reply_json(
            {
                "id": str(APP),
                "name": "gesal",
                "description": "",
                "icon": None,
                "bot_public": False,
                "bot_require_code_grant": False,
                "owner": user(1, "owner"),
                "verify_key": "0" * 64,
                "flags": 0,
            }
        )

    async def channel(self, request: web.Request) -> web.Response:
        return reply_json(
            {
                "id": str(CHANNEL),
                "guild_id": str(GUILD),
                "type": 0,
                "name": "general",
                "position": 0,
                "permission_overwrites": [],
                "nsfw": False,
                "parent_id": None,
            }
        )

    async def question(self, request: web.Request) -> web.Response:
        return reply_json(
            message(
                QUESTION,
                user(MEMBER, "bob"),
                f"<@{BOT}> hello world",
                mentions=[self.me],
            )
        )

    async def create_message(self, request: web.Request) -> web.Response:
        attempt = sum(1 for c in self.calls if c[0] == "POST" and c[1].endswith("/messages"))
        if self.limited(attempt - 1):
            return reply_json(
                {
                    "message": "You are being rate limited.",
                    "retry_after": RETRY_AFTER,
                    "global": False,
                },
                status=429,
                headers={
                    **limit_headers(0, RETRY_AFTER),
                    "Retry-After": "1",
                    "X-RateLimit-Scope": "user",
                },
            )
        body = await request.json()
        self.next_id += 1
        posted = message(
            self.next_id,
            self.me,
            body["content"],
            type=19,
            message_reference={**body["message_reference"], "channel_id": str(CHANNEL)},
        )
        self.posted.append(posted)
        return reply_json(posted, headers=limit_headers(4, 5.0))


async def ask_once(monkeypatch, service: ChatService, server: LoopbackDiscord) -> None:
    """Serve ``server`` on loopback and let the bot answer the question there, through
    the real client: login, ``fetch_channel``/``fetch_message``, then ``on_message``."""
    runner = web.AppRunner(server.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001
    monkeypatch.setattr(discord.http.Route, "BASE", f"http://127.0.0.1:{port}/api/v10")
    bot = GesalDiscordBot(service, service.settings)
    try:
        async with bot:
            await bot.login("loopback.token.value")
            channel = await bot.fetch_channel(CHANNEL)
            question = await channel.fetch_message(QUESTION)
            await bot.on_message(question)
    finally:
        await runner.cleanup()


@pytest.fixture
def engine(tiny_tokenizer):
    eng = make_engine(tiny_tokenizer)
    yield eng
    eng.close()


KEY = f"discord:{GUILD}:{CHANNEL}"


def test_a_429_is_retried_by_discord_py_and_the_answer_posted_once(engine, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    server = LoopbackDiscord(limited=lambda attempt: attempt == 0)
    service = ChatService(engine, discord_settings(monkeypatch))
    started = time.monotonic()
    asyncio.run(ask_once(monkeypatch, service, server))
    assert time.monotonic() - started < 5

    posts = [c for c in server.calls if c == ("POST", f"/api/v10/channels/{CHANNEL}/messages")]
    assert len(posts) == 2 and len(server.posted) == 1
    (posted,) = server.posted
    assert str(posted["message_reference"]["message_id"]) == str(QUESTION)
    reply_id = asyncio.run(engine.reply_for_message(KEY, posted["id"]))
    assert reply_id is not None
    assert asyncio.run(engine.store.get_reply(KEY, reply_id)).text == posted["content"]
    assert not any(c[0] == "PUT" and "reactions" in c[1] for c in server.calls)
    assert any(
        r.name == "discord.http" and "rate limited" in r.getMessage() for r in caplog.records
    )
    assert not [r for r in caplog.records if r.name.startswith("bot") and r.levelno >= 30]


def test_a_rate_limit_that_does_not_end_is_reported_and_flagged(engine, monkeypatch, caplog):
    """Five 429s in a row: discord.py gives up; the answer is discarded, the operator
    reads why, and the member sees ⚠️ on the question."""
    caplog.set_level(logging.INFO)
    server = LoopbackDiscord(limited=lambda attempt: True)
    service = ChatService(engine, discord_settings(monkeypatch))
    asyncio.run(ask_once(monkeypatch, service, server))

    posts = [c for c in server.calls if c == ("POST", f"/api/v10/channels/{CHANNEL}/messages")]
    assert len(posts) == 5 and not server.posted
    reaction = f"/api/v10/channels/{CHANNEL}/messages/{QUESTION}/reactions/{UNDELIVERED_FLAG}/@me"
    assert ("PUT", reaction) in server.calls
    assert asyncio.run(engine.stats(KEY))["replies"] == 0
    (warning,) = [
        r.getMessage() for r in caplog.records if r.name.startswith("bot") and r.levelno >= 30
    ]
    assert KEY in warning and "You are being rate limited. (HTTP 429" in warning
