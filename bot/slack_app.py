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
* ``/gesal stats|config|export|import|reset|train``. Admin status is checked on every
  call from ``users.info`` (``is_admin``/``is_owner``) or ``SLACK_ADMIN_USERS``. The
  answer goes to the command's ``response_url`` (ephemeral, to the user who typed it),
  so it arrives also in conversations the bot is not a member of.
  ``/gesal reset`` answers with Block Kit buttons (reset / cancel); pressing "reset"
  arrives as a signed ``block_actions`` request, and the bot checks again, on its own
  side, that the presser is the admin who asked and is still an admin, before anything
  is deleted.
* ``/gesal import <file id>`` checks admin rights first and downloads nothing for anyone
  else. The download goes only to Slack's file host (`SLACK_FILE_ORIGINS`: the bot token
  travels with it, so a ``files.info`` answer pointing elsewhere is refused), and stops
  at `MAX_DOWNLOAD_BYTES` (``files.info``'s ``size`` first, then while reading).
* Both transports: Socket Mode (``SLACK_APP_TOKEN``) and HTTP (``SLACK_SIGNING_SECRET``;
  bolt verifies the signature and timestamp of every request, and `dedupe_retries`
  drops Slack's retries of an event already received, by ``event_id``: through Redis
  when the store is Redis, so a retry that reaches another replica is dropped too).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from urllib.parse import urljoin, urlsplit

import aiohttp
from slack_bolt.async_app import AsyncApp
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError, SlackRequestError
from slack_sdk.http_retry.async_handler import AsyncRetryHandler
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from .health import Check, Health, connection_check
from .messages import (
    MAX_IMPORT_BYTES,
    AdminCommand,
    AdminResult,
    ContextMessage,
    Correction,
    Mention,
    PostError,
    Reaction,
    strip_mentions,
)
from .service import ChatService
from .settings import Settings, SettingsError
from .slack_threads import ThreadReader
from .text import parse_correction

log = logging.getLogger(__name__)
PLATFORM = "slack"
CORRECTION_ACK = "white_check_mark"
THINKING = "eyes"
UNDELIVERED = "warning"  # on a question whose answer Slack refused to post
# Message subtypes that can carry a correction: a thread reply posted with "also send
# to channel". Plain replies have no subtype.
CORRECTION_SUBTYPES = frozenset({"thread_broadcast"})
_FILE_ID = re.compile(r"\bF[A-Z0-9]{6,}\b")
RESET_CONFIRM, RESET_CANCEL = "gesal_reset_confirm", "gesal_reset_cancel"

# Where an export may be downloaded from, as scheme://host[:port]. The request carries
# the bot token, so only Slack's own file host gets it; `build_app(file_origins=...)`
# replaces the list (tests serve files on loopback).
SLACK_FILE_ORIGINS = ("https://files.slack.com",)
# The largest export downloaded: the service refuses bigger imports anyway, so a bigger
# file is never fetched (a full 64-node channel exports to about 20 MB).
MAX_DOWNLOAD_BYTES = MAX_IMPORT_BYTES
DOWNLOAD_TIMEOUT_S = 120.0
MAX_REDIRECTS = 3  # followed only while they stay on an allowed origin
# Slack retries an unacknowledged event after about 1 s, 1 min and 5 min: an hour covers it.
DEDUPE_TTL_S = 3600
DEDUPE_PREFIX = "gesal:slack:event:"
KNOWN_USERS = 10_000  # users whose bot flag is remembered (least recently seen go first)
# A Web API call answered 429 (``ratelimited``) is sent again after its ``Retry-After``,
# at most this many times, so one rate-limited ``chat.postMessage`` does not lose an
# answer and a throttled workspace does not hold a listener for long.
RATE_LIMIT_RETRIES = 2
CONNECTION_RETRIES = 2  # a reset or dropped connection to Slack is retried this often


def _err(exc: SlackApiError) -> str:
    """Slack's error code (``channel_not_found``…), or the HTTP status when there is none."""
    data = getattr(exc.response, "data", None)
    if isinstance(data, dict) and data.get("error"):
        return str(data["error"])
    return f"HTTP {getattr(exc.response, 'status_code', '?')}"


# What a Web API call raises once the client's retries are spent: Slack refused
# (SlackApiError), an upload failed (SlackRequestError), or the network did.
WEB_ERRORS = (SlackApiError, SlackRequestError, aiohttp.ClientError, TimeoutError)


def _why(exc: BaseException) -> str:
    """A Web API call's failure in a few words: Slack's error code, or the kind of
    network failure (the client has already retried rate limits and dropped
    connections)."""
    if isinstance(exc, SlackApiError):
        return _err(exc)
    return type(exc).__name__


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


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL without user info; None for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a port that is not a number
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in ("http", "https") or not host or "@" in parts.netloc:
        return None
    return scheme, host, port or (443 if scheme == "https" else 80)


def file_url_allowed(url: str, origins: tuple[str, ...] = SLACK_FILE_ORIGINS) -> bool:
    """Is ``url`` on one of ``origins`` (same scheme, host and port)?"""
    where = _origin(url)
    return where is not None and any(where == _origin(o) for o in origins)


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.3g} MB"


