"""The local web playground: a third adapter next to Discord and Slack.

The playground plays the *platform*: it keeps each channel's message log, message ids,
members and their reactions, exactly the things Discord or Slack would keep. Every
behaviour of the bot (answering, which reactions count, corrections, admin commands)
goes through `bot.service.ChatService`, the same code the other adapters use, so what a
newcomer sees here is what a Discord channel gets.

Admin rights: the page is served on loopback to the person who started it, so its admin
actions (`admin.PlaygroundAdmin`) run as an admin. That is why `guard.Guard` lets only
the served page use the API (Host, Origin, JSON and a per-process token), why a reset
needs the confirmation the server handed out with its preview, and why binding to
another address needs GESAL_PLAYGROUND_PUBLIC and prints a warning.

This module holds the chat side (channels, messages, votes, corrections, status and the
graph) and `create_app`, which routes the page and the whole API.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np
from aiohttp import web

from ..boot import BootProgress
from ..health import Health, add_routes
from ..messages import Correction, Delivery, Mention, Reaction
from ..metrics import Metrics
from ..service import ChatService
from .admin import PlaygroundAdmin
from .channels import PLATFORM, WORKSPACE, Channel, Message
from .guard import TOKEN_HEADER, Guard, security_headers
from .jsonapi import BadRequest, json_body, json_str

if TYPE_CHECKING:
    from gesal_core.engine import Engine


BOT_NAME = "gesal"
DEFAULT_MEMBERS = ("ada", "ben", "chloé", "dev")
DEFAULT_CHANNEL = "general"
EMOJI = {"up": "👍", "down": "👎"}
_CHANNEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
_MENTION = re.compile(rf"(^|\s)@{BOT_NAME}\b", re.IGNORECASE)
MAX_TEXT = 4000
TOKEN_PLACEHOLDER = "{{GESAL_TOKEN}}"  # in static/index.html, replaced when served


def mentions_bot(text: str) -> bool:
    return bool(_MENTION.search(text))


def strip_bot_mention(text: str) -> str:
    return _MENTION.sub(" ", text).strip()


class Playground:
    """State of the simulated platform plus the service it forwards everything to.

    ``service`` is None while the engine is still loading (`attach` sets it); the API
    answers 503 with the boot progress until then.
    """

    def __init__(
        self,
        progress: BootProgress | None = None,
        members: tuple[str, ...] = DEFAULT_MEMBERS,
        metrics: Metrics | None = None,
        health: Health | None = None,
    ) -> None:
        self.progress = progress or BootProgress()
        self.members = list(members)
        self.metrics = metrics or Metrics()
        self.health = health or Health()
        self.service: ChatService | None = None
        self.scheduler: Any = None
        self.info: dict[str, Any] = {}
        self.channels: dict[str, Channel] = {}
        self._ids = itertools.count(1)
        self.admin = PlaygroundAdmin(self)

    # -- lifecycle ---------------------------------------------------------------------
    async def attach(self, service: ChatService, scheduler: Any = None, **info: Any) -> None:
        """The engine is ready: start answering. Existing playground channels reappear."""
        self.service, self.scheduler = service, scheduler
        self.info.update(info)
        prefix = f"{PLATFORM}:{WORKSPACE}:"
        for key in await service.engine.channels():
            if key.startswith(prefix):
                self.channels.setdefault(key[len(prefix) :], Channel(key[len(prefix) :]))
        self.channels.setdefault(DEFAULT_CHANNEL, Channel(DEFAULT_CHANNEL))
        self.progress.ready = True

    def ready_service(self) -> ChatService:
        """The service, or a 503 with the boot error (or "still starting") before it."""
        if self.service is None:
            raise web.HTTPServiceUnavailable(
                text=json_str(self.progress.error or "still starting"),
                content_type="application/json",
            )
        return self.service

    def channel_of(self, request: web.Request) -> Channel:
        """The channel the request's path names, or a 404 (a 503 before the service)."""
        self.ready_service()
        name = request.match_info["channel"]
        ch = self.channels.get(name)
        if ch is None:
            raise web.HTTPNotFound(
                text=json_str(f"no channel named {name}"), content_type="application/json"
            )
        return ch

    def _bot_reply(self, request: web.Request, what: str) -> tuple[Channel, Message]:
        """The channel and the bot reply a vote or correction is about, or a plain 400."""
        ch = self.channel_of(request)
        msg = ch.find(request.match_info["message"])
        if msg is None or not msg.is_bot:
            raise BadRequest(f"{what} go on the bot's replies")
        return ch, msg

    def _member(self, body: dict) -> str:
        member = str(body.get("member", "")).strip()
        if member not in self.members:
            raise BadRequest(f"unknown member {member!r}; pick one of {', '.join(self.members)}")
        return member

    def _next_id(self) -> str:
        return f"m{next(self._ids)}"

    @staticmethod
    def key(channel: str) -> str:
        return f"{PLATFORM}:{WORKSPACE}:{channel}"

    # -- status --------------------------------------------------------------------------
    async def status(self, _request: web.Request) -> web.Response:
        body: dict[str, Any] = {"boot": self.progress.as_dict(), "members": self.members}
        body.update(self.info)
        if self.service is not None:
            engine = self.service.engine
            body["schedule"] = await self._schedule(engine)
        return web.json_response(body)

    async def _schedule(self, engine: Engine) -> dict:
        settings = self.service.settings if self.service else None
        pending = 0
        for name in self.channels:
            pending += await engine.pending(self.key(name))
        out: dict[str, Any] = {
            "pending": pending,
            "last_train": engine.last_train,
            "interval": settings.gesal_train_interval if settings else None,
            "round": settings.gesal_train_round if settings else None,
            "next_run": None,
            "running": self.scheduler is not None,
        }
        if self.scheduler is not None:
            from ..runtime import schedule_status

            out.update(schedule_status(self.scheduler))
        return out

    # -- channels ---------------------------------------------------------------------------
    async def list_channels(self, _request: web.Request) -> web.Response:
        self.ready_service()
        return web.json_response({"channels": sorted(self.channels)})

    async def create_channel(self, request: web.Request) -> web.Response:
        self.ready_service()
        body = await json_body(request)
        name = str(body.get("name", "")).strip().lower().lstrip("#")
        if not _CHANNEL_NAME.match(name):
            raise BadRequest(
                "channel names are 1-40 characters: lowercase letters, digits, - and _"
            )
        self.channels.setdefault(name, Channel(name))
        return web.json_response({"channel": name, "channels": sorted(self.channels)})

    async def messages(self, request: web.Request) -> web.Response:
        ch = self.channel_of(request)
        return web.json_response({"messages": [asdict(m) for m in ch.messages]})

    # -- chat --------------------------------------------------------------------------------
    async def post_message(self, request: web.Request) -> web.Response:
        ch = self.channel_of(request)
        body = await json_body(request)
        member = self._member(body)
        text = str(body.get("text", "")).strip()
        if not text:
            raise BadRequest("type a message first")
        if len(text) > MAX_TEXT:
            raise BadRequest(f"messages are limited to {MAX_TEXT} characters")
        posted = Message(self._next_id(), member, text)
        ch.messages.append(posted)
        new = [posted]
        if not mentions_bot(text):
            return web.json_response({"messages": [asdict(m) for m in new]})

        async def post(_chunk: str) -> str:  # the page shows what the exchange returns
            return self._next_id()

        mention = Mention(PLATFORM, WORKSPACE, ch.name, member, strip_bot_mention(text), posted.id)
        delivery = await self.ready_service().exchange(mention, post)
        replies = _bot_messages(delivery)
        ch.messages.extend(replies)
        new.extend(replies)
        return web.json_response(
            {"messages": [asdict(m) for m in new], "request_id": delivery.request_id}
        )

    async def vote(self, request: web.Request) -> web.Response:
        """Set a member's reaction on a reply to ``up``, ``down`` or none (``null``)."""
        ch, msg = self._bot_reply(request, "votes")
        body = await json_body(request)
        member = self._member(body)
        want = body.get("vote")
        if want not in ("up", "down", None):
            raise BadRequest("vote must be up, down or null")
        current = msg.reactions.get(member)
        if want == current:
            return web.json_response({"status": "unchanged", "message": asdict(msg)})
        emoji = EMOJI[want] if want else EMOJI[current]  # type: ignore[index]
        result = await self.ready_service().handle_reaction(
            Reaction(PLATFORM, WORKSPACE, ch.name, member, msg.id, emoji, added=want is not None)
        )
        if not result.counted:
            raise BadRequest(result.message or "that vote did not count")
        if want is None:
            msg.reactions.pop(member, None)
        else:
            msg.reactions[member] = want
        return web.json_response({"status": result.status, "message": asdict(msg)})

    async def correct(self, request: web.Request) -> web.Response:
        ch, msg = self._bot_reply(request, "corrections")
        body = await json_body(request)
        member = self._member(body)
        better = str(body.get("text", "")).strip()
        if not better:
            raise BadRequest("write the better answer first")
        result = await self.ready_service().handle_correction(
            Correction(
                PLATFORM, WORKSPACE, ch.name, member, self._next_id(), msg.id, "better: " + better
            )
        )
        if not result.counted:
            raise BadRequest(result.message or "that correction did not count")
        msg.corrections.append({"member": member, "text": better})
        return web.json_response({"status": result.status, "message": asdict(msg)})

    async def graph(self, request: web.Request) -> web.Response:
        ch = self.channel_of(request)
        engine = self.ready_service().engine
        return web.json_response(await graph_view(engine, self.key(ch.name), ch))


