"""Discord adapter (discord.py 2.7): translate gateway events to `ChatService` calls.

Intents are the minimum the bot needs:

* ``guilds``: channel and thread cache (a thread's parent gives the channel key) and
  application commands;
* ``guild_messages``: MESSAGE_CREATE, to see mentions and ``better:`` replies;
* ``guild_reactions``: MESSAGE_REACTION_ADD/REMOVE, received as *raw* events so a vote
  on a reply that is no longer in the message cache still counts.

``message_content`` (privileged) is **not** required: Discord always delivers the text
of messages that mention the bot, and a reply to the bot pings it by default, so both
questions and corrections arrive with their content. Without it, earlier messages of a
reply chain that neither mention the bot nor come from it arrive empty and are left out
of the context; set ``GESAL_DISCORD_MESSAGE_CONTENT=true`` (and enable the intent in the
developer portal) to include them.

Admin commands live in one ``/gesal`` group with ``default_permissions`` (Manage
Channels), which only hides them in the client; a server can grant a command to anyone,
so every invocation is checked again here against the permissions Discord computed for
the invoking member (``interaction.permissions``), never trusting the client. An import's
attachment is downloaded only after that check passes, and only when Discord says it is
at most `MAX_DOWNLOAD_BYTES`. Reactions by bots (``member.bot``, or the cached user's
``bot`` flag) never count as votes.

Threads and forum posts share their parent channel's graph (the key is
``discord:<guild>:<parent id>``): a mention in a thread is answered in the thread, and a
vote or correction there counts like one in the channel. Without a reply chain, the
thread's earlier messages (in a forum post: from the starter message on) are the context;
`bot.discord_context` reads it.

A correction (``better: …`` replying to a message) is matched through the reference's
message id, so it counts even when the bot's answer is no longer in discord.py's cache or
has been deleted since; a correction on a message that carries no answer the bot can learn
from is told so rather than answered as a question. A reference to a deleted message ends
a reply chain's context there.

Answers are posted through `ChatService.deliver`, as one reply chain under the question.
discord.py retries rate limits (429, sleeping ``retry_after``) and server errors itself;
whatever it still cannot post (Missing Permissions, an archived or locked thread, five
429s in a row, a network error) is logged once for the operator with Discord's reason and
counted (``gesal_undelivered_total``), an answer of which nothing was posted is discarded,
and the member sees a ⚠️ reaction on their question when the bot may still react there.
The "typing…" indicator is best effort: a refused one never stops the answer. An admin
command's result that cannot be sent (an expired interaction, say) is logged and counted
the same way, with ``kind="command"``.

Direct messages are not read (no ``dm_messages`` intent): the bot serves servers only.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import AsyncIterator, Callable

import discord
from discord import app_commands

from .discord_context import read_context, replied_to
from .discord_rest import SEND_ERRORS, failure
from .health import Check, Health, connection_check
from .messages import (
    MAX_IMPORT_BYTES,
    AdminCommand,
    AdminResult,
    Correction,
    Delivery,
    Mention,
    Post,
    PostError,
    Reaction,
    ReplyParts,
    strip_mentions,
)
from .service import ChatService
from .settings import Settings
from .text import parse_correction

log = logging.getLogger(__name__)
PLATFORM = "discord"
CORRECTION_ACK = "\u2705"  # ✅ on the member's correction
UNDELIVERED_FLAG = "\u26a0\ufe0f"  # ⚠️ on a question whose answer could not be posted
NOT_LEARNABLE = (
    "I can't learn from this correction: the message it replies to is not an answer of "
    "mine that I still have on record."
)
ADMIN_PERMISSIONS = discord.Permissions(manage_channels=True)
# The largest import attachment downloaded: the service refuses bigger imports anyway.
MAX_DOWNLOAD_BYTES = MAX_IMPORT_BYTES


def make_intents(message_content: bool = False) -> discord.Intents:
    """The minimal intents described in the module docstring."""
    intents = discord.Intents.none()
    intents.guilds = True
    intents.guild_messages = True
    intents.guild_reactions = True
    intents.message_content = message_content
    return intents


def is_admin(interaction: discord.Interaction) -> bool:
    """Server-side check: Manage Channels (or Manage Server / Administrator) in this
    channel, as computed by Discord for the invoking member."""
    if interaction.guild is None:
        return False
    p = interaction.permissions
    return p.manage_channels or p.manage_guild or p.administrator


def _files(result: AdminResult) -> list[discord.File]:
    return [discord.File(io.BytesIO(f.data), filename=f.name) for f in result.files]


async def read_export(attachment: discord.Attachment) -> bytes | str:
    """The attachment's bytes, or one sentence saying why not. Its size comes from
    Discord, so a file over `MAX_DOWNLOAD_BYTES` is refused without fetching it."""
    cap = MAX_DOWNLOAD_BYTES
    if attachment.size > cap:
        return f"That file is too large to be an export (over {cap / 2**20:.3g} MB)."
    try:
        data = await attachment.read()
    except discord.HTTPException as exc:
        return f"Downloading the file failed (HTTP {exc.status})."
    if len(data) > cap:
        return f"That file is too large to be an export (over {cap / 2**20:.3g} MB)."
    return data


@contextlib.asynccontextmanager
async def typing_if_allowed(channel: discord.abc.Messageable) -> AsyncIterator[None]:
    """Show "typing…" while the body runs, if Discord lets the bot. Starting it is a
    POST that fails exactly where the answer will (no Send Messages, an archived thread),
    and that failure is reported once, by `ChatService.deliver`; here it must not stop
    the answer."""
    typing = channel.typing()
    try:
        await typing.__aenter__()
    except SEND_ERRORS as exc:
        log.debug("no typing indicator in %s: %s", getattr(channel, "id", channel), failure(exc))
        yield
        return
    try:
        yield
    finally:
        await typing.__aexit__(None, None, None)


async def send_result(
    bot: GesalDiscordBot, interaction: discord.Interaction, name: str, text: str, **kw
) -> None:
    """Send an admin command's result as an ephemeral followup. Discord refuses it when
    the interaction has expired (15 minutes after a long ``train``) or was deleted; the
    command has run by then, so the operator learns what it said instead."""
    try:
        await interaction.followup.send(text, ephemeral=True, **kw)
    except SEND_ERRORS as exc:
        said = text if len(text) <= 120 else text[:119] + "…"
        bot.service.undelivered(
            PLATFORM,
            "command",
            f"the result of /gesal {name} in channel {interaction.channel_id} could not be "
            f"sent ({failure(exc)}); it said: {said}",
        )


class ConfirmReset(discord.ui.View):
    """The confirmation button of ``/gesal reset``; only the asking admin may press it."""

    def __init__(self, bot: GesalDiscordBot, owner_id: int, timeout: float = 120.0) -> None:
        super().__init__(timeout=timeout)
        self.bot, self.owner_id = bot, owner_id

    @discord.ui.button(label="Reset this channel", style=discord.ButtonStyle.danger)
    async def confirm(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        if interaction.user.id != self.owner_id:
            await interaction.response.send_message(
                "Only the admin who asked can confirm this.", ephemeral=True
            )
            return
        if not await defer(self.bot, interaction, "reset"):
            return
        result = await self.bot.admin(interaction, "reset", confirmed=True)
        self.stop()
        await send_result(self.bot, interaction, "reset", result.text)

    @discord.ui.button(label="Cancel", style=discord.ButtonStyle.secondary)
    async def cancel(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        self.stop()
        await interaction.response.send_message("Nothing was reset.", ephemeral=True)


async def defer(bot: GesalDiscordBot, interaction: discord.Interaction, name: str) -> bool:
    """Acknowledge a command within Discord's 3 s (its result may take longer). When
    Discord refuses (the interaction already expired), the command is not run: the member
    was shown "did not respond" and nothing could tell them what it did."""
    try:
        await interaction.response.defer(ephemeral=True, thinking=True)
    except SEND_ERRORS as exc:
        bot.service.undelivered(
            PLATFORM,
            "command",
            f"/gesal {name} in channel {interaction.channel_id} was not run because Discord "
            f"refused to acknowledge it ({failure(exc)})",
        )
        return False
    return True


async def run_command(
    bot: GesalDiscordBot,
    interaction: discord.Interaction,
    name: str,
    attachment: discord.Attachment | None = None,
    **kw,
) -> None:
    """Run ``/gesal <name>`` for ``interaction`` and send its result (or the reset
    confirmation) to the member who asked."""
    # Defer first: Discord wants an answer within 3 s, and export/import/train
    # can take longer.
    if not await defer(bot, interaction, name):
        return
    if attachment is not None and is_admin(interaction):  # a member's file is never fetched
        data = await read_export(attachment)
        if isinstance(data, str):
            await send_result(bot, interaction, name, data)
            return
        kw["file"] = data
    result = await bot.admin(interaction, name, **kw)
    if result.needs_confirmation:
        view = ConfirmReset(bot, interaction.user.id)
        await send_result(bot, interaction, name, result.text, view=view)
        return
    await send_result(bot, interaction, name, result.text, files=_files(result))


def build_gesal_group(bot: GesalDiscordBot) -> app_commands.Group:
    """``/gesal reset|export|import|stats|config|train``, hidden from non-admins by
    default and re-checked on the server in `GesalDiscordBot.admin`."""
    group = app_commands.Group(
        name="gesal",
        description="Manage what the bot has learned in this channel",
        default_permissions=ADMIN_PERMISSIONS,
        guild_only=True,
    )

    @group.command(name="reset", description="Forget everything learned in this channel")
    async def reset(interaction: discord.Interaction) -> None:
        await run_command(bot, interaction, "reset")

    @group.command(name="export", description="Download this channel's graph (JSON + picture)")
    async def export(interaction: discord.Interaction) -> None:
        await run_command(bot, interaction, "export")

    @group.command(name="import", description="Replace this channel's graph with an export")
    @app_commands.describe(file="a JSON file made by /gesal export")
    async def import_(interaction: discord.Interaction, file: discord.Attachment) -> None:
        await run_command(bot, interaction, "import", attachment=file)

    @group.command(name="stats", description="Nodes, votes, rewards and last update")
    async def stats(interaction: discord.Interaction) -> None:
        await run_command(bot, interaction, "stats")

    @group.command(name="config", description="Show or change this channel's settings")
    @app_commands.describe(
        threshold="similarity below which a question starts a new node (-1..1)",
        reward_up="reward of a 👍 (> 0)",
        reward_down="reward of a 👎 (< 0)",
    )
    async def config(
        interaction: discord.Interaction,
        threshold: float | None = None,
        reward_up: float | None = None,
        reward_down: float | None = None,
    ) -> None:
        args = {"threshold": threshold, "reward_up": reward_up, "reward_down": reward_down}
        given = {k: str(v) for k, v in args.items() if v is not None}
        await run_command(bot, interaction, "config", args=given)

    @group.command(name="train", description="Learn from this channel's feedback now")
    async def train(interaction: discord.Interaction) -> None:
        await run_command(bot, interaction, "train")

    return group


class GesalDiscordBot(discord.Client):
    """A `discord.Client` that forwards mentions, replies, reactions and ``/gesal``."""

    def __init__(self, service: ChatService, settings: Settings, **options) -> None:
        options.setdefault("intents", make_intents(settings.gesal_discord_message_content))
        options.setdefault("allowed_mentions", discord.AllowedMentions.none())
        super().__init__(**options)
        self.service = service
        self.settings = settings
        self.tree = app_commands.CommandTree(self)
        self.tree.add_command(build_gesal_group(self))
        self.gateway_up = False  # between a gateway (re)connect and the next disconnect

    async def setup_hook(self) -> None:
        await self.tree.sync()

    # -- connection state (/healthz) -------------------------------------------------
    # discord.py stays "ready" while it reconnects after a dropped gateway, so the
    # connect/disconnect events are what tell a live connection from a retrying one.
    async def on_connect(self) -> None:
        self.gateway_up = True

    async def on_ready(self) -> None:
        self.gateway_up = True
        log.info("connected to Discord as %s", self.user)

    async def on_resumed(self) -> None:
        self.gateway_up = True

    async def on_disconnect(self) -> None:
        self.gateway_up = False
        log.warning("Discord gateway disconnected; discord.py is reconnecting")

    def connection_state(self) -> Check:
        """Ready, not closed and the gateway up; the detail has the heartbeat latency."""
        if self.is_closed():
            return Check(False, "closed")
        if not self.is_ready():
            return Check(False, "connecting (no READY yet)")
        if not self.gateway_up:
            return Check(False, "gateway disconnected, reconnecting")
        latency = self.latency
        if math.isfinite(latency):
            return Check(True, f"ready, gateway latency {latency * 1000:.0f} ms")
        return Check(True, "ready")

    # -- keys ------------------------------------------------------------------------
    async def _where(self, channel_id: int, guild_id: int | None) -> tuple[str, str, str | None]:
        """(workspace, channel, thread) for a channel id; threads (forum posts too) map
        to their parent. A thread missing from the cache (archived, or created while the
        bot was disconnected) is fetched, so its votes still reach the parent's graph."""
        workspace = str(guild_id) if guild_id else "dm"
        channel = self.get_channel(channel_id)
        if channel is None:
            try:
                channel = await self.fetch_channel(channel_id)
            except SEND_ERRORS as exc:
                log.warning(
                    "could not look up channel %s (%s); if it is a thread, what happens "
                    "there is filed under the thread instead of its parent channel",
                    channel_id,
                    failure(exc),
                )
                return workspace, str(channel_id), None
        if isinstance(channel, discord.Thread):
            return workspace, str(channel.parent_id), str(channel.id)
        return workspace, str(channel_id), None

    # -- messages --------------------------------------------------------------------
    async def on_message(self, message: discord.Message) -> None:
        if message.author.bot or self.user is None:
            return
        if message.reference is not None and parse_correction(message.content) is not None:
            replied = await replied_to(message)
            if replied is None or replied.author.id == self.user.id:
                # A reply to the bot, or to a message that is gone or unreadable now: the
                # store knows whether its id carried one of the bot's answers.
                addressed = replied is not None or self.user in message.mentions
                await self._correction(message, addressed)
                return
        if self.user in message.mentions:
            await self._mention(message)

    async def _mention(self, message: discord.Message) -> None:
        """Answer a mention in a reply chain: `ChatService.exchange` tags every line,
        the reads of the context here included, with one request id."""
        thread: str | None = None

        async def mention() -> Mention:
            nonlocal thread
            workspace, channel, thread = await self._where(
                message.channel.id, message.guild and message.guild.id
            )
            assert self.user is not None
            context, more = await read_context(
                message, thread is not None, self.settings.gesal_context_messages, self.user.id
            )
            return Mention(
                PLATFORM,
                workspace,
                channel,
                str(message.author.id),
                strip_mentions(message.content),
                str(message.id),
                thread=thread,
                context=context,
                context_truncated=more,
            )

        post = self.poster(message, lambda: thread)
        delivery = await self.service.exchange(mention(), post, typing_if_allowed(message.channel))
        await self._flag(message, delivery)

    def poster(self, message: discord.Message, thread: Callable[[], str | None]) -> Post:
        """The ``post`` that `ChatService.deliver` calls: each chunk replies to the one
        before it (the first to ``message``), so a long answer reads as one chain, and
        Discord's refusal becomes a `PostError` with its reason (and the thread, which
        the channel key does not name). discord.py has retried 429s and server errors
        before it raises."""
        target = message

        async def post(chunk: str) -> str:
            nonlocal target
            try:
                target = await target.reply(chunk, mention_author=False)
            except SEND_ERRORS as exc:
                where = thread()
                raise PostError(failure(exc) + (f" in thread {where}" if where else "")) from exc
            return str(target.id)

        return post

    async def post_or_tell(
        self, message: discord.Message, parts: ReplyParts, thread: str | None = None
    ) -> Delivery:
        """Reply to ``message`` with ``parts``, flagging it when Discord refuses."""
        delivery = await self.service.deliver(parts, self.poster(message, lambda: thread))
        await self._flag(message, delivery)
        return delivery

    @staticmethod
    async def _flag(message: discord.Message, delivery: Delivery) -> None:
        """When Discord refused (part of) an answer, the operator reads why in the log
        (`ChatService.deliver`), and the member sees ⚠️ on their message.

        The ⚠️ is what can still reach the member where posting failed: a direct message
        would be out of place, and many members refuse DMs from server members. It needs
        Add Reactions and Read Message History, which a channel that denies Send Messages
        often still grants; an archived or locked thread refuses it too, and then only
        the operator's log line is left."""
        if delivery.complete:
            return
        try:
            await message.add_reaction(UNDELIVERED_FLAG)
        except SEND_ERRORS as exc:
            log.info("could not flag message %s with ⚠️ either: %s", message.id, failure(exc))

    async def _correction(self, message: discord.Message, addressed: bool) -> None:
        """Hand a ``better:`` reply to the service. ``addressed``: the member replied to
        the bot (or pinged it), so a correction that cannot count is answered with why."""
        assert message.reference is not None and message.reference.message_id is not None
        workspace, channel, thread = await self._where(
            message.channel.id, message.guild and message.guild.id
        )
        correction = Correction(
            PLATFORM,
            workspace,
            channel,
            str(message.author.id),
            str(message.id),
            str(message.reference.message_id),
            strip_mentions(message.content),
        )
        result = await self.service.handle_correction(correction)
        if result.status == "corrected":
            try:
                await message.add_reaction(CORRECTION_ACK)
            except SEND_ERRORS as exc:  # the correction is stored; only the ✅ is missing
                log.warning(
                    "correction %s in %s counted, but its ✅ could not be added: %s",
                    message.id,
                    correction.key,
                    failure(exc),
                )
        elif result.status == "error" or (result.status == "ignored" and addressed):
            text = result.message if result.status == "error" else NOT_LEARNABLE
            await self.post_or_tell(message, ReplyParts([text], "error", correction.key), thread)

    # -- reactions -------------------------------------------------------------------
    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        await self._reaction(payload, added=True)

    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        await self._reaction(payload, added=False)

    async def _reaction(self, payload: discord.RawReactionActionEvent, added: bool) -> None:
        if payload.emoji.id is not None:  # custom server emoji are never votes
            return
        workspace, channel, _ = await self._where(payload.channel_id, payload.guild_id)
        await self.service.handle_reaction(
            Reaction(
                PLATFORM,
                workspace,
                channel,
                str(payload.user_id),
                str(payload.message_id),
                str(payload.emoji),
                added,
                reactor_is_bot=self._reactor_is_bot(payload),
            )
        )

    def _reactor_is_bot(self, payload: discord.RawReactionActionEvent) -> bool:
        """This bot, or any bot: the member Discord sends with a guild reaction, else
        the cached user (a removal carries no member; a bot's vote never counted, so
        the removal of its reaction changes nothing either way)."""
        if self.user is not None and payload.user_id == self.user.id:
            return True
        if payload.member is not None:
            return payload.member.bot
        user = self.get_user(payload.user_id)
        return user is not None and user.bot

    # -- admin -----------------------------------------------------------------------
    async def admin(self, interaction: discord.Interaction, name: str, **kw) -> AdminResult:
        assert interaction.channel_id is not None
        workspace, channel, _ = await self._where(interaction.channel_id, interaction.guild_id)
        return await self.service.handle_admin(
            AdminCommand(
                PLATFORM,
                workspace,
                channel,
                str(interaction.user.id),
                name,
                is_admin=is_admin(interaction),
                **kw,
            )
        )


async def run_discord(
    service: ChatService, settings: Settings, *, health: Health | None = None
) -> None:
    """Connect to Discord with ``DISCORD_TOKEN`` and serve until cancelled; the
    connection's state shows in /healthz as ``platform_discord``."""
    if settings.discord_token is None:
        from .settings import SettingsError

        raise SettingsError("DISCORD_TOKEN is not set")
    bot = GesalDiscordBot(service, settings)
    if health is not None:
        health.add(*connection_check("discord", bot.connection_state))
    async with bot:
        await bot.start(settings.discord_token.get_secret_value())


__all__ = ["GesalDiscordBot", "build_gesal_group", "is_admin", "make_intents", "run_discord"]
