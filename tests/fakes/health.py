"""/healthz served on loopback by the real aiohttp routes, for adapter tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from bot.health import Health, add_routes, bound_port, start_server
from bot.metrics import Metrics

Probe = Callable[[], Awaitable[tuple[int, dict]]]


@contextlib.asynccontextmanager
async def serve_healthz(health: Health) -> AsyncIterator[Probe]:
    """Yield ``get()`` -> (HTTP status, JSON body) of a real /healthz endpoint."""
    app = web.Application()
    add_routes(app, health, Metrics())
    runner = await start_server(app, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{bound_port(runner)}/healthz"
    async with aiohttp.ClientSession() as http:

        async def get() -> tuple[int, dict]:
            async with http.get(url) as resp:
                return resp.status, await resp.json()

        try:
            yield get
        finally:
            await runner.cleanup()