def parse_command(text: str) -> tuple[str, dict[str, str], list[str]]:
    """``"config threshold=0.8 reward_up=1"`` → ("config", {...}, []); bare words go to
    the list (``reset confirm``, ``import F0123``)."""
    words = (text or "").split()
    if not words:
        return "help", {}, []
    args: dict[str, str] = {}
    rest: list[str] = []
    for w in words[1:]:
        if "=" in w:
            k, _, v = w.partition("=")
            args[k.strip().lower()] = v.strip()
        else:
            rest.append(w)
    return words[0].lower(), args, rest


def channel_team(body: dict, context=None, event: dict | None = None) -> str:
    """The team a channel's key (``slack:<team>:<channel>``) is stored under, for every
    kind of request: the workspace that installed the bot, so one channel has one key
    whoever acts in it.

    In a shared (Slack Connect) channel ``event.team``/``user_team`` name the actor's
    team and the body's ``team_id`` the team the event came from, both of which differ
    from member to member. Bolt's ``context.team_id`` is the installing workspace
    (``authorizations[0].team_id`` for events, the request's team for commands and
    buttons); the body's ``team_id``, then ``team.id`` (``null`` in org-wide installs),
    then ``event.team`` stand in only when it is missing."""
    team = context.get("team_id") if context is not None else None
    if team:
        return str(team)
    body_team = body.get("team")
    event = event or {}
    return str(
        body.get("team_id")
        or (body_team.get("id") if isinstance(body_team, dict) else body_team)
        or event.get("team")
        or "T"
    )


HELP = (
    "Usage: `/gesal stats` · `/gesal config [threshold=0.8] [reward_up=1] [reward_down=-2]` · "
    "`/gesal export` · `/gesal import <file id>` (upload the export to this channel first) · "
    "`/gesal reset` (asks for confirmation) · `/gesal train`"
)


