"""Members' feedback on the bot's replies: which reactions count as votes, and which
replies are corrections, the same on every platform.

Feedback is the only thing the channels learn from, so what counts is decided here once
for Discord, Slack and the playground (`ChatService.handle_reaction` and
`handle_correction` hand the adapters' events over). Results are words for the member,
never an exception.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from gesal_core.engine import Engine

from .messages import Correction, FeedbackResult, FeedbackStatus, Reaction, explain
from .metrics import Metrics
from .text import parse_correction, vote_for_emoji

log = logging.getLogger(__name__)


class FeedbackHandler:
    """Turns reactions into votes and ``better: …`` replies into demonstrations.

    ``notify(channel_key, reply_id)`` is awaited after every counted vote or correction.
    """

    def __init__(
        self, engine: Engine, metrics: Metrics, notify: Callable[[str, str], Awaitable[None]]
    ) -> None:
        self.engine, self.metrics, self.notify = engine, metrics, notify

    async def reaction(self, r: Reaction) -> FeedbackResult:
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
        await self.notify(key, reply_id)
        return FeedbackResult(status)

    async def correction(self, c: Correction) -> FeedbackResult:
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
        await self.notify(key, reply_id)
        return FeedbackResult("corrected", "thanks, I'll learn from that")


__all__ = ["FeedbackHandler"]
