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
"""

from __future__ import annotations

import io
import logging
import math

import discord
from discord import app_commands

from .observability import Check, Health, connection_check, request_context
from .service import (
    MAX_IMPORT_BYTES,
    AdminCommand,
    AdminResult,
    ChatService,
    ContextMessage,
    Correction,
    Mention,
    Reaction,
    strip_mentions,
)
from .settings import Settings
from .text import parse_correction

log = logging.getLogger(__name__)
PLATFORM = "discord"
CORRECTION_ACK = "\u2705"  # ✅ on the member's correction
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
        await interaction.response.defer(ephemeral=True, thinking=True)
        result = await self.bot.admin(interaction, "reset", confirmed=True)
        self.stop()
        await interaction.followup.send(result.text, ephemeral=True)

    @discord.ui.button(label="Cancel", style=discord.ButtonStyle.secondary)
    async def cancel(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        self.stop()
        await interaction.response.send_message("Nothing was reset.", ephemeral=True)


def build_gesal_group(bot: GesalDiscordBot) -> app_commands.Group:
    """``/gesal reset|export|import|stats|config|train``, hidden from non-admins by
    default and re-checked on the server in `GesalDiscordBot.admin`."""
    group = app_commands.Group(
        name="gesal",
        description="Manage what the bot has learned in this channel",
        default_permissions=ADMIN_PERMISSIONS,
        guild_only=True,
    )

    async def run(
        interaction: discord.Interaction,
        name: str,
        attachment: discord.Attachment | None = None,
        **kw,
    ) -> None:
        # Defer first: Discord wants an answer within 3 s, and export/import/train
        # can take longer.
        await interaction.response.defer(ephemeral=True, thinking=True)
        if attachment is not None and is_admin(interaction):  # a member's file is never fetched
            data = await read_export(attachment)
            if isinstance(data, str):
                await interaction.followup.send(data, ephemeral=True)
                return
            kw["file"] = data
        result = await bot.admin(interaction, name, **kw)
        if result.needs_confirmation:
            view = ConfirmReset(bot, interaction.user.id)
            await interaction.followup.send(result.text, view=view, ephemeral=True)
            return
        await interaction.followup.send(result.text, files=_files(result), ephemeral=True)

    @group.command(name="reset", description="Forget everything learned in this channel")
    async def reset(interaction: discord.Interaction) -> None:
        await run(interaction, "reset")

    @group.command(name="export", description="Download this channel's graph (JSON + picture)")
    async def export(interaction: discord.Interaction) -> None:
        await run(interaction, "export")

    @group.command(name="import", description="Replace this channel's graph with an export")
    @app_commands.describe(file="a JSON file made by /gesal export")
    async def import_(interaction: discord.Interaction, file: discord.Attachment) -> None:
        await run(interaction, "import", attachment=file)

    @group.command(name="stats", description="Nodes, votes, rewards and last update")
    async def stats(interaction: discord.Interaction) -> None:
        await run(interaction, "stats")

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
        await run(interaction, "config", args={k: str(v) for k, v in args.items() if v is not None})

    @group.command(name="train", description="Learn from this channel's feedback now")
    async def train(interaction: discord.Interaction) -> None:
        await run(interaction, "train")

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
        """(workspace, channel, thread) for a channel id; threads map to their parent."""
        workspace = str(guild_id) if guild_id else "dm"
        channel = self.get_channel(channel_id)
        if channel is None:
            try:
                channel = await self.fetch_channel(channel_id)
            except discord.HTTPException:
                return workspace, str(channel_id), None
        if isinstance(channel, discord.Thread):
            return workspace, str(channel.parent_id), str(channel.id)
        return workspace, str(channel_id), None

    # -- messages --------------------------------------------------------------------
    async def on_message(self, message: discord.Message) -> None:
        if message.author.bot or self.user is None:
            return
        replied = await self._replied_to(message)
        to_me = replied is not None and replied.author.id == self.user.id
        if to_me and parse_correction(message.content) is not None:
            await self._correction(message, replied)
        elif self.user in message.mentions:
            await self._mention(message)

    async def _replied_to(self, message: discord.Message) -> discord.Message | None:
        ref = message.reference
        if ref is None or ref.message_id is None:
            return None
        if isinstance(ref.resolved, discord.Message):
            return ref.resolved
        try:
            return await message.channel.fetch_message(ref.message_id)
        except discord.HTTPException:
            return None

    async def _context(self, message: discord.Message) -> tuple[list[ContextMessage], bool]:
        """Earlier messages of the reply chain (or of the thread), oldest first."""
        limit = self.settings.gesal_context_messages
        found: list[discord.Message] = []
        more = False
        current = message
        while current.reference is not None and limit:
            if len(found) >= limit:
                more = True
                break
            parent = await self._replied_to(current)
            if parent is None:
                break
            found.append(parent)
            current = parent
        if not found and isinstance(message.channel, discord.Thread) and limit:
            async for m in message.channel.history(limit=limit + 1, before=message):
                found.append(m)
            more = len(found) > limit
            found = found[:limit]
        assert self.user is not None
        context = [
            ContextMessage(
                str(m.author.id), strip_mentions(m.content), is_bot=m.author.id == self.user.id
            )
            for m in reversed(found)
            if m.content
        ]
        return context, more

    async def _mention(self, message: discord.Message) -> None:
        with request_context():  # one id on every log line of this mention
            await self._answer_mention(message)

    async def _answer_mention(self, message: discord.Message) -> None:
        workspace, channel, thread = await self._where(
            message.channel.id, message.guild and message.guild.id
        )
        context, more = await self._context(message)
        mention = Mention(
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
        async with message.channel.typing():
            parts = await self.service.handle_mention(mention)
        ids: list[str] = []
        target = message
        for chunk in parts.chunks:  # each chunk replies to the previous one: one chain
            try:
                target = await target.reply(chunk, mention_author=False)
            except discord.HTTPException as exc:
                log.warning("could not post a reply in %s: %s", parts.channel_key, exc)
                break
            ids.append(str(target.id))
        await self.service.link_reply(parts, ids)
        log.info(
            "posted %d of %d message(s) in %s", len(ids), len(parts.chunks), message.channel.id
        )

    async def _correction(self, message: discord.Message, replied: discord.Message) -> None:
        workspace, channel, _ = await self._where(
            message.channel.id, message.guild and message.guild.id
        )
        result = await self.service.handle_correction(
            Correction(
                PLATFORM,
                workspace,
                channel,
                str(message.author.id),
                str(message.id),
                str(replied.id),
                strip_mentions(message.content),
            )
        )
        try:
            if result.status == "corrected":
                await message.add_reaction(CORRECTION_ACK)
            elif result.status == "error":
                await message.reply(result.message, mention_author=False)
        except discord.HTTPException as exc:
            log.warning("could not acknowledge a correction: %s", exc)

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
