"""What admins and health checks read about a channel: its counts, votes, training
health (`channel_stats`), and the caps it is near (`capacity_warnings`).

Store reads only, no model: `gesal-bot stats` and /healthz answer without loading one.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from .records import ChannelMeta, Node
from .store import Store

# Capacity warnings (admin stats, /healthz): a channel is flagged before a cap bites.
# At NEAR_CAP of `max_nodes` a new topic soon folds the least used node into another; at
# NEAR_CAP of the store's reply retention the oldest replies (and their votes) soon drop.
# Feedback streams have no cap, so PENDING_WARN pending events is the threshold: a parked
# or failing channel's stream grows with every vote until an admin acts.
NEAR_CAP = 0.9
PENDING_WARN = 1000


def capacity_warnings(
    *,
    nodes: int,
    max_nodes: int,
    pending: int,
    replies: int | None = None,
    max_replies: int | None = None,
) -> list[str]:
    """One sentence per cap a channel is near (`NEAR_CAP`, `PENDING_WARN`); [] if none.

    ``max_replies`` is None for a store without reply retention (`MemoryStore`), and
    ``replies`` None where the caller counts no replies (/healthz reads counts only)."""
    out = []
    if nodes >= NEAR_CAP * max_nodes:
        out.append(
            f"{nodes} of {max_nodes} nodes: new topics fold the least used node into another"
        )
    if replies is not None and max_replies and replies >= NEAR_CAP * max_replies:
        out.append(
            f"{replies} of {max_replies} replies kept: the oldest replies and their votes drop"
        )
    if pending >= PENDING_WARN:
        out.append(
            f"{pending} feedback events pending (warning at {PENDING_WARN}): the stream grows "
            "until training drains it"
        )
    return out


async def channel_capacity(store: Store, channel: str) -> list[str]:
    """`capacity_warnings` from counts only (on Redis two ZCARDs, an XLEN and the config):
    no node or reply record is read, so /healthz stays cheap whatever channels hold."""
    cfg = await store.get_config(channel)
    return capacity_warnings(
        nodes=await store.node_count(channel),
        max_nodes=cfg.max_nodes,
        pending=await store.pending_count(channel),
        replies=await store.reply_count(channel),
        max_replies=getattr(store, "max_replies", None),  # the store's retention
    )


async def channel_stats(store: Store, channel: str) -> dict:
    """A channel's nodes, votes, rewards and updates: store reads only, no model needed
    (`gesal-bot stats` answers without loading one)."""
    nodes = await store.load_nodes(channel)
    replies = await store.list_replies(channel)
    meta = ChannelMeta.from_dict(await store.meta(channel))
    config = await store.get_config(channel)
    pending = await store.pending_count(channel)
    ups = sum(v > 0 for r in replies for v in r.votes.values())
    downs = sum(v < 0 for r in replies for v in r.votes.values())
    return {
        "channel": channel,
        "nodes": len(nodes),
        "prompts": sum(n.count for n in nodes),
        "replies": len(replies),
        "votes_up": ups,
        "votes_down": downs,
        "corrections": sum(len(r.corrections) for r in replies),
        "pending_feedback": pending,
        "updates": sum(n.updates for n in nodes),
        "rollbacks": sum(n.rollbacks for n in nodes),
        "mean_reward": (sum(n.reward_sum for n in nodes) / max(1, sum(n.rated for n in nodes))),
        "last_update": meta.last_train,
        # training failures in a row; parked: scheduled runs skip the channel until an
        # admin trains, resets or imports it (`EngineConfig.park_after`)
        "train_failures": meta.train_failures,
        "train_parked": meta.train_parked,
        "train_error": meta.train_error if meta.train_failures else None,
        "config": asdict(config),
        # caps this channel is near, one sentence each (`capacity_warnings`)
        "near_caps": capacity_warnings(
            nodes=len(nodes),
            max_nodes=config.max_nodes,
            pending=pending,
            replies=len(replies),
            max_replies=getattr(store, "max_replies", None),  # the store's retention
        ),
        "node_list": [_node_row(n) for n in nodes],
    }


def _node_row(n: Node) -> dict:
    """One node's line of the stats."""
    return {
        "id": n.node_id,
        "count": n.count,
        "version": n.version,
        "mean_reward": n.mean_reward,
        "rated": n.rated,
        # how far its adapter has moved from the base model (LearningConfig.max_drift)
        "drift": round(float(np.linalg.norm(n.z - 1)), 4),
        "edges": n.neighbors,
    }
