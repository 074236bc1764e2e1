"""Slack adapter (slack-bolt 1.x, asyncio): translate Slack events to `ChatService` calls.

* ``app_mention`` → threaded answer. Bolt acks the event before the listener runs
  (``process_before_response=False``), so Slack gets its 200 within milliseconds and
  the model works afterwards. Slack has no typing indicator for bots in channels, so
  the question gets an :eyes: reaction while the bot thinks.
* ``reaction_added`` / ``reaction_removed`` → votes (the service decides what counts).
  Reactions by bots never count: the bot's own, and any user ``users.info`` calls a
  bot (``is_bot``, remembered per user), so another app cannot vote.
* Corrections: a thread reply starting with ``better:`` or ✏️ corrects the bot's latest
  answer above it in that thread, also when it is sent to the channel too
  (``thread_broadcast``). It arrives as ``app_mention`` when it mentions the bot, or as
  a ``message`` event when the app subscribes to ``message.channels``.
* Web API calls answered 429 are sent again after ``Retry-After`` (`with_retries`), so
  one rate-limited ``chat.postMessage`` does not lose an answer.
* A channel's key is ``slack:<team>:<channel>`` with the team that installed the bot
  (`channel_team`), for every kind of request: in a shared (Slack Connect) channel the
  members of every team teach, vote in and administer the same memory.
* ``/gesal`` and its reset buttons are `SlackCommands` (``bot/slack_commands.py``);
  `SlackBot` registers their listeners on the same app.
* Both transports: Socket Mode (``SLACK_APP_TOKEN``) and HTTP (``SLACK_SIGNING_SECRET``;
  bolt verifies the signature and timestamp of every request, and `dedupe_retries`
  drops Slack's retries of an event already received, by ``event_id``: through Redis
  when the store is Redis, so a retry that reaches another replica is dropped too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

import aiohttp
from slack_bolt.async_app import AsyncApp
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.async_handler import AsyncRetryHandler
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from .health import Check, Health, connection_check
from .messages import (
    ContextMessage,
    Correction,
    Mention,
    PostError,
    Reaction,
    strip_mentions,
)
from .service import ChatService
from .settings import Settings, SettingsError
from .slack_commands import RESET_CANCEL, RESET_CONFIRM, SlackCommands
from .slack_threads import ThreadReader
from .slack_web import (
    PLATFORM,
    SLACK_FILE_ORIGINS,
    WEB_ERRORS,
    channel_team,
    error_code,
    why_failed,
)
from .text import parse_correction

log = logging.getLogger(__name__)
CORRECTION_ACK = "white_check_mark"
THINKING = "eyes"
UNDELIVERED = "warning"  # on a question whose answer Slack refused to post
# Message subtypes that can carry a correction: a thread reply posted with "also send
# to channel". Plain replies have no subtype.
CORRECTION_SUBTYPES = frozenset({"thread_broadcast"})

# Slack retries an unacknowledged event after about 1 s, 1 min and 5 min: an hour covers it.
DEDUPE_TTL_S = 3600
DEDUPE_PREFIX = "gesal:slack:event:"
KNOWN_USERS = 10_000  # users whose bot flag is remembered (least recently seen go first)
# A Web API call answered 429 (``ratelimited``) is sent again after its ``Retry-After``,
# at most this many times, so one rate-limited ``chat.postMessage`` does not lose an
# answer and a throttled workspace does not hold a listener for long.
RATE_LIMIT_RETRIES = 2
CONNECTION_RETRIES = 2  # a reset or dropped connection to Slack is retried this often


class EventDeduper:
    """Remembers recent ``event_id``s in this process, so a retried delivery is
    processed once (the de-duplication of a single process, and the fallback of
    `RedisEventDeduper`)."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._seen: OrderedDict[str, float] = OrderedDict()

    async def seen(self, event_id: str) -> bool:
        """True if ``event_id`` was seen before; records it otherwise."""
        if event_id in self._seen:
            return True
        self._seen[event_id] = time.monotonic()
        while len(self._seen) > self.size:
            self._seen.popitem(last=False)
        return False

    async def close(self) -> None:
        return None


