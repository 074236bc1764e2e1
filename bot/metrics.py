"""The bot's Prometheus metrics, on a private registry.

A private registry, so that several engines in one process (tests, the playground)
never share counters by accident. The chat service counts replies, votes, corrections
and undelivered answers as it handles them; training reports arrive through
`Metrics.observe_train` (the scheduler's ``on_report`` and an admin's "train now"); the
per-channel gauges are read when /metrics is scraped (`Metrics.refresh`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from gesal_core.engine import TrainReport

VOTE_LABELS = {1: "up", -1: "down", None: "retract"}


class ChannelCounts(Protocol):
    """The per-channel counts the gauges show (`gesal_core.engine.Engine` has them)."""

    async def channels(self) -> list[str]: ...

    async def pending(self, channel: str) -> int: ...

    async def node_count(self, channel: str) -> int: ...


class Metrics:
    """The bot's Prometheus metrics, on their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.reply_seconds = Histogram(
            "gesal_reply_seconds",
            "Time from mention to reply text (routing + generation)",
            ["platform"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "gesal_generation_tokens_per_second",
            "Generated tokens per second of reply time",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
            registry=r,
        )
        self.replies = Counter("gesal_replies", "Replies given", ["platform"], registry=r)
        self.reply_errors = Counter(
            "gesal_reply_errors", "Mentions that failed to get a reply", ["platform"], registry=r
        )
        self.undelivered = Counter(
            "gesal_undelivered",
            "Answers and admin command results the platform refused to post, by kind",
            ["platform", "kind"],
            registry=r,
        )
        self.votes = Counter("gesal_votes", "Votes recorded, by value", ["value"], registry=r)
        self.corrections = Counter("gesal_corrections", "Corrections recorded", registry=r)
        self.pending = Gauge(
            "gesal_pending_feedback", "Feedback events not yet trained on", ["channel"], registry=r
        )
        self.nodes = Gauge("gesal_nodes", "Graph nodes per channel", ["channel"], registry=r)
        self.train_seconds = Histogram(
            "gesal_update_seconds",
            "Duration of one training run",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.node_updates = Counter(
            "gesal_node_updates", "Node training outcomes, by status", ["status"], registry=r
        )
        self.rollbacks = Counter(
            "gesal_rollbacks", "Node updates rejected and rolled back", registry=r
        )
        self.last_train = Gauge(
            "gesal_last_train_timestamp_seconds", "Unix time of the last training run", registry=r
        )
        # Labelled by channel: which community's training broke is what an operator needs
        # to act on. The label adds no series the per-channel gauges above do not already
        # have, and only for channels that failed (a parked one stops counting).
        self.train_failures = Counter(
            "gesal_train_failures",
            "Channel training runs that raised (the channel's feedback stays pending)",
            ["channel"],
            registry=r,
        )

    def observe_reply(self, platform: str, seconds: float, tokens: int) -> None:
        self.replies.labels(platform).inc()
        self.reply_seconds.labels(platform).observe(seconds)
        if seconds > 0 and tokens > 0:
            self.tokens_per_second.observe(tokens / seconds)

    def observe_vote(self, value: int | None) -> None:
        self.votes.labels(VOTE_LABELS[None if value is None else (1 if value > 0 else -1)]).inc()

    def observe_train(self, report: TrainReport) -> None:
        """Record a `TrainReport` from `Engine.train`."""
        self.train_seconds.observe(report.seconds)
        self.last_train.set(time.time())
        for reports in report.channels.values():
            for r in reports:
                self.node_updates.labels(r.status).inc()
        self.rollbacks.inc(report.count("rolled_back"))
        for channel in report.failed:
            self.train_failures.labels(channel).inc()

    async def refresh(self, engine: ChannelCounts) -> None:
        """Set the per-channel gauges (called when /metrics is scraped).

        Two counts per channel (on Redis an XLEN and a ZCARD), never a node record: a
        scrape costs the same whatever the channels' nodes hold."""
        for channel in await engine.channels():
            self.pending.labels(channel).set(await engine.pending(channel))
            self.nodes.labels(channel).set(await engine.node_count(channel))

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["ChannelCounts", "Metrics", "VOTE_LABELS"]