def _bot_messages(delivery: Delivery) -> list[Message]:
    """The bot's reply as the page's messages: one per chunk, under the ids it was posted as."""
    parts = delivery.parts
    return [
        Message(
            mid,
            BOT_NAME,
            chunk,
            is_bot=True,
            kind=parts.kind,
            reply_id=parts.reply_id,
            node_id=parts.node_id,
            new_node=parts.new_node,
            z_version=parts.z_version,
        )
        for mid, chunk in zip(delivery.message_ids, parts.chunks, strict=False)
    ]


async def graph_view(engine: Engine, key: str, ch: Channel | None = None) -> dict:
    """Nodes (2-D layout, count, rewards, version, adapter drift), edges, and which
    node answered each reply on the page."""
    from ..picture import _layout

    nodes = sorted(await engine.nodes(key), key=lambda n: n.created_at)
    replies = await engine.replies(key)
    votes: dict[str, list[int]] = {}
    for r in replies:
        votes.setdefault(r.node_id, []).extend(r.votes.values())
    pos = (
        _layout(np.stack([n.embedding for n in nodes]).astype(np.float64))
        if nodes
        else np.zeros((0, 2))
    )
    if len(nodes) > 1:
        span = np.abs(pos).max(axis=0)
        pos = pos / np.where(span > 0, span, 1.0)
    ids = {n.node_id for n in nodes}
    return {
        "nodes": [
            {
                "id": n.node_id,
                "x": float(pos[i][0]),
                "y": float(pos[i][1]),
                "count": n.count,
                "mean_reward": round(n.mean_reward, 4),
                "rated": n.rated,
                "version": n.version,
                "updates": n.updates,
                "votes_up": sum(v > 0 for v in votes.get(n.node_id, [])),
                "votes_down": sum(v < 0 for v in votes.get(n.node_id, [])),
                "drift": round(float(np.linalg.norm(n.z - 1.0)), 6),
            }
            for i, n in enumerate(nodes)
        ],
        "edges": [
            {"source": n.node_id, "target": other, "similarity": round(float(sim), 4)}
            for n in nodes
            for other, sim in n.neighbors
            if other in ids and n.node_id < other
        ],
        "answers": {m.id: m.node_id for m in (ch.messages if ch else []) if m.node_id},
    }


