"""What crosses the boundary between the adapters and `ChatService`, and how a failure
is worded for a member.

An adapter turns a platform event into one of these dataclasses (`Mention`, `Reaction`,
`Correction`, `AdminCommand`), gives the service a `Post` function where it must post,
and renders what comes back (`Delivery`, `FeedbackResult`, `AdminResult`). Nothing here
knows a platform or the engine.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from gesal_core.errors import GesalError

MAX_IMPORT_BYTES = 50 * 1024 * 1024

UNAVAILABLE = (
    "My memory store is unavailable right now, so I can't do that. Please try again in a minute."
)
BROKEN = "Sorry, something went wrong on my side. It has been logged for the admins."


def channel_key(platform: str, workspace: str, channel: str) -> str:
    """The engine/store key of a channel: ``platform:workspace:channel``."""
    if not (platform and workspace and channel) or ":" in f"{platform}{workspace}":
        raise ValueError(f"bad channel key parts {platform!r}, {workspace!r}, {channel!r}")
    return f"{platform}:{workspace}:{channel}"


# -- events in ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ContextMessage:
    """An earlier message of the reply chain or thread, oldest first."""

    author: str
    text: str
    is_bot: bool = False  # the bot's own earlier answer: becomes an assistant turn


@dataclass
class Mention:
    """Someone addressed the bot. ``text`` is the question with the bot's mention removed."""

    platform: str
    workspace: str
    channel: str
    user: str
    text: str
    message_id: str
    thread: str | None = None
    context: list[ContextMessage] = field(default_factory=list)
    context_truncated: bool = False  # the adapter knows older messages exist beyond context

    @property
    def key(self) -> str:
        return channel_key(self.platform, self.workspace, self.channel)


@dataclass
class Reaction:
    """A reaction added to (``added=True``) or removed from a message."""

    platform: str
    workspace: str
    channel: str
    user: str
    message_id: str
    emoji: str  # Discord: the unicode emoji or custom name; Slack: the reaction name
    added: bool
    reactor_is_bot: bool = False  # set when the reactor is this bot (or any bot)

    @property
    def key(self) -> str:
        return channel_key(self.platform, self.workspace, self.channel)


@dataclass
class Correction:
    """A message that replies to ``replied_to`` (one of the bot's messages).

    ``text`` is the raw message; it only counts when it starts with a correction marker
    (``better:`` or ✏️, see `bot.text.parse_correction`).
    """

    platform: str
    workspace: str
    channel: str
    user: str
    message_id: str
    replied_to: str
    text: str

    @property
    def key(self) -> str:
        return channel_key(self.platform, self.workspace, self.channel)


@dataclass
class AdminCommand:
    """``/gesal <name>``. ``is_admin`` must come from the platform's server-side data
    (Discord interaction permissions, Slack ``users.info`` or the allow-list), never
    from anything the user typed."""

    platform: str
    workspace: str
    channel: str
    user: str
    name: str
    is_admin: bool
    args: dict[str, str] = field(default_factory=dict)  # config: threshold=0.8 ...
    file: bytes | None = None  # import: the attached export
    confirmed: bool = False  # reset: the user pressed "confirm"

    @property
    def key(self) -> str:
        return channel_key(self.platform, self.workspace, self.channel)


# -- results out ---------------------------------------------------------------------------
ReplyKind = Literal["answer", "empty", "rate_limited", "unavailable", "error"]


@dataclass
class ReplyParts:
    """What to post for a mention: one message per chunk, in order.

    ``reply_id`` is set only for real answers; `ChatService.deliver` links every posted
    chunk to it, so that reactions on any of the chunks count.
    """

    chunks: list[str]
    kind: ReplyKind
    channel_key: str
    reply_id: str | None = None
    node_id: str | None = None
    z_version: int | None = None
    new_node: bool = False
    request_id: str | None = None  # the id on every log line of this mention

    @property
    def ok(self) -> bool:
        return self.kind == "answer"


class PostError(Exception):
    """An adapter could not post a message (after its client's own retries).

    ``reason`` is one short phrase for the operator's log: the platform's error code
    (``channel_not_found``, ``Missing Permissions``), ``rate limited``, a network error."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Posts one chunk (in order, each after the previous) and returns its platform message id.
Post = Callable[[str], Awaitable[str]]
UndeliveredKind = Literal["answer", "command"]


@dataclass
class Delivery:
    """What the service posted for a mention: the answer, the platform ids of the
    messages posted (the first ``len(message_ids)`` chunks), and why posting stopped
    early."""

    parts: ReplyParts
    message_ids: list[str]
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.error is None

    @property
    def request_id(self) -> str | None:
        return self.parts.request_id


@dataclass
class Attachment:
    name: str
    data: bytes
    mime: str


@dataclass
class AdminResult:
    """What an admin command answers. ``needs_confirmation``: show ``text`` with confirm
    and cancel buttons; "confirm" runs the command again with ``confirmed=True``, after
    the adapter has checked the presser's admin rights again."""

    text: str
    ok: bool = True
    files: list[Attachment] = field(default_factory=list)
    needs_confirmation: bool = False
    data: dict | None = None  # machine-readable payload (stats, config) for the playground

    def file(self, suffix: str) -> Attachment | None:
        return next((f for f in self.files if f.name.endswith(suffix)), None)


FeedbackStatus = Literal["up", "down", "retracted", "corrected", "ignored", "error"]


@dataclass
class FeedbackResult:
    """Outcome of a reaction or correction. Adapters acknowledge ``corrected`` with a
    reaction and may show ``message`` when status is ``error``; ``ignored`` is silent."""

    status: FeedbackStatus
    message: str = ""

    @property
    def counted(self) -> bool:
        return self.status in ("up", "down", "retracted", "corrected")


def _is_unavailable(exc: BaseException) -> bool:
    """Infrastructure trouble (Redis down, timeouts) rather than a bug."""
    if isinstance(exc, ConnectionError | TimeoutError | OSError):
        return True
    try:
        import redis.exceptions as rex

        return isinstance(exc, rex.ConnectionError | rex.TimeoutError | rex.BusyLoadingError)
    except ImportError:  # pragma: no cover - redis is a dependency
        return False


def explain(exc: BaseException) -> tuple[str, str]:
    """(kind, words) for an exception: what a user may be told about it."""
    if isinstance(exc, GesalError):
        return "error", str(exc)
    if _is_unavailable(exc):
        return "unavailable", UNAVAILABLE
    return "error", BROKEN


_MENTION = re.compile(r"<@[!&]?[\w]+>")


def strip_mentions(text: str) -> str:
    """Remove ``<@123>`` / ``<@U123>`` mention markup (both platforms use it)."""
    return _MENTION.sub("", text).strip()
