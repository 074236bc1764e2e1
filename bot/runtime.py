"""Build everything `gesal-bot run` needs, once, for every platform it serves.

Store, model, SVD factors, engine, metrics and the chat service are the same object
whether the mentions come from Discord, Slack or the playground; only the adapters
differ. Each expensive step runs through `bot.boot.run_step`, so the terminal and the
playground page both show where start-up is.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gesal_core.engine import Engine
from gesal_core.store import Store

from .boot import BootProgress, in_thread, run_step
from .health import Health, engine_checks
from .metrics import Metrics
from .scheduler import JOB_ID, TrainingScheduler
from .service import ChatService
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    service: ChatService
    metrics: Metrics
    health: Health
    store_kind: str
    scheduler: TrainingScheduler | None = None
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def close(self) -> None:
        """Stop the scheduler, the model worker and the store (embedded Redis last)."""
        for close in reversed(self.closers):
            try:
                await close()
            except Exception:  # noqa: BLE001 - keep closing the rest
                log.exception("error while shutting down")


async def open_store(settings: Settings) -> tuple[Store, Callable[[], Awaitable[None]]]:
    """The store and its closer. REDIS_URL set: that server (``memory://``: this
    process's memory); unset: the embedded one, with GESAL_REDIS_MAXMEMORY."""
    from gesal_core.store import open_store as open_url

    url = settings.redis_url.get_secret_value() if settings.redis_url else ""
    return await open_url(
        url, settings.channel_defaults(), embedded_maxmemory=settings.gesal_redis_maxmemory
    )


async def open_store_step(settings: Settings, progress: BootProgress):
    """`open_store` as a boot step, with the kind of store as its detail."""

    async def step(s):
        url = settings.redis_url.get_secret_value() if settings.redis_url else ""
        store, close = await open_store(settings)
        if url == "memory://":
            s.detail = "in-memory (nothing survives a restart)"
        elif url:
            s.detail = "REDIS_URL"
        else:
            s.detail = "embedded redis-server"
        return store, close, s.detail

    return await run_step(progress, "Redis store", step)


async def load_engine_steps(settings: Settings, store, progress: BootProgress) -> Engine:
    """Model (converted once from the bundled GGUF), SVD (cached), then the engine."""
    from gesal_core.model import load_model
    from gesal_core.svf import SVFConfig, SVFModel

    async def model_step(s):
        lm = await in_thread(
            lambda: load_model(
                settings.gesal_model, device=settings.gesal_device, dtype=settings.gesal_dtype
            )
        )
        s.detail = f"{lm.name} on {lm.device}"
        return lm

    lm = await run_step(progress, "Model (first run converts the GGUF)", model_step)

    async def svd_step(s):
        svf = await in_thread(SVFModel, lm.model, lm.name, SVFConfig())
        s.detail = f"{len(svf.layers)} matrices, {svf.z_size} z components"
        return svf

    svf = await run_step(progress, "SVD of the adapted weights (cached later)", svd_step)
    config = settings.engine_config()
    await compile_updates_step(svf, config.learning, lm.tokenizer.pad_token_id or 0, progress)
    return Engine(svf, lm.tokenizer, store, config, model_name=lm.name)


async def compile_updates_step(svf, learning, pad_id: int, progress: BootProgress) -> None:
    """With ``GESAL_COMPILE_UPDATES``, compile the update passes now, before the bot
    answers anyone: the first training update would otherwise stall on it for minutes
    (`gesal_core.svf.compiled`). A compiler that fails leaves updates eager, and says so."""
    if not learning.compile:
        return
    from gesal_core.learning import warm_up_compiled

    async def step(s):
        took = await in_thread(warm_up_compiled, svf, learning, pad_id)
        s.detail = svf.compiled_passes.outcome(took)

    await run_step(progress, "Compiling the update passes (minutes, once)", step)


async def build_runtime(
    settings: Settings,
    progress: BootProgress,
    metrics: Metrics | None = None,
    health: Health | None = None,
    engine_factory: Callable[[Any], Awaitable[Engine]] | None = None,
) -> Runtime:
    """Open the store, load the engine and wire the service, metrics and health checks.

    ``engine_factory(store)`` replaces the model steps (tests pass the tiny model).
    """
    metrics = metrics or Metrics()
    health = health or Health()
    store, close_store, store_kind = await open_store_step(settings, progress)
    closers: list[Callable[[], Awaitable[None]]] = [close_store]
    try:
        if engine_factory is None:
            raw = await load_engine_steps(settings, store, progress)
        else:
            raw = await engine_factory(store)
    except BaseException:
        await close_store()
        raise

    async def close_engine() -> None:
        raw.close()

    closers.append(close_engine)
    engine_checks(health, raw, settings.gesal_train_interval)
    service = ChatService(raw, settings, metrics=metrics)
    closers.append(service.close)
    runtime = Runtime(settings, raw, service, metrics, health, store_kind, closers=closers)
    runtime.scheduler = _start_scheduler(runtime)
    return runtime


def _start_scheduler(runtime: Runtime) -> TrainingScheduler:
    """The training scheduler, wired to the service's feedback hook and to the metrics."""
    sched = TrainingScheduler(
        runtime.engine, runtime.settings, on_report=runtime.metrics.observe_train
    )
    sched.start()
    runtime.service.on_feedback = sched.feedback_arrived

    async def close_sched() -> None:
        sched.shutdown()

    runtime.closers.append(close_sched)
    return sched


def schedule_status(sched: TrainingScheduler | None) -> dict:
    """Next scheduled training run (Unix time) for status pages; {} without a scheduler."""
    if sched is None:
        return {}
    job = sched.scheduler.get_job(JOB_ID) if sched.scheduler.running else None
    when = getattr(job, "next_run_time", None)
    return {"next_run": when.timestamp() if when else None, "running": job is not None}


__all__ = [
    "Runtime",
    "build_runtime",
    "compile_updates_step",
    "load_engine_steps",
    "open_store",
    "open_store_step",
    "schedule_status",
]
