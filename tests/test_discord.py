"""The Discord adapter driven offline through the real discord.py client.

`simcord` runs discord.py's own gateway parsers, cache, HTTP client and command tree
against an in-memory Discord, so these tests exercise the same code paths as
production: MESSAGE_CREATE with a mention, raw reaction events, slash-command
interactions with deferral, followups with files, and buttons.
"""

from __future__ import annotations

import asyncio
import json

import discord
import pytest
import simcord

from bot.discord_app import CORRECTION_ACK, GesalDiscordBot, make_intents
from bot.service import ChatService
from bot.settings import load_settings

from .fakes.tiny import make_engine

ADMIN_COMMANDS = ["reset", "export", "stats", "config", "train"]


@pytest.fixture
def settings(monkeypatch):
    for name in ("DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET"):
        monkeypatch.delenv(name, raising=False)
    return load_settings(None)


@pytest.fixture
def engine(tiny_tokenizer):
    eng = make_engine(tiny_tokenizer)
    yield eng
    eng.close()


def make_bot(engine, settings):
    service = ChatService(engine, settings)
    return GesalDiscordBot(service, settings)


async def world(env):
    guild = env.create_guild("town")
    channel = guild.create_text_channel("general")
    mod_role = guild.create_role("mods", permissions=discord.Permissions(manage_channels=True))
    alice = guild.add_member(env.create_user("alice"), roles=[mod_role])
    bob = guild.add_member(env.create_user("bob"))
    await env.settle()
    return guild, channel, alice, bob


def bot_messages(env, channel):
    return [m for m in channel.history() if m.author.id == env.bot.user.id]


def answer(result):
    """The bot's last word on an interaction: after a defer, the first followup
    completes the original "thinking…" response, later ones are extra messages."""
    msgs = [m for m in [result.response, *result.followups] if m is not None]
    assert msgs, "the bot never answered"
    return msgs[-1]


def deferred_first(env, since):
    """The first callback of the interaction was a type-5 defer (answered within 3 s)."""
    callbacks = [r for r in env.http_requests[since:] if r.path.endswith("/callback")]
    return bool(callbacks) and callbacks[0].json["type"] == 5


def test_intents_are_minimal():
    intents = make_intents()
    assert intents.guilds and intents.guild_messages and intents.guild_reactions
    assert not intents.message_content and not intents.members and not intents.presences
    assert not intents.dm_messages and not intents.guild_typing


def test_mention_reply_reactions_and_correction(engine, settings):
    async def go():
        bot = make_bot(engine, settings)
        async with simcord.run(bot) as env:
            guild, channel, alice, bob = await world(env)
            question = await bob.send(channel, f"{env.bot.user.mention} hello world")
            await env.settle()
            replies = bot_messages(env, channel)
            assert len(replies) == 1
            reply = replies[0]
            assert reply.reference is not None and reply.reference.message_id == question.id
            key = f"discord:{guild.id}:{channel.id}"
            reply_id = await engine.reply_for_message(key, str(reply.id))
            assert reply_id is not None
            stored = await engine.store.get_reply(key, reply_id)
            assert stored.prompt_text == "hello world" and reply.content == stored.text

            await alice.react(reply, "👍🏽")
            await bob.react(reply, "👎")
            await bob.react(question, "👍")  # not the bot's message: ignored
            await env.settle()
            stored = await engine.store.get_reply(key, reply_id)
            assert stored.votes == {str(alice.id): 1, str(bob.id): -1}
            await alice.unreact(reply, "👍🏽")
            await env.settle()
            stored = await engine.store.get_reply(key, reply_id)
            assert stored.votes == {str(bob.id): -1}
            assert await engine.pending(key) == 3

            fix = await alice.send(channel, "better: Hello! How can I help?", reply_to=reply)
            await env.settle()
            stored = await engine.store.get_reply(key, reply_id)
            assert stored.corrections[0]["text"] == "Hello! How can I help?"
            fix_now = next(m for m in channel.history() if m.id == fix.id)
            assert [str(r.emoji) for r in fix_now.reactions] == [CORRECTION_ACK]

    asyncio.run(go())


