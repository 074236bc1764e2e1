"""/healthz and /metrics: what an operator needs to trust a running bot.

``/healthz`` answers 200 only when every registered check passes (the store, the model
worker, the platform connections) and reports the age of the last training run, so a
container orchestrator restarts a wedged bot and a human sees *why* it is unhealthy.
Channels near a cap are listed under ``warnings``, which never fail it. ``/metrics`` is
the Prometheus text of `bot.metrics.Metrics`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gesal_core.errors import GesalError

from .metrics import Metrics

if TYPE_CHECKING:
    from gesal_core.engine import Engine

log = logging.getLogger(__name__)


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


def engine_checks(health: Health, engine: Engine, train_interval: float | None = None) -> None:
    """The standard checks for an engine: its store answers, its model worker lives.

    The store's check is named ``redis`` when the store is a Redis server every process
    shares, ``store`` otherwise."""

    async def store() -> Check:
        return Check(True, await engine.ping_store())

    async def worker() -> Check:
        alive = engine.worker.alive()
        return Check(alive, "running" if alive else "the model thread has stopped")

    def last_train() -> dict:
        last = engine.last_train
        age = None if last is None else round(time.time() - last, 1)
        return {"age_seconds": age, "interval_seconds": train_interval}

    async def capacity() -> dict[str, list[str]]:
        # counts only per channel, like the /metrics gauges
        near = {}
        for channel in await engine.channels():
            found = await engine.capacity(channel)
            if found:
                near[channel] = found
        return near

    health.add("redis" if engine.shared_url else "store", store)
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
    "HealthCheck",
    "add_routes",
    "bound_port",
    "connection_check",
    "engine_checks",
    "start_server",
]
