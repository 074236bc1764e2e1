"""Health, metrics and structured logs: what an operator needs to trust a running bot.

- ``/healthz`` answers 200 only when every registered check passes (Redis, the model
  worker, the platform connections) and reports the age of the last training run, so a
  container orchestrator restarts a wedged bot and a human sees *why* it is unhealthy.
  Channels near a cap are listed under ``warnings``, which never fail it.
- ``/metrics`` is Prometheus text from `prometheus_client`, on a private registry so
  that several engines (tests, the playground) never share counters by accident.
- Logs carry a request id per mention (a `ContextVar`, so it follows the asyncio task
  through the service, the engine and back), can be JSON for log shippers, and pass
  through a filter that masks every configured secret.

`MeteredEngine` wraps an `Engine` and records the metrics as calls go through it; the
chat service and all three adapters use it unchanged, so nothing is counted twice and
no adapter has to remember to count.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)


class OpsSettings(BaseSettings):
    """Where /healthz and /metrics listen and how logs look.

    Separate from `bot.settings.Settings` (what the bot does) because these are the
    operator's knobs: the container sets them, the bot's behaviour never reads them.
    """

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", case_sensitive=False, extra="ignore"
    )

    gesal_http_host: str = Field(
        "127.0.0.1",
        description="address /healthz and /metrics listen on (``0.0.0.0`` in containers)",
    )
    gesal_http_port: int = Field(
        8080, ge=0, le=65535, description="port of /healthz and /metrics (0: any free port)"
    )
    gesal_log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="log level: ``debug``, ``info``, ``warning`` or ``error``"
    )
    gesal_log_format: Literal["text", "json"] = Field(
        "text",
        description="``text`` for people, ``json`` (one object per line) for log shippers",
    )


def load_ops_settings(env_file: str | None = ".env", **overrides: object) -> OpsSettings:
    """Read and validate `OpsSettings`; errors name the variable, never its value."""
    from .settings import SettingsError

    try:
        return OpsSettings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors(include_input=False)
        )
        raise SettingsError(f"invalid configuration: {problems}") from None


# -- request ids ---------------------------------------------------------------------------
_request_id: ContextVar[str | None] = ContextVar("gesal_request_id", default=None)


def current_request_id() -> str | None:
    return _request_id.get()


@contextlib.contextmanager
def request_context(request_id: str | None = None) -> Iterator[str]:
    """Tag every log line inside the block (and tasks it starts) with one request id."""
    rid = request_id or uuid.uuid4().hex[:12]
    token = _request_id.set(rid)
    try:
        yield rid
    finally:
        _request_id.reset(token)


# -- logging -------------------------------------------------------------------------------
_STD_ATTRS = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {
    "message",
    "asctime",
    "request_id",
}


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id.get() or "-"
        return True


class RedactFilter(logging.Filter):
    """Masks secret values wherever they would appear in a formatted log line.

    Secrets are `SecretStr` in the settings, but a token can still reach a log line by
    way of a third-party library's exception text; this is the last line of defence.
    """

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        redacted = message
        for s in self.secrets:
            redacted = redacted.replace(s, "***")
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            for s in self.secrets:
                text = text.replace(s, "***")
            record.exc_info, record.exc_text = None, text
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, request_id, msg, and any extras."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", None) or _request_id.get() or "-",
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                out[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def configure_logging(
    level: int | str = logging.INFO, fmt: str = "text", secrets: list[str] | None = None
) -> logging.Handler:
    """Install one stderr handler on the root logger (replacing earlier ones).

    ``fmt`` is ``text`` (people) or ``json`` (log shippers). Returns the handler.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be text or json, not {fmt!r}")
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RedactFilter(secrets or []))
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


# -- metrics -------------------------------------------------------------------------------
VOTE_LABELS = {1: "up", -1: "down", None: "retract"}


