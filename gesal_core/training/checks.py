"""The checks between a round's node updates and their commit.

The guard probes every updated node's new z at once (one batched probe run per try for
all nodes of the round, not one per node). A step it rejects is halved, up to
`GuardConfig.backtrack` times, along the same direction, and rolled back if no size
passes: a step that overshoots keeps the part of it that helps. Last, a z with a NaN or
an infinity is never written: its node would answer nothing but errors.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ..guard import Guard, GuardConfig
from ..records import NodeUpdate
from ..worker import ModelWorker
from .reports import NodeReport

log = logging.getLogger(__name__)

_Failed = list[tuple[NodeUpdate, NodeReport, str]]  # an update, its report, the reason


async def guard_updates(
    worker: ModelWorker,
    guard: Guard,
    cfg: GuardConfig,
    channel: str,
    updates: list[NodeUpdate],
    reports: list[NodeReport],
    before: dict[str, np.ndarray],
) -> None:
    """Check the updates that move a z; halve the ones that degrade and roll back the
    ones that still do. ``before`` holds each node's z before this round. Each report's
    time gets an equal share of the checks'."""
    todo = [(u, r) for u, r in zip(updates, reports, strict=True) if u.z is not None]
    if not todo or not cfg.enabled:
        return
    t0 = time.perf_counter()
    verdicts = await worker.run(guard.check_many, [(u.z, r.related) for u, r in todo])
    failed = [(u, r, v.reason) for (u, r), v in zip(todo, verdicts, strict=True) if not v.ok]
    failed = await _backtrack(worker, guard, cfg.backtrack, channel, failed, before)
    for update, report, reason in failed:
        update.z, update.updated, update.rolled_back = None, False, True
        report.status, report.reason = "rolled_back", reason
        log.warning("channel %s node %s: update rolled back: %s", channel, update.node_id, reason)
    share = (time.perf_counter() - t0) / len(todo)
    for _, report in todo:
        report.seconds += share
        report.guard_seconds += share


async def _backtrack(
    worker: ModelWorker,
    guard: Guard,
    tries: int,
    channel: str,
    failed: _Failed,
    before: dict[str, np.ndarray],
) -> _Failed:
    """Halve each failed step and check again, up to ``tries`` times; the ones that
    never pass are returned."""
    for halvings in range(1, tries + 1):
        if not failed:
            break
        for update, _, _ in failed:
            start = before[update.node_id]
            update.z = (start + (update.z - start) * 0.5).astype(np.float32)
        verdicts = await worker.run(guard.check_many, [(u.z, r.related) for u, r, _ in failed])
        still = []
        for (update, report, reason), verdict in zip(failed, verdicts, strict=True):
            if verdict.ok:
                report.reason = f"step halved {halvings}x; the whole step failed: {reason}"
                log.info("channel %s node %s: %s", channel, update.node_id, report.reason)
            else:
                still.append((update, report, reason))
        failed = still
    return failed


def refuse_non_finite(channel: str, updates: list[NodeUpdate], reports: list[NodeReport]) -> None:
    """Roll back every update whose z has a NaN or an infinity."""
    for update, report in zip(updates, reports, strict=True):
        if update.z is not None and not np.isfinite(update.z).all():
            update.z, update.updated, update.rolled_back = None, False, True
            report.status, report.reason = "rolled_back", "non-finite z"
            log.warning("channel %s node %s: non-finite z rolled back", channel, update.node_id)