def _static_dir():
    return resources.files("bot.playground") / "static"


def create_app(
    playground: Playground,
    refresh_metrics=None,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    token: str | None = None,
) -> web.Application:
    """The aiohttp application: the page, its JSON API, /healthz and /metrics.

    ``host`` and ``port`` are where it is bound (the Host check; the port defaults to
    the one each connection arrived on); ``token`` defaults to a fresh random one,
    which only the served page carries.
    """
    guard = Guard(host, port, token)
    app = web.Application(client_max_size=60 * 1024 * 1024, middlewares=[guard.middleware])
    app.on_response_prepare.append(security_headers)
    pg = playground
    static = _static_dir()
    page = (static / "index.html").read_text(encoding="utf-8")
    if TOKEN_PLACEHOLDER not in page:
        raise RuntimeError(f"static/index.html lacks {TOKEN_PLACEHOLDER}")
    page = page.replace(TOKEN_PLACEHOLDER, guard.token)

    async def index(_request: web.Request) -> web.Response:
        # no-store: a page kept from an earlier run would carry that run's token
        return web.Response(
            text=page, content_type="text/html", headers={"Cache-Control": "no-store"}
        )

    r = app.router
    r.add_get("/", index)
    r.add_static("/static/", str(static))
    r.add_get("/api/status", pg.status)
    r.add_get("/api/channels", pg.list_channels)
    r.add_post("/api/channels", pg.create_channel)
    r.add_get("/api/channels/{channel}/messages", pg.messages)
    r.add_post("/api/channels/{channel}/messages", pg.post_message)
    r.add_post("/api/channels/{channel}/messages/{message}/vote", pg.vote)
    r.add_post("/api/channels/{channel}/messages/{message}/correct", pg.correct)
    r.add_post("/api/channels/{channel}/train", pg.admin.train)
    r.add_get("/api/channels/{channel}/stats", pg.admin.stats)
    r.add_post("/api/channels/{channel}/config", pg.admin.config)
    r.add_post("/api/channels/{channel}/reset", pg.admin.reset)
    r.add_get("/api/channels/{channel}/export", pg.admin.export)
    r.add_post("/api/channels/{channel}/import", pg.admin.import_)
    r.add_get("/api/channels/{channel}/graph", pg.graph)
    add_routes(app, pg.health, pg.metrics, refresh_metrics)
    return app


__all__ = [
    "TOKEN_HEADER",
    "Channel",
    "Message",
    "Playground",
    "create_app",
    "graph_view",
    "mentions_bot",
]
