"""What the simulated platform keeps per channel: its messages, with their reactions and
corrections, as Discord or Slack would keep them.

Apart from the server so that the handlers for chat and for admin actions share one
model without importing each other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

PLATFORM, WORKSPACE = "playground", "local"  # the first two parts of a channel key


@dataclass
class Message:
    id: str
    author: str
    text: str
    is_bot: bool = False
    ts: float = field(default_factory=time.time)
    kind: str = "message"  # message | answer | empty | rate_limited | unavailable | error
    reply_id: str | None = None
    node_id: str | None = None
    new_node: bool = False
    z_version: int | None = None
    reactions: dict[str, str] = field(default_factory=dict)  # member -> up | down
    corrections: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Channel:
    name: str
    messages: list[Message] = field(default_factory=list)

    def find(self, message_id: str) -> Message | None:
        return next((m for m in self.messages if m.id == message_id), None)


__all__ = ["PLATFORM", "WORKSPACE", "Channel", "Message"]
