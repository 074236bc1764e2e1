"""The storage contract the engine relies on.

Every method takes the channel key first: a channel's data is only ever reached through
its own key, which is what keeps one channel's feedback away from another's adapters.
All methods are async so a network store never blocks the event loop.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import GesalError
from ..records import ChannelConfig, FeedbackEvent, Node, NodeHead, NodeUpdate, Reply


class UnknownReplyError(GesalError):
    """A vote or correction names a reply this channel never gave."""


class ConflictError(GesalError):
    """A node changed since it was read, or its events were already applied (CAS failed)."""


class NodeGoneError(GesalError, KeyError):
    """A request's node vanished under it: the channel was reset meanwhile.

    Raised instead of writing half of a request into the fresh channel (a reply pointing
    at a node that no longer exists). Also a KeyError, so code that catches a missing
    node as a KeyError still does.
    """

    def __init__(self, node_id: str) -> None:
        super().__init__(
            "this channel's memory was reset while the answer was being written, so it "
            "was not kept; please ask again"
        )
        self.node_id = node_id

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class StoreUnavailableError(GesalError):
    """The database cannot be reached (or refuses writes); nothing was changed.

    ``str(exc)`` is meant for whoever asked, a chat member included: it says that the
    bot's memory is unavailable and never names the server (no address, user name or
    secret), since chat platforms show it to anyone in the channel. ``detail`` is the
    operator's version for logs and start-up errors: it names the server, with every
    secret of its URL masked (``redis://user:***@host:6379/0``).
    """

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail or message


@runtime_checkable
class Store(Protocol):
    # -- graph ---------------------------------------------------------------------
    async def load_nodes(self, channel: str) -> list[Node]: ...
    async def node_heads(self, channel: str) -> list[NodeHead]:
        """Every node's id, embedding, count and `updated_at`, without z, in creation
        order (as `load_nodes`): what routing a mention reads, in one consistent read."""
        ...

    async def node_count(self, channel: str) -> int:
        """How many nodes the channel has, without reading any (the /metrics gauge)."""
        ...

    async def reply_count(self, channel: str) -> int:
        """How many replies the channel keeps, without reading any (/healthz's caps)."""
        ...

    async def get_node(self, channel: str, node_id: str) -> Node | None: ...
    async def save_node(self, channel: str, node: Node) -> None:
        """Write a whole node record, creating or replacing it."""
        ...

    async def delete_node(self, channel: str, node_id: str) -> None: ...
    async def set_neighbors(
        self, channel: str, node_id: str, neighbors: list[tuple[str, float]]
    ) -> None: ...

    async def observe(self, channel: str, node_id: str, embedding: np.ndarray) -> int:
        """Atomically fold one prompt embedding into the node's running mean; new count.

        Raises NodeGoneError (a KeyError) when the node does not exist.
        """
        ...

    # -- replies and feedback --------------------------------------------------------
    async def put_reply(self, channel: str, reply: Reply, *, require_node: bool = False) -> None:
        """Store a reply (replacing one with the same id).

        ``require_node``: refuse with NodeGoneError, storing nothing, unless the reply's
        node exists or was folded into another (``meta["merged"]``). `respond` sets it so
        an answer that raced a reset is not kept pointing at a deleted node; imports and
        tests may store replies on their own.
        """
        ...

    async def get_reply(self, channel: str, reply_id: str) -> Reply | None: ...
    async def drop_reply(self, channel: str, reply_id: str) -> None:
        """Forget a reply and its message link (a reply that was never posted; an
        unknown id changes nothing)."""
        ...

    async def list_replies(self, channel: str) -> list[Reply]: ...
    async def link_message(self, channel: str, reply_id: str, message_id: str) -> None: ...
    async def reply_for_message(self, channel: str, message_id: str) -> str | None: ...

    async def set_vote(self, channel: str, reply_id: str, user: str, value: int | None) -> str:
        """Record (or retract, with None) a user's vote and append a feedback event.

        Returns the event id once the event is durable. Raises UnknownReplyError.
        """
        ...

    async def add_correction(
        self, channel: str, reply_id: str, user: str, text: str, ids: list[int]
    ) -> str:
        """Store ``user``'s better answer to a reply (replacing their earlier one to the same
        reply: one demonstration per member and reply) and buffer its event."""
        ...

    async def pending(self, channel: str, consumer: str, count: int = 1000) -> list[FeedbackEvent]:
        """Unacknowledged feedback events (including ones a dead consumer left behind)."""
        ...

    async def pending_count(self, channel: str) -> int: ...

    async def commit(self, channel: str, updates: list[NodeUpdate], event_ids: list[str]) -> None:
        """Apply node updates (compare-and-set on each version) and ack the events, atomically.

        Raises ConflictError, changing nothing, if any node's version moved or any of the
        events is no longer pending (another trainer applied it already).
        """
        ...

    def trainer_lock(self, channel: str, ttl: float) -> AbstractAsyncContextManager[bool]:
        """Try to become the channel's only trainer, for as long as the block runs.

        ``ttl`` is a lease, not a time limit: a heartbeat renews it while the block runs,
        so a long training keeps the lock, and a trainer that dies without releasing it
        (SIGKILL, power loss) blocks the channel for at most ``ttl`` seconds.
        Yields False (without waiting) when another trainer holds it. The lock only saves
        wasted work: correctness comes from `commit`'s checks, since a lease can still be
        lost (a process stalled for longer than ``ttl``).
        """
        ...

    # -- channels --------------------------------------------------------------------
    async def channels(self) -> list[str]: ...
    async def get_config(self, channel: str) -> ChannelConfig: ...
    async def set_config(self, channel: str, config: ChannelConfig) -> None: ...
    async def reset(self, channel: str) -> None:
        """Forget the channel's data in one atomic step.

        Concurrent writes land wholly before (and are erased) or wholly after it; the
        trainer lock is kept (it guards a run, not data).
        """
        ...

    async def replace(
        self,
        channel: str,
        config: ChannelConfig,
        nodes: list[Node],
        replies: list[Reply],
        meta: dict,
    ) -> None:
        """Replace the channel's data with these records in one atomic step (an import).

        The same as `reset` followed by writing the config, the meta fields, every node
        (in this order: their creation order) and every reply, except that no reader and
        no concurrent write ever sees a state in between: a write racing it lands wholly
        before (and is gone) or wholly after it. If it fails, the channel is unchanged.
        Pending feedback goes with the old data; the trainer lock stays. The caller
        validates the records (`gesal_core.snapshot`).
        """
        ...

    async def meta(self, channel: str) -> dict: ...
    async def set_meta(self, channel: str, **values) -> None: ...
