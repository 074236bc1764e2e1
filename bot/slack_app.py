"""Slack adapter (slack-bolt 1.x, asyncio): translate Slack events to `ChatService` calls.

* ``app_mention`` → threaded answer. Bolt acks the event before the listener runs
  (``process_before_response=False``), so Slack gets its 200 within milliseconds and
  the model works afterwards. Slack has no typing indicator for bots in channels, so
  the question gets an :eyes: reaction while the bot thinks.
* ``reaction_added`` / ``reaction_removed`` → votes (the service decides what counts).
* Corrections: a thread reply starting with ``better:`` or ✏️ corrects the bot's latest
  answer above it in that thread. It arrives as ``app_mention`` when it mentions the
  bot, or as a ``message`` event when the app subscribes to ``message.channels``.
* ``/gesal stats|config|export|import|reset|train``. Admin status is checked on every
  call from ``users.info`` (``is_admin``/``is_owner``) or ``SLACK_ADMIN_USERS``.
  ``/gesal reset`` answers with Block Kit buttons (reset / cancel); pressing "reset"
  arrives as a signed ``block_actions`` request, and the bot checks again, on its own
  side, that the presser is the admin who asked and is still an admin, before anything
  is deleted.
* Both transports: Socket Mode (``SLACK_APP_TOKEN``) and HTTP (``SLACK_SIGNING_SECRET``;
  bolt verifies the signature and timestamp of every request, and `dedupe_retries`
  drops Slack's retries of an event already received, by ``event_id``).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import OrderedDict

import aiohttp
from slack_bolt.async_app import AsyncApp
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from .observability import Check, Health, connection_check, request_context
from .service import (
    AdminCommand,
    AdminResult,
    ChatService,
    ContextMessage,
    Correction,
    Mention,
    Reaction,
    strip_mentions,
)
from .settings import Settings, SettingsError
from .text import parse_correction

log = logging.getLogger(__name__)
PLATFORM = "slack"
CORRECTION_ACK = "white_check_mark"
THINKING = "eyes"
_FILE_ID = re.compile(r"\bF[A-Z0-9]{6,}\b")
RESET_CONFIRM, RESET_CANCEL = "gesal_reset_confirm", "gesal_reset_cancel"


def _err(exc: SlackApiError) -> str:
    """Slack's error code (``channel_not_found``…), or the HTTP status when there is none."""
    data = getattr(exc.response, "data", None)
    if isinstance(data, dict) and data.get("error"):
        return str(data["error"])
    return f"HTTP {getattr(exc.response, 'status_code', '?')}"