class SlackBot:
    """Registers the listeners on an `AsyncApp` and holds what they share."""

    def __init__(
        self,
        app: AsyncApp,
        service: ChatService,
        settings: Settings,
        *,
        file_origins: tuple[str, ...] = SLACK_FILE_ORIGINS,
    ) -> None:
        self.app, self.service, self.settings = app, service, settings
        self.file_origins = file_origins
        self.threads = ThreadReader()
        self.deduper = event_deduper(service.engine.shared_url)
        self._bots: OrderedDict[str, bool] = OrderedDict()  # user id -> users.info is_bot
        app.middleware(self.dedupe_retries)
        app.event("app_mention")(self.on_mention)
        app.event("message")(self.on_message)
        app.event("reaction_added")(self.on_reaction_added)
        app.event("reaction_removed")(self.on_reaction_removed)
        app.command("/gesal")(self.on_command)
        app.action(RESET_CONFIRM)(self.on_reset_confirm)
        app.action(RESET_CANCEL)(self.on_reset_cancel)

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
                raise PostError(_why(exc)) from exc
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
            log.warning("cannot read thread %s: %s", thread, _why(exc))
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
            log.warning("cannot read thread for a correction: %s", _why(exc))
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
                log.warning("could not say why a correction failed: %s", _why(exc))

    @staticmethod
    async def _react(client: AsyncWebClient, method: str, channel: str, ts: str, name: str):
        try:
            await getattr(client, method)(channel=channel, timestamp=ts, name=name)
        except WEB_ERRORS as exc:  # cosmetic: never fail an answer over it
            log.debug("%s %s failed: %s", method, name, _why(exc))

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
                "users.info failed for %s (%s); its reaction is not counted", user, _err(exc)
            )
            return True
        self._bots[user] = bot = bool(info.get("is_bot"))
        while len(self._bots) > KNOWN_USERS:
            self._bots.popitem(last=False)
        return bot

    # -- /gesal ----------------------------------------------------------------------------
    async def is_admin(self, client: AsyncWebClient, user: str) -> bool:
        """Allow-list, else the workspace's own word: ``users.info`` admin/owner flags."""
        if self.settings.is_slack_admin(user):
            return True
        try:
            info = (await client.users_info(user=user))["user"]
        except SlackApiError as exc:
            log.warning("users.info failed for %s: %s", user, _err(exc))
            return False
        return bool(info.get("is_admin") or info.get("is_owner") or info.get("is_primary_owner"))

    async def on_command(
        self, ack, command: dict, client: AsyncWebClient, context, respond
    ) -> None:
        await ack()  # within 3 s; the work and its answer follow through response_url
        name, args, rest = parse_command(command.get("text", ""))
        channel, user = command["channel_id"], command["user_id"]
        if name == "help":
            await self._reply(respond, HELP)
            return
        admin = await self.is_admin(client, user)
        file = None
        if name == "import" and admin:  # a non-admin's file is never fetched
            file = await self._download_export(client, rest)
            if isinstance(file, str):  # an explanation, not bytes
                await self._reply(respond, file)
                return
        result = await self.service.handle_admin(
            AdminCommand(
                PLATFORM,
                channel_team(command, context),
                channel,
                user,
                name,
                is_admin=admin,
                args=args,
                file=file,
            )
        )
        await self._render(client, respond, channel, user, result)

    async def _render(self, client, respond, channel: str, user: str, result: AdminResult) -> None:
        text = result.text
        if result.needs_confirmation:
            await self._reply(respond, text, confirm_blocks(text, channel, user))
            return
        if result.files:
            try:
                await client.files_upload_v2(
                    channel=channel,
                    initial_comment=text,
                    file_uploads=[
                        {"file": f.data, "filename": f.name, "title": f.name} for f in result.files
                    ],
                )
                return
            except (SlackApiError, SlackRequestError) as exc:
                # SlackApiError: an API step refused (files.getUploadURLExternal,
                # files.completeUploadExternal); SlackRequestError: the upload of the
                # bytes themselves failed, whose message carries the status and body
                reason = _err(exc) if isinstance(exc, SlackApiError) else "the upload failed"
                log.warning("could not upload the export to %s: %s", channel, exc)
                text = f"I could not upload the export files ({reason})."
        await self._reply(respond, text)

    async def _reply(self, respond, text: str, blocks: list | None = None) -> None:
        """Answer a slash command through its ``response_url``: ephemeral, seen only by
        the user who typed it, and delivered in any conversation the command can be
        typed in, also those the bot is not a member of (where ``chat.postEphemeral``
        answers ``channel_not_found``)."""
        failed = await self._respond(respond, text=text, blocks=blocks, response_type="ephemeral")
        if failed:
            self.service.undelivered(PLATFORM, "command", f"/gesal answer not delivered: {failed}")

    @staticmethod
    async def _respond(respond, **message) -> str | None:
        """Send through ``response_url``; None when Slack took it, else why not (the
        URL is missing or expired after 30 minutes, or Slack cannot be reached)."""
        try:
            resp = await respond(**message)
        except Exception as exc:  # noqa: BLE001 - no response_url, network, timeout
            return f"{type(exc).__name__}: {exc}"
        if resp.status_code != 200:
            return f"response_url answered HTTP {resp.status_code} {(resp.body or '')[:200]}"
        return None

    # -- the reset buttons -----------------------------------------------------------------
    async def on_reset_confirm(
        self, ack, body: dict, action: dict, respond, client, context
    ) -> None:
        """The "reset" button. The request is signed by Slack, but whoever presses it is
        checked here again: the admin who asked, and still an admin (``users.info``)."""
        await ack()
        user = body.get("user", {}).get("id", "")
        try:
            asked = json.loads(action.get("value") or "{}")
        except json.JSONDecodeError:
            asked = {}
        channel = asked.get("channel") or body.get("channel", {}).get("id", "")
        if not channel or user != asked.get("user"):
            await self._answer(
                respond, client, channel, user, "Only the admin who asked can confirm this."
            )
            return
        result = await self.service.handle_admin(
            AdminCommand(
                PLATFORM,
                channel_team(body, context),
                channel,
                user,
                "reset",
                is_admin=await self.is_admin(client, user),
                confirmed=True,
            )
        )
        await self._answer(respond, client, channel, user, result.text)

    async def on_reset_cancel(self, ack, body: dict, respond, client) -> None:
        await ack()
        channel = body.get("channel", {}).get("id", "")
        await self._answer(
            respond, client, channel, body.get("user", {}).get("id", ""), "Nothing was reset."
        )

    async def _answer(self, respond, client, channel: str, user: str, text: str) -> None:
        """Replace the ephemeral prompt (so its buttons cannot be pressed twice); a new
        ephemeral message when there is no ``response_url`` or it cannot be reached
        (``chat.postEphemeral``, which works where the bot is a member)."""
        failed = await self._respond(respond, text=text, replace_original=True)
        if failed is None:
            return
        log.info("response_url failed (%s); answering with a new message", failed)
        try:
            await client.chat_postEphemeral(channel=channel, user=user, text=text)
        except WEB_ERRORS as exc:
            self.service.undelivered(
                PLATFORM,
                "command",
                f"reset answer not delivered: {failed}; chat.postEphemeral: {_why(exc)}",
            )

    async def _download_export(self, client: AsyncWebClient, rest: list[str]) -> bytes | str:
        """The export's bytes, or one sentence saying why not (the caller checked that
        the asker is an admin)."""
        file_id = next((w for w in rest if _FILE_ID.fullmatch(w)), None)
        if file_id is None:
            return (
                "Upload the JSON export to this channel, then run `/gesal import <file id>` "
                "(the file id starts with F; find it in the file's link)."
            )
        try:
            info = (await client.files_info(file=file_id))["file"]
        except SlackApiError as exc:
            return f"I can't open that file ({_err(exc)})."
        cap = MAX_DOWNLOAD_BYTES
        too_large = f"That file is too large to be an export (over {_megabytes(cap)})."
        size = info.get("size")
        if isinstance(size, int) and size > cap:
            return too_large
        url = info.get("url_private_download") or info.get("url_private") or ""
        headers = {"Authorization": f"Bearer {client.token}"}
        timeout = aiohttp.ClientTimeout(total=DOWNLOAD_TIMEOUT_S)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http:
                for _ in range(MAX_REDIRECTS + 1):
                    if not file_url_allowed(url, self.file_origins):
                        log.warning(
                            "refused to download file %s from %s: not a Slack file host",
                            file_id,
                            urlsplit(url).netloc or url[:80],
                        )
                        return "That file is not on Slack's file host, so I did not fetch it."
                    # redirects are followed here, one by one, so that the token only
                    # ever goes to an allowed origin
                    async with http.get(url, headers=headers, allow_redirects=False) as resp:
                        if resp.status in (301, 302, 303, 307, 308):
                            url = urljoin(url, resp.headers.get("Location", ""))
                            continue
                        if resp.status != 200:
                            return f"Downloading the file failed (HTTP {resp.status})."
                        if (resp.content_length or 0) > cap:
                            return too_large
                        data = bytearray()
                        async for chunk in resp.content.iter_chunked(64 * 1024):
                            data += chunk
                            if len(data) > cap:
                                return too_large
                        return bytes(data)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"Downloading the file failed ({type(exc).__name__})."
        return "Downloading the file failed (too many redirects)."


def confirm_blocks(text: str, channel: str, user: str) -> list[dict]:
    """Block Kit for a reset prompt: the warning and two buttons. The button's value
    names the channel and the admin who asked; the click handler checks both."""
    value = json.dumps({"channel": channel, "user": user})
    return [
        {"type": "section", "text": {"type": "mrkdwn", "text": text}},
        {
            "type": "actions",
            "block_id": "gesal_reset",
            "elements": [
                {
                    "type": "button",
                    "action_id": RESET_CONFIRM,
                    "text": {"type": "plain_text", "text": "Reset this channel"},
                    "style": "danger",
                    "value": value,
                },
                {
                    "type": "button",
                    "action_id": RESET_CANCEL,
                    "text": {"type": "plain_text", "text": "Cancel"},
                    "value": value,
                },
            ],
        },
    ]


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
        return Check(False, f"auth.test failed: {_err(exc)}")
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
    "file_url_allowed",
    "make_bot",
    "parse_command",
    "run_slack",
    "with_retries",
]
