"""When training happens: an APScheduler interval job, plus an early run once a channel
has enough pending feedback.

One job (``gesal-train``) does all training, with ``max_instances=1`` so runs never
overlap, ``coalesce=True`` so a backlog of missed runs collapses into one, and a misfire
grace time so a run delayed by a busy process still happens. The early trigger simply
moves that job's next run to *now*, which keeps those guarantees.

The job is a coroutine on the event loop, but it only awaits: `Engine.train` does the
maths on the model's worker thread. Across processes, the engine takes the store's
per-channel trainer lock (a Redis ``SET NX PX`` lock) and commits with a version
compare-and-set, so two deployments sharing one Redis never apply the same feedback
twice.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from gesal_core.engine import Engine, TrainReport

from .settings import Settings

log = logging.getLogger(__name__)
JOB_ID = "gesal-train"


class TrainingScheduler:
    """Owns the training job. Hook `feedback_arrived` into ``ChatService.on_feedback``."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.scheduler = AsyncIOScheduler(timezone=timezone.utc)
        self.reports: list[TrainReport] = []  # recent runs, newest last (for stats / tests)
        self.runs = asyncio.Event()  # set after every completed run

    def start(self) -> None:
        """Add the interval job and start the scheduler (needs a running event loop)."""
        self.scheduler.add_job(
            self.run_once,
            "interval",
            seconds=self.settings.gesal_train_interval,
            id=JOB_ID,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=self.settings.gesal_train_misfire_grace,
            replace_existing=True,
        )
        self.scheduler.start()
        log.info(
            "training every %.0fs, or early at %d pending feedback events in a channel",
            self.settings.gesal_train_interval,
            self.settings.gesal_train_early_votes,
        )

    def shutdown(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    async def feedback_arrived(self, channel: str) -> None:
        """Called after each vote or correction: train early when enough has piled up."""
        pending = await self.engine.pending(channel)
        if pending >= self.settings.gesal_train_early_votes:
            self.trigger_now(f"{channel} has {pending} pending feedback events")

    def trigger_now(self, why: str = "requested") -> None:
        job = self.scheduler.get_job(JOB_ID)
        if job is None:
            log.warning("early training requested (%s) but the scheduler is not running", why)
            return
        log.info("training early: %s", why)
        job.modify(next_run_time=datetime.now(timezone.utc))

    async def run_once(self) -> TrainReport | None:
        """One training pass over every channel with pending feedback. Never raises:
        a failed run is logged and the feedback stays pending for the next one."""
        try:
            report = await self.engine.train()
        except Exception:  # noqa: BLE001 - the scheduler must keep running
            log.exception("training run failed; pending feedback is kept for the next run")
            self.runs.set()
            return None
        if report.events:
            log.info("training: %s", report.summary())
        self.reports = [*self.reports[-19:], report]
        self.runs.set()
        return report


__all__ = ["JOB_ID", "TrainingScheduler"]