def test_long_answer_is_split_into_a_reply_chain(engine, settings):
    async def go():
        real = engine.respond

        async def long_answer(channel, messages, record=True):
            out = await real(channel, messages, record)
            out.text = "word " * 400 + "x"  # 2001 characters
            return out

        engine.respond = long_answer
        bot = make_bot(engine, settings)
        async with simcord.run(bot) as env:
            guild, channel, alice, bob = await world(env)
            question = await bob.send(channel, f"{env.bot.user.mention} tell me everything")
            await env.settle()
            replies = bot_messages(env, channel)
            assert len(replies) == 2
            assert all(len(m.content) <= 2000 for m in replies)
            assert " ".join(m.content for m in replies).split() == (["word"] * 400 + ["x"])
            assert replies[0].reference.message_id == question.id
            assert replies[1].reference.message_id == replies[0].id
            # a vote on the second chunk counts for the same reply
            await alice.react(replies[1], "👍")
            await env.settle()
            key = f"discord:{guild.id}:{channel.id}"
            rid = await engine.reply_for_message(key, str(replies[0].id))
            assert (await engine.store.get_reply(key, rid)).votes == {str(alice.id): 1}

    asyncio.run(go())


def test_admin_commands_hidden_and_refused_for_non_admins(engine, settings):
    async def go():
        bot = make_bot(engine, settings)
        async with simcord.run(bot) as env:
            guild, channel, alice, bob = await world(env)
            assert "gesal stats" in alice.available_commands(channel)
            # default_permissions hides the group from members without Manage Channels
            assert not any(c.startswith("gesal") for c in bob.available_commands(channel))
            # ...but a server may grant it to anyone: the bot must still refuse
            commands = await env.bot.tree.fetch_commands()
            gesal = next(c for c in commands if c.name == "gesal")
            guild.set_command_permissions(gesal, {bob: True})
            assert "gesal stats" in bob.available_commands(channel)
            for name in ADMIN_COMMANDS:
                since = len(env.http_requests)
                result = await bob.slash(channel, f"gesal {name}")
                await env.settle()
                assert deferred_first(env, since), name
                assert "only admins" in answer(result).content, name
                assert not answer(result).attachments and not answer(result).components
            result = await bob.slash(
                channel, "gesal import", file=("g.json", b'{"format": "gesal-graph"}')
            )
            await env.settle()
            assert "only admins" in answer(result).content
            assert (await engine.stats(f"discord:{guild.id}:{channel.id}"))["nodes"] == 0

    asyncio.run(go())


def test_admin_export_import_config_and_reset(engine, settings):
    async def go():
        bot = make_bot(engine, settings)
        async with simcord.run(bot) as env:
            guild, channel, alice, bob = await world(env)
            key = f"discord:{guild.id}:{channel.id}"
            await bob.send(channel, f"{env.bot.user.mention} hello world")
            await env.settle()

            since = len(env.http_requests)
            result = await alice.slash(channel, "gesal export")
            await env.settle()
            assert deferred_first(env, since)
            files = {a.filename: a for a in answer(result).attachments}
            json_name = next(n for n in files if n.endswith(".json"))
            assert any(n.endswith(".png") for n in files)
            data = json.loads(await files[json_name].read())
            assert data["channel"] == key and len(data["nodes"]) == 1

            result = await alice.slash(channel, "gesal config", threshold=0.5)
            await env.settle()
            assert "Updated" in answer(result).content
            assert (await engine.store.get_config(key)).threshold == 0.5

            result = await alice.slash(channel, "gesal stats")
            await env.settle()
            assert "1 nodes" in answer(result).content

            # reset: a confirmation button first, nothing is deleted until it is pressed
            result = await alice.slash(channel, "gesal reset")
            await env.settle()
            prompt = answer(result)
            assert "cannot be undone" in prompt.content
            assert (await engine.stats(key))["nodes"] == 1
            click = await alice.click(prompt, label="Reset this channel")
            await env.settle()
            assert "reset" in answer(click).content.lower()
            assert (await engine.stats(key))["nodes"] == 0

            raw = json.dumps(data).encode()
            result = await alice.slash(channel, "gesal import", file=("graph.json", raw))
            await env.settle()
            assert "Imported 1 nodes" in answer(result).content
            assert (await engine.stats(key))["nodes"] == 1

    asyncio.run(go())


def test_healthz_follows_the_discord_connection(engine, settings):
    """``platform_discord`` is 503 until READY, while the gateway is down and after
    close; 200 with the heartbeat latency while connected (the real client's state)."""
    from bot.health import Health, connection_check

    async def go():
        bot = make_bot(engine, settings)
        health = Health()
        health.add(*connection_check("discord", bot.connection_state))

        async def check():
            ok, body = await health.report()
            assert ok is body["checks"]["platform_discord"]["ok"]
            return body["checks"]["platform_discord"]

        assert (await check()) == {"ok": False, "detail": "connecting (no READY yet)"}
        async with simcord.run(bot) as env:
            await world(env)
            assert (await check()) == {"ok": True, "detail": "ready, gateway latency 0 ms"}
            bot.dispatch("disconnect")  # what discord.py emits when the websocket drops
            await env.settle()
            assert (await check()) == {"ok": False, "detail": "gateway disconnected, reconnecting"}
            bot.dispatch("resumed")
            await env.settle()
            assert (await check())["ok"] is True
            await bot.close()  # shutting down (simcord itself leaves the client open)
            assert (await check()) == {"ok": False, "detail": "closed"}

    asyncio.run(go())


