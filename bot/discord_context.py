"""Reading what a Discord question follows: the messages up its reply chain, or, in a
thread without one, the thread's earlier messages, as the context of a `Mention`.

Apart from the adapter's event handling in `bot.discord_app` because it is the one
part that walks message history: each step may be a REST fetch that Discord refuses
(a deleted message, no Read Message History), and every refusal only shortens the
context, never stops the answer.
"""

from __future__ import annotations

import logging

import discord

from .discord_rest import SEND_ERRORS, failure
from .messages import ContextMessage, strip_mentions

log = logging.getLogger(__name__)


async def replied_to(message: discord.Message) -> discord.Message | None:
    """The message ``message`` replies to, from the gateway's copy or fetched; None
    when it was deleted or the bot may not read it."""
    ref = message.reference
    if ref is None or ref.message_id is None:
        return None
    if isinstance(ref.resolved, discord.Message):
        return ref.resolved
    if isinstance(ref.resolved, discord.DeletedReferencedMessage):
        return None
    try:
        return await message.channel.fetch_message(ref.message_id)
    except SEND_ERRORS:
        return None


async def read_context(
    message: discord.Message, in_thread: bool, limit: int, bot_id: int
) -> tuple[list[ContextMessage], bool]:
    """Up to ``limit`` earlier messages of the reply chain (or of the thread), oldest
    first, and whether more were left out. Reading them is best effort: the question is
    answered without what cannot be read. ``in_thread`` comes from the adapter's channel
    lookup, which also knows a thread missing from the cache (there ``message.channel``
    is only a `discord.PartialMessageable`); ``bot_id`` marks the bot's own messages."""
    found, more = await _reply_chain(message, limit)
    if not found and in_thread and limit:
        found, more = await _thread_before(message, limit)
    context = [
        ContextMessage(str(m.author.id), strip_mentions(m.content), is_bot=m.author.id == bot_id)
        for m in reversed(found)
        if m.content
    ]
    return context, more


async def _reply_chain(message: discord.Message, limit: int) -> tuple[list[discord.Message], bool]:
    """The messages ``message`` replies to, newest first, up to the first deleted or
    unreadable one; True when the chain goes on past ``limit``."""
    found: list[discord.Message] = []
    current = message
    while current.reference is not None and limit:
        if len(found) >= limit:
            return found, True
        parent = await replied_to(current)
        if parent is None:
            break
        found.append(parent)
        current = parent
    return found, False


async def _thread_before(
    message: discord.Message, limit: int
) -> tuple[list[discord.Message], bool]:
    """The thread's messages before ``message``, newest first (what could be read when
    Discord refuses part way); True when there are more than ``limit``."""
    found: list[discord.Message] = []
    try:
        async for m in message.channel.history(limit=limit + 1, before=message):
            found.append(m)
    except SEND_ERRORS as exc:
        log.info("could not read thread %s: %s", message.channel.id, failure(exc))
    return found[:limit], len(found) > limit
