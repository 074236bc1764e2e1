"""The platform-neutral chat service: everything Discord, Slack and the playground share.

Adapters translate platform events into the dataclasses of `bot.messages`, call one
method, and render what comes back. All behaviour (prompt building, reply splitting,
posting and linking an answer, rate limits, error wording, request ids and metrics;
which reactions and replies count as feedback in `bot.feedback`, admin commands in
`bot.admin`) lives here, so the platforms cannot drift apart and most of it is tested
without any platform.

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

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

from gesal_core.engine import Engine, ReplyOut

from .admin import AdminCommands
from .feedback import FeedbackHandler
from .logs import current_request_id, request_context
from .messages import (
    BROKEN,
    AdminCommand,
    AdminResult,
    ContextMessage,
    Correction,
    Delivery,
    FeedbackResult,
    Mention,
    Post,
    PostError,
    Reaction,
    ReplyParts,
    UndeliveredKind,
    explain,
)
from .metrics import Metrics
from .ratelimit import MentionLimits, mention_limits
from .settings import Settings
from .text import LIMITS, split_message

log = logging.getLogger(__name__)


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
        self.admin = AdminCommands(engine, settings, self.metrics)
        self.feedback = FeedbackHandler(engine, self.metrics, self._notify)
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
        """Turn a 👍/👎 on one of the bot's replies into a vote, or retract it (`bot.feedback`)."""
        return await self.feedback.reaction(r)

    async def handle_correction(self, c: Correction) -> FeedbackResult:
        """A ``better: …`` reply to one of the bot's answers becomes a demonstration."""
        return await self.feedback.correction(c)

    # -- admin ---------------------------------------------------------------------------
    async def handle_admin(self, cmd: AdminCommand) -> AdminResult:
        """Run ``/gesal <name>`` (`bot.admin`); errors come back as text."""
        return await self.admin.handle(cmd)


__all__ = ["ChatService"]