class Metrics:
    """The bot's Prometheus metrics, on their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.reply_seconds = Histogram(
            "gesal_reply_seconds",
            "Time from mention to reply text (routing + generation)",
            ["platform"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "gesal_generation_tokens_per_second",
            "Generated tokens per second of reply time",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
            registry=r,
        )
        self.replies = Counter("gesal_replies", "Replies given", ["platform"], registry=r)
        self.reply_errors = Counter(
            "gesal_reply_errors", "Mentions that failed to get a reply", ["platform"], registry=r
        )
        self.undelivered = Counter(
            "gesal_undelivered",
            "Answers and admin command results the platform refused to post, by kind",
            ["platform", "kind"],
            registry=r,
        )
        self.votes = Counter("gesal_votes", "Votes recorded, by value", ["value"], registry=r)
        self.corrections = Counter("gesal_corrections", "Corrections recorded", registry=r)
        self.pending = Gauge(
            "gesal_pending_feedback", "Feedback events not yet trained on", ["channel"], registry=r
        )
        self.nodes = Gauge("gesal_nodes", "Graph nodes per channel", ["channel"], registry=r)
        self.train_seconds = Histogram(
            "gesal_update_seconds",
            "Duration of one training run",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.node_updates = Counter(
            "gesal_node_updates", "Node training outcomes, by status", ["status"], registry=r
        )
        self.rollbacks = Counter(
            "gesal_rollbacks", "Node updates rejected and rolled back", registry=r
        )
        self.last_train = Gauge(
            "gesal_last_train_timestamp_seconds", "Unix time of the last training run", registry=r
        )
        # Labelled by channel: which community's training broke is what an operator needs
        # to act on. The label adds no series the per-channel gauges above do not already
        # have, and only for channels that failed (a parked one stops counting).
        self.train_failures = Counter(
            "gesal_train_failures",
            "Channel training runs that raised (the channel's feedback stays pending)",
            ["channel"],
            registry=r,
        )

    def observe_reply(self, platform: str, seconds: float, tokens: int) -> None:
        self.replies.labels(platform).inc()
        self.reply_seconds.labels(platform).observe(seconds)
        if seconds > 0 and tokens > 0:
            self.tokens_per_second.observe(tokens / seconds)

    def observe_vote(self, value: int | None) -> None:
        self.votes.labels(VOTE_LABELS[None if value is None else (1 if value > 0 else -1)]).inc()

    def observe_train(self, report) -> None:
        """Record a `TrainReport` from `Engine.train`."""
        self.train_seconds.observe(report.seconds)
        self.last_train.set(time.time())
        for reports in report.channels.values():
            for r in reports:
                self.node_updates.labels(r.status).inc()
        self.rollbacks.inc(report.count("rolled_back"))
        for channel in report.failed:
            self.train_failures.labels(channel).inc()

    async def refresh(self, engine) -> None:
        """Set the per-channel gauges from the store (called when /metrics is scraped).

        Two counts per channel (on Redis an XLEN and a ZCARD), never a node record: a
        scrape costs the same whatever the channels' nodes hold."""
        for channel in await engine.store.channels():
            self.pending.labels(channel).set(await engine.store.pending_count(channel))
            self.nodes.labels(channel).set(await engine.store.node_count(channel))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MeteredEngine:
    """An `Engine` that records metrics and logs on the way through.

    Everything not overridden here is delegated untouched, so it is a drop-in engine
    for the chat service.
    """

    def __init__(self, engine, metrics: Metrics, platform_of: Callable[[str], str] | None = None):
        self._engine = engine
        self.metrics = metrics
        # channel keys look like "discord:guild:channel"; the prefix names the platform
        self._platform_of = platform_of or (lambda ch: ch.split(":", 1)[0] if ":" in ch else "-")

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    @property
    def engine(self):
        return self._engine

    def _count_tokens(self, text: str) -> int:
        try:
            return len(self._engine.tokenizer(text, add_special_tokens=False)["input_ids"])
        except Exception:  # noqa: BLE001 - a metric must never break a reply
            return 0

    async def respond(self, channel: str, messages: list[dict], **kw):
        if current_request_id() is None:  # an adapter that did not tag the mention
            with request_context():
                return await self.respond(channel, messages, **kw)
        platform = self._platform_of(channel)
        try:
            out = await self._engine.respond(channel, messages, **kw)
        except Exception:
            self.metrics.reply_errors.labels(platform).inc()
            raise
        tokens = self._count_tokens(out.text)
        self.metrics.observe_reply(platform, out.seconds, tokens)
        log.info(
            "replied in %s: node %s%s, %d tokens in %.2fs",
            channel,
            out.node_id,
            " (new)" if out.new_node else "",
            tokens,
            out.seconds,
            extra={"channel": channel, "node": out.node_id, "reply_id": out.reply_id},
        )
        return out

    async def vote(self, channel: str, reply_id: str, user: str, value: int | None):
        result = await self._engine.vote(channel, reply_id, user, value)
        self.metrics.observe_vote(value)
        return result

    async def correct(self, channel: str, reply_id: str, user: str, text: str):
        result = await self._engine.correct(channel, reply_id, user, text)
        self.metrics.corrections.inc()
        return result

    async def train(self, channel: str | None = None, *, force: bool = False):
        report = await self._engine.train(channel, force=force)
        self.metrics.observe_train(report)
        log.info("training: %s", report.summary())
        return report


# -- health --------------------------------------------------------------------------------
@dataclass
class Check:
    ok: bool
    detail: str = ""


HealthCheck = Callable[[], Awaitable[Check]]


