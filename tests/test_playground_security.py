"""No page on another origin can drive the playground.

A real `gesal-bot run --platform local` (launch.serve with the tiny model, in-memory
store) serves on loopback; the tests send raw HTTP to it, as a browser on another site
would: bodies a page elsewhere may send without asking first (text/plain, urlencoded,
multipart), no token, a wrong token, a foreign Origin, a foreign Host (DNS rebinding),
a reset without the server's confirmation and non-finite settings. Each asserts the
refusal and that the store and the page's state are unchanged.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import socket
import uuid
from unittest import mock

import pytest
from aiohttp.test_utils import make_mocked_request

import bot.playground.admin as playground_admin
from bot.launch import serve
from bot.ops_settings import OpsSettings
from bot.playground.guard import Guard, check_bind, is_loopback
from bot.settings import SettingsError, load_settings
from gesal_core.engine import Engine

from .playground_server import PlaygroundServer

LAB = "playground:local:lab"
EVIL = "http://evil.example"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server(PlaygroundServer):
    """The playground with generous rate limits, and raw HTTP under the test's control."""

    def __init__(self, tokenizer, port: int) -> None:
        super().__init__(tokenizer, port, gesal_rate_user=1000, gesal_rate_channel=1000)

    # -- raw HTTP, every header under the test's control ---------------------------------
    def send(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        host: str | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", host if host is not None else f"127.0.0.1:{self.port}")
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            if method not in ("GET", "HEAD"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self) -> str:
        status, _, page = self.send("GET", "/")
        assert status == 200
        found = re.search(rb'<meta name="gesal-token" content="([^"]+)">', page)
        assert found, "the page carries no token"
        return found.group(1).decode()

    def page_post(self, path: str, payload: object) -> tuple[int, dict]:
        """A request exactly as the page's script sends it."""
        status, _, body = self.send(
            "POST",
            path,
            json.dumps(payload).encode(),
            {
                "Content-Type": "application/json",
                "X-Gesal-Token": self.token(),
                "Origin": self.origin,
            },
        )
        return status, json.loads(body)

    def get_json(self, path: str) -> dict:
        status, _, body = self.send("GET", path)
        assert status == 200, body
        return json.loads(body)

    def snapshot(self) -> dict:
        """Everything a refused request must leave as it was: the channel's graph,
        replies and votes, its settings, pending feedback, the store's channels, and the
        playground's own channels and message log."""
        engine = self.runtime.engine

        async def read() -> dict:
            return {
                "export": Engine.dumps(await engine.export(LAB)),
                "config": await engine.store.get_config(LAB),
                "pending": await engine.store.pending_count(LAB),
                "store_channels": sorted(await engine.store.channels()),
            }

        out = self.run(read())
        out["channels"] = self.get_json("/api/channels")["channels"]
        out["messages"] = self.get_json("/api/channels/lab/messages")["messages"]
        return out


@pytest.fixture(scope="module")
def pg(tiny_tokenizer):
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith(("DISCORD_", "SLACK_", "GESAL_", "REDIS_URL")) and name not in (
                "GESAL_CACHE_DIR",
            ):
                mp.delenv(name, raising=False)
        srv = Server(tiny_tokenizer, _free_port())
        srv.start()
        try:
            # the page's own requests: a channel with an answer and a pending 👍
            assert srv.page_post("/api/channels", {"name": "lab"})[0] == 200
            status, body = srv.page_post(
                "/api/channels/lab/messages", {"member": "ada", "text": "@gesal hello world"}
            )
            assert status == 200, body
            srv.reply = next(m["id"] for m in body["messages"] if m["is_bot"])
            status, body = srv.page_post(
                f"/api/channels/lab/messages/{srv.reply}/vote", {"member": "ada", "vote": "up"}
            )
            assert status == 200, body
            before = srv.snapshot()
            assert before["pending"] >= 1 and '"nodes"' in before["export"]
            assert len(json.loads(before["export"])["nodes"]) == 1
            yield srv
        finally:
            srv.stop()
    assert not srv.thread.is_alive(), "the server did not shut down"


def _attacks(pg: Server) -> dict[str, tuple[str, object]]:
    """What a page on another site tried: path and JSON payload of each change."""
    empty = pg.run(pg.runtime.engine.export("playground:local:nobody"))
    m = pg.reply
    return {
        "create a channel": ("/api/channels", {"name": "evil"}),
        "ask as a member": (
            "/api/channels/lab/messages",
            {"member": "ben", "text": "@gesal pwned"},
        ),
        "vote": (f"/api/channels/lab/messages/{m}/vote", {"member": "ben", "vote": "down"}),
        "correct": (f"/api/channels/lab/messages/{m}/correct", {"member": "ben", "text": "x"}),
        "set reward_up to nan": ("/api/channels/lab/config", {"reward_up": "nan"}),
        "reset in one request": ("/api/channels/lab/reset", {"confirmed": True}),
        "import a graph": ("/api/channels/lab/import", empty),
        "train": ("/api/channels/lab/train", {}),
    }


ATTACKS = [
    "create a channel",
    "ask as a member",
    "vote",
    "correct",
    "set reward_up to nan",
    "reset in one request",
    "import a graph",
    "train",
]


def _multipart(payload: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="graph.json"\r\n'
            "Content-Type: application/json\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def _simple_bodies(payload: bytes) -> dict[str, tuple[bytes, str]]:
    """The bodies a browser sends cross-site without a preflight, each carrying the
    JSON a lenient server would parse."""
    return {
        "text/plain": (payload, "text/plain;charset=UTF-8"),
        "urlencoded": (payload, "application/x-www-form-urlencoded"),
        "multipart": _multipart(payload),
    }


def _assert_refused(pg: Server, before: dict, status: int, body: bytes, expect: int, words: str):
    assert status == expect, body
    error = json.loads(body)["error"]
    assert words in error and error.count(". ") == 0  # one sentence that says why
    assert pg.snapshot() == before


# -- a page on another site: no preflight, no token, its own Origin ----------------------
@pytest.mark.parametrize("action", ATTACKS)
@pytest.mark.parametrize("encoding", ["text/plain", "urlencoded", "multipart"])
def test_cross_site_simple_requests_change_nothing(pg, action, encoding):
    path, payload = _attacks(pg)[action]
    body, ctype = _simple_bodies(json.dumps(payload).encode())[encoding]
    before = pg.snapshot()
    status, _, answer = pg.send(
        "POST", path, body, {"Content-Type": ctype, "Origin": EVIL, "Referer": EVIL + "/x"}
    )
    _assert_refused(pg, before, status, answer, 403, "another origin")


# -- each check on its own: every other part of the request is the page's ---------------
@pytest.mark.parametrize("action", ATTACKS)
@pytest.mark.parametrize("encoding", ["text/plain", "urlencoded", "multipart"])
def test_not_json_is_refused_even_with_the_token(pg, action, encoding):
    path, payload = _attacks(pg)[action]
    body, ctype = _simple_bodies(json.dumps(payload).encode())[encoding]
    before = pg.snapshot()
    status, _, answer = pg.send(
        "POST", path, body, {"Content-Type": ctype, "X-Gesal-Token": pg.token()}
    )
    _assert_refused(pg, before, status, answer, 415, "application/json")


@pytest.mark.parametrize("action", ATTACKS)
def test_json_without_the_token_is_refused(pg, action):
    path, payload = _attacks(pg)[action]
    before = pg.snapshot()
    status, _, answer = pg.send(
        "POST", path, json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    _assert_refused(pg, before, status, answer, 403, "no X-Gesal-Token")


@pytest.mark.parametrize("action", ATTACKS)
def test_a_wrong_token_is_refused(pg, action):
    path, payload = _attacks(pg)[action]
    token = pg.token()
    wrong = token[:-1] + ("A" if token[-1] != "A" else "B")  # one character off
    before = pg.snapshot()
    for bad in (wrong, "", "x", token + "x", "ünïcode"):
        headers = {"Content-Type": "application/json", "X-Gesal-Token": bad}
        if not bad:
            headers.pop("X-Gesal-Token")
        status, _, answer = pg.send(
            "POST",
            path,
            json.dumps(payload).encode(),
            {k: v.encode().decode("latin-1") for k, v in headers.items()},
        )
        _assert_refused(pg, before, status, answer, 403, "X-Gesal-Token")


@pytest.mark.parametrize("action", ATTACKS)
def test_a_foreign_origin_is_refused_even_with_the_token(pg, action):
    path, payload = _attacks(pg)[action]
    before = pg.snapshot()
    for origin in (EVIL, "null", f"https://127.0.0.1:{pg.port}", "http://127.0.0.1:1"):
        status, _, answer = pg.send(
            "POST",
            path,
            json.dumps(payload).encode(),
            {"Content-Type": "application/json", "X-Gesal-Token": pg.token(), "Origin": origin},
        )
        _assert_refused(pg, before, status, answer, 403, "another origin")


# -- DNS rebinding: the page reaches the server under its own name ------------------------
@pytest.mark.parametrize(
    "path", ["/api/channels/lab/export", "/", "/api/status", "/api/channels/lab/graph"]
)
def test_a_foreign_host_cannot_read(pg, path):
    for host in ("evil.example", f"evil.example:{pg.port}", f"127.0.0.1:{pg.port + 1}", ""):
        status, _, body = pg.send("GET", path, host=host)
        assert status == 421, (host, body)
        error = json.loads(body)["error"]
        assert "does not serve the Host" in error and "nodes" not in error
        assert b"gesal-token" not in body
    status, _, body = pg.send("GET", "/api/channels/lab/export")  # the right Host: served
    assert status == 200 and json.loads(body)["channel"] == LAB


@pytest.mark.parametrize("action", ATTACKS)
def test_a_foreign_host_cannot_change(pg, action):
    path, payload = _attacks(pg)[action]
    before = pg.snapshot()
    status, _, answer = pg.send(
        "POST",
        path,
        json.dumps(payload).encode(),
        {"Content-Type": "application/json", "X-Gesal-Token": pg.token()},
        host=f"evil.example:{pg.port}",
    )
    _assert_refused(pg, before, status, answer, 421, "does not serve the Host")


# -- reset: the confirmation lives on the server ------------------------------------------
def test_reset_needs_the_confirmation_from_its_preview(pg):
    assert pg.page_post("/api/channels", {"name": "scratch"})[0] == 200
    assert pg.page_post("/api/channels", {"name": "other"})[0] == 200
    ask = {"member": "ada", "text": "@gesal the quick brown fox"}
    assert pg.page_post("/api/channels/scratch/messages", ask)[0] == 200
    engine = pg.runtime.engine

    def nodes() -> int:
        return pg.run(engine.stats("playground:local:scratch"))["nodes"]

    assert nodes() == 1
    for payload in ({"confirmed": True}, {"confirm": "scratch"}, {"confirm": ""}, {"confirm": 1}):
        status, body = pg.page_post("/api/channels/scratch/reset", payload)
        assert status == 400 and "reset" in body["error"], payload
        assert nodes() == 1
    # the preview changes nothing and hands out a confirmation for this channel only
    status, preview = pg.page_post("/api/channels/scratch/reset", {})
    assert status == 200 and preview["needs_confirmation"] and "1 nodes" in preview["text"]
    assert nodes() == 1
    status, body = pg.page_post("/api/channels/other/reset", {"confirm": preview["confirm"]})
    assert status == 400 and "#other" in body["error"]
    status, body = pg.page_post("/api/channels/scratch/reset", {"confirm": preview["confirm"]})
    assert status == 200 and not body["needs_confirmation"]
    assert nodes() == 0
    assert pg.get_json("/api/channels/scratch/messages")["messages"] == []
    # once only
    assert pg.page_post("/api/channels/scratch/messages", ask)[0] == 200
    status, body = pg.page_post("/api/channels/scratch/reset", {"confirm": preview["confirm"]})
    assert status == 400 and nodes() == 1


def test_an_expired_confirmation_resets_nothing(pg):
    assert pg.page_post("/api/channels", {"name": "slow"})[0] == 200
    ask = {"member": "ben", "text": "@gesal jumps over the lazy dog"}
    assert pg.page_post("/api/channels/slow/messages", ask)[0] == 200
    # a preview whose confirmation is already past its validity
    with mock.patch.object(playground_admin, "RESET_CONFIRM_SECONDS", -1.0):
        status, preview = pg.page_post("/api/channels/slow/reset", {})
    assert status == 200 and preview["confirm"]
    status, body = pg.page_post("/api/channels/slow/reset", {"confirm": preview["confirm"]})
    assert status == 400 and "ask for the reset again" in body["error"]
    assert pg.run(pg.runtime.engine.stats("playground:local:slow"))["nodes"] == 1


# -- non-finite settings, even from the page ----------------------------------------------
@pytest.mark.parametrize(
    "raw",
    [
        b'{"reward_up": "nan"}',
        b'{"reward_up": NaN}',
        b'{"reward_up": "inf"}',
        b'{"reward_down": "-Infinity"}',
        b'{"threshold": -Infinity}',
        b'{"reward_up": true}',
        b'{"reward_up": [1]}',
    ],
)
def test_non_finite_settings_are_refused(pg, raw):
    before = pg.snapshot()
    status, _, answer = pg.send(
        "POST",
        "/api/channels/lab/config",
        raw,
        {"Content-Type": "application/json", "X-Gesal-Token": pg.token(), "Origin": pg.origin},
    )
    assert status == 400, answer
    assert "number" in json.loads(answer)["error"]
    assert pg.snapshot() == before


# -- the page's own requests still work ---------------------------------------------------
def test_the_pages_own_requests_work(pg):
    status, headers, page = pg.send("GET", "/")
    assert status == 200 and b"/static/app.js" in page
    assert headers["Cache-Control"] == "no-store" and headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert pg.token() == pg.token()  # one token per process
    for host in (f"localhost:{pg.port}", f"[::1]:{pg.port}", f"LOCALHOST:{pg.port}"):
        assert pg.send("GET", "/api/status", host=host)[0] == 200, host

    status, body = pg.page_post("/api/channels", {"name": "mine"})
    assert status == 200 and "mine" in body["channels"]
    status, body = pg.page_post(
        "/api/channels/mine/messages", {"member": "chloé", "text": "@gesal 0123456789"}
    )
    assert status == 200
    reply = next(m for m in body["messages"] if m["is_bot"])
    key = "playground:local:mine"
    pending = pg.run(pg.runtime.engine.store.pending_count(key))
    status, body = pg.page_post(
        f"/api/channels/mine/messages/{reply['id']}/vote", {"member": "dev", "vote": "down"}
    )
    assert status == 200 and body["message"]["reactions"] == {"dev": "down"}
    assert pg.run(pg.runtime.engine.store.pending_count(key)) == pending + 1
    status, body = pg.page_post("/api/channels/mine/config", {"reward_up": "2", "threshold": 0.5})
    assert status == 200 and body["data"]["reward_up"] == 2.0
    assert pg.run(pg.runtime.engine.store.get_config(key)).threshold == 0.5
    # the page's Origin under another of the served names, and the import as JSON text
    exported = pg.send("GET", "/api/channels/mine/export")[2]
    status, _, body = pg.send(
        "POST",
        "/api/channels/mine/import",
        exported,
        {
            "Content-Type": "application/json; charset=utf-8",
            "X-Gesal-Token": pg.token(),
            "Origin": f"http://localhost:{pg.port}",
        },
        host=f"localhost:{pg.port}",
    )
    assert status == 200 and "Imported 1 nodes" in json.loads(body)["text"], body
    status, body = pg.page_post("/api/channels/mine/train", {})
    assert status == 200 and "Training done" in body["text"]


# -- binding elsewhere only on purpose ------------------------------------------------------
def test_binding_beyond_loopback_needs_the_public_setting():
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        assert is_loopback(host) and check_bind(host, public=False) is None
    for host in ("0.0.0.0", "", "::", "192.168.1.5", "my-box.lan"):
        assert not is_loopback(host)
        with pytest.raises(SettingsError, match="GESAL_PLAYGROUND_PUBLIC=true"):
            check_bind(host, public=False)
        assert "admin rights" in check_bind(host, public=True)
    settings = load_settings(None, gesal_playground_public="true")
    assert settings.gesal_playground_public is True
    assert load_settings(None).gesal_playground_public is False


def test_serve_refuses_a_public_bind_without_the_setting(monkeypatch, capsys):
    monkeypatch.delenv("GESAL_PLAYGROUND_PUBLIC", raising=False)
    settings = load_settings(
        None, redis_url="memory://", gesal_playground_host="0.0.0.0", gesal_playground_port=1
    )

    async def never(_store):
        raise AssertionError("the engine must not be built")

    with pytest.raises(SettingsError, match="not a loopback address"):
        asyncio.run(serve(settings, OpsSettings(), ["local"], engine_factory=never))
    assert "gesal-bot playground:" not in capsys.readouterr().out  # nothing was served


def _request(guard: Guard, host: str, local_ip: str, port: int = 8765, **headers: str):
    transport = mock.Mock()
    transport.get_extra_info.return_value = (local_ip, port)
    return make_mocked_request(
        "GET", "/api/status", headers={"Host": host, **headers}, transport=transport
    )


def test_a_wildcard_bind_serves_loopback_and_the_arriving_interface():
    guard = Guard("0.0.0.0")
    ok = [("127.0.0.1:8765", "127.0.0.1"), ("localhost:8765", "127.0.0.1")]
    ok += [("192.168.1.5:8765", "192.168.1.5"), ("192.168.1.5:8765", "::ffff:192.168.1.5")]
    for host, local in ok:
        assert guard.refusal(_request(guard, host, local)) is None, host
    bad = [("evil.example:8765", "192.168.1.5"), ("192.168.1.5:8766", "192.168.1.5")]
    bad += [("10.0.0.9:8765", "192.168.1.5"), ("192.168.1.5", "192.168.1.5")]
    for host, local in bad:
        assert guard.refusal(_request(guard, host, local))[0] == 421, host
    req = _request(guard, "192.168.1.5:8765", "192.168.1.5", Origin="http://evil.example")
    assert guard.refusal(req)[0] == 403
    req = _request(guard, "192.168.1.5:8765", "192.168.1.5", Origin="http://192.168.1.5:8765")
    assert guard.refusal(req) is None
    # a named bind serves that name, not others
    named = Guard("my-box.lan")
    assert named.refusal(_request(named, "my-box.lan:8765", "192.168.1.5")) is None
    assert named.refusal(_request(named, "localhost:8765", "192.168.1.5"))[0] == 421
    # port 80 may be left out of Host
    assert named.refusal(_request(named, "my-box.lan", "192.168.1.5", port=80)) is None
