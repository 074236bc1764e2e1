"""A fake Slack on loopback: the Web API methods the bot calls, file upload/download
URLs, and a Socket Mode websocket.

It answers the way Slack documents (``{"ok": true, ...}``, errors as ``ok: false``),
checks the bot token on every call, and records every call so tests can assert on
what the real `AsyncWebClient` sent.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from decimal import Decimal

from aiohttp import WSMsgType, web

BOT_TOKEN = "xoxb-test-token"
BOT_USER, BOT_ID, TEAM = "UBOT", "BBOT", "T1"


def event_callback(event: dict, event_id: str, actor_team: str | None = None) -> dict:
    """An Events API request body, as Slack sends it to the app installed in `TEAM`.

    ``actor_team``: the event happens in a shared (Slack Connect) channel and the actor
    is a member of that other team. Slack then names the actor's team in ``event.team``
    and ``event.user_team`` and in the body's ``team_id`` (the team the event comes
    from), marks the body ``is_ext_shared_channel``, and only ``authorizations`` names
    the workspace that installed the app."""
    body = {
        "token": "legacy",
        "team_id": TEAM,
        "api_app_id": "A1",
        "type": "event_callback",
        "event_id": event_id,
        "event_time": int(time.time()),
        "event": event,
        "authorizations": [{"team_id": TEAM, "user_id": BOT_USER, "is_bot": True}],
    }
    if actor_team is not None:
        body["team_id"] = actor_team
        body["is_ext_shared_channel"] = True
        body["event"] = {**event, "team": actor_team, "user_team": actor_team}
    return body


@dataclass
class Call:
    method: str
    args: dict


@dataclass
class FakeSlack:
    users: dict[str, dict] = field(default_factory=dict)  # id -> users.info "user" fields
    calls: list[Call] = field(default_factory=list)
    messages: dict[str, list[dict]] = field(default_factory=dict)  # channel -> messages
    uploads: dict[str, dict] = field(default_factory=dict)  # file id -> {name, data, ...}
    socket_acks: list[dict] = field(default_factory=list)
    responses: list[dict] = field(default_factory=list)  # bodies POSTed to response_url
    downloads: list[str] = field(default_factory=list)  # file ids requested from /download
    not_in: set[str] = field(default_factory=set)  # channels the bot is not a member of
    response_status: int = 200  # what response_url answers (404: an expired URL)
    upload_status: int = 200  # what the upload URL answers (500: the file host fails)
    # method -> how many of its next calls Slack refuses as rate-limited (HTTP 429)
    rate_limited: dict[str, int] = field(default_factory=dict)
    # method -> the error code every call of it answers (``channel_not_found``…)
    errors: dict[str, str] = field(default_factory=dict)
    # the most messages one page of conversations.replies holds: 15 for apps
    # distributed outside the Marketplace, 1000 for the others
    replies_page_max: int = 1000
    # time between two messages (seconds): each new ``ts`` is the clock advanced by this
    tick: Decimal = Decimal("0.000001")
    url: str = ""

    def __post_init__(self) -> None:
        self._now = Decimal("1700000000")
        self._files = itertools.count(1)
        self._sockets: list[web.WebSocketResponse] = []
        self._acked = asyncio.Event()
        self.runner: web.AppRunner | None = None

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> FakeSlack:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/api/{method}", self._api)
        app.router.add_get("/api/{method}", self._api)  # e.g. conversations.replies
        app.router.add_post("/upload/{fid}", self._upload)
        app.router.add_get("/download/{fid}", self._download)
        app.router.add_get("/socket", self._socket)
        app.router.add_post("/response", self._response)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        for ws in self._sockets:
            await ws.close()
        if self.runner:
            await self.runner.cleanup()

    @property
    def api_url(self) -> str:
        return self.url + "/api/"

    def called(self, method: str) -> list[dict]:
        return [c.args for c in self.calls if c.method == method]

    def next_ts(self) -> str:
        """A new message's ``ts``: Slack's clock, moved on by `tick`."""
        self._now += self.tick
        return f"{self._now:.6f}"

    def add_file(self, name: str, data: bytes, redirect: str = "", **info) -> str:
        """A file already shared in Slack; ``info`` overrides what ``files.info`` says
        about it (``size``, ``url_private_download``), as a lying or hostile answer would;
        ``redirect``: its download answers 302 to that URL."""
        fid = f"F{next(self._files):08d}"
        self.uploads[fid] = {"name": name, "data": data, "redirect": redirect, "info": info}
        return fid

    def add_message(self, channel: str, **msg) -> dict:
        msg.setdefault("ts", self.next_ts())
        self.messages.setdefault(channel, []).append(msg)
        return msg

    # -- Web API -------------------------------------------------------------------------
    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        args = dict(request.query)  # the SDK sends `params=` in the query string
        if request.method == "GET":
            pass
        elif request.content_type == "application/json":
            args.update(await request.json())
        else:
            args.update(await request.post())
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth else args.get("token")
        self.calls.append(Call(method, {k: v for k, v in args.items() if k != "token"}))
        if method == "apps.connections.open":
            return web.json_response(
                {"ok": True, "url": self.url.replace("http", "ws") + "/socket"}
            )
        if token != BOT_TOKEN:
            return web.json_response({"ok": False, "error": "invalid_auth"})
        if self.rate_limited.get(method):
            self.rate_limited[method] -= 1
            return web.json_response(
                {"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": "1"}
            )
        if method in self.errors:
            return web.json_response({"ok": False, "error": self.errors[method]})
        handler = getattr(self, "_m_" + method.replace(".", "_"), None)
        if handler is None:
            return web.json_response({"ok": False, "error": "unknown_method"})
        result = handler(args)
        if "error" in result:
            return web.json_response({"ok": False, **result})
        return web.json_response({"ok": True, **result})

    def _m_auth_test(self, args):
        return {"user_id": BOT_USER, "bot_id": BOT_ID, "team_id": TEAM, "user": "gesal"}

    def _m_chat_postMessage(self, args):
        if args["channel"] in self.not_in:
            return {"error": "not_in_channel"}
        msg = self.add_message(
            args["channel"],
            text=args.get("text", ""),
            user=BOT_USER,
            bot_id=BOT_ID,
            thread_ts=args.get("thread_ts"),
        )
        return {"channel": args["channel"], "ts": msg["ts"], "message": msg}

    def _m_chat_postEphemeral(self, args):
        if args["channel"] in self.not_in:  # as Slack answers outside the bot's channels
            return {"error": "channel_not_found"}
        return {"message_ts": self.next_ts()}

    def _m_reactions_add(self, args):
        return {}

    def _m_reactions_remove(self, args):
        return {}

    def _m_conversations_replies(self, args):
        """A thread oldest first: one page of at most ``limit`` replies (capped at
        `replies_page_max`) within ``oldest``/``latest`` (``inclusive`` keeps the
        bounds), after the page the ``cursor`` names. The thread's parent comes first on
        every page, whatever the bounds, as Slack returns it; ``has_more`` and a
        ``next_cursor`` say that more pages follow."""
        thread = args["ts"]
        msgs = sorted(
            (
                m
                for m in self.messages.get(args["channel"], [])
                if m["ts"] == thread or m.get("thread_ts") == thread
            ),
            key=lambda m: Decimal(m["ts"]),
        )
        if not msgs or msgs[0]["ts"] != thread:
            return {"error": "thread_not_found"}
        inclusive = str(args.get("inclusive", "")).lower() in ("1", "true")
        lo, hi = Decimal(args.get("oldest") or 0), Decimal(args.get("latest") or "1e12")
        after = Decimal(args["cursor"].removeprefix("next_ts:")) if args.get("cursor") else None

        def wanted(m: dict) -> bool:
            t = Decimal(m["ts"])
            inside = lo <= t <= hi if inclusive else lo < t < hi
            return inside and (after is None or t > after)

        replies = [m for m in msgs[1:] if wanted(m)]
        size = min(int(args.get("limit") or self.replies_page_max), self.replies_page_max)
        result = {"messages": [msgs[0], *replies[:size]], "has_more": len(replies) > size}
        if len(replies) > size:
            result["response_metadata"] = {"next_cursor": f"next_ts:{replies[size - 1]['ts']}"}
        return result

    def _m_users_info(self, args):
        user = {"id": args["user"], "is_admin": False, "is_owner": False}
        user.update(self.users.get(args["user"], {}))
        return {"user": user}

    def _m_files_getUploadURLExternal(self, args):
        fid = f"F{next(self._files):08d}"
        self.uploads[fid] = {"name": args["filename"], "length": int(args["length"])}
        return {"upload_url": f"{self.url}/upload/{fid}", "file_id": fid}

    def _m_files_completeUploadExternal(self, args):
        files = args["files"]
        files = json.loads(files) if isinstance(files, str) else files
        for f in files:
            self.uploads[f["id"]].update(
                title=f.get("title"),
                channel=args.get("channel_id"),
                completed=True,
                comment=args.get("initial_comment"),
            )
        return {"files": [{"id": f["id"], "title": f.get("title")} for f in files]}

    def _m_files_info(self, args):
        fid = args["file"]
        if fid not in self.uploads:
            return {"error": "file_not_found"}
        f = self.uploads[fid]
        info = {
            "id": fid,
            "name": f["name"],
            "size": len(f.get("data", b"")),
            "url_private_download": f"{self.url}/download/{fid}",
        }
        return {"file": {**info, **f.get("info", {})}}

    # -- files ---------------------------------------------------------------------------
    async def _upload(self, request: web.Request) -> web.Response:
        fid = request.match_info["fid"]
        if fid not in self.uploads:
            return web.Response(status=404)
        if self.upload_status != 200:
            return web.Response(status=self.upload_status, text="upload failed")
        post = await request.post()
        part = post.get("file")
        data = part.file.read() if hasattr(part, "file") else await request.read()
        self.uploads[fid]["data"] = data
        return web.Response(text="OK")

    async def _download(self, request: web.Request) -> web.Response:
        self.downloads.append(request.match_info["fid"])
        if request.headers.get("Authorization") != f"Bearer {BOT_TOKEN}":
            return web.Response(status=403)
        f = self.uploads.get(request.match_info["fid"])
        if f is None or "data" not in f:
            return web.Response(status=404)
        if f.get("redirect"):  # a file host that sends the client on elsewhere
            return web.Response(status=302, headers={"Location": f["redirect"]})
        return web.Response(body=f["data"])

    async def _response(self, request: web.Request) -> web.Response:
        """A slash command's or button's ``response_url`` (no token: the URL is the key).
        Each body is recorded with the URL's query (tests put ``user`` and ``channel``
        there, to see whom an answer reaches: Slack knows it from the URL)."""
        body = {**request.query, **await request.json()}
        if self.response_status != 200:
            return web.Response(status=self.response_status, text="expired_url")
        self.responses.append(body)
        return web.Response(text="ok")

    # -- Socket Mode ---------------------------------------------------------------------
    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.append(ws)
        await ws.send_json({"type": "hello", "num_connections": 1})
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                self.socket_acks.append(json.loads(msg.data))
                self._acked.set()
        return ws

    async def drop_sockets(self) -> None:
        """Close every Socket Mode connection from Slack's side (a network blip)."""
        for ws in self._sockets:
            await ws.close()
        self._sockets.clear()

    async def wait_socket(self, timeout: float = 10.0) -> None:
        for _ in range(int(timeout * 20)):
            if self._sockets:
                return
            await asyncio.sleep(0.05)
        raise TimeoutError("the Socket Mode client never connected")

    async def send_envelope(self, envelope: dict, timeout: float = 10.0) -> dict:
        """Push one envelope to the connected client; return its ack."""
        self._acked.clear()
        before = len(self.socket_acks)
        await self._sockets[-1].send_json(envelope)
        while len(self.socket_acks) == before:
            await asyncio.wait_for(self._acked.wait(), timeout)
            self._acked.clear()
        return self.socket_acks[-1]
