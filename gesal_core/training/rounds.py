"""Training rounds: when a channel's waiting feedback trains, and that feedback grouped
by the node that learns it.

An update moves z about as far whatever it learns from, so a channel trained on every
vote or two drifts and loses what its answers said; it trains once `RoundRule.size` of
its replies have new feedback, or once the oldest of it has waited `RoundRule.max_wait`
seconds (docs/learning.md, "Training rounds"). The trainer and the bot's scheduler both
ask `RoundRule.is_full`, so the early run the scheduler starts is the run the trainer
agrees to.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from ..records import CORRECTION, ChannelMeta, FeedbackEvent, Reply
from ..store import Store


@dataclass(frozen=True)
class RoundRule:
    """A channel trains once ``size`` of its replies have new feedback, or once its
    oldest new feedback has waited ``max_wait`` seconds."""

    size: int
    max_wait: float

    def is_full(self, replies: int, waited: float) -> bool:
        """Whether feedback on ``replies`` replies, the oldest of it ``waited`` seconds
        old, makes a round."""
        return replies >= self.size or waited >= self.max_wait


@dataclass
class FeedbackRound:
    """A channel's pending feedback, grouped by the node that learns it now (a folded
    node's feedback goes to its target, `ChannelMeta.owner`)."""

    # node -> reply id -> reply, for every reply with feedback
    by_node: dict[str, dict[str, Reply]] = field(default_factory=lambda: defaultdict(dict))
    # node -> (reply, user) -> the newest correction text of this round
    corrections: dict[str, dict[tuple[str, str], tuple[Reply, str]]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    live: list[FeedbackEvent] = field(default_factory=list)  # events on kept replies
    orphans: list[str] = field(default_factory=list)  # events whose reply is gone

    @property
    def replies(self) -> int:
        """Replies with new feedback: what fills a round."""
        return sum(len(rs) for rs in self.by_node.values())

    @property
    def oldest(self) -> float:
        """When the oldest live event was given (wall clock)."""
        return min(e.ts for e in self.live)

    def reply_ids(self) -> set[str]:
        return {rid for rs in self.by_node.values() for rid in rs}

    def hold(self) -> dict[str, int]:
        """Keep the live feedback pending for a later round: it leaves this one, and
        node -> replies with feedback is returned for the report. Orphans still go."""
        waiting = {node_id: len(rs) for node_id, rs in self.by_node.items()}
        self.by_node.clear()
        self.corrections.clear()
        self.live = []
        return waiting

    def acked(self) -> list[str]:
        """The events a commit of this round acknowledges."""
        return self.orphans + [e.event_id for e in self.live]


async def collect_round(
    store: Store, channel: str, events: list[FeedbackEvent], meta: ChannelMeta
) -> FeedbackRound:
    """Group pending ``events`` by node, reading each reply once (not once per event: a
    waiting channel is read again every run). An event whose reply the store no longer
    keeps is an orphan: acknowledged, never learnt."""
    fb = FeedbackRound()
    read: dict[str, Reply | None] = {}
    for ev in events:
        if ev.reply_id not in read:
            read[ev.reply_id] = await store.get_reply(channel, ev.reply_id)
        reply = read[ev.reply_id]
        if reply is None:
            fb.orphans.append(ev.event_id)
            continue
        fb.live.append(ev)
        node_id = meta.owner(reply.node_id)
        if ev.kind == CORRECTION:
            fb.corrections[node_id][(reply.reply_id, ev.user)] = (reply, ev.text or "")
        fb.by_node[node_id][reply.reply_id] = reply
    return fb
