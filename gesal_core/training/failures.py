"""A channel's failed training runs: counted in a row in its meta (the store's, so every
trainer process and `gesal-bot stats` see them), shown to admins as one sentence, and
parked after `EngineConfig.park_after` of them, so one channel's bad data costs a few
logged tracebacks, not one per run."""

from __future__ import annotations

import logging
import re

from ..store import Store
from .reports import TrainReport

log = logging.getLogger(__name__)

# a URL, or anything with user@host in it, may carry a user name, a password or an address
_ADDRESS = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+|\S+@\S+", re.IGNORECASE)


def error_sentence(exc: BaseException) -> str:
    """A failure in one line for admin stats: the exception's type and the first line of
    its message, addresses removed, cut at 200 characters. The traceback is logged."""
    lines = str(exc).strip().splitlines()
    words = _ADDRESS.sub("<address>", lines[0].strip()) if lines else ""
    if len(words) > 200:
        words = words[:199] + "…"
    return f"{type(exc).__name__}: {words}" if words else type(exc).__name__


async def record_failure(
    store: Store, channel: str, exc: Exception, failures: int, park_after: int, report: TrainReport
) -> None:
    """Log, report and record a channel's failed run, its ``failures``-th in a row; park
    it once that reaches ``park_after``."""
    error = error_sentence(exc)
    parked = failures >= park_after
    report.failed[channel] = error
    if parked:
        report.parked[channel] = error
    log.error(
        "training %s failed (%d run(s) in a row)%s; its feedback stays pending: %s",
        channel,
        failures,
        ", parked until an admin trains, resets or imports it" if parked else "",
        error,
        exc_info=exc,
        extra={"channel": channel},
    )
    try:
        await store.set_meta(
            channel, train_failures=failures, train_parked=parked, train_error=error
        )
    except Exception:  # noqa: BLE001 - the next run counts again
        log.exception("training %s: the failure could not be recorded", channel)


async def record_recovery(store: Store, channel: str, failures: int) -> None:
    """A channel that failed ``failures`` runs in a row trained again: clear its count."""
    await store.set_meta(channel, train_failures=0, train_parked=False, train_error=None)
    log.info("training %s works again after %d failed run(s)", channel, failures)