class RedisEventDeduper:
    """``event_id``s recorded in Redis, so every replica behind Slack's HTTP endpoint
    drops a retry that another one already received.

    One ``SET <key> 1 NX EX <ttl>`` per event: the first process to record an id owns
    it; the key expires after `DEDUPE_TTL_S`. Its own small client from the store's URL,
    one per event loop (redis-py's asyncio connections are loop-bound). While Redis
    cannot be reached it falls back to this process's memory: events keep flowing, and
    only a retry that lands on another replica in that time is processed twice.
    """

    def __init__(
        self, url: str, ttl: int = DEDUPE_TTL_S, fallback: EventDeduper | None = None
    ) -> None:
        from gesal_core.store.redis_store import url_secrets

        self.url, self.ttl = url, ttl
        self.fallback = fallback or EventDeduper()
        self._secrets = url_secrets(url)
        self._client = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _redis(self):
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            import redis.asyncio as aioredis

            self._client = aioredis.Redis.from_url(
                self.url, socket_timeout=2.0, socket_connect_timeout=2.0
            )
            self._loop = loop
        return self._client

    async def seen(self, event_id: str) -> bool:
        try:
            first = await self._redis().set(DEDUPE_PREFIX + event_id, b"1", nx=True, ex=self.ttl)
        except Exception as exc:  # noqa: BLE001 - Redis trouble must not drop events
            from gesal_core.store.redis_store import scrub

            log.warning(
                "shared event de-duplication unavailable (%s); using this process's",
                scrub(f"{type(exc).__name__}: {exc}", self._secrets),
            )
            return await self.fallback.seen(event_id)
        return not first

    async def close(self) -> None:
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client = self._loop = None


def event_deduper(shared_url: str | None) -> EventDeduper | RedisEventDeduper:
    """De-duplication shared on the Redis server at ``shared_url`` (`Engine.shared_url`,
    which every bot process of a deployment uses), else this process's own."""
    return RedisEventDeduper(shared_url) if shared_url else EventDeduper()


