"""Replay sets: per node, its earlier liked answers and corrections, newest first, as
demonstrations that `LearningConfig.replay` re-learns alongside new feedback, so a
round of new votes does not wash out what the node learnt before.

Read from the reply history the store keeps anyway (its retention bounds it), so a
node's replay set needs no storage of its own.
"""

from __future__ import annotations

from collections import defaultdict

from ..learning import Sample
from ..records import ChannelConfig, ChannelMeta
from ..store import Store
from ..verdicts import reply_reward
from .samples import SampleRules


async def replay_sets(
    store: Store,
    channel: str,
    meta: ChannelMeta,
    cfg: ChannelConfig,
    exclude: set[str],
    limit: int,
    rules: SampleRules,
) -> dict[str, list[Sample]]:
    """Node -> at most ``limit`` demonstrations, newest first; {} when ``limit`` is 0.
    Replies of this round (``exclude``) are learnt from their fresh feedback instead."""
    if limit <= 0:
        return {}
    sets: dict[str, list[Sample]] = defaultdict(list)
    history = sorted(await store.list_replies(channel), key=lambda r: -r.created_at)
    for reply in history:
        if reply.reply_id in exclude:
            continue
        node_id = meta.owner(reply.node_id)
        if len(sets[node_id]) >= limit:
            continue
        for c in reversed(reply.corrections):
            sets[node_id].append(rules.correction(reply, c["ids"]))
        r = reply_reward(reply.votes, cfg)
        if r is not None and r > 0 and not reply.corrections and rules.learnable(reply, r):
            sets[node_id].append(Sample(reply.prompt_ids, reply.response_ids, demo=True))
        del sets[node_id][limit:]
    return sets