def test_run_discord_registers_its_connection_in_healthz(engine, settings, monkeypatch):
    """run_discord wires the check before it logs in: a rejected token leaves
    /healthz at 503 for platform_discord (Discord's REST faked on loopback)."""
    from aiohttp import web
    from pydantic import SecretStr

    from bot.discord_app import run_discord
    from bot.health import Health

    from .fakes.health import serve_healthz

    async def unauthorized(_request):
        return web.json_response({"message": "401: Unauthorized", "code": 0}, status=401)

    async def go():
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", unauthorized)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001
        monkeypatch.setattr(discord.http.Route, "BASE", f"http://127.0.0.1:{port}/api/v10")
        health = Health()
        cfg = settings.model_copy(update={"discord_token": SecretStr("bad.token.value")})
        try:
            with pytest.raises(discord.LoginFailure):
                await run_discord(ChatService(engine, cfg), cfg, health=health)
            async with serve_healthz(health) as get:
                status, body = await get()
            assert status == 503 and body["checks"]["platform_discord"]["ok"] is False
            assert "bad.token.value" not in json.dumps(body)
        finally:
            await runner.cleanup()

    asyncio.run(go())


def test_every_log_line_of_a_mention_carries_one_request_id(engine, settings, caplog):
    """The adapter's and the service's log lines of one mention (its metrics line
    "replied in" included) share a request id; the next mention gets another one."""
    import logging

    from bot.logs import RequestIdFilter
    from bot.metrics import Metrics

    caplog.set_level(logging.INFO, logger="bot")
    caplog.handler.addFilter(RequestIdFilter())  # what configure_logging installs

    async def go():
        service = ChatService(engine, settings, metrics=Metrics())
        bot = GesalDiscordBot(service, settings)
        async with simcord.run(bot) as env:
            guild, channel, alice, bob = await world(env)
            for who in (bob, alice):
                await who.send(channel, f"{env.bot.user.mention} hello from {who.name}")
                await env.settle()
            return len(bot_messages(env, channel))

    assert asyncio.run(go()) == 2
    tagged = [r for r in caplog.records if r.request_id != "-"]
    by_rid: dict[str, set[str]] = {}
    for r in tagged:
        by_rid.setdefault(r.request_id, set()).add(r.name)
    assert len(by_rid) == 2, by_rid  # one id per mention
    for names in by_rid.values():  # ...on the adapter's and the service's lines
        assert {"bot.discord_app", "bot.service"} <= names
    replied = [r for r in tagged if r.getMessage().startswith("replied in")]
    assert len(replied) == 2 and all(r.reply_id for r in replied)
    assert {r.request_id for r in replied} == set(by_rid)
    untagged = [r.getMessage() for r in caplog.records if r.request_id == "-"]
    assert not any("mention from" in m or "replied in" in m for m in untagged)


def test_reactions_by_other_bots_do_not_count(engine, settings):
    async def go():
        bot = make_bot(engine, settings)
        async with simcord.run(bot) as env:
            guild, channel, alice, bob = await world(env)
            helper = guild.add_member(env.create_user("helper", bot=True))
            await env.settle()
            await bob.send(channel, f"{env.bot.user.mention} hello world")
            await env.settle()
            reply = bot_messages(env, channel)[0]
            key = f"discord:{guild.id}:{channel.id}"
            reply_id = await engine.reply_for_message(key, str(reply.id))
            await helper.react(reply, "👍")
            await helper.react(reply, "👎")
            await alice.react(reply, "👍")
            await env.settle()
            assert (await engine.store.get_reply(key, reply_id)).votes == {str(alice.id): 1}
            assert await engine.pending(key) == 1

    asyncio.run(go())


def _record_cdn_reads(env) -> list[str]:
    """Every attachment the bot downloads from the (fake) CDN, by URL."""
    reads: list[str] = []
    real = env.backend.cdn.get

    def get(url: str):
        reads.append(url)
        return real(url)

    env.backend.cdn.get = get
    return reads


