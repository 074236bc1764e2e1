"""`gesal-bot run`: start the HTTP side first, then the engine, then the platforms.

Order matters for people: the playground page (or /healthz) is reachable within a
second, and shows start-up progress while the model loads; a platform adapter starts
only when the engine can answer, so nobody's first mention times out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gesal_core.errors import GesalError

from .boot import BootProgress
from .health import Health, add_routes, bound_port, start_server
from .metrics import Metrics
from .ops_settings import OpsSettings
from .runtime import Runtime, build_runtime
from .settings import Settings

log = logging.getLogger(__name__)
PLATFORMS = ("discord", "slack", "local")


def choose_platforms(requested: str | None, settings: Settings) -> list[str]:
    """Which adapters to run. Default: every platform with tokens, else the playground.

    Asking for a platform without its tokens is an error that says which variable is
    missing, not a silent fallback.
    """
    configured = settings.platforms()
    if requested in (None, ""):
        return configured or ["local"]
    if requested == "all":
        return [*configured, "local"]
    if requested not in PLATFORMS:
        raise GesalError(f"unknown platform {requested!r}; use discord, slack, local or all")
    if requested == "discord" and "discord" not in configured:
        raise GesalError("--platform discord needs DISCORD_TOKEN (in the environment or .env)")
    if requested == "slack" and "slack" not in configured:
        raise GesalError("--platform slack needs SLACK_BOT_TOKEN (and SLACK_APP_TOKEN or ...)")
    return [requested]


def _adapter(platform: str) -> Callable[[Any, Settings], Awaitable[None]]:
    if platform == "discord":
        from .discord_app import run_discord

        return run_discord
    from .slack_app import run_slack  # type: ignore[import-not-found]

    return run_slack


async def serve(
    settings: Settings,
    ops: OpsSettings,
    platforms: list[str],
    engine_factory=None,
    ready: Callable[[Runtime, str | None], Awaitable[None]] | None = None,
) -> None:
    """Run until cancelled (Ctrl-C / SIGTERM). ``ready(runtime, url)`` is awaited once
    everything answers (tests use it); ``url`` is the playground's, when it runs."""
    progress, metrics, health = BootProgress(), Metrics(), Health()
    runners: list[web.AppRunner] = []
    playground = None
    url = None
    runtime: Runtime | None = None
    tasks: list[asyncio.Task] = []
    engine_ref: dict[str, Any] = {}

    async def refresh() -> None:
        if "engine" in engine_ref:
            await metrics.refresh(engine_ref["engine"])

    try:
        if "local" in platforms:
            from .playground.guard import check_bind
            from .playground.server import Playground, create_app

            host, port = settings.gesal_playground_host, settings.gesal_playground_port
            # every playground request acts as admin: another address only on purpose
            warning = check_bind(host, settings.gesal_playground_public)
            if warning:
                print(warning, file=sys.stderr, flush=True)
            playground = Playground(progress, metrics=metrics, health=health)
            runner = await start_server(create_app(playground, refresh, host=host), host, port)
            runners.append(runner)
            url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{bound_port(runner)}/"
            print(f"gesal-bot playground: {url}  (starting; the page shows progress)", flush=True)
        if platforms != ["local"]:
            app = web.Application()
            add_routes(app, health, metrics, refresh)
            runner = await start_server(app, ops.gesal_http_host, ops.gesal_http_port)
            runners.append(runner)
            print(
                f"health and metrics: http://{ops.gesal_http_host}:{bound_port(runner)}/healthz",
                flush=True,
            )
        print("starting the engine:", file=sys.stderr, flush=True)
        runtime = await build_runtime(settings, progress, metrics, health, engine_factory)
        engine_ref["engine"] = runtime.engine
        if playground is not None:
            await playground.attach(
                runtime.service,
                runtime.scheduler,
                model=runtime.engine.model_name,
                store=runtime.store_kind,
            )
        for platform in platforms:
            if platform != "local":
                tasks.append(
                    asyncio.create_task(
                        _adapter(platform)(runtime.service, settings, health=runtime.health),
                        name=platform,
                    )
                )
        print(f"ready: {', '.join(platforms)}", flush=True)
        if ready is not None:
            await ready(runtime, url)
        if tasks:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        else:
            await asyncio.Event().wait()
    except BaseException:
        progress.error = progress.error or "stopped"
        raise
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        if runtime is not None:
            await runtime.close()
        for runner in runners:
            await runner.cleanup()


def run_forever(coro_factory: Callable[[], Awaitable[None]]) -> None:
    """asyncio.run with SIGTERM treated like Ctrl-C, so systemd/docker stop cleanly."""

    async def main() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, task.cancel)  # type: ignore[union-attr]
        try:
            await coro_factory()
        except asyncio.CancelledError:
            raise KeyboardInterrupt from None

    asyncio.run(main())


__all__ = ["choose_platforms", "run_forever", "serve"]
