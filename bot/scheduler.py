"""When training happens: an APScheduler interval job, plus an early run once a
channel's round is full.

One job (``gesal-train``) does all training, with ``max_instances=1`` so runs never
overlap, ``coalesce=True`` so a backlog of missed runs collapses into one, and a misfire
grace time so a run delayed by a busy process still happens. The early trigger moves
that job's next run to *now*, which keeps those guarantees; an early run trains only the
channels whose round filled, and the interval run it stood in for is put back on the
clock afterwards, so a busy channel never delays the others' runs. A trigger that fires
while a run is in progress is remembered and starts one more run right after it.

What a run trains is the engine's decision, not the clock's: a channel trains once
``GESAL_TRAIN_ROUND`` of its replies have new feedback, or once its oldest new feedback
has waited ``GESAL_TRAIN_MAX_WAIT`` seconds (`RoundRule`, which the engine's trainer
asks too). An update moves z about as far whatever it learns from, so a quiet channel
trained on every vote or two drifts and loses what its answers said (docs/learning.md,
"Training rounds"); rounds of 8 are what the evaluation measures. The interval run is
therefore cheap when nothing is due: it reads the pending buffer and leaves it there.
The counts that start a run early are this process's own (replies it saw new feedback
on since the last run started, and when the first of them came, kept while their channel
waits); feedback received by another process, or before a restart, still waits in the
store and is trained by the interval job.

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
import time
from collections.abc import Callable
from datetime import datetime, timezone

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from gesal_core.engine import Engine, TrainReport
from gesal_core.training import RoundRule

from .settings import Settings

log = logging.getLogger(__name__)
JOB_ID = "gesal-train"


class TrainingScheduler:
    """Owns the training job. Hook `feedback_arrived` into ``ChatService.on_feedback``;
    ``on_report`` is called with every `TrainReport` a run gets (metrics)."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        on_report: Callable[[TrainReport], None] | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.on_report = on_report
        self.rounds = RoundRule(settings.gesal_train_round, settings.gesal_train_max_wait)
        self.scheduler = AsyncIOScheduler(timezone=timezone.utc)
        self.reports: list[TrainReport] = []  # recent runs, newest last (for stats / tests)
        self.runs = asyncio.Event()  # set after every completed run
        # channel -> the replies with feedback this process received since the last run
        # started (a round is per channel, so which node answered does not matter here)
        self.new_feedback: dict[str, set[str]] = {}
        self._first_feedback: dict[str, float] = {}  # channel -> when its count began
        self._due: set[str] = set()  # channels the next early run trains
        self._everything = False  # the next early run trains every channel
        self._interval_due: datetime | None = None  # the interval run an early run replaces
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
        """Called after each vote or correction (``ChatService.on_feedback``): train the
        channel at once when its round is full (`RoundRule`), as the engine counts it."""
        replies = self.new_feedback.setdefault(channel, set())
        if reply_id in replies:
            return  # a second vote on a reply does not make the round any fuller
        replies.add(reply_id)
        now = time.time()
        if self.rounds.is_full(len(replies), now - self._first_feedback.setdefault(channel, now)):
            why = f"{channel} has a round: {len(replies)} replies with new feedback"
            self.trigger_now(why, channel)

    def trigger_now(self, why: str = "requested", channel: str | None = None) -> None:
        """Start a run now: of ``channel``, or of every channel."""
        if self.scheduler.get_job(JOB_ID) is None:
            log.warning("early training requested (%s) but the scheduler is not running", why)
            return
        if channel is None:
            self._everything = True
        else:
            self._due.add(channel)
        self._fire(why)

    def _fire(self, why: str) -> None:
        """Move the job's next run to now (or after the run in progress)."""
        job = self.scheduler.get_job(JOB_ID)
        if job is None:
            return
        if self._running:  # max_instances=1 would drop it: run again when this one ends
            self._again = True
            return
        log.info("training early: %s", why)
        if self._interval_due is None:
            self._interval_due = job.next_run_time
        job.modify(next_run_time=datetime.now(timezone.utc))

    async def run_once(self) -> TrainReport | None:
        """One training pass: over the channels whose round filled when the job was
        moved forward for them, else over every channel with pending feedback. Never
        raises: a failed run (an unreachable store) is logged and the feedback stays
        pending for the next one; a failed channel is in the report's ``failed``.
        Returns the pass's last report (None when it failed)."""
        targets = self._targets()
        # what arrived until now is in the store's pending buffer, which this run reads;
        # what arrives during the run is counted afresh
        taken = list(self.new_feedback) if targets is None else targets
        counted = {ch: self.new_feedback.pop(ch) for ch in taken if ch in self.new_feedback}
        since = {ch: self._first_feedback.pop(ch) for ch in taken if ch in self._first_feedback}
        self._running, self._again = True, False
        reports = await self._train(targets)
        self._running = False
        self._keep_waiting(counted, since, reports)
        for report in reports:
            self._note(report)
        self.runs.set()
        loop = asyncio.get_running_loop()
        # after this job instance has been counted as finished (its done-callback is
        # queued when the coroutine returns), or max_instances=1 would skip the run
        if targets is not None:
            loop.call_soon(self._restore_interval)
        if self._again:
            loop.call_soon(self._fire, "a round filled up during the last run")
        return reports[-1] if reports and reports[-1] is not None else None

    def _targets(self) -> list[str] | None:
        """The channels this run trains; None: every channel. A run the early trigger
        started for some channels trains those; any other run (the interval's, a direct
        call, a trigger for everything) trains every channel."""
        due, everything = self._due, self._everything
        early = self._interval_due is not None
        self._due, self._everything = set(), False
        if not early or everything or not due:
            self._interval_due = None
            return None
        return sorted(due)

    async def _train(self, targets: list[str] | None) -> list[TrainReport | None]:
        """A report per `Engine.train` call; None last where a call raised."""
        reports: list[TrainReport | None] = []
        try:
            for channel in targets if targets is not None else [None]:
                reports.append(
                    await (self.engine.train(channel) if channel else self.engine.train())
                )
        except Exception:  # noqa: BLE001 - the scheduler must keep running
            log.exception("training run failed; pending feedback is kept for the next run")
            reports.append(None)
        return reports

    def _keep_waiting(
        self,
        counted: dict[str, set[str]],
        since: dict[str, float],
        reports: list[TrainReport | None],
    ) -> None:
        """A channel that waits keeps its count towards its round, and so does every
        channel of a failed run; only new feedback starts a run, so waiting never makes
        runs back to back."""
        done = [r for r in reports if r is not None]
        failed = len(done) < len(reports)
        waiting = {ch for r in done for ch in r.waiting}
        for channel, replies in counted.items():
            if failed or channel in waiting:
                self.new_feedback[channel] = replies | self.new_feedback.get(channel, set())
                first = since.get(channel, time.time())
                self._first_feedback[channel] = min(first, self._first_feedback.get(channel, first))

    def _note(self, report: TrainReport | None) -> None:
        """Log a report, keep it, and hand it to ``on_report``."""
        if report is None:
            return
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
            try:
                self.on_report(report)
            except Exception:  # noqa: BLE001 - metrics must not stop training
                log.exception("the training report's hook failed")

    def _restore_interval(self) -> None:
        """Put back the interval run an early run of some channels stood in for (at
        once if its time has passed meanwhile), so the other channels' runs keep their
        clock."""
        job = self.scheduler.get_job(JOB_ID)
        if self._interval_due is None or job is None or self._running:
            return
        if self._due or self._everything:  # another early run is wanted: it restores
            return
        due, self._interval_due = self._interval_due, None
        job.modify(next_run_time=max(due, datetime.now(timezone.utc)))


__all__ = ["JOB_ID", "TrainingScheduler"]