class SlackBot:
    """Registers the listeners on an `AsyncApp` and holds what they share; the ``/gesal``
    listeners belong to ``commands`` (`SlackCommands`)."""

    def __init__(
        self,
        app: AsyncApp,
        service: ChatService,
        settings: Settings,
        *,
        file_origins: tuple[str, ...] = SLACK_FILE_ORIGINS,
    ) -> None:
        self.app, self.service, self.settings = app, service, settings
        self.commands = SlackCommands(service, settings, file_origins=file_origins)
        self.threads = ThreadReader()
        self.deduper = event_deduper(service.engine.shared_url)
        self._bots: OrderedDict[str, bool] = OrderedDict()  # user id -> users.info is_bot
        app.middleware(self.dedupe_retries)
        app.event("app_mention")(self.on_mention)
        app.event("message")(self.on_message)
        app.event("reaction_added")(self.on_reaction_added)
        app.event("reaction_removed")(self.on_reaction_removed)
        app.command("/gesal")(self.commands.on_command)
        app.action(RESET_CONFIRM)(self.commands.on_reset_confirm)
        app.action(RESET_CANCEL)(self.commands.on_reset_cancel)

    # -- plumbing ------------------------------------------------------------------------
    async def dedupe_retries(self, body: dict, next) -> BoltResponse | None:  # noqa: A002
        event_id = body.get("event_id") if isinstance(body, dict) else None
        if event_id and await self.deduper.seen(str(event_id)):
            log.info("dropping a repeated delivery of event %s", event_id)
            return BoltResponse(status=200, body="")
        return await next()

    async def close(self) -> None:
        """Release the shared de-duplication's Redis connection, if there is one."""
        await self.deduper.close()

    # -- mentions and corrections ---------------------------------------------------------
    async def on_mention(self, body: dict, event: dict, client: AsyncWebClient, context) -> None:
        if event.get("thread_ts") and parse_correction(strip_mentions(event.get("text", ""))):
            await self._correction(body, event, client, context)
            return
        await self._answer_mention(body, event, client, context)

    async def _answer_mention(self, body: dict, event: dict, client: AsyncWebClient, context):
        channel, ts = event["channel"], event["ts"]
        thread = event.get("thread_ts") or ts

        async def mention() -> Mention:
            ctx, more = await self._thread_context(client, channel, event, context.bot_user_id)
            return Mention(
                PLATFORM,
                channel_team(body, context, event),
                channel,
                event.get("user", ""),
                strip_mentions(event.get("text", "")),
                ts,
                thread=thread,
                context=ctx,
                context_truncated=more,
            )

        async def post(chunk: str) -> str:
            try:
                resp = await client.chat_postMessage(channel=channel, thread_ts=thread, text=chunk)
            except WEB_ERRORS as exc:
                raise PostError(why_failed(exc)) from exc
            return str(resp["ts"])

        delivery = await self.service.exchange(mention(), post, self._thinking(client, channel, ts))
        if not delivery.complete:  # the member sees the answer did not (all) arrive
            await self._react(client, "reactions_add", channel, ts, UNDELIVERED)

    @contextlib.asynccontextmanager
    async def _thinking(self, client: AsyncWebClient, channel: str, ts: str) -> AsyncIterator[None]:
        """The 👀 reaction on the question while the answer is being written."""
        await self._react(client, "reactions_add", channel, ts, THINKING)
        try:
            yield
        finally:
            await self._react(client, "reactions_remove", channel, ts, THINKING)

    async def _thread_context(
        self, client: AsyncWebClient, channel: str, event: dict, bot_user: str | None
    ) -> tuple[list[ContextMessage], bool]:
        thread = event.get("thread_ts")
        limit = self.settings.gesal_context_messages
        if not thread or not limit:
            return [], False
        try:
            earlier, more = await self.threads.before(client, channel, thread, event["ts"], limit)
        except WEB_ERRORS as exc:
            # e.g. a missing history scope: answer without the context
            log.warning("cannot read thread %s: %s", thread, why_failed(exc))
            return [], False
        return [
            ContextMessage(
                m.get("user") or m.get("bot_id", "bot"),
                strip_mentions(m.get("text", "")),
                is_bot=bool(m.get("bot_id")) or m.get("user") == bot_user,
            )
            for m in earlier
        ], more

    async def on_message(self, body: dict, event: dict, client: AsyncWebClient, context) -> None:
        """Plain thread messages: only corrections matter (mentions come as app_mention).

        A reply also sent to the channel (``thread_broadcast``) is a thread reply like
        any other; every other subtype (edits, deletions, ``bot_message``…) and anything
        a bot posts, the bot's own broadcasts included, is not a correction."""
        subtype = event.get("subtype")
        if subtype and subtype not in CORRECTION_SUBTYPES:
            return
        if event.get("bot_id") or not event.get("thread_ts"):
            return
        if context.bot_user_id and event.get("user") == context.bot_user_id:
            return
        text = event.get("text", "")
        if context.bot_user_id and f"<@{context.bot_user_id}>" in text:
            return  # handled by on_mention
        if parse_correction(text) is not None:
            await self._correction(body, event, client, context)

    async def _correction(self, body: dict, event: dict, client: AsyncWebClient, context) -> None:
        """A correction replies to the bot's newest answer above it in the thread."""
        channel, ts = event["channel"], event["ts"]

        def mine(m: dict) -> bool:
            return m.get("user") == context.bot_user_id or m.get("bot_id") == context.bot_id

        try:
            answer = await self.threads.last(client, channel, event["thread_ts"], ts, mine)
        except WEB_ERRORS as exc:
            log.warning("cannot read thread for a correction: %s", why_failed(exc))
            return
        if answer is None:
            return
        result = await self.service.handle_correction(
            Correction(
                PLATFORM,
                channel_team(body, context, event),
                channel,
                event.get("user", ""),
                ts,
                answer["ts"],
                strip_mentions(event.get("text", "")),
            )
        )
        if result.status == "corrected":
            await self._react(client, "reactions_add", channel, ts, CORRECTION_ACK)
        elif result.status == "error":
            try:
                await client.chat_postMessage(
                    channel=channel, thread_ts=event["thread_ts"], text=result.message
                )
            except WEB_ERRORS as exc:
                log.warning("could not say why a correction failed: %s", why_failed(exc))

    @staticmethod
    async def _react(client: AsyncWebClient, method: str, channel: str, ts: str, name: str):
        try:
            await getattr(client, method)(channel=channel, timestamp=ts, name=name)
        except WEB_ERRORS as exc:  # cosmetic: never fail an answer over it
            log.debug("%s %s failed: %s", method, name, why_failed(exc))

    # -- reactions -----------------------------------------------------------------------
    async def on_reaction_added(
        self, body: dict, event: dict, client: AsyncWebClient, context
    ) -> None:
        await self._reaction(body, event, client, context, True)

    async def on_reaction_removed(
        self, body: dict, event: dict, client: AsyncWebClient, context
    ) -> None:
        await self._reaction(body, event, client, context, False)

    async def _reaction(
        self, body: dict, event: dict, client: AsyncWebClient, context, added: bool
    ) -> None:
        item = event.get("item", {})
        if item.get("type") != "message":
            return
        await self.service.handle_reaction(
            Reaction(
                PLATFORM,
                channel_team(body, context, event),
                item["channel"],
                event.get("user", ""),
                item["ts"],
                event.get("reaction", ""),
                added,
                reactor_is_bot=await self.is_bot(client, event, context.bot_user_id),
            )
        )

    async def is_bot(self, client: AsyncWebClient, event: dict, own_user: str | None) -> bool:
        """Did a bot react? This bot itself; an event that names a bot (``bot_id``);
        else ``users.info``'s ``is_bot``, remembered per user (a user does not become a
        bot). When Slack cannot say, the reaction is treated as a bot's and not counted:
        a lost vote is cheaper than another app's votes steering a channel."""
        user = event.get("user") or ""
        if not user or user == own_user or event.get("bot_id") or event.get("bot_profile"):
            return True
        known = self._bots.get(user)
        if known is not None:
            self._bots.move_to_end(user)
            return known
        try:
            info = (await client.users_info(user=user))["user"]
        except SlackApiError as exc:
            log.warning(
                "users.info failed for %s (%s); its reaction is not counted", user, error_code(exc)
            )
            return True
        self._bots[user] = bot = bool(info.get("is_bot"))
        while len(self._bots) > KNOWN_USERS:
            self._bots.popitem(last=False)
        return bot


