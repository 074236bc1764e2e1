"""When training happens: an APScheduler interval job, plus an early run once a
channel's round is full.

One job (``gesal-train``) does all training, with ``max_instances=1`` so runs never
overlap, ``coalesce=True`` so a backlog of missed runs collapses into one, and a misfire
grace time so a run delayed by a busy process still happens. The early trigger simply
moves that job's next run to *now*, which keeps those guarantees; a trigger that fires
while a run is in progress is remembered and starts one more run right after it.

What a run trains is the engine's decision, not the clock's: a channel trains once
``GESAL_TRAIN_ROUND`` of its replies have new feedback, or once its oldest new feedback
has waited ``GESAL_TRAIN_MAX_WAIT`` seconds (`EngineConfig.train_round`). An update
moves z about as far whatever it learns from, so a quiet channel trained on every vote
or two drifts and loses what its answers said (docs/learning.md, "Training rounds");
rounds of 8 are what the evaluation measures. The interval run is
therefore cheap when nothing is due: it reads the pending buffer and leaves it there.
The counts that start a run early are this process's own (replies it saw new feedback
on since the last run started, kept while their channel waits); feedback received by
another process, or before a restart, still waits in the store and is trained by the
interval job.

The job is a coroutine on the event loop, but it only awaits: `Engine.train` does the
maths on the model's worker thread. Across processes, the engine takes the store's
per-channel trainer lock (a Redis ``SET NX PX`` lock) and commits with a version
compare-and-set, so two deployments sharing one Redis never apply the same feedback
twice.

One channel cannot stop the others: `Engine.train` isolates each channel's failure (its
feedback stays pending, and after ``EngineConfig.park_after`` failures in a row the
channel is parked until an admin acts), so a run always reaches every channel. A failed
or parked channel's counts towards an early run are dropped: the interval job retries a
failed one, and votes in a parked one must not start run after run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timezone

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from gesal_core.engine import Engine, TrainReport

from .settings import Settings

log = logging.getLogger(__name__)
JOB_ID = "gesal-train"


class TrainingScheduler:
    """Owns the training job. Hook `feedback_arrived` into ``ChatService.on_feedback``."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        on_report: Callable[[TrainReport], None] | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.on_report = on_report  # e.g. the metrics' observe_train
        self.scheduler = AsyncIOScheduler(timezone=timezone.utc)
        self.reports: list[TrainReport] = []  # recent runs, newest last (for stats / tests)
        self.runs = asyncio.Event()  # set after every completed run
        # channel -> the replies with feedback this process received since the last run
        # started (a round is per channel, so which node answered does not matter here)
        self.new_feedback: dict[str, set[str]] = {}
        self._running = False
        self._again = False

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
            "training checked every %.0fs, and at once when a channel has new feedback on "
            "%d replies; feedback that has waited %.0fs trains without a full round",
            self.settings.gesal_train_interval,
            self.settings.gesal_train_round,
            self.settings.gesal_train_max_wait,
        )

    def shutdown(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    async def feedback_arrived(self, channel: str, reply_id: str) -> None:
        """Called after each vote or correction (``ChatService.on_feedback``): train at
        once when ``GESAL_TRAIN_ROUND`` of the channel's replies have new feedback, which
        is when the engine counts the channel's round as full."""
        replies = self.new_feedback.setdefault(channel, set())
        if reply_id in replies:
            return  # a second vote on a reply does not make the round any fuller
        replies.add(reply_id)
        if len(replies) >= self.settings.gesal_train_round:
            self.trigger_now(f"{channel} has a round: {len(replies)} replies with new feedback")

    def trigger_now(self, why: str = "requested") -> None:
        job = self.scheduler.get_job(JOB_ID)
        if job is None:
            log.warning("early training requested (%s) but the scheduler is not running", why)
            return
        if self._running:  # max_instances=1 would drop it: run again when this one ends
            self._again = True
            return
        log.info("training early: %s", why)
        job.modify(next_run_time=datetime.now(timezone.utc))

    async def run_once(self) -> TrainReport | None:
        """One training pass over every channel with pending feedback. Never raises:
        a failed run (an unreachable store) is logged and the feedback stays pending for
        the next one; a failed channel is in the report's ``failed``."""
        # what arrived until now is in the store's pending buffer, which this run reads;
        # what arrives during the run is counted afresh
        counted, self.new_feedback = self.new_feedback, {}
        self._running, self._again = True, False
        try:
            report = await self.engine.train()
        except Exception:  # noqa: BLE001 - the scheduler must keep running
            log.exception("training run failed; pending feedback is kept for the next run")
            report = None
        finally:
            self._running = False
        # a channel that waits keeps its count towards its round; only new feedback
        # starts a run, so waiting never makes runs back to back
        waiting = report.waiting if report is not None else None
        for channel, replies in counted.items():
            if waiting is None or channel in waiting:
                self.new_feedback[channel] = replies | self.new_feedback.get(channel, set())
        if report is not None:
            if report.failed:
                log.warning(
                    "training failed in %d channel(s), the others trained: %s",
                    len(report.failed),
                    "; ".join(f"{ch}: {err}" for ch, err in sorted(report.failed.items())),
                )
            if report.events or report.waiting:
                log.info("training: %s", report.summary())
            self.reports = [*self.reports[-19:], report]
            if self.on_report is not None:
                self.on_report(report)
        self.runs.set()
        if self._again:
            # after this job instance has been counted as finished (its done-callback is
            # queued when the coroutine returns), or max_instances=1 would skip the run
            asyncio.get_running_loop().call_soon(
                self.trigger_now, "a round filled up during the last run"
            )
        return report


__all__ = ["JOB_ID", "TrainingScheduler"]
