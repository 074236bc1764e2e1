"""`Store` on Redis: the production system of record.

The key layout is described in `layout.py`; the atomic steps are the Lua scripts in
`lua.py`. What this module guarantees:

* **Durable votes.** ``set_vote`` writes the vote and appends its feedback event in one
  script, then (when the server has AOF on) waits with ``WAITAOF`` until that write is
  fsynced to disk, before returning. A vote acknowledged to the user survives a crash of
  Redis, or of the whole machine. With ``appendfsync everysec`` that wait is at most
  about a second; reactions need no faster answer, and concurrent votes share one fsync.
* **Exactly-once effect.** Events are read through the consumer group ``trainers``
  (at-least-once: a dead trainer's entries are reclaimed with ``XAUTOCLAIM``). The commit
  script applies a batch only if every node still has the version the trainer read and
  every event of the batch is still unacknowledged; it then acknowledges and deletes the
  events in the same step. So a batch is applied once or not at all.
* **Idempotent events.** An event only says "look at this reply again": training reads
  the reply's current votes. A duplicated event (a retried write) changes nothing.
* **Failures are messages.** Connection errors are retried with exponential backoff and
  the client reconnects by itself; when Redis stays away, calls raise
  `StoreUnavailableError`, whose text can be shown to a chat user (it names no server;
  the log gets the server with its secrets masked). Nothing crashes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from urllib.parse import parse_qs, unquote, unquote_plus, urlsplit, urlunsplit

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    NoScriptError,
    RedisError,
    ResponseError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

from ..records import VOTE, ChannelConfig, FeedbackEvent, Node, NodeHead, NodeUpdate, Reply
from . import lua
from .base import ConflictError, NodeGoneError, StoreUnavailableError, UnknownReplyError
from .layout import CHANNELS, GROUP, Keys

log = logging.getLogger(__name__)

DEFAULT_MAX_REPLIES = 2000
DEFAULT_CLAIM_IDLE_MS = 30_000
CONSUMER_GC_MS = 3_600_000  # forget consumers idle for an hour with nothing pending
# An import's staged keys expire after this long: far longer than staging takes, so only
# the stage of a process that died mid-import ever expires.
STAGE_TTL_S = 3600
STAGE_BATCH = 1000  # commands per staging pipeline
NODE_INTS = ("count", "version", "rated", "updates", "skipped", "rollbacks")
NODE_FLOATS = ("baseline", "reward_sum", "created_at", "updated_at")
NODE_JSON = ("recent", "downvoted", "neighbors")
REPLY_EXTRA = ("votes", "corrections", "platform_message_id", "counted")


TLS_FILE_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
TLS_HINT = (
    "if its certificate comes from a private CA, give that CA's file in REDIS_URL, "
    "e.g. rediss://:PASSWORD@HOST:6380/0?ssl_ca_certs=/path/to/ca.crt"
)


# ``password=`` and ``ssl_password=`` (a client key's): the query options that hold secrets
_QUERY_SECRET = re.compile(r"(?i)(^|&)([^=&]*password=)([^&]*)")


def url_secrets(url: str) -> list[str]:
    """Every secret a Redis URL carries, as written and percent-decoded.

    The password of ``user:password@``; a lone user-info part (``redis://secret@host``),
    which is how people write a password alone and which some clients send as one; and
    the value of any ``password=`` query option.
    """
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    found: list[str] = []
    if at:
        user, colon, password = userinfo.partition(":")
        found.append(password if colon else user)
    found += [m.group(3) for m in _QUERY_SECRET.finditer(parts.query)]
    variants = {v for s in found for v in (s, unquote(s), unquote_plus(s)) if v}
    return sorted(variants, key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` with each of ``secrets`` replaced by ``***``."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def redact_url(url: str) -> str:
    """The URL with its secrets masked (see `url_secrets`), for logs and operators.

    ``user:password@`` keeps the user name (``user:***@``); a lone user-info part is
    taken for a password (``***@``); ``password=`` query values become ``***``. Host,
    port, database and file paths (``ssl_ca_certs``) stay: an operator needs them. This
    is never what a chat member sees (`StoreUnavailableError` keeps the two apart).
    """
    parts = urlsplit(url)
    query = _QUERY_SECRET.sub(r"\1\2***", parts.query)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at and query == parts.query:
        return url  # unchanged (urlunsplit would also drop unix:///'s empty host)
    if at:
        user, colon, _ = userinfo.partition(":")
        parts = parts._replace(netloc=f"{user}:***@{host}" if colon else f"***@{host}")
    return urlunsplit(parts._replace(query=query))


def check_url(url: str) -> None:
    """Refuse a ``redis://``/``rediss://``/``unix://`` URL that cannot work, saying why.

    redis-py only notices a mistyped query option or a missing CA file when it first
    connects, as a TypeError or a generic connection error; checked here, before any
    network traffic, the operator gets one plain sentence that names the option.
    """
    where = redact_url(url)
    options = parse_qs(urlsplit(url).query)
    for name in TLS_FILE_OPTIONS:
        for path in options.get(name, []):
            if not os.access(path, os.R_OK):
                raise StoreUnavailableError(
                    f"REDIS_URL ({where}) names {name}={path}, which is not a readable file"
                )
    try:
        aioredis.ConnectionPool.from_url(url).make_connection()  # parses; no I/O
    except (TypeError, ValueError, RedisError) as exc:
        reason = scrub(str(exc), url_secrets(url))
        raise StoreUnavailableError(
            f"REDIS_URL ({where}) has a setting the Redis client does not accept: {reason}"
        ) from None


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _tls_failure(exc: BaseException) -> str | None:
    """The reason a TLS handshake failed, if that is what ``exc`` comes from."""
    for e in _chain(exc):
        if isinstance(e, ssl.SSLError):
            return getattr(e, "verify_message", None) or e.reason or str(e)
    return None


def _vec_bytes(v: np.ndarray) -> bytes:
    return np.asarray(v, dtype="<f4").tobytes()


def _vec(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype="<f4").astype(np.float32)


def _s(b: bytes | str | None) -> str | None:
    return b.decode() if isinstance(b, bytes) else b


def node_to_fields(node: Node) -> dict[str, bytes | str]:
    fields: dict[str, bytes | str] = {"emb": _vec_bytes(node.embedding), "z": _vec_bytes(node.z)}
    fields.update({k: str(int(getattr(node, k))) for k in NODE_INTS})
    fields.update({k: repr(float(getattr(node, k))) for k in NODE_FLOATS})
    fields["recent"] = json.dumps([float(r) for r in node.recent])
    fields["downvoted"] = json.dumps(list(node.downvoted))
    fields["neighbors"] = json.dumps([[n, float(s)] for n, s in node.neighbors])
    return fields


def node_from_fields(node_id: str, h: dict[bytes, bytes]) -> Node:
    g = {k.decode(): v for k, v in h.items()}
    return Node(
        node_id=node_id,
        embedding=_vec(g["emb"]),
        z=_vec(g["z"]),
        **{k: int(g[k]) for k in NODE_INTS},
        **{k: float(g[k]) for k in NODE_FLOATS},
        recent=[float(r) for r in json.loads(g["recent"])],
        downvoted=list(json.loads(g["downvoted"])),
        neighbors=[(n, float(s)) for n, s in json.loads(g["neighbors"])],
    )


def reply_to_fields(reply: Reply) -> tuple[dict[str, str], list[str]]:
    """A reply's hash fields (``data``, ``v:<user>``, ``msg``, ``counted``) and its
    corrections list (JSON items)."""
    d = reply.to_dict()
    data = json.dumps({key: v for key, v in d.items() if key not in REPLY_EXTRA})
    fields: dict[str, str] = {"data": data}
    fields.update({f"v:{u}": str(int(v)) for u, v in reply.votes.items()})
    if reply.platform_message_id:
        fields["msg"] = reply.platform_message_id
    if reply.counted is not None:
        fields["counted"] = repr(float(reply.counted))
    return fields, [json.dumps(c) for c in reply.corrections]


def reply_from_fields(h: dict[bytes, bytes], corrections: list[bytes]) -> Reply:
    d = json.loads(h[b"data"])
    d["votes"] = {k.decode()[2:]: int(v) for k, v in h.items() if k.startswith(b"v:") and v != b""}
    d["corrections"] = [json.loads(c) for c in corrections]
    d["platform_message_id"] = _s(h.get(b"msg"))
    d["counted"] = float(h[b"counted"]) if h.get(b"counted") else None
    return Reply.from_dict(d)


def _stream_id_key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def _event(event_id: str, f: dict[bytes, bytes]) -> FeedbackEvent:
    value = _s(f.get(b"value")) or None
    return FeedbackEvent(
        event_id=event_id,
        reply_id=_s(f[b"reply"]),
        user=_s(f[b"user"]),
        kind=_s(f.get(b"kind")) or VOTE,
        value=int(value) if value is not None else None,
        text=_s(f.get(b"text")),
        ts=float(f.get(b"ts") or 0.0),
    )


# What a member is told. These never name the server: chat platforms show them to
# everyone in the channel, so the address and user name stay in the operator's log.
UNREACHABLE = (
    "the bot's memory (its database) is not reachable right now, so nothing was saved; "
    "it keeps retrying, please try again in a moment"
)
REFUSED_LOGIN = (
    "the bot's memory (its database) refused the bot's login, so nothing was saved; "
    "the bot's operator needs to check its database settings"
)
TLS_FAILED = (
    "the bot's memory (its database) is not reachable right now (its secure connection "
    "failed), so nothing was saved; the bot's operator needs to check its database settings"
)
FULL = (
    "the bot's memory (its database) is full and refuses writes, so nothing was saved; "
    "the bot's operator needs to give it more room"
)
LOG_EVERY_S = 10.0  # one log line per kind of failure and interval, not one per call
# Connections per client. A call holds its connection through its retries (and a vote
# through WAITAOF), so during an outage calls pile up on the pool; a full pool makes new
# calls wait up to POOL_WAIT_S for a connection rather than fail at once. The wait is a
# little above the retry budget (~3 s), so a call queued behind a retried one still gets
# its turn when Redis returns; past it the call is refused as unreachable.
POOL_SIZE = 256
POOL_WAIT_S = 10.0


def _guarded(fn):
    """Turn connection-level failures into a StoreUnavailableError: a member's message,
    and a detail (server named, secrets masked) that goes to the log and to start-up."""

    @functools.wraps(fn)
    async def wrapper(self: RedisStore, *args, **kwargs):
        try:
            return await fn(self, *args, **kwargs)
        except AuthenticationError as exc:
            raise self._unavailable(
                REFUSED_LOGIN,
                f"the database (Redis at {self.where}) refused the credentials; "
                "check the user name and password in REDIS_URL",
                exc,
            ) from exc
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            tls = _tls_failure(exc)
            if tls:
                raise self._unavailable(
                    TLS_FAILED,
                    f"the TLS connection to the database (Redis at {self.where}) failed "
                    f"({tls}); {TLS_HINT}",
                    exc,
                ) from exc
            raise self._unavailable(
                UNREACHABLE,
                f"the database (Redis at {self.where}) is not reachable right now, so "
                "nothing was saved; gesal-bot keeps retrying, please try again in a moment",
                exc,
            ) from exc
        except ResponseError as exc:
            if str(exc).startswith("OOM"):
                raise self._unavailable(
                    FULL,
                    f"the database (Redis at {self.where}) is full and refuses writes "
                    "(maxmemory with noeviction); nothing was saved",
                    exc,
                ) from exc
            raise

    return wrapper


class RedisStore:
    """Async `Store` over one Redis server (or a cluster with hash-tag-aware routing).

    ``claim_idle_ms``: how long an event must sit unacknowledged with another consumer
    before `pending` takes it over (that consumer is presumed dead).
    ``max_replies``: per-channel reply history kept (oldest dropped first).
    ``fsync_votes``: wait for the AOF fsync before acknowledging a vote (see module doc).
    """

    def __init__(
        self,
        url: str,
        default_config: ChannelConfig | None = None,
        *,
        max_replies: int = DEFAULT_MAX_REPLIES,
        claim_idle_ms: int = DEFAULT_CLAIM_IDLE_MS,
        fsync_votes: bool = True,
        fsync_timeout_ms: int = 5000,
        retries: int = 6,
        socket_timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.where = redact_url(url)
        self._secrets = url_secrets(url)
        self._logged: dict[str, float] = {}  # detail -> when it was last logged
        self._default = default_config or ChannelConfig()
        self.max_replies = max_replies
        self.claim_idle_ms = claim_idle_ms
        self.fsync_votes = fsync_votes
        self.fsync_timeout_ms = fsync_timeout_ms
        self._retries = retries
        self._socket_timeout = socket_timeout
        self._client_obj: aioredis.Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aof: bool | None = None  # does the server have AOF on (WAITAOF usable)?

    # -- failures ------------------------------------------------------------------------
    def _unavailable(
        self, message: str, detail: str, cause: BaseException
    ) -> StoreUnavailableError:
        """The error to raise, after logging its detail with the client's own reason.

        ``detail`` names the server by `redact_url`, so it holds no secret. The reason
        (``Error 111 connecting to 127.0.0.1:6379``) is redis-py's text, which holds none
        either; being someone else's, it is scrubbed of the URL's secrets all the same.
        Logged at most once per `LOG_EVERY_S` for the same detail, so an outage is a
        line every few seconds rather than one per call.
        """
        now = time.monotonic()
        if now - self._logged.get(detail, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged[detail] = now
            reason = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
            log.warning("%s (%s)", detail, scrub(reason, self._secrets))
        return StoreUnavailableError(message, detail)

    # -- connection ----------------------------------------------------------------------
    def _make_client(self) -> aioredis.Redis:
        # Writes and reads are retried with backoff (~3 s in all by default) across
        # reconnects; a Redis restart that takes longer surfaces as StoreUnavailableError.
        # The retry settings are connection settings: the client retries with the policy
        # of the connection the command runs on.
        retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), self._retries)
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=POOL_SIZE,
            timeout=POOL_WAIT_S,
            retry=retry,
            retry_on_error=[RedisConnectionError, RedisTimeoutError, BusyLoadingError],
            socket_timeout=self._socket_timeout,
            socket_connect_timeout=5.0,
            health_check_interval=30,
            decode_responses=False,
        )
        # from_pool: the client owns the pool, so closing the client disconnects it.
        return aioredis.Redis.from_pool(pool)

    @property
    def _r(self) -> aioredis.Redis:
        """The client for the running event loop (a client's connections are loop-bound)."""
        loop = asyncio.get_running_loop()
        if self._client_obj is None or self._loop is not loop:
            self._client_obj, self._loop = self._make_client(), loop
        return self._client_obj

    @_guarded
    async def ping(self) -> None:
        await self._r.ping()

    async def close(self) -> None:
        if self._client_obj is not None and self._loop is asyncio.get_running_loop():
            await self._client_obj.aclose()
        self._client_obj = self._loop = None

    async def _eval(self, script: lua.Script, keys: list[str], args: list, durable=False):
        """Run a script by SHA (loading it after a server restart), optionally fsynced."""
        r = self._r
        if durable and self.fsync_votes and self._aof is None:
            info = await r.info("persistence")
            self._aof = bool(int(info.get("aof_enabled", 0)))
            if not self._aof:
                log.warning("Redis at %s has AOF off: votes are not fsynced", self.where)
        durable = durable and self.fsync_votes and self._aof
        for attempt in range(2):
            try:
                if not durable:
                    return await r.evalsha(script.sha, len(keys), *keys, *args)
                # WAITAOF waits for this connection's own writes, so both go in one
                # pipeline on one connection; a retried pipeline re-sends both.
                async with r.pipeline(transaction=False) as p:
                    p.evalsha(script.sha, len(keys), *keys, *args)
                    p.execute_command("WAITAOF", 1, 0, self.fsync_timeout_ms)
                    result, waited = await p.execute(raise_on_error=False)
                if isinstance(result, Exception):
                    raise result
                if isinstance(waited, Exception) or int(waited[0]) < 1:
                    raise StoreUnavailableError(
                        "the database could not confirm that this was saved to disk; "
                        "please try again"
                    )
                return result
            except NoScriptError:
                if attempt:
                    raise
                await r.script_load(script.source)

    async def _register(self, channel: str) -> None:
        # not memoised: another process may have reset the channel meanwhile
        await self._r.sadd(CHANNELS, channel)

    # -- graph ---------------------------------------------------------------------------
    @_guarded
    async def load_nodes(self, channel: str) -> list[Node]:
        k = Keys(channel)
        ids = [i.decode() for i in await self._r.zrange(k.nodes, 0, -1)]
        if not ids:
            return []
        async with self._r.pipeline(transaction=False) as p:
            for i in ids:
                p.hgetall(k.node(i))
            rows = await p.execute()
        return [node_from_fields(i, h) for i, h in zip(ids, rows, strict=True) if h]

    @_guarded
    async def node_heads(self, channel: str) -> list[NodeHead]:
        k = Keys(channel)
        flat = await self._eval(lua.NODE_HEADS, [k.nodes], [k.base])
        return [
            NodeHead(_s(flat[i]), _vec(flat[i + 1]), int(flat[i + 2]), float(flat[i + 3]))
            for i in range(0, len(flat), 4)
        ]

    @_guarded
    async def node_count(self, channel: str) -> int:
        return int(await self._r.zcard(Keys(channel).nodes))

    @_guarded
    async def reply_count(self, channel: str) -> int:
        return int(await self._r.zcard(Keys(channel).replies))

    @_guarded
    async def get_node(self, channel: str, node_id: str) -> Node | None:
        h = await self._r.hgetall(Keys(channel).node(node_id))
        return node_from_fields(node_id, h) if h else None

    @_guarded
    async def save_node(self, channel: str, node: Node) -> None:
        k = Keys(channel)
        await self._register(channel)
        flat = [x for kv in node_to_fields(node).items() for x in kv]
        await self._eval(
            lua.SAVE_NODE, [k.node(node.node_id), k.nodes, k.seq], [node.node_id, *flat]
        )

    @_guarded
    async def delete_node(self, channel: str, node_id: str) -> None:
        k = Keys(channel)
        async with self._r.pipeline(transaction=True) as p:
            p.delete(k.node(node_id))
            p.zrem(k.nodes, node_id)
            await p.execute()

    @_guarded
    async def set_neighbors(
        self, channel: str, node_id: str, neighbors: list[tuple[str, float]]
    ) -> None:
        payload = json.dumps([[n, float(s)] for n, s in neighbors])
        await self._eval(lua.SET_NEIGHBORS, [Keys(channel).node(node_id)], [payload])

    @_guarded
    async def observe(self, channel: str, node_id: str, embedding: np.ndarray) -> int:
        key = Keys(channel).node(node_id)
        try:
            return int(await self._eval(lua.OBSERVE, [key], [_vec_bytes(embedding)]))
        except ResponseError as exc:
            if str(exc).startswith("NONODE"):
                raise NodeGoneError(node_id) from None
            raise ValueError(str(exc)) from exc

    # -- replies and feedback ------------------------------------------------------------
    @_guarded
    async def put_reply(self, channel: str, reply: Reply, *, require_node: bool = False) -> None:
        k = Keys(channel)
        await self._register(channel)
        fields, corrections = reply_to_fields(reply)
        keys = [
            k.reply(reply.reply_id),
            k.corrections(reply.reply_id),
            k.replies,
            k.messages,
            k.node(reply.node_id),
            k.meta,
        ]
        args = [
            int(require_node),
            reply.node_id,
            reply.reply_id,
            repr(float(reply.created_at)),
            reply.platform_message_id or "",
            len(corrections),
            *corrections,
            *(x for kv in fields.items() for x in kv),
        ]
        try:
            size = int(await self._eval(lua.PUT_REPLY, keys, args))
        except ResponseError as exc:
            if str(exc).startswith("NONODE"):
                raise NodeGoneError(reply.node_id) from None
            raise
        if size > self.max_replies:
            await self._trim_replies(k, size - self.max_replies)

    async def _trim_replies(self, k: Keys, excess: int) -> None:
        """Retention: drop the oldest replies beyond ``max_replies``."""
        for rid in [i.decode() for i in await self._r.zrange(k.replies, 0, excess - 1)]:
            await self._drop_reply(k, rid)

    async def _drop_reply(self, k: Keys, reply_id: str) -> None:
        keys = [k.reply(reply_id), k.corrections(reply_id), k.replies, k.messages]
        await self._eval(lua.DROP_REPLY, keys, [reply_id])

    @_guarded
    async def drop_reply(self, channel: str, reply_id: str) -> None:
        await self._drop_reply(Keys(channel), reply_id)

    async def _get_replies(self, k: Keys, ids: list[str]) -> list[Reply | None]:
        async with self._r.pipeline(transaction=False) as p:
            for rid in ids:
                p.hgetall(k.reply(rid))
                p.lrange(k.corrections(rid), 0, -1)
            rows = await p.execute()
        return [
            reply_from_fields(h, c) if h else None
            for h, c in zip(rows[::2], rows[1::2], strict=True)
        ]

    @_guarded
    async def get_reply(self, channel: str, reply_id: str) -> Reply | None:
        return (await self._get_replies(Keys(channel), [reply_id]))[0]

    @_guarded
    async def list_replies(self, channel: str) -> list[Reply]:
        k = Keys(channel)
        ids = [i.decode() for i in await self._r.zrange(k.replies, 0, -1)]
        return [r for r in await self._get_replies(k, ids) if r is not None]

    @_guarded
    async def link_message(self, channel: str, reply_id: str, message_id: str) -> None:
        k = Keys(channel)
        try:
            await self._eval(
                lua.LINK_MESSAGE, [k.reply(reply_id), k.messages], [reply_id, message_id]
            )
        except ResponseError as exc:
            raise self._unknown(exc, reply_id) from exc

    @_guarded
    async def reply_for_message(self, channel: str, message_id: str) -> str | None:
        return _s(await self._r.hget(Keys(channel).messages, message_id))

    @staticmethod
    def _unknown(exc: ResponseError, reply_id: str) -> Exception:
        if str(exc).startswith("NOREPLY"):
            return UnknownReplyError(
                f"no reply {reply_id!r} in this channel (it may be older than the history kept)"
            )
        return exc

    @_guarded
    async def set_vote(self, channel: str, reply_id: str, user: str, value: int | None) -> str:
        k = Keys(channel)
        args = [user, "" if value is None else str(int(value)), reply_id, repr(time.time())]
        try:
            event_id = await self._eval(
                lua.SET_VOTE, [k.reply(reply_id), k.feedback], args, durable=True
            )
        except ResponseError as exc:
            raise self._unknown(exc, reply_id) from exc
        return _s(event_id)

    @_guarded
    async def add_correction(
        self, channel: str, reply_id: str, user: str, text: str, ids: list[int]
    ) -> str:
        k = Keys(channel)
        item = json.dumps({"user": user, "text": text, "ids": [int(i) for i in ids]})
        keys = [k.reply(reply_id), k.corrections(reply_id), k.feedback]
        try:
            event_id = await self._eval(
                lua.ADD_CORRECTION,
                keys,
                [user, item, reply_id, repr(time.time()), text],
                durable=True,
            )
        except ResponseError as exc:
            raise self._unknown(exc, reply_id) from exc
        return _s(event_id)

    async def _ensure_group(self, k: Keys) -> None:
        try:
            await self._r.xgroup_create(k.feedback, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    @_guarded
    async def pending(self, channel: str, consumer: str, count: int = 1000) -> list[FeedbackEvent]:
        """This consumer's unacked entries, a dead consumer's (XAUTOCLAIM), then new ones."""
        k = Keys(channel)
        r = self._r
        await self._ensure_group(k)
        got: dict[str, FeedbackEvent] = {}

        def take(entries) -> None:
            for raw_id, fields in entries or []:
                if fields:  # None: deleted while pending (cannot happen with our scripts)
                    eid = _s(raw_id)
                    got.setdefault(eid, _event(eid, fields))

        try:
            own = await r.xreadgroup(GROUP, consumer, {k.feedback: "0"}, count=count)
            for _, entries in own or []:
                take(entries)
            cursor = "0-0"
            while len(got) < count:
                cursor, claimed, *_ = await r.xautoclaim(
                    k.feedback, GROUP, consumer, self.claim_idle_ms, cursor, count=count
                )
                take(claimed)
                if _s(cursor) == "0-0":
                    break
            if len(got) < count:
                new = await r.xreadgroup(GROUP, consumer, {k.feedback: ">"}, count=count - len(got))
                for _, entries in new or []:
                    take(entries)
            await self._forget_idle_consumers(k, consumer)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # the channel was reset meanwhile
                return []
            raise
        events = sorted(got.values(), key=lambda e: _stream_id_key(e.event_id))
        return events[:count]

    async def _forget_idle_consumers(self, k: Keys, me: str) -> None:
        """Each trainer process is a new consumer; drop old ones that hold nothing."""
        for c in await self._r.xinfo_consumers(k.feedback, GROUP):
            name = _s(c["name"])
            if name != me and int(c["pending"]) == 0 and int(c["idle"]) > CONSUMER_GC_MS:
                await self._r.xgroup_delconsumer(k.feedback, GROUP, name)

    @_guarded
    async def pending_count(self, channel: str) -> int:
        # acknowledged entries are deleted in the commit script: what is left is pending
        return int(await self._r.xlen(Keys(channel).feedback))

    @_guarded
    async def commit(self, channel: str, updates: list[NodeUpdate], event_ids: list[str]) -> None:
        k = Keys(channel)
        counted = [(rid, r) for u in updates for rid, r in u.counted.items()]
        args: list = [GROUP, len(updates), len(event_ids), len(counted)]
        for u in updates:
            args += [
                int(u.expected_version),
                b"" if u.z is None else _vec_bytes(u.z),
                repr(float(u.baseline)),
                int(u.rated_delta),
                repr(float(u.reward_sum_delta)),
                json.dumps([float(x) for x in u.recent]),
                json.dumps(list(u.downvoted)),
                int(bool(u.updated)),
                int(bool(u.rolled_back)),
            ]
        args += list(event_ids)
        args += [repr(float(r)) for _, r in counted]
        keys = [k.feedback, k.meta, *(k.node(u.node_id) for u in updates)]
        keys += [k.reply(rid) for rid, _ in counted]
        try:
            await self._eval(lua.COMMIT, keys, args)
        except ResponseError as exc:
            if str(exc).startswith("CONFLICT"):
                raise ConflictError(str(exc).removeprefix("CONFLICT ")) from exc
            raise

    @asynccontextmanager
    async def trainer_lock(self, channel: str, ttl: float) -> AsyncIterator[bool]:
        """``SET NX PX`` with a random token; a heartbeat renews it every ``ttl / 3``."""
        key, token = Keys(channel).trainlock, uuid.uuid4().hex
        lease_ms = max(1, int(ttl * 1000))
        try:
            held = bool(await self._r.set(key, token, nx=True, px=lease_ms))
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise self._unavailable(
                UNREACHABLE, f"the database (Redis at {self.where}) is not reachable right now", exc
            ) from exc
        stop = asyncio.Event()
        heartbeat = asyncio.create_task(self._keep_lock(key, token, ttl, stop)) if held else None
        try:
            yield held
        finally:
            if heartbeat is not None:
                # the event ends the loop even when the cancellation lands inside a Redis
                # call that turns it into a connection error (and would renew forever)
                stop.set()
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat
            if held:
                try:
                    await self._eval(lua.RELEASE_LOCK, [key], [token])
                except (RedisConnectionError, RedisTimeoutError, OSError):
                    log.warning("could not release the trainer lock; it expires in %.0fs", ttl)

    async def _keep_lock(self, key: str, token: str, ttl: float, stop: asyncio.Event) -> None:
        """Renew the lease every ``ttl / 3`` while its holder runs (until ``stop``); stop
        once it is no longer ours."""
        lease_ms = max(1, int(ttl * 1000))
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), ttl / 3)
            if stop.is_set():
                return
            try:
                renewed = await self._eval(lua.RENEW_LOCK, [key], [token, lease_ms])
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if stop.is_set():
                    return
                log.warning("could not renew the trainer lock %s (%s); retrying", key, exc)
                continue
            if not renewed:
                log.warning(
                    "the trainer lock %s expired and was taken over; the commit's checks "
                    "still keep the data right",
                    key,
                )
                return

    # -- channels ------------------------------------------------------------------------
    @_guarded
    async def channels(self) -> list[str]:
        return sorted(c.decode() for c in await self._r.smembers(CHANNELS))

    @_guarded
    async def get_config(self, channel: str) -> ChannelConfig:
        raw = await self._r.get(Keys(channel).config)
        if raw is None:
            return ChannelConfig(**vars(self._default))
        return ChannelConfig.from_dict(json.loads(raw))

    @_guarded
    async def set_config(self, channel: str, config: ChannelConfig) -> None:
        await self._register(channel)
        await self._r.set(Keys(channel).config, json.dumps(vars(config.validate())))

    @_guarded
    async def reset(self, channel: str) -> None:
        """Delete the channel's data in one Lua script (see `lua.RESET`).

        The registry entry goes first: a write racing the reset re-adds it, so at worst
        the registry names an empty channel (harmless), never hides one with data.
        """
        k = Keys(channel)
        await self._r.srem(CHANNELS, channel)
        keys = [k.nodes, k.replies, k.messages, k.feedback, k.config, k.meta, k.seq]
        await self._eval(lua.RESET, keys, [k.base])

    @_guarded
    async def replace(
        self,
        channel: str,
        config: ChannelConfig,
        nodes: list[Node],
        replies: list[Reply],
        meta: dict,
    ) -> None:
        """Replace the channel's data with these records, atomically (an import).

        The records are written first under a staging prefix in the channel's slot
        (`Keys(channel, stage)`, each key with a TTL, so a process that dies while staging
        leaves nothing for long), then `lua.REPLACE` checks the stage whole, deletes the
        channel's data as `reset` does and renames the staged keys into place, in one
        step: readers see the old channel or the new one, never a mix, and a write racing
        the import lands wholly before it (and is gone) or wholly after it. A failure
        before that step leaves the channel as it was, and the stage is deleted.

        The registry entry is added before staging and again after the swap, so a
        channel with data is never left out of it (at worst, after a racing reset, it
        names an empty channel, as after `reset`).
        """
        k, stage = Keys(channel), Keys(channel, uuid.uuid4().hex)
        staged = [stage.node(n.node_id) for n in nodes]
        staged += [
            x for r in replies for x in (stage.reply(r.reply_id), stage.corrections(r.reply_id))
        ]
        staged += [*self._fixed(stage), f"{stage.base}:done"]
        await self._register(channel)
        try:
            await self._stage(stage, config, nodes, replies, meta)
            keys = [*self._fixed(k), *self._fixed(stage), f"{stage.base}:done"]
            try:
                await self._eval(lua.REPLACE, keys, [k.base, stage.base, len(nodes), len(replies)])
            except ResponseError as exc:
                if str(exc).startswith("STAGED"):
                    raise StoreUnavailableError(
                        "the import could not be written whole (the database lost part of "
                        "it), so nothing was changed; please try again"
                    ) from exc
                raise
        finally:
            with contextlib.suppress(RedisError, OSError):
                for i in range(0, len(staged), 1000):  # what is left: nothing after a swap
                    await self._r.unlink(*staged[i : i + 1000])
        await self._register(channel)
        if len(replies) > self.max_replies:
            await self._trim_replies(k, len(replies) - self.max_replies)

    @staticmethod
    def _fixed(k: Keys) -> list[str]:
        """A channel's (or a stage's) keys that are not per node or reply, in the order
        `lua.REPLACE` expects."""
        return [k.nodes, k.replies, k.messages, k.feedback, k.config, k.meta, k.seq]

    async def _stage(
        self, s: Keys, config: ChannelConfig, nodes: list[Node], replies: list[Reply], meta: dict
    ) -> None:
        """Write the records under the staging keys ``s``, each with `STAGE_TTL_S`, in
        pipelines of a bounded size. Every command is idempotent (a key is deleted before
        its list is pushed), so a pipeline the client retries after a dropped connection
        writes the same stage."""
        r, ttl = self._r, STAGE_TTL_S
        p = r.pipeline(transaction=False)

        async def flush(force: bool = False) -> None:
            nonlocal p
            if len(p) >= STAGE_BATCH or (force and len(p)):
                await p.execute()
                p = r.pipeline(transaction=False)

        p.set(s.config, json.dumps(vars(config.validate())), ex=ttl)
        for i, node in enumerate(nodes, 1):
            key = s.node(node.node_id)
            p.delete(key)
            p.hset(key, mapping=node_to_fields(node))
            p.expire(key, ttl)
            p.zadd(s.nodes, {node.node_id: i})  # creation order, as `save_node` gives it
            p.expire(s.nodes, ttl)
            await flush()
        if nodes:
            p.set(s.seq, len(nodes), ex=ttl)
        for reply in replies:
            fields, corrections = reply_to_fields(reply)
            key, corr = s.reply(reply.reply_id), s.corrections(reply.reply_id)
            p.delete(key, corr)
            p.hset(key, mapping=fields)
            p.expire(key, ttl)
            if corrections:
                p.rpush(corr, *corrections)
                p.expire(corr, ttl)
            p.zadd(s.replies, {reply.reply_id: repr(float(reply.created_at))})
            p.expire(s.replies, ttl)
            if reply.platform_message_id:
                p.hset(s.messages, reply.platform_message_id, reply.reply_id)
                p.expire(s.messages, ttl)
            await flush()
        if meta:
            p.hset(s.meta, mapping={key: json.dumps(v) for key, v in meta.items()})
            p.expire(s.meta, ttl)
        await flush(force=True)

    @_guarded
    async def meta(self, channel: str) -> dict:
        h = await self._r.hgetall(Keys(channel).meta)
        return {key.decode(): json.loads(v) for key, v in h.items()}

    @_guarded
    async def set_meta(self, channel: str, **values) -> None:
        if not values:
            return
        await self._register(channel)
        mapping = {key: json.dumps(v) for key, v in values.items()}
        await self._r.hset(Keys(channel).meta, mapping=mapping)