def build_app(
    service: ChatService,
    settings: Settings,
    client: AsyncWebClient | None = None,
    *,
    file_origins: tuple[str, ...] = SLACK_FILE_ORIGINS,
) -> AsyncApp:
    """A bolt `AsyncApp` with every listener registered. ``client`` lets tests point the
    Web API at a fake server (``AsyncWebClient(token=..., base_url=...)``), and
    ``file_origins`` its file downloads. `make_bot` keeps the `SlackBot` too, whose
    ``close`` releases the Redis connection of its event de-duplication."""
    return make_bot(service, settings, client, file_origins=file_origins).app


def retry_handlers() -> list[AsyncRetryHandler]:
    """slack-sdk's retry handlers for rate limits (429, sent again after
    ``Retry-After``) and for connections to Slack that drop or reset."""
    return [
        AsyncRateLimitErrorRetryHandler(max_retry_count=RATE_LIMIT_RETRIES),
        AsyncConnectionErrorRetryHandler(max_retry_count=CONNECTION_RETRIES),
    ]


def with_retries(client: AsyncWebClient) -> AsyncWebClient:
    """``client`` with each of `retry_handlers` whose kind it lacks (a handler the
    caller configured stays as it is). Bolt's per-request clients copy the app client's
    handlers, so every listener's ``client`` retries too."""
    handlers = list(client.retry_handlers or [])
    kinds = {type(h) for h in handlers}
    client.retry_handlers = handlers + [h for h in retry_handlers() if type(h) not in kinds]
    return client


