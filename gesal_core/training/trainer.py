"""The training run: for each channel, under its trainer lock, the pending feedback is
collected into a round, every node with feedback is updated, the updates are checked
and committed atomically with acknowledging the feedback.

Channels fail one by one: a channel whose training raises is logged with its traceback,
reported, keeps its feedback pending, and is parked after `EngineConfig.park_after`
failures in a row (training/failures.py); the run goes on with the next channel. An
unreachable store or a stopped model worker ends the run instead: no channel could
train, and it is no channel's fault. Across processes the store's trainer lock saves
wasted work and the commit's version checks keep two trainers from applying one round
twice.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

import numpy as np

from ..config import EngineConfig
from ..guard import Guard
from ..learning import Sample, prior_baseline
from ..records import ChannelConfig, ChannelMeta, NodeUpdate
from ..store import ConflictError, Store, StoreUnavailableError
from ..svf import SVFModel
from ..verdicts import FreshDownvotes, reply_reward
from ..worker import ModelWorker
from .checks import guard_updates, refuse_non_finite
from .failures import record_failure, record_recovery
from .node_update import NodeLearner
from .replay import replay_sets
from .reports import NodeReport, TrainReport
from .rounds import FeedbackRound, RoundRule, collect_round
from .samples import SampleRules

log = logging.getLogger(__name__)


class Trainer:
    """Trains one channel or every channel from its pending feedback (`train`)."""

    def __init__(
        self,
        svf: SVFModel,
        pad_id: int,
        store: Store,
        worker: ModelWorker,
        guard: Guard,
        config: EngineConfig,
        downvotes: FreshDownvotes,
        clock: Callable[[], float],
        consumer: str,
    ) -> None:
        self.store, self.worker, self.guard, self.config = store, worker, guard, config
        self.rules = SampleRules(guard, config.learning.demo_focus)
        self.learner = NodeLearner(svf, pad_id, worker, config, self.rules)
        self.downvotes = downvotes
        # wall-clock seconds, the feedback events' own clock (their `ts`): how long a
        # channel's feedback has waited for its round
        self.clock = clock
        self.consumer = consumer  # this process's name in the store's feedback group
        self.rounds = RoundRule(config.train_round, config.train_max_wait)
        self._lock = asyncio.Lock()  # one run at a time in this process

    async def train(self, channel: str | None = None, *, force: bool = False) -> TrainReport:
        """A run over ``channel``, or every channel (see `Engine.train`)."""
        report = TrainReport()
        start = time.perf_counter()
        async with self._lock:
            channels = [channel] if channel else await self.store.channels()
            for ch in channels:
                await self._train_channel(ch, force, report, admin=force and channel is not None)
        report.seconds = time.perf_counter() - start
        return report

    async def _train_channel(
        self, channel: str, force: bool, report: TrainReport, admin: bool = False
    ) -> None:
        """Train one channel into ``report``; its failure is its own. A parked channel
        trains only for an ``admin``."""
        async with self.store.trainer_lock(channel, self.config.train_lock_ttl) as held:
            if not held:
                log.info("training %s: another trainer is at it; skipping this round", channel)
                return
            failures = 0
            try:  # a channel whose own meta cannot be read fails alone too
                meta = ChannelMeta.from_dict(await self.store.meta(channel))
                failures = meta.train_failures
                if meta.train_parked and not admin:
                    report.parked[channel] = meta.train_error or ""
                    log.debug("training %s: parked until an admin acts", channel)
                    return
                reports, n_events, waiting = await self.train_locked(channel, force)
            except StoreUnavailableError:
                raise
            except Exception as exc:  # noqa: BLE001 - one channel's failure stays its own
                if not self.worker.alive():
                    raise
                park_after = self.config.park_after
                await record_failure(self.store, channel, exc, failures + 1, park_after, report)
                return
            if reports or n_events:
                report.channels[channel] = reports
                report.events += n_events
            if waiting:
                report.waiting[channel] = waiting
            if failures and (n_events or admin):
                await record_recovery(self.store, channel, failures)

    async def train_locked(
        self, channel: str, force: bool
    ) -> tuple[list[NodeReport], int, dict[str, int]]:
        """One channel's run with its trainer lock held: the node reports, the events
        acknowledged, and node -> replies with feedback while its round fills (``force``:
        train whatever is pending)."""
        events = await self.store.pending(channel, self.consumer)
        if not events:
            return [], 0, {}
        meta = ChannelMeta.from_dict(await self.store.meta(channel))
        fb = await collect_round(self.store, channel, events, meta)
        waiting: dict[str, int] = {}
        replies = fb.replies
        if fb.live and not force and not self.rounds.is_full(replies, self.clock() - fb.oldest):
            waiting = fb.hold()
            # debug: the interval run says this every few minutes in a quiet channel
            log.debug("channel %s: %d of a round of %d", channel, replies, self.rounds.size)
        acked = fb.acked()
        if not acked:
            return [], 0, waiting
        reports = await self._learn(channel, meta, fb, acked)
        await self.store.set_meta(channel, last_train=time.time())
        return reports, len(acked), waiting

    async def _learn(
        self, channel: str, meta: ChannelMeta, fb: FeedbackRound, acked: list[str]
    ) -> list[NodeReport]:
        """Update every node of the round, check the updates, and commit them with
        acknowledging ``acked``."""
        cfg = await self.store.get_config(channel)
        rewards = _rewards(channel, fb, cfg)
        prior = prior_baseline(list(rewards.values()), cfg)
        limit = self.config.learning.replay
        replay = await replay_sets(
            self.store, channel, meta, cfg, fb.reply_ids(), limit, self.rules
        )
        unlearnt = {
            rid
            for rs in fb.by_node.values()
            for rid, reply in rs.items()
            if rid in rewards and not self.rules.learnable(reply, rewards[rid])
        }
        if unlearnt:
            log.info("channel %s: 👍 on degenerate replies not learnt: %s", channel, unlearnt)
        updates, reports, before = await self._update_nodes(
            channel, fb, rewards, prior, replay, unlearnt
        )
        kept = [r for r in reports if r.status != "orphaned"]
        await guard_updates(
            self.worker, self.guard, self.config.guard, channel, updates, kept, before
        )
        refuse_non_finite(channel, updates, kept)
        await self._commit(channel, updates, reports, acked)
        return reports

    async def _update_nodes(
        self,
        channel: str,
        fb: FeedbackRound,
        rewards: dict[str, float],
        prior: float,
        replay: dict[str, list[Sample]],
        unlearnt: set[str],
    ) -> tuple[list[NodeUpdate], list[NodeReport], dict[str, np.ndarray]]:
        """Each node's update and report, in the round's order, and each node's z before
        the round (what the guard's backtracking halves towards). A node deleted since its
        feedback was given is reported orphaned."""
        updates, reports, before = [], [], {}
        for node_id, replies in fb.by_node.items():
            t0 = time.perf_counter()
            node = await self.store.get_node(channel, node_id)
            if node is None:
                reports.append(NodeReport(node_id, "orphaned", "node no longer exists"))
                continue
            before[node_id] = node.z
            update, rep = await self.learner.update(
                channel,
                node,
                list(replies.values()),
                list(fb.corrections.get(node_id, {}).values()),
                rewards,
                prior,
                replay.get(node_id, []),
                unlearnt,
            )
            rep.seconds = time.perf_counter() - t0
            rep.related = [r.prompt_text for r in replies.values()]
            updates.append(update)
            reports.append(rep)
        return updates, reports, before

    async def _commit(
        self, channel: str, updates: list[NodeUpdate], reports: list[NodeReport], acked: list[str]
    ) -> None:
        """Write the updates and acknowledge the events in one atomic step. A conflict
        (another trainer, a reset) changes nothing: the events stay pending."""
        try:
            await self.store.commit(channel, updates, acked)
        except ConflictError as exc:
            log.warning("training %s: %s; the events stay pending for the next run", channel, exc)
            for r in reports:
                r.status, r.reason = "conflict", str(exc)
        else:  # the nodes' own lists hold these now
            self.downvotes.settled(channel, updates)


def _rewards(channel: str, fb: FeedbackRound, cfg: ChannelConfig) -> dict[str, float]:
    """Reply id -> verdict, for the round's replies that have votes. A stored config
    validates on read; leaving non-finite verdicts out keeps a NaN out of every baseline."""
    rewards = {
        rid: r
        for rs in fb.by_node.values()
        for rid, reply in rs.items()
        if (r := reply_reward(reply.votes, cfg)) is not None
    }
    bad = [rid for rid, r in rewards.items() if not math.isfinite(r)]
    if bad:
        log.warning("channel %s: non-finite rewards of replies %s not learnt", channel, bad)
        for rid in bad:
            del rewards[rid]
    return rewards
