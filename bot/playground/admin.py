"""The playground's admin actions on a channel: train, stats, config, reset, export and
import, each sent to `bot.service.ChatService` as an admin command of the operator.

The page is served to whoever started it, so these run with admin rights; a reset in
particular takes two requests: its preview hands out a one-time confirmation, and only
that value sent back empties the channel, so no single request can.
"""

from __future__ import annotations

import hmac
import math
import secrets
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..messages import AdminCommand, AdminResult
from .channels import PLATFORM, WORKSPACE, Channel
from .jsonapi import BadRequest, json_body

if TYPE_CHECKING:
    from .server import Playground

RESET_CONFIRM_SECONDS = 300.0  # how long a reset preview's confirmation stays valid


class PlaygroundAdmin:
    """The admin endpoints of ``playground``, whose channels and service they act on."""

    def __init__(self, playground: Playground) -> None:
        self.playground = playground
        # channel -> (confirmation, expiry): handed out with a reset's preview, needed
        # (once) to reset, so no single request can empty a channel
        self._reset_confirms: dict[str, tuple[str, float]] = {}

    async def _run(self, ch: Channel, name: str, **kw: Any) -> AdminResult:
        command = AdminCommand(PLATFORM, WORKSPACE, ch.name, "operator", name, is_admin=True, **kw)
        result = await self.playground.ready_service().handle_admin(command)
        if not result.ok:
            raise BadRequest(result.text)
        return result

    async def _reply(self, request: web.Request, name: str, **kw: Any) -> web.Response:
        result = await self._run(self.playground.channel_of(request), name, **kw)
        return web.json_response({"text": result.text, "data": result.data})

    async def train(self, request: web.Request) -> web.Response:
        return await self._reply(request, "train")

    async def stats(self, request: web.Request) -> web.Response:
        return await self._reply(request, "stats")

    async def config(self, request: web.Request) -> web.Response:
        ch = self.playground.channel_of(request)
        body = await json_body(request)
        args = {k: _config_value(k, v) for k, v in body.items() if v is not None}
        result = await self._run(ch, "config", args=args)
        return web.json_response({"text": result.text, "data": result.data})

    async def reset(self, request: web.Request) -> web.Response:
        """Without ``confirm``: the preview (what would be lost) and a one-time
        ``confirm`` value; with that value, within RESET_CONFIRM_SECONDS: the reset."""
        ch = self.playground.channel_of(request)
        body = await json_body(request)
        given = body.get("confirm")
        if given is None:
            return await self._reset_preview(ch, body)
        self._use_confirmation(ch, given)
        result = await self._run(ch, "reset", confirmed=True)
        ch.messages.clear()  # the replies they showed no longer exist
        return web.json_response({"text": result.text, "needs_confirmation": False})

    async def _reset_preview(self, ch: Channel, body: dict) -> web.Response:
        if body.get("confirmed"):
            raise BadRequest(
                "a reset needs the confirm value of its preview: ask for the reset "
                "without it first, then send that value back as confirm"
            )
        result = await self._run(ch, "reset", confirmed=False)
        confirm = secrets.token_urlsafe(16)
        self._reset_confirms[ch.name] = (confirm, time.monotonic() + RESET_CONFIRM_SECONDS)
        return web.json_response(
            {"text": result.text, "needs_confirmation": True, "confirm": confirm}
        )

    def _use_confirmation(self, ch: Channel, given: Any) -> None:
        """Spend ``ch``'s current confirmation if ``given`` is it, else refuse."""
        expected, expires = self._reset_confirms.get(ch.name, ("", 0.0))
        if (
            not isinstance(given, str)
            or not expected
            or time.monotonic() > expires
            or not hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode())
        ):
            raise BadRequest(
                f"that confirmation does not match a current reset preview of #{ch.name} "
                f"(each is valid once, for {RESET_CONFIRM_SECONDS / 60:g} minutes): "
                "ask for the reset again"
            )
        del self._reset_confirms[ch.name]

    async def export(self, request: web.Request) -> web.Response:
        ch = self.playground.channel_of(request)
        result = await self._run(ch, "export")
        kind = request.query.get("format", "json")
        att = result.file(".png" if kind == "png" else ".json")
        if att is None:
            raise BadRequest(f"no {kind} in the export")
        return web.Response(
            body=att.data,
            content_type=att.mime,
            headers={"Content-Disposition": f'attachment; filename="{att.name}"'},
        )

    async def import_(self, request: web.Request) -> web.Response:
        """The body is the export file itself (the page sends it as application/json)."""
        ch = self.playground.channel_of(request)
        data = await request.read()
        result = await self._run(ch, "import", file=data or None)
        return web.json_response({"text": result.text, "data": result.data})


def _config_value(name: str, value: Any) -> str:
    """A setting's value as the service parses it; non-numbers and non-finite numbers
    are refused here, before anything is stored."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise BadRequest(f"{name} must be a number")
    try:
        number = float(value)
    except ValueError:
        return str(value)  # the service says it must be a number
    if not math.isfinite(number):
        raise BadRequest(f"{name} must be a finite number, not {value}")
    return str(value)


__all__ = ["RESET_CONFIRM_SECONDS", "PlaygroundAdmin"]
