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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gesal_core.errors import GesalError

from .boot import BootProgress
from .health import Health, add_routes, bound_port, start_server
from .metrics import Metrics
from .ops_settings import OpsSettings
from .runtime import Runtime, build_runtime
from .settings import Settings

if TYPE_CHECKING:
    from .playground.server import Playground

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
    serving = _Serving()
    try:
        playground, url = None, None
        if "local" in platforms:
            playground, url = await _start_playground(settings, serving)
        if platforms != ["local"]:
            await _start_health_server(ops, serving)
        runtime = await _start_engine(settings, serving, engine_factory, playground)
        _start_platforms(platforms, settings, runtime, serving.tasks)
        print(f"ready: {', '.join(platforms)}", flush=True)
        if ready is not None:
            await ready(runtime, url)
        await _wait(serving.tasks)
    except BaseException:
        serving.progress.error = serving.progress.error or "stopped"
        raise
    finally:
        await serving.stop()


@dataclass
class _Serving:
    """What the steps of `serve` share: the start-up state the HTTP side shows, and
    everything started so far, so that `stop` stops exactly that whichever step failed."""

    progress: BootProgress = field(default_factory=BootProgress)
    metrics: Metrics = field(default_factory=Metrics)
    health: Health = field(default_factory=Health)
    runners: list[web.AppRunner] = field(default_factory=list)
    runtime: Runtime | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)

    async def refresh(self) -> None:
        """Reads the engine's figures into the metrics before they are served; nothing
        to read while the engine loads."""
        if self.runtime is not None:
            await self.metrics.refresh(self.runtime.engine)

    async def stop(self) -> None:
        """The platforms first (they call the engine), then the engine and store, then
        the HTTP servers."""
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(BaseException):
                await t
        if self.runtime is not None:
            await self.runtime.close()
        for runner in self.runners:
            await runner.cleanup()


async def _start_playground(settings: Settings, serving: _Serving) -> tuple[Playground, str]:
    """The playground page, up before the model loads so that it shows the progress;
    returns it and its address."""
    from .playground.guard import check_bind
    from .playground.server import Playground, create_app

    host, port = settings.gesal_playground_host, settings.gesal_playground_port
    # every playground request acts as admin: another address only on purpose
    warning = check_bind(host, settings.gesal_playground_public)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    playground = Playground(serving.progress, metrics=serving.metrics, health=serving.health)
    runner = await start_server(create_app(playground, serving.refresh, host=host), host, port)
    serving.runners.append(runner)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{bound_port(runner)}/"
    print(f"gesal-bot playground: {url}  (starting; the page shows progress)", flush=True)
    return playground, url


async def _start_health_server(ops: OpsSettings, serving: _Serving) -> None:
    """/healthz and /metrics for a deployment's probes and scrapers (the playground
    serves its own)."""
    app = web.Application()
    add_routes(app, serving.health, serving.metrics, serving.refresh)
    runner = await start_server(app, ops.gesal_http_host, ops.gesal_http_port)
    serving.runners.append(runner)
    print(
        f"health and metrics: http://{ops.gesal_http_host}:{bound_port(runner)}/healthz",
        flush=True,
    )


async def _start_engine(
    settings: Settings, serving: _Serving, engine_factory, playground: Playground | None
) -> Runtime:
    """Loads the engine (the long step: the page shows its progress meanwhile), then
    gives the playground the service it answers with."""
    print("starting the engine:", file=sys.stderr, flush=True)
    runtime = await build_runtime(
        settings, serving.progress, serving.metrics, serving.health, engine_factory
    )
    serving.runtime = runtime
    if playground is not None:
        await playground.attach(
            runtime.service,
            runtime.scheduler,
            model=runtime.engine.model_name,
            store=runtime.store_kind,
        )
    return runtime


def _start_platforms(
    platforms: list[str], settings: Settings, runtime: Runtime, tasks: list[asyncio.Task]
) -> None:
    """One task per chat platform, added to ``tasks``; the playground is served already."""
    for platform in platforms:
        if platform != "local":
            tasks.append(
                asyncio.create_task(
                    _adapter(platform)(runtime.service, settings, health=runtime.health),
                    name=platform,
                )
            )


async def _wait(tasks: list[asyncio.Task]) -> None:
    """Until cancelled, or until a platform fails: its error stops the bot."""
    if not tasks:
        await asyncio.Event().wait()
        return
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    for t in done:
        if t.exception() is not None:
            raise t.exception()  # type: ignore[misc]


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
