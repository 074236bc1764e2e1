"""In-process `Store`: for tests, the evaluation harness and quick experiments.

It keeps the same semantics as the Redis store (copies in and out, compare-and-set on
commit, events pending until acknowledged) so code tested against it behaves the same
in production. It is not durable.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np

from ..records import (
    CORRECTION,
    VOTE,
    ChannelConfig,
    FeedbackEvent,
    Node,
    NodeHead,
    NodeUpdate,
    Reply,
)
from .base import ConflictError, NodeGoneError, UnknownReplyError


@dataclass
class _Channel:
    nodes: dict[str, Node] = field(default_factory=dict)
    replies: dict[str, Reply] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    events: dict[str, FeedbackEvent] = field(default_factory=dict)  # pending, insertion order
    config: ChannelConfig = field(default_factory=ChannelConfig)
    meta: dict = field(default_factory=dict)


class MemoryStore:
    def __init__(self, default_config: ChannelConfig | None = None) -> None:
        self._channels: dict[str, _Channel] = defaultdict(_Channel)
        self._default = default_config or ChannelConfig()
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._trainer_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._seq = itertools.count(1)

    def _ch(self, channel: str) -> _Channel:
        if channel not in self._channels:
            self._channels[channel] = _Channel(config=copy.deepcopy(self._default))
        return self._channels[channel]

    # -- graph ---------------------------------------------------------------------
    async def load_nodes(self, channel: str) -> list[Node]:
        return [copy.deepcopy(n) for n in self._ch(channel).nodes.values()]

    async def node_heads(self, channel: str) -> list[NodeHead]:
        return [
            NodeHead(n.node_id, n.embedding.copy(), n.count, n.updated_at)
            for n in self._ch(channel).nodes.values()
        ]

    async def node_count(self, channel: str) -> int:
        return len(self._ch(channel).nodes)

    async def reply_count(self, channel: str) -> int:
        return len(self._ch(channel).replies)

    async def get_node(self, channel: str, node_id: str) -> Node | None:
        node = self._ch(channel).nodes.get(node_id)
        return copy.deepcopy(node) if node else None

    async def save_node(self, channel: str, node: Node) -> None:
        self._ch(channel).nodes[node.node_id] = copy.deepcopy(node)

    async def delete_node(self, channel: str, node_id: str) -> None:
        self._ch(channel).nodes.pop(node_id, None)

    async def set_neighbors(self, channel, node_id, neighbors) -> None:
        node = self._ch(channel).nodes.get(node_id)
        if node:
            node.neighbors = list(neighbors)

    async def observe(self, channel: str, node_id: str, embedding: np.ndarray) -> int:
        async with self._locks[channel]:
            node = self._ch(channel).nodes.get(node_id)
            if node is None:
                raise NodeGoneError(node_id)
            node.count += 1
            node.embedding = node.embedding + (embedding - node.embedding) / node.count
            return node.count

    # -- replies and feedback --------------------------------------------------------
    async def put_reply(self, channel: str, reply: Reply, *, require_node: bool = False) -> None:
        ch = self._ch(channel)
        known = reply.node_id in ch.nodes or reply.node_id in ch.meta.get("merged", {})
        if require_node and not known:
            raise NodeGoneError(reply.node_id)
        ch.replies[reply.reply_id] = copy.deepcopy(reply)
        if reply.platform_message_id:
            ch.messages[reply.platform_message_id] = reply.reply_id

    async def get_reply(self, channel: str, reply_id: str) -> Reply | None:
        reply = self._ch(channel).replies.get(reply_id)
        return copy.deepcopy(reply) if reply else None

    async def drop_reply(self, channel: str, reply_id: str) -> None:
        ch = self._ch(channel)
        reply = ch.replies.pop(reply_id, None)
        mid = reply.platform_message_id if reply else None
        if mid and ch.messages.get(mid) == reply_id:
            del ch.messages[mid]

    async def list_replies(self, channel: str) -> list[Reply]:
        return [copy.deepcopy(r) for r in self._ch(channel).replies.values()]

    async def link_message(self, channel: str, reply_id: str, message_id: str) -> None:
        ch = self._ch(channel)
        if reply_id not in ch.replies:
            raise UnknownReplyError(f"no reply {reply_id!r} in this channel")
        ch.replies[reply_id].platform_message_id = message_id
        ch.messages[message_id] = reply_id

    async def reply_for_message(self, channel: str, message_id: str) -> str | None:
        return self._ch(channel).messages.get(message_id)

    def _event(self, channel: str, **kw) -> str:
        event_id = f"{next(self._seq)}-0"
        self._ch(channel).events[event_id] = FeedbackEvent(event_id=event_id, **kw)
        return event_id

    async def set_vote(self, channel: str, reply_id: str, user: str, value: int | None) -> str:
        async with self._locks[channel]:
            reply = self._ch(channel).replies.get(reply_id)
            if reply is None:
                raise UnknownReplyError(f"no reply {reply_id!r} in this channel")
            if value is None:
                reply.votes.pop(user, None)
            else:
                reply.votes[user] = value
            return self._event(channel, reply_id=reply_id, user=user, kind=VOTE, value=value)

    async def add_correction(self, channel, reply_id, user, text, ids) -> str:
        async with self._locks[channel]:
            reply = self._ch(channel).replies.get(reply_id)
            if reply is None:
                raise UnknownReplyError(f"no reply {reply_id!r} in this channel")
            reply.corrections[:] = [c for c in reply.corrections if c["user"] != user]
            reply.corrections.append({"user": user, "text": text, "ids": list(ids)})
            return self._event(channel, reply_id=reply_id, user=user, kind=CORRECTION, text=text)

    async def pending(self, channel: str, consumer: str, count: int = 1000) -> list[FeedbackEvent]:
        return [copy.deepcopy(e) for e in list(self._ch(channel).events.values())[:count]]

    async def pending_count(self, channel: str) -> int:
        return len(self._ch(channel).events)

    async def commit(self, channel: str, updates: list[NodeUpdate], event_ids: list[str]) -> None:
        async with self._locks[channel]:
            ch = self._ch(channel)
            for event_id in event_ids:
                if event_id not in ch.events:
                    raise ConflictError(f"feedback event {event_id} was already applied")
            for u in updates:
                node = ch.nodes.get(u.node_id)
                if node is None or node.version != u.expected_version:
                    raise ConflictError(f"node {u.node_id} changed since it was read")
            for u in updates:
                node = ch.nodes[u.node_id]
                if u.z is not None:
                    node.z = np.array(u.z, dtype=np.float32)
                    node.version += 1
                node.baseline = u.baseline
                node.rated += u.rated_delta
                node.reward_sum += u.reward_sum_delta
                node.recent = list(u.recent)
                node.downvoted = list(u.downvoted)
                node.updates += int(u.updated)
                node.rollbacks += int(u.rolled_back)
                node.skipped += int(not u.updated and not u.rolled_back)
                for reply_id, reward in u.counted.items():
                    if reply_id in ch.replies:  # retention may have dropped it meanwhile
                        ch.replies[reply_id].counted = float(reward)
            for event_id in event_ids:
                ch.events.pop(event_id, None)
            if event_ids:
                ch.meta["trained_events"] = ch.meta.get("trained_events", 0) + len(event_ids)

    @asynccontextmanager
    async def trainer_lock(self, channel: str, ttl: float) -> AsyncIterator[bool]:
        lock = self._trainer_locks[channel]
        if lock.locked():
            yield False
            return
        async with lock:
            yield True

    # -- channels --------------------------------------------------------------------
    async def channels(self) -> list[str]:
        return sorted(self._channels)

    async def get_config(self, channel: str) -> ChannelConfig:
        return copy.deepcopy(self._ch(channel).config)

    async def set_config(self, channel: str, config: ChannelConfig) -> None:
        self._ch(channel).config = copy.deepcopy(config.validate())

    async def reset(self, channel: str) -> None:
        self._channels.pop(channel, None)

    async def replace(
        self,
        channel: str,
        config: ChannelConfig,
        nodes: list[Node],
        replies: list[Reply],
        meta: dict,
    ) -> None:
        """Build the channel anew from these records, then swap it in with one
        assignment: no await in between, so no other task sees a mix. Pending feedback
        goes with the old channel, as on `reset`; the trainer lock stays."""
        new = _Channel(config=copy.deepcopy(config.validate()), meta=copy.deepcopy(meta))
        for node in nodes:
            new.nodes[node.node_id] = copy.deepcopy(node)
        for reply in replies:
            new.replies[reply.reply_id] = copy.deepcopy(reply)
            if reply.platform_message_id:
                new.messages[reply.platform_message_id] = reply.reply_id
        self._channels[channel] = new

    async def meta(self, channel: str) -> dict:
        return dict(self._ch(channel).meta)

    async def set_meta(self, channel: str, **values) -> None:
        self._ch(channel).meta.update(values)