class Health:
    """Named async checks; the bot is healthy when all of them pass within a timeout."""

    def __init__(self, timeout: float = 3.0) -> None:
        self.timeout = timeout
        self.checks: dict[str, HealthCheck] = {}
        self.info: dict[str, Callable[[], object]] = {}
        self.warnings: dict[str, Callable[[], Awaitable[object]]] = {}

    def add(self, name: str, check: HealthCheck) -> None:
        self.checks[name] = check

    def add_info(self, name: str, value: Callable[[], object]) -> None:
        """Reported in /healthz but never makes it fail (e.g. age of the last training)."""
        self.info[name] = value

    def add_warning(self, name: str, warning: Callable[[], Awaitable[object]]) -> None:
        """Reported under ``warnings`` in /healthz when it answers something non-empty,
        and never makes /healthz fail: a channel near a cap is capacity, not ill health."""
        self.warnings[name] = warning

    async def _warn(self, warning: Callable[[], Awaitable[object]]) -> object:
        try:
            return await asyncio.wait_for(warning(), self.timeout)
        except asyncio.TimeoutError:
            return f"unavailable: no answer within {self.timeout:g}s"
        except Exception as exc:  # noqa: BLE001 - a warning that fails is reported, not raised
            return f"unavailable: {type(exc).__name__}"

    async def _run(self, check: HealthCheck) -> Check:
        try:
            return await asyncio.wait_for(check(), self.timeout)
        except asyncio.TimeoutError:
            return Check(False, f"no answer within {self.timeout:g}s")
        except Exception as exc:  # noqa: BLE001 - a failing check is a result, not a crash
            return Check(False, f"{type(exc).__name__}: {exc}")

    async def report(self) -> tuple[bool, dict]:
        names = list(self.checks)
        results = await asyncio.gather(*(self._run(self.checks[n]) for n in names))
        checks = {n: {"ok": r.ok, "detail": r.detail} for n, r in zip(names, results, strict=True)}
        body: dict = {"ok": all(r.ok for r in results), "checks": checks}
        wnames = list(self.warnings)
        found = await asyncio.gather(*(self._warn(self.warnings[n]) for n in wnames))
        warnings = {n: w for n, w in zip(wnames, found, strict=True) if w}
        if warnings:
            body["warnings"] = warnings
        for name, fn in self.info.items():
            try:
                body[name] = fn()
            except Exception as exc:  # noqa: BLE001
                body[name] = f"unavailable: {exc}"
        return body["ok"], body


def engine_checks(health: Health, engine, train_interval: float | None = None) -> None:
    """The standard checks for an engine: its store answers, its model worker lives."""

    async def store() -> Check:
        ping = getattr(engine.store, "ping", None)
        if ping is None:
            await engine.store.channels()
            return Check(True, type(engine.store).__name__)
        await ping()
        return Check(True, type(engine.store).__name__)

    async def worker() -> Check:
        alive = engine.worker.alive()
        return Check(alive, "running" if alive else "the model thread has stopped")

    def last_train() -> dict:
        last = engine.last_train
        age = None if last is None else round(time.time() - last, 1)
        return {"age_seconds": age, "interval_seconds": train_interval}

    async def capacity() -> dict[str, list[str]]:
        # counts only per channel (`channel_capacity`), like the /metrics gauges
        from gesal_core.engine import channel_capacity

        near = {}
        for channel in await engine.store.channels():
            found = await channel_capacity(engine.store, channel)
            if found:
                near[channel] = found
        return near

    health.add("redis" if hasattr(engine.store, "ping") else "store", store)
    health.add("model_worker", worker)
    health.add_info("last_training", last_train)
    health.add_warning("near_caps", capacity)


ConnectionProbe = Callable[[], "bool | Check | Awaitable[bool | Check]"]


def connection_check(name: str, probe: ConnectionProbe) -> tuple[str, HealthCheck]:
    """A ``platform_<name>`` check from a probe of the client's own state.

    The probe may be sync or async and answer a bool or a `Check` (with a detail such
    as the gateway latency). Adapters register one per configured platform, before
    connecting, so /healthz is 503 until the platform is really connected.
    """

    async def check() -> Check:
        result = probe()
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, Check):
            return result
        ok = bool(result)
        return Check(ok, "connected" if ok else "not connected")

    return f"platform_{name}", check


# -- HTTP ----------------------------------------------------------------------------------
def add_routes(
    app: web.Application,
    health: Health,
    metrics: Metrics,
    refresh: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Mount ``GET /healthz`` and ``GET /metrics`` on an aiohttp application."""

    async def healthz(_request: web.Request) -> web.Response:
        ok, body = await health.report()
        return web.json_response(body, status=200 if ok else 503)

    async def metrics_view(_request: web.Request) -> web.Response:
        if refresh is not None:
            try:
                await refresh()
            except Exception as exc:  # noqa: BLE001 - stale gauges beat a failed scrape
                log.warning("could not refresh metrics: %s", exc)
        resp = web.Response(body=metrics.render())
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_view)


async def start_server(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start ``app`` on host:port (port 0 picks a free one); stop it with ``runner.cleanup()``."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        from gesal_core.errors import GesalError

        raise GesalError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The TCP port a started runner listens on (useful after asking for port 0)."""
    for site in runner.sites:
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            return server.sockets[0].getsockname()[1]
    raise RuntimeError("the server is not listening")


__all__ = [
    "Check",
    "Health",
    "JsonFormatter",
    "MeteredEngine",
    "Metrics",
    "OpsSettings",
    "RedactFilter",
    "add_routes",
    "bound_port",
    "configure_logging",
    "connection_check",
    "current_request_id",
    "engine_checks",
    "load_ops_settings",
    "request_context",
    "start_server",
]
