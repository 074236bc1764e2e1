"""The ``/gesal`` slash command on Slack and its reset buttons: admin commands in,
the service's answers out to the admin who typed them.

Apart from the event listeners (mentions, corrections, votes) in `bot.slack_app`, whose
`SlackBot` registers these listeners on the same bolt app, because a command works
differently: it is answered through its ``response_url`` to one person rather than in
the channel, checks admin rights on every call, and may download a file with the bot
token.

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
"""

from __future__ import annotations

import json
import logging
import re
from urllib.parse import urljoin, urlsplit

import aiohttp
from slack_sdk.errors import SlackApiError, SlackRequestError
from slack_sdk.web.async_client import AsyncWebClient

from .messages import MAX_IMPORT_BYTES, AdminCommand, AdminResult
from .service import ChatService
from .settings import Settings
from .slack_web import (
    PLATFORM,
    SLACK_FILE_ORIGINS,
    WEB_ERRORS,
    channel_team,
    error_code,
    why_failed,
)

log = logging.getLogger(__name__)

_FILE_ID = re.compile(r"\bF[A-Z0-9]{6,}\b")
RESET_CONFIRM, RESET_CANCEL = "gesal_reset_confirm", "gesal_reset_cancel"
# The largest export downloaded: the service refuses bigger imports anyway, so a bigger
# file is never fetched (a full 64-node channel exports to about 20 MB).
MAX_DOWNLOAD_BYTES = MAX_IMPORT_BYTES
DOWNLOAD_TIMEOUT_S = 120.0
MAX_REDIRECTS = 3  # followed only while they stay on an allowed origin


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


HELP = (
    "Usage: `/gesal stats` · `/gesal config [threshold=0.8] [reward_up=1] [reward_down=-2]` · "
    "`/gesal export` · `/gesal import <file id>` (upload the export to this channel first) · "
    "`/gesal reset` (asks for confirmation) · `/gesal train`"
)


class SlackCommands:
    """The ``/gesal`` listeners (`on_command`, `on_reset_confirm`, `on_reset_cancel`)
    and what they share: the service, the admin allow-list in the settings, and the
    file hosts an import may download from."""

    def __init__(
        self,
        service: ChatService,
        settings: Settings,
        *,
        file_origins: tuple[str, ...] = SLACK_FILE_ORIGINS,
    ) -> None:
        self.service, self.settings = service, settings
        self.file_origins = file_origins

    async def is_admin(self, client: AsyncWebClient, user: str) -> bool:
        """Allow-list, else the workspace's own word: ``users.info`` admin/owner flags."""
        if self.settings.is_slack_admin(user):
            return True
        try:
            info = (await client.users_info(user=user))["user"]
        except SlackApiError as exc:
            log.warning("users.info failed for %s: %s", user, error_code(exc))
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
                reason = error_code(exc) if isinstance(exc, SlackApiError) else "the upload failed"
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
                f"reset answer not delivered: {failed}; chat.postEphemeral: {why_failed(exc)}",
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
            return f"I can't open that file ({error_code(exc)})."
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


__all__ = [
    "HELP",
    "RESET_CANCEL",
    "RESET_CONFIRM",
    "SlackCommands",
    "confirm_blocks",
    "file_url_allowed",
    "parse_command",
]