class EventDeduper:
    """Remembers recent ``event_id``s so a retried delivery is processed once."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._seen: OrderedDict[str, float] = OrderedDict()

    def seen(self, event_id: str) -> bool:
        """True if ``event_id`` was seen before; records it otherwise."""
        if event_id in self._seen:
            return True
        self._seen[event_id] = time.monotonic()
        while len(self._seen) > self.size:
            self._seen.popitem(last=False)
        return False


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


HELP = (
    "Usage: `/gesal stats` · `/gesal config [threshold=0.8] [reward_up=1] [reward_down=-2]` · "
    "`/gesal export` · `/gesal import <file id>` (upload the export to this channel first) · "
    "`/gesal reset` (asks for confirmation) · `/gesal train`"
)


class SlackBot:
    """Registers the listeners on an `AsyncApp` and holds what they share."""

    def __init__(self, app: AsyncApp, service: ChatService, settings: Settings) -> None:
        self.app, self.service, self.settings = app, service, settings
        self.deduper = EventDeduper()
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
        if event_id and self.deduper.seen(event_id):
            log.info("dropping a repeated delivery of event %s", event_id)
            return BoltResponse(status=200, body="")
        return await next()

    @staticmethod
    def _team(body: dict, event: dict | None = None) -> str:
        event = event or {}
        return event.get("team") or body.get("team_id") or body.get("team", {}).get("id") or "T"

    # -- mentions and corrections ---------------------------------------------------------
    async def on_mention(self, body: dict, event: dict, client: AsyncWebClient, context) -> None:
        if event.get("thread_ts") and parse_correction(strip_mentions(event.get("text", ""))):
            await self._correction(body, event, client, context)
            return
        with request_context():  # one id on every log line of this mention
            await self._answer_mention(body, event, client, context)

    async def _answer_mention(self, body: dict, event: dict, client: AsyncWebClient, context):
        channel, ts = event["channel"], event["ts"]
        thread = event.get("thread_ts") or ts
        ctx, more = await self._thread_context(client, channel, event, context.bot_user_id)
        mention = Mention(
            PLATFORM,
            self._team(body, event),
            channel,
            event.get("user", ""),
            strip_mentions(event.get("text", "")),
            ts,
            thread=thread,
            context=ctx,
            context_truncated=more,
        )
        await self._react(client, "reactions_add", channel, ts, THINKING)
        try:
            parts = await self.service.handle_mention(mention)
        finally:
            await self._react(client, "reactions_remove", channel, ts, THINKING)
        ids = []
        for chunk in parts.chunks:
            try:
                resp = await client.chat_postMessage(channel=channel, thread_ts=thread, text=chunk)
            except SlackApiError as exc:
                log.warning("could not post in %s: %s", channel, _err(exc))
                break
            ids.append(resp["ts"])
        await self.service.link_reply(parts, ids)
        log.info(
            "posted %d of %d message(s) in %s (event %s)",
            len(ids),
            len(parts.chunks),
            channel,
            body.get("event_id", "-"),
        )

    async def _thread_context(
        self, client: AsyncWebClient, channel: str, event: dict, bot_user: str | None
    ) -> tuple[list[ContextMessage], bool]:
        thread = event.get("thread_ts")
        limit = self.settings.gesal_context_messages
        if not thread or not limit:
            return [], False
        try:
            resp = await client.conversations_replies(channel=channel, ts=thread, limit=200)
        except SlackApiError as exc:  # missing history scope: answer without context
            log.warning("cannot read thread %s: %s", thread, _err(exc))
            return [], False
        earlier = [m for m in resp.get("messages", []) if float(m["ts"]) < float(event["ts"])]
        more = len(earlier) > limit or bool(resp.get("has_more"))
        return [
            ContextMessage(
                m.get("user") or m.get("bot_id", "bot"),
                strip_mentions(m.get("text", "")),
                is_bot=bool(m.get("bot_id")) or m.get("user") == bot_user,
            )
            for m in earlier[-limit:]
        ], more

    async def on_message(self, body: dict, event: dict, client: AsyncWebClient, context) -> None:
        """Plain thread messages: only corrections matter (mentions come as app_mention)."""
        if event.get("subtype") or event.get("bot_id") or not event.get("thread_ts"):
            return
        text = event.get("text", "")
        if context.bot_user_id and f"<@{context.bot_user_id}>" in text:
            return  # handled by on_mention
        if parse_correction(text) is not None:
            await self._correction(body, event, client, context)

    async def _correction(self, body: dict, event: dict, client: AsyncWebClient, context) -> None:
        channel, ts = event["channel"], event["ts"]
        try:
            resp = await client.conversations_replies(
                channel=channel, ts=event["thread_ts"], limit=200
            )
        except SlackApiError as exc:
            log.warning("cannot read thread for a correction: %s", _err(exc))
            return
        mine = [
            m
            for m in resp.get("messages", [])
            if float(m["ts"]) < float(ts)
            and (m.get("user") == context.bot_user_id or m.get("bot_id") == context.bot_id)
        ]
        if not mine:
            return
        result = await self.service.handle_correction(
            Correction(
                PLATFORM,
                self._team(body, event),
                channel,
                event.get("user", ""),
                ts,
                mine[-1]["ts"],
                strip_mentions(event.get("text", "")),
            )
        )
        if result.status == "corrected":
            await self._react(client, "reactions_add", channel, ts, CORRECTION_ACK)
        elif result.status == "error":
            await client.chat_postMessage(
                channel=channel, thread_ts=event["thread_ts"], text=result.message
            )

    @staticmethod
    async def _react(client: AsyncWebClient, method: str, channel: str, ts: str, name: str):
        try:
            await getattr(client, method)(channel=channel, timestamp=ts, name=name)
        except SlackApiError as exc:  # cosmetic: never fail an answer over it
            log.debug("%s %s failed: %s", method, name, _err(exc))

    # -- reactions -----------------------------------------------------------------------
    async def on_reaction_added(self, body: dict, event: dict, context) -> None:
        await self._reaction(body, event, context, True)

    async def on_reaction_removed(self, body: dict, event: dict, context) -> None:
        await self._reaction(body, event, context, False)

    async def _reaction(self, body: dict, event: dict, context, added: bool) -> None:
        item = event.get("item", {})
        if item.get("type") != "message":
            return
        await self.service.handle_reaction(
            Reaction(
                PLATFORM,
                self._team(body),
                item["channel"],
                event.get("user", ""),
                item["ts"],
                event.get("reaction", ""),
                added,
                reactor_is_bot=event.get("user") == context.bot_user_id,
            )
        )

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

    async def on_command(self, ack, command: dict, client: AsyncWebClient) -> None:
        await ack()  # within 3 s; the work and its answer follow as an ephemeral message
        name, args, rest = parse_command(command.get("text", ""))
        channel, user = command["channel_id"], command["user_id"]
        if name == "help":
            await self._tell(client, channel, user, HELP)
            return
        file = None
        if name == "import":
            file = await self._download_export(client, rest)
            if isinstance(file, str):  # an explanation, not bytes
                await self._tell(client, channel, user, file)
                return
        result = await self.service.handle_admin(
            AdminCommand(
                PLATFORM,
                command.get("team_id") or "T",
                channel,
                user,
                name,
                is_admin=await self.is_admin(client, user),
                args=args,
                file=file,
            )
        )
        await self._render(client, channel, user, result)

    async def _render(self, client, channel: str, user: str, result: AdminResult) -> None:
        text = result.text
        if result.needs_confirmation:
            await self._tell(client, channel, user, text, confirm_blocks(text, channel, user))
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
            except SlackApiError as exc:
                text = f"I could not upload the files ({_err(exc)})."
        await self._tell(client, channel, user, text)

    @staticmethod
    async def _tell(
        client: AsyncWebClient, channel: str, user: str, text: str, blocks: list | None = None
    ) -> None:
        try:
            await client.chat_postEphemeral(channel=channel, user=user, text=text, blocks=blocks)
        except SlackApiError as exc:
            log.warning("could not answer /gesal: %s", _err(exc))

    # -- the reset buttons -----------------------------------------------------------------
    async def on_reset_confirm(self, ack, body: dict, action: dict, respond, client) -> None:
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
        team = body.get("team", {}).get("id") or body.get("user", {}).get("team_id") or "T"
        result = await self.service.handle_admin(
            AdminCommand(
                PLATFORM,
                team,
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
        """Replace the ephemeral prompt (so its buttons cannot be pressed twice)."""
        try:
            await respond(text=text, replace_original=True)
        except Exception as exc:  # noqa: BLE001 - no response_url, or it expired
            log.info("response_url failed (%s); answering with a new message", exc)
            await self._tell(client, channel, user, text)

    async def _download_export(self, client: AsyncWebClient, rest: list[str]) -> bytes | str:
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
        url = info.get("url_private_download") or info.get("url_private")
        headers = {"Authorization": f"Bearer {client.token}"}
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.get(url, headers=headers) as resp,
            ):
                if resp.status != 200:
                    return f"Downloading the file failed (HTTP {resp.status})."
                return await resp.read()
        except aiohttp.ClientError as exc:
            return f"Downloading the file failed ({type(exc).__name__})."


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
    service: ChatService, settings: Settings, client: AsyncWebClient | None = None
) -> AsyncApp:
    """A bolt `AsyncApp` with every listener registered. ``client`` lets tests point the
    Web API at a fake server (``AsyncWebClient(token=..., base_url=...)``)."""
    if settings.slack_bot_token is None:
        raise SettingsError("SLACK_BOT_TOKEN is not set")
    token = settings.slack_bot_token.get_secret_value()
    secret = settings.slack_signing_secret
    app = AsyncApp(
        client=client or AsyncWebClient(token=token),
        token=None if client else token,
        signing_secret=secret.get_secret_value() if secret else None,
        # Socket Mode needs no signature; HTTP mode always has a secret (settings check)
        request_verification_enabled=secret is not None,
        process_before_response=False,
    )
    SlackBot(app, service, settings)
    return app


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
    import asyncio

    mode = mode or settings.slack_mode or "socket"
    app = build_app(service, settings, client=client)
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


__all__ = ["EventDeduper", "SlackBot", "build_app", "parse_command", "run_slack"]