def test_import_attachment_is_fetched_only_for_an_admin_and_within_the_cap(
    engine, settings, monkeypatch
):
    import bot.discord_app as discord_app

    monkeypatch.setattr(discord_app, "MAX_DOWNLOAD_BYTES", 4096)

    async def go():
        bot = make_bot(engine, settings)
        async with simcord.run(bot) as env:
            guild, channel, alice, bob = await world(env)
            reads = _record_cdn_reads(env)
            commands = await env.bot.tree.fetch_commands()
            gesal = next(c for c in commands if c.name == "gesal")
            guild.set_command_permissions(gesal, {bob: True})  # the server lets bob use it
            small = ("g.json", b'{"format": "gesal-graph"}')

            result = await bob.slash(channel, "gesal import", file=small)
            await env.settle()
            assert "only admins" in answer(result).content
            assert reads == []  # a member's attachment is never downloaded

            result = await alice.slash(channel, "gesal import", file=("g.json", b"x" * 5000))
            await env.settle()
            said = answer(result).content
            assert "too large" in said and ". " not in said
            assert reads == []  # Discord's size says so: not downloaded either

            await alice.slash(channel, "gesal import", file=small)
            await env.settle()
            assert len(reads) == 1 and reads[0].endswith("/g.json")

    asyncio.run(go())


async def forged_click(env, member, message, label: str):
    """``member`` presses a button of a message they cannot see: the interaction
    simcord's `click` refuses to build for them, sent as a client could send it."""
    from simcord import actors

    stored = env.backend.get_message(message.channel_id, message.id)
    button = actors._find_component(  # noqa: SLF001
        stored.components, types=(discord.ComponentType.button.value,), custom_id=None, label=label
    )
    data = {"custom_id": button["custom_id"], "component_type": button["type"]}
    return await actors._component_interaction(member, stored, data)  # noqa: SLF001


def test_reset_button_rechecks_who_presses_it(engine, settings):
    """The reset prompt's button re-checks on the bot's side: another member pressing
    it, or the admin after losing Manage Channels, is refused and nothing is reset."""

    async def go():
        bot = make_bot(engine, settings)
        async with simcord.run(bot) as env:
            guild, channel, alice, bob = await world(env)
            mod_role = guild.roles["mods"]
            key = f"discord:{guild.id}:{channel.id}"
            await bob.send(channel, f"{env.bot.user.mention} hello world")
            await env.settle()
            assert (await engine.stats(key))["nodes"] == 1

            async def prompt():
                result = await alice.slash(channel, "gesal reset")
                await env.settle()
                assert "cannot be undone" in answer(result).content
                return answer(result)

            first = await prompt()
            # Discord shows alice's ephemeral prompt to nobody else; a client that sends
            # its button anyway (a forged or replayed interaction) reaches the bot as bob
            click = await forged_click(env, bob, first, "Reset this channel")
            await env.settle()
            assert "Only the admin who asked" in answer(click).content
            assert (await engine.stats(key))["nodes"] == 1

            # alice loses Manage Channels between the command and the button press
            env.backend.remove_member_role(guild.id, alice.id, mod_role.id)
            await env.settle()
            click = await alice.click(first, label="Reset this channel")
            await env.settle()
            assert "only admins" in answer(click).content
            assert (await engine.stats(key))["nodes"] == 1

            # with the role back, a fresh prompt's button resets
            env.backend.add_member_role(guild.id, alice.id, mod_role.id)
            await env.settle()
            click = await alice.click(await prompt(), label="Reset this channel")
            await env.settle()
            assert "has been reset" in answer(click).content
            assert (await engine.stats(key))["nodes"] == 0

    asyncio.run(go())


def test_redis_down_a_member_sees_no_address(tiny_tokenizer, settings, caplog):
    """With Redis unreachable, the answer in the channel says the bot's memory is
    unavailable; the URL's host, port, user name and password stay out of it, and the
    password out of the log."""
    import logging
    import socket

    from gesal_core.store.redis_store import RedisStore

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens
    password = "Pa55-w0rd-xyz"
    caplog.set_level(logging.DEBUG)
    eng = make_engine(tiny_tokenizer, store=RedisStore(f"redis://{password}@127.0.0.1:{port}/0"))

    async def go():
        async with simcord.run(make_bot(eng, settings)) as env:
            guild, channel, alice, bob = await world(env)
            await bob.send(channel, f"{env.bot.user.mention} hello world")
            await env.settle()
            return [m.content for m in bot_messages(env, channel)]

    try:
        said = asyncio.run(go())
    finally:
        eng.close()
    assert len(said) == 1 and "memory" in said[0] and "not reachable" in said[0]
    for leak in (password, "127.0.0.1", str(port), "redis://"):
        assert leak not in said[0]
    assert password not in caplog.text and f"redis://***@127.0.0.1:{port}/0" in caplog.text