def make_bot(
    service: ChatService,
    settings: Settings,
    client: AsyncWebClient | None = None,
    *,
    file_origins: tuple[str, ...] = SLACK_FILE_ORIGINS,
) -> SlackBot:
    """The `SlackBot` on a new bolt `AsyncApp` (its ``app``); see `build_app`."""
    if settings.slack_bot_token is None:
        raise SettingsError("SLACK_BOT_TOKEN is not set")
    token = settings.slack_bot_token.get_secret_value()
    secret = settings.slack_signing_secret
    app = AsyncApp(
        client=(
            with_retries(client)
            if client is not None
            else AsyncWebClient(token=token, retry_handlers=retry_handlers())
        ),
        token=None if client else token,
        signing_secret=secret.get_secret_value() if secret else None,
        # Socket Mode needs no signature; HTTP mode always has a secret (settings check)
        request_verification_enabled=secret is not None,
        process_before_response=False,
    )
    return SlackBot(app, service, settings, file_origins=file_origins)


async def run_slack(
    service: ChatService,
    settings: Settings,
    mode: str | None = None,
    *,
    health: Health | None = None,
    client: AsyncWebClient | None = None,
) -> None:
    """Serve Slack until cancelled: ``mode`` "socket" (needs SLACK_APP_TOKEN) or "http"
    (listens on SLACK_HTTP_HOST:SLACK_HTTP_PORT at /slack/events); default from settings.

    The connection shows in /healthz as ``platform_slack``: in Socket Mode, whether the
    websocket is connected right now; in HTTP mode Slack connects to us, so the check is
    the result of ``auth.test`` at start-up (a revoked or mistyped token fails it).
    ``client`` points the Web API elsewhere (tests use a fake Slack on loopback).
    """
    mode = mode or settings.slack_mode or "socket"
    bot = make_bot(service, settings, client=client)
    try:
        await _serve(bot.app, settings, mode, health)
    finally:
        await bot.close()


async def _serve(app: AsyncApp, settings: Settings, mode: str, health: Health | None) -> None:
    if mode == "socket":
        from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

        if settings.slack_app_token is None:
            raise SettingsError("Socket Mode needs SLACK_APP_TOKEN (xapp-…)")
        handler = AsyncSocketModeHandler(app, settings.slack_app_token.get_secret_value())

        async def socket_state() -> Check:
            ok = await handler.client.is_connected()
            return Check(ok, "Socket Mode connected" if ok else "Socket Mode not connected")

        if health is not None:
            health.add(*connection_check("slack", socket_state))
        await handler.connect_async()
        try:
            await asyncio.Event().wait()
        finally:
            await handler.close_async()
    elif mode == "http":
        from aiohttp import web

        auth = Check(False, "auth.test not done yet")
        if health is not None:
            health.add(*connection_check("slack", lambda: auth))
        auth = await _auth_test(app.client)
        log.info("Slack auth.test: %s", auth.detail)
        runner = web.AppRunner(app.web_app(path="/slack/events"))
        await runner.setup()
        site = web.TCPSite(runner, settings.slack_http_host, settings.slack_http_port)
        await site.start()
        log.info(
            "Slack HTTP endpoint on http://%s:%d/slack/events",
            settings.slack_http_host,
            settings.slack_http_port,
        )
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()
    else:
        raise SettingsError(f"unknown Slack mode {mode!r}: use socket or http")


async def _auth_test(client: AsyncWebClient) -> Check:
    """Does Slack accept the bot token? (HTTP mode's only outgoing connection check.)"""
    try:
        resp = await client.auth_test()
    except SlackApiError as exc:
        return Check(False, f"auth.test failed: {error_code(exc)}")
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return Check(False, f"auth.test failed: cannot reach Slack ({type(exc).__name__})")
    return Check(True, f"HTTP mode; auth.test ok as {resp.get('user')} in {resp.get('team_id')}")


__all__ = [
    "EventDeduper",
    "RedisEventDeduper",
    "SlackBot",
    "build_app",
    "channel_team",
    "event_deduper",
    "make_bot",
    "run_slack",
    "with_retries",
]
