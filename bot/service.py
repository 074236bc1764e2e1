"""The platform-neutral chat service: everything Discord, Slack and the playground share.

Adapters translate platform events into the dataclasses below, call one method, and
render what comes back. All behaviour (prompt building, reply splitting, which reactions
count, admin commands, rate limits, error wording, request ids and metrics) lives here,
so the platforms cannot drift apart and most of it is tested without any platform.

Channel keys are ``<platform>:<workspace>:<channel>``, e.g. ``discord:<guild id>:<channel
id>``, ``slack:<team id>:<channel id>``, ``playground:local:<name>``. **Threads share their
parent channel's graph**: a thread is a conversation in the channel's community, and
splitting its votes off would starve both of feedback. The adapter passes the parent
channel as ``channel`` and the thread only as ``thread`` (used for context and for
where to reply). Direct messages use ``workspace="dm"``.

Typical adapter flow::

    delivery = await service.exchange(Mention(...), post)   # post(chunk) -> message id
    ...
    await service.handle_reaction(Reaction(...))              # on reaction add/remove
    result = await service.handle_admin(AdminCommand(...))    # render result.text/files

Nothing here raises to the adapter for a user-caused or infrastructure problem: the
result carries a plain-words message instead (see `ReplyParts.kind`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Literal

from gesal_core.engine import Engine, ReplyOut
from gesal_core.errors import GesalError
from gesal_core.records import ConfigError
from gesal_core.snapshot import SnapshotError

from .logs import current_request_id, request_context
from .metrics import Metrics
from .ratelimit import MentionLimits, RateLimiter, mention_limits
from .settings import Settings
from .text import LIMITS, parse_correction, split_message, vote_for_emoji

log = logging.getLogger(__name__)

MAX_IMPORT_BYTES = 50 * 1024 * 1024
ADMIN_COMMANDS = ("reset", "export", "import", "stats", "config", "train")
CONFIG_KEYS = ("threshold", "reward_up", "reward_down", "max_nodes")

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

    ``reply_id`` is set only for real answers; pass the posted message ids to
    `ChatService.link_reply` so that reactions on any of the chunks count.
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


# -- the service ---------------------------------------------------------------------------
class ChatService:
    """Platform-neutral behaviour of the bot, shared by every adapter.

    ``on_feedback(channel_key, reply_id)`` is awaited after every counted vote or
    correction; the scheduler uses it to train at once when a channel's round is full.
    Replies, votes, corrections, undelivered answers and an admin's training runs are
    counted in ``metrics`` as they are handled (a private registry when none is given).
    """

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        on_feedback: Callable[[str, str], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.on_feedback = on_feedback
        self.metrics = metrics or Metrics()
        # shared by every process when the store is Redis (see bot.ratelimit)
        self.limits: MentionLimits = mention_limits(
            engine.shared_url, settings.gesal_rate_user, settings.gesal_rate_channel, clock
        )

    async def close(self) -> None:
        """Release the shared rate limiter's Redis connection, if there is one."""
        close = getattr(self.limits, "close", None)
        if close is not None:
            await close()

    # -- mentions ------------------------------------------------------------------------
    def build_messages(self, m: Mention) -> tuple[list[dict], bool]:
        """Chat messages for the engine (oldest first) and whether context was cut.

        Keeps at most ``GESAL_CONTEXT_MESSAGES`` earlier messages and
        ``GESAL_CONTEXT_CHARS`` characters of them, dropping the oldest first.
        """
        s = self.settings
        context = [c for c in m.context if c.text.strip()]
        truncated = m.context_truncated
        if len(context) > s.gesal_context_messages:
            context = context[len(context) - s.gesal_context_messages :]
            truncated = True
        budget = s.gesal_context_chars
        kept: list[ContextMessage] = []
        for c in reversed(context):
            if len(c.text) > budget:
                truncated = True
                break
            budget -= len(c.text)
            kept.append(c)
        messages = []
        for c in reversed(kept):
            if c.is_bot:
                messages.append({"role": "assistant", "content": c.text})
            else:
                prefix = "" if c.author == m.user else f"{c.author}: "
                messages.append({"role": "user", "content": prefix + c.text})
        messages.append({"role": "user", "content": m.text.strip()})
        return messages, truncated

    async def _limited(self, m: Mention) -> float:
        return await self.limits.take(f"{m.platform}:{m.workspace}:{m.user}", m.key)

    async def exchange(
        self,
        mention: Mention | Awaitable[Mention],
        post: Post,
        while_answering: AbstractAsyncContextManager[object] | None = None,
    ) -> Delivery:
        """Answer a mention and post the answer: the whole exchange, for every adapter.

        One request id tags every log line of it, including the adapter's own reads
        when ``mention`` is an awaitable that builds the `Mention` (a thread's earlier
        messages). ``while_answering`` is entered while the answer is being written and
        left before anything is posted (Discord's typing indicator, Slack's 👀
        reaction). Then `deliver`. Never raises for user, infrastructure or platform
        problems: the `Delivery` says what was posted.
        """
        with request_context(current_request_id()):
            m = mention if isinstance(mention, Mention) else await mention
            async with while_answering or contextlib.nullcontext():
                parts = await self.handle_mention(m)
            return await self.deliver(parts, post)

    async def handle_mention(self, m: Mention) -> ReplyParts:
        """Answer a mention, without posting it (`exchange` also posts it). Never raises
        for user or infrastructure problems.

        Every log line written while answering (here, in the engine, and in the adapter
        when it wraps the whole mention in `request_context`) carries one request id,
        which also comes back in ``ReplyParts.request_id``.
        """
        with request_context(current_request_id()) as rid:
            log.info(
                "mention from %s in %s (message %s)",
                m.user,
                m.key,
                m.message_id,
                extra={"channel": m.key, "user": m.user, "message_id": m.message_id},
            )
            parts = await self._answer(m)
            parts.request_id = rid
            log.info(
                "answer (%s) in %d message(s)%s",
                parts.kind,
                len(parts.chunks),
                f", reply {parts.reply_id} from node {parts.node_id}" if parts.reply_id else "",
                extra={"reply_id": parts.reply_id, "node": parts.node_id},
            )
            return parts

    async def _answer(self, m: Mention) -> ReplyParts:
        key = m.key
        limit = LIMITS.get(m.platform, LIMITS["discord"])
        if not m.text.strip():
            return ReplyParts(
                ["Ask me something after the mention, e.g. “@gesal what is Redis?”"], "empty", key
            )
        wait = await self._limited(m)
        if wait > 0:
            return ReplyParts(
                [f"I'm getting a lot of questions; please try again in {int(wait) + 1} s."],
                "rate_limited",
                key,
            )
        messages, cut = self.build_messages(m)
        try:
            out = await self.engine.respond(key, messages)
        except Exception as exc:  # noqa: BLE001 - every failure becomes words, never a crash
            self.metrics.reply_errors.labels(m.platform).inc()
            kind, words = explain(exc)
            if kind == "error" and words == BROKEN:
                log.exception("answering a mention in %s failed", key)
            else:
                log.warning("answering a mention in %s: %s", key, exc)
            return ReplyParts([words], kind, key)  # type: ignore[arg-type]
        self._replied(m, out)
        text = out.text.strip() or "…"
        if cut or out.truncated:
            text += "\n\n_(I only read the most recent part of this conversation.)_"
        return ReplyParts(
            split_message(text, limit),
            "answer",
            key,
            reply_id=out.reply_id,
            node_id=out.node_id,
            z_version=out.z_version,
            new_node=out.new_node,
        )

    def _replied(self, m: Mention, out: ReplyOut) -> None:
        """Count and log an answer the engine wrote."""
        try:
            tokens = len(self.engine.tokenizer(out.text, add_special_tokens=False)["input_ids"])
        except Exception:  # noqa: BLE001 - a metric must never break a reply
            tokens = 0
        self.metrics.observe_reply(m.platform, out.seconds, tokens)
        log.info(
            "replied in %s: node %s%s, %d tokens in %.2fs",
            m.key,
            out.node_id,
            " (new)" if out.new_node else "",
            tokens,
            out.seconds,
            extra={"channel": m.key, "node": out.node_id, "reply_id": out.reply_id},
        )

    async def deliver(self, parts: ReplyParts, post: Post) -> Delivery:
        """Post an answer's chunks in order and link the posted ones to the reply, so
        reactions on any of them count.

        ``post`` raises `PostError` when the platform refuses (its client has already
        retried rate limits and dropped connections). Posting stops at the first
        failure, which is logged and counted (``gesal_undelivered{kind="answer"}``). An
        answer of which nothing was posted is discarded: no member can ever see, vote
        on or correct it, so it must not sit in the channel's history as a reply.
        """
        ids: list[str] = []
        error = None
        for chunk in parts.chunks:
            try:
                ids.append(str(await post(chunk)))
            except PostError as exc:
                error = exc.reason
                break
        if ids:
            await self.link_reply(parts, ids)
        elif parts.reply_id is not None:
            try:
                await self.engine.discard_reply(parts.channel_key, parts.reply_id)
            except Exception as exc:  # noqa: BLE001 - it expires with the history anyway
                log.warning("could not discard unposted reply %s: %s", parts.reply_id, exc)
        if error is not None:
            what = "the answer was discarded" if not ids else "the rest was dropped"
            self.undelivered(
                parts.channel_key.split(":", 1)[0],
                "answer",
                f"{len(ids)} of {len(parts.chunks)} message(s) posted in "
                f"{parts.channel_key}, {what}: {error}",
            )
        else:
            log.info("posted %d message(s) in %s", len(ids), parts.channel_key)
        return Delivery(parts, ids, error)

    def undelivered(self, platform: str, kind: UndeliveredKind, detail: str) -> None:
        """Log and count something the bot had to say but could not post: an answer
        (`deliver`) or an admin command's result (the adapters)."""
        log.warning("could not post %s on %s: %s", kind, platform, detail)
        self.metrics.undelivered.labels(platform, kind).inc()

    async def link_reply(self, parts: ReplyParts, message_ids: list[str]) -> None:
        """Record the platform ids of the posted chunks, so reactions on them count."""
        if parts.reply_id is None:
            return
        for mid in message_ids:
            try:
                await self.engine.link_message(parts.channel_key, parts.reply_id, str(mid))
            except Exception:  # noqa: BLE001 - the answer was posted; only votes are lost
                log.exception("could not link message %s to reply %s", mid, parts.reply_id)

    # -- feedback ------------------------------------------------------------------------
    async def _notify(self, key: str, reply_id: str) -> None:
        if self.on_feedback is not None:
            try:
                await self.on_feedback(key, reply_id)
            except Exception:  # noqa: BLE001 - feedback is stored; training will catch up
                log.exception("feedback hook failed for %s", key)

    async def handle_reaction(self, r: Reaction) -> FeedbackResult:
        """Turn a 👍/👎 on one of the bot's replies into a vote; a removal retracts it.

        Ignored: other emoji, reactions by bots, reactions on messages that are not the
        bot's replies, and the removal of a reaction that is not the user's current vote
        (after 👍 then 👎, removing the 👍 leaves the 👎 standing: last write wins).
        """
        if r.reactor_is_bot:
            return FeedbackResult("ignored", "reactions by bots do not count")
        value = vote_for_emoji(r.emoji)
        if value is None:
            return FeedbackResult("ignored", f"{r.emoji!r} is not a vote")
        key = r.key
        try:
            reply_id = await self.engine.reply_for_message(key, r.message_id)
            if reply_id is None:
                return FeedbackResult("ignored", "not one of my replies")
            if r.added:
                await self.engine.vote(key, reply_id, r.user, value)
                self.metrics.observe_vote(value)
                status: FeedbackStatus = "up" if value > 0 else "down"
            else:
                reply = await self.engine.get_reply(key, reply_id)
                if reply is None or reply.votes.get(str(r.user)) != value:
                    return FeedbackResult("ignored", "that reaction is not the current vote")
                await self.engine.vote(key, reply_id, r.user, None)
                self.metrics.observe_vote(None)
                status = "retracted"
        except Exception as exc:  # noqa: BLE001
            log.warning("reaction in %s failed: %s", key, exc, exc_info=True)
            return FeedbackResult("error", explain(exc)[1])
        await self._notify(key, reply_id)
        return FeedbackResult(status)

    async def handle_correction(self, c: Correction) -> FeedbackResult:
        """A ``better: …`` reply to one of the bot's answers becomes a demonstration."""
        better = parse_correction(c.text)
        if better is None:
            return FeedbackResult("ignored", "no correction marker")
        key = c.key
        try:
            reply_id = await self.engine.reply_for_message(key, c.replied_to)
            if reply_id is None:
                return FeedbackResult("ignored", "not a reply to one of my answers")
            await self.engine.correct(key, reply_id, c.user, better)
            self.metrics.corrections.inc()
        except Exception as exc:  # noqa: BLE001
            log.warning("correction in %s failed: %s", key, exc)
            return FeedbackResult("error", explain(exc)[1])
        await self._notify(key, reply_id)
        return FeedbackResult("corrected", "thanks, I'll learn from that")

    # -- admin ---------------------------------------------------------------------------
    async def handle_admin(self, cmd: AdminCommand) -> AdminResult:
        """Run ``/gesal <name>`` after the permission check; errors come back as text."""
        if cmd.name not in ADMIN_COMMANDS:
            return AdminResult(
                f"Unknown command “{cmd.name}”. Try one of: {', '.join(ADMIN_COMMANDS)}.",
                ok=False,
            )
        if not cmd.is_admin:
            log.info("refused /gesal %s for %s in %s", cmd.name, cmd.user, cmd.key)
            return AdminResult(
                f"Sorry, only admins can use /gesal {cmd.name} "
                f"({self._who_is_admin(cmd.platform)}).",
                ok=False,
            )
        try:
            return await getattr(self, f"_admin_{cmd.name}")(cmd)
        except Exception as exc:  # noqa: BLE001
            kind, words = explain(exc)
            if words == BROKEN:
                log.exception("/gesal %s in %s failed", cmd.name, cmd.key)
            return AdminResult(words, ok=False)

    @staticmethod
    def _who_is_admin(platform: str) -> str:
        if platform == "discord":
            return "members with the Manage Channels permission"
        if platform == "slack":
            return "workspace admins and owners, or users on the bot's allow-list"
        return "admins"

    async def _admin_reset(self, cmd: AdminCommand) -> AdminResult:
        if not cmd.confirmed:
            stats = await self.engine.stats(cmd.key)
            return AdminResult(
                f"This deletes everything this channel has learned ({stats['nodes']} nodes, "
                f"{stats['replies']} replies and their votes). It cannot be undone.",
                needs_confirmation=True,
            )
        await self.engine.reset(cmd.key)
        log.info("channel %s reset by %s", cmd.key, cmd.user)
        return AdminResult("Done: this channel's graph memory has been reset.")

    async def _admin_export(self, cmd: AdminCommand) -> AdminResult:
        from .picture import render_graph_png

        data = await self.engine.export(cmd.key)
        body = Engine.dumps(data).encode("utf-8")
        png = await asyncio.to_thread(render_graph_png, data)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", cmd.key)
        return AdminResult(
            f"Exported {len(data['nodes'])} nodes and {len(data['replies'])} replies.",
            files=[
                Attachment(f"gesal-{stem}.json", body, "application/json"),
                Attachment(f"gesal-{stem}.png", png, "image/png"),
            ],
            data={"nodes": len(data["nodes"]), "replies": len(data["replies"])},
        )

    async def _admin_import(self, cmd: AdminCommand) -> AdminResult:
        if not cmd.file:
            return AdminResult(
                "Attach the JSON file that /gesal export produced to import it.", ok=False
            )
        if len(cmd.file) > MAX_IMPORT_BYTES:
            return AdminResult(
                f"That file is too large to be an export (over {MAX_IMPORT_BYTES >> 20} MB).",
                ok=False,
            )
        try:  # the file itself: its size and nesting are checked before it is parsed
            counts = await self.engine.import_graph(cmd.key, cmd.file)
        except SnapshotError as exc:
            return AdminResult(f"Not imported, nothing was changed: {exc}.", ok=False)
        return AdminResult(
            f"Imported {counts['nodes']} nodes and {counts['replies']} replies; "
            "this channel's previous graph was replaced.",
            data=counts,
        )

    async def _admin_stats(self, cmd: AdminCommand) -> AdminResult:
        s = await self.engine.stats(cmd.key)
        last = s["last_update"]
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(last)) if last else "never trained"
        cfg = s["config"]
        text = (
            f"**Graph of this channel**: {s['nodes']} nodes, {s['prompts']} prompts, "
            f"{s['replies']} replies.\n"
            f"Votes: {s['votes_up']} 👍, {s['votes_down']} 👎, {s['corrections']} corrections; "
            f"{s['pending_feedback']} waiting for training (the channel trains once "
            f"{self.settings.gesal_train_round} replies have feedback, or once it has "
            f"waited {self.settings.gesal_train_max_wait / 3600:g} h).\n"
            f"Updates: {s['updates']} ({s['rollbacks']} rolled back); "
            f"mean reward {s['mean_reward']:+.2f}; last update: {when}.\n"
            f"Settings: threshold {cfg['threshold']}, rewards {cfg['reward_up']:+g}/"
            f"{cfg['reward_down']:+g}, at most {cfg['max_nodes']} nodes."
        )
        if s["train_parked"]:
            text += (
                f"\n**Training is paused** after {s['train_failures']} failed runs in a row "
                f"({s['train_error']}); the feedback is kept. Fix the cause, then "
                "/gesal train retries it; /gesal reset drops it."
            )
        elif s["train_failures"]:
            text += (
                f"\nThe last {s['train_failures']} training run(s) failed "
                f"({s['train_error']}); the feedback is kept for the next one."
            )
        if s["near_caps"]:
            text += "\n**Near a limit**: " + "; ".join(s["near_caps"]) + "."
        return AdminResult(text, data=s)

    async def _admin_config(self, cmd: AdminCommand) -> AdminResult:
        changes: dict[str, str] = {}
        for name, raw in cmd.args.items():
            if raw is None or str(raw).strip() == "":
                continue
            if name not in CONFIG_KEYS:
                return AdminResult(
                    f"Unknown setting “{name}”; settable: {', '.join(CONFIG_KEYS)}.", ok=False
                )
            changes[name] = str(raw).strip()
        if changes:
            # the engine parses and range-checks every value (NaN and infinities too), for
            # every adapter alike; a refused change leaves all settings as they were
            try:
                cfg = await self.engine.configure(cmd.key, **changes)
            except ConfigError as exc:
                return AdminResult(f"Not changed: {exc}.", ok=False)
            head = "Updated."
        else:
            cfg = await self.engine.get_config(cmd.key)
            head = "Current settings."
        return AdminResult(
            f"{head} threshold {cfg.threshold}, reward_up {cfg.reward_up:+g}, "
            f"reward_down {cfg.reward_down:+g}, max_nodes {cfg.max_nodes}.",
            data={
                "threshold": cfg.threshold,
                "reward_up": cfg.reward_up,
                "reward_down": cfg.reward_down,
                "max_nodes": cfg.max_nodes,
            },
        )

    async def _admin_train(self, cmd: AdminCommand) -> AdminResult:
        # an admin's "train now" does not wait for full rounds
        report = await self.engine.train(cmd.key, force=True)
        self.metrics.observe_train(report)
        log.info("training: %s", report.summary())
        if cmd.key in report.failed:
            return AdminResult(
                f"Training failed ({report.failed[cmd.key]}); the feedback is kept, and "
                "the details are in the bot's log.",
                ok=False,
                data={"events": 0, "error": report.failed[cmd.key]},
            )
        return AdminResult(f"Training done: {report.summary()}.", data={"events": report.events})


__all__ = [
    "ADMIN_COMMANDS",
    "AdminCommand",
    "AdminResult",
    "Attachment",
    "ChatService",
    "ContextMessage",
    "Correction",
    "Delivery",
    "FeedbackResult",
    "Mention",
    "Post",
    "PostError",
    "Reaction",
    "RateLimiter",
    "ReplyParts",
    "channel_key",
    "explain",
    "strip_mentions",
]
