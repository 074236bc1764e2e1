"""The Discord adapter driven offline through the real discord.py client.

`simcord` runs discord.py's own gateway parsers, cache, HTTP client and command tree
against an in-memory Discord, so these tests exercise the same code paths as
production: MESSAGE_CREATE with a mention, raw reaction events, slash-command
interactions with deferral, followups with files, and buttons.
"""

from __future__ import annotations

import asyncio
import json
import logging

import discord
import pytest
import simcord

from bot.discord_app import (
    CORRECTION_ACK,
    NOT_LEARNABLE,
    UNDELIVERED_FLAG,
    GesalDiscordBot,
    make_intents,
)
from bot.service import ChatService
from bot.settings import load_settings

from .fakes.tiny import make_engine

ADMIN_COMMANDS = ["reset", "export", "stats", "config", "train"]


def discord_settings(monkeypatch):
    """Default settings, whatever tokens the environment running the tests has."""
    for name in ("DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET"):
        monkeypatch.delenv(name, raising=False)
    return load_settings(None)


@pytest.fixture
def settings(monkeypatch):
    return discord_settings(monkeypatch)


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
    """The service's log lines of one mention (its metrics line "replied in" and the
    delivery included) share a request id; the next mention gets another one."""
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
    for names in by_rid.values():  # ...on the service's lines, delivery too
        assert "bot.service" in names
    posted = [r for r in tagged if r.getMessage().startswith("posted")]
    assert {r.request_id for r in posted} == set(by_rid)
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


# -- threads, forum posts and references -----------------------------------------------
def record_prompts(engine) -> list[list[dict]]:
    """The chat messages the engine is asked to answer, one list per mention: shows
    which context the adapter read."""
    seen: list[list[dict]] = []
    real = engine.respond

    async def respond(channel, messages, record=True):
        seen.append(list(messages))
        return await real(channel, messages, record)

    engine.respond = respond
    return seen


def texts(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages]


async def gateway_message(env, channel, author, content, *, reference=None, **payload):
    """``author`` posts in ``channel`` as Discord's gateway announces it, with fields
    simcord's actors do not produce: a reply to a message deleted before it was sent
    (``referenced_message=None``), or no ``referenced_message`` at all (discord.py then
    has only the reference's ids)."""
    from simcord.backend import serializers

    backend = env.backend
    ref = None
    if reference is not None:
        ref = {"channel_id": str(channel.id), "message_id": str(reference)}
    message = backend.prepare_message(channel.id, author.id, content, reference=ref)
    backend.commit_message(message, broadcast=False)
    data = dict(serializers.message_payload(backend, message))
    guild = backend.guilds[channel.guild.id]
    data["member"] = serializers.member_payload(
        backend, guild, guild.members[author.id], with_user=False
    )
    for name, value in payload.items():
        if value is ...:
            data.pop(name, None)
        else:
            data[name] = value
    backend.emit("MESSAGE_CREATE", data)
    await env.settle()
    return message


def in_channel(env, channel):
    return [m for m in channel.history() if m.author.id == env.bot.user.id]


def test_thread_mention_context_vote_and_correction(engine, settings):
    """In a thread: answered in the thread, filed under the parent channel, the thread's
    earlier messages are the context, and votes and corrections there count."""
    prompts = record_prompts(engine)

    async def go():
        async with simcord.run(make_bot(engine, settings)) as env:
            guild, channel, alice, bob = await world(env)
            thread = env.backend.create_thread(channel.id, "help", bob.id)
            await env.settle()
            thread = next(t for t in channel.threads if t.id == thread.id)
            await bob.send(thread, "my laptop will not boot")
            question = await alice.send(thread, f"{env.bot.user.mention} any idea?")
            await env.settle()
            assert not in_channel(env, channel)  # nothing in the parent channel
            (reply,) = bot_messages(env, thread)
            assert reply.reference.message_id == question.id
            assert texts(prompts[-1]) == [f"{bob.id}: my laptop will not boot", "any idea?"]

            key = f"discord:{guild.id}:{channel.id}"
            reply_id = await engine.reply_for_message(key, str(reply.id))
            assert reply_id is not None
            await alice.react(reply, "👍")
            await env.settle()
            assert (await engine.store.get_reply(key, reply_id)).votes == {str(alice.id): 1}

            fix = await bob.send(thread, "better: check the power cable", reply_to=reply)
            await env.settle()
            stored = await engine.store.get_reply(key, reply_id)
            assert stored.corrections[0]["text"] == "check the power cable"
            fix_now = next(m for m in thread.history() if m.id == fix.id)
            assert [str(r.emoji) for r in fix_now.reactions] == [CORRECTION_ACK]

    asyncio.run(go())


def test_thread_missing_from_the_cache_still_maps_to_its_parent(engine, settings):
    """A thread discord.py never cached (created while the bot was away, archived and
    reopened): the message's channel is only a PartialMessageable; the thread is
    fetched, so the answer, its context and its votes still belong to the parent."""
    prompts = record_prompts(engine)

    async def go():
        async with simcord.run(make_bot(engine, settings)) as env:
            guild, channel, alice, bob = await world(env)
            made = env.backend.create_thread(channel.id, "quiet", bob.id, broadcast=False)
            thread = next(t for t in channel.threads if t.id == made.id)
            await bob.send(thread, "the build is red")
            assert env.bot.get_channel(thread.id) is None
            await alice.send(thread, f"{env.bot.user.mention} why?")
            await env.settle()
            (reply,) = bot_messages(env, thread)
            assert texts(prompts[-1]) == [f"{bob.id}: the build is red", "why?"]
            key = f"discord:{guild.id}:{channel.id}"
            reply_id = await engine.reply_for_message(key, str(reply.id))
            assert reply_id is not None
            await bob.react(reply, "👎")
            await env.settle()
            assert (await engine.store.get_reply(key, reply_id)).votes == {str(bob.id): -1}

    asyncio.run(go())


async def forum_post(env, forum, author, title: str, content: str):
    """``author`` opens a post in ``forum``: a thread whose starter message has the
    thread's id, announced THREAD_CREATE then MESSAGE_CREATE as Discord does (simcord's
    own `create_forum_post` only lets the bot start posts)."""
    backend = env.backend
    made = backend.create_thread(forum.id, title, author.id, broadcast=False)
    starter = backend.prepare_message(made.id, author.id, content)
    starter.id = made.id
    backend.commit_message(starter, broadcast=False)
    backend.announce_thread_create(made)
    backend.announce_message_create(starter)
    await env.settle()
    return next(t for t in forum.threads if t.id == made.id)


def test_forum_post_is_answered_in_the_post_and_filed_under_the_forum(engine, settings):
    prompts = record_prompts(engine)

    async def go():
        async with simcord.run(make_bot(engine, settings)) as env:
            guild, channel, alice, bob = await world(env)
            forum = guild.create_forum_channel("help-forum")
            await env.settle()
            post = await forum_post(
                env, forum, bob, "Printer", f"{env.bot.user.mention} my printer jams"
            )
            (reply,) = bot_messages(env, post)
            assert reply.reference.message_id == post.id  # the starter message
            assert texts(prompts[-1]) == ["my printer jams"]
            key = f"discord:{guild.id}:{forum.id}"
            reply_id = await engine.reply_for_message(key, str(reply.id))
            assert reply_id is not None
            await alice.react(reply, "👍")
            await env.settle()
            assert (await engine.store.get_reply(key, reply_id)).votes == {str(alice.id): 1}

            # a later mention in the post, not a reply: the post so far is the context
            await alice.send(post, f"{env.bot.user.mention} and if it still jams?")
            await env.settle()
            context = prompts[-1][:-1]
            assert context[0] == {"role": "user", "content": f"{bob.id}: my printer jams"}
            assert context[1] == {"role": "assistant", "content": reply.content}
            assert len(bot_messages(env, post)) == 2

            await alice.send(post, "better: open the rear tray", reply_to=reply)
            await env.settle()
            stored = await engine.store.get_reply(key, reply_id)
            assert stored.corrections[0]["text"] == "open the rear tray"

    asyncio.run(go())


def test_mention_replying_to_a_deleted_message_is_answered(engine, settings):
    """The chain's context stops at a deleted message: Discord says it is gone
    (``referenced_message: null``), so it is not fetched either."""
    prompts = record_prompts(engine)

    async def go():
        async with simcord.run(make_bot(engine, settings)) as env:
            guild, channel, alice, bob = await world(env)
            gone = await alice.send(channel, "a message that will be deleted")
            await alice.delete(gone)
            since = len(env.http_requests)
            await gateway_message(
                env,
                channel,
                bob,
                f"{env.bot.user.mention} what did alice mean?",
                reference=gone.id,
                referenced_message=None,
            )
            (reply,) = bot_messages(env, channel)
            assert texts(prompts[-1]) == ["what did alice mean?"]
            fetched = [r.path for r in env.http_requests[since:] if r.method == "GET"]
            assert f"/channels/{channel.id}/messages/{gone.id}" not in fetched
            key = f"discord:{guild.id}:{channel.id}"
            assert await engine.reply_for_message(key, str(reply.id)) is not None

    asyncio.run(go())


def test_correction_counts_without_the_answer_in_the_cache_or_after_its_deletion(engine, settings):
    """A ``better:`` reply is matched by the referenced message id: it counts when the
    gateway carries no copy of the answer (it is fetched), and when a moderator deleted
    the answer since: the store still knows that id was the bot's answer, and a
    correction is most useful on exactly such an answer. It is not answered as a
    question although it mentions the bot."""

    async def go():
        async with simcord.run(make_bot(engine, settings)) as env:
            guild, channel, alice, bob = await world(env)
            mod = guild.add_member(
                env.create_user("mod"),
                roles=[guild.create_role("del", permissions=discord.Permissions.all())],
            )
            await env.settle()
            key = f"discord:{guild.id}:{channel.id}"
            for who in (alice, bob):
                await who.send(channel, f"{env.bot.user.mention} hello world")
                await env.settle()
            first, second = bot_messages(env, channel)

            # no referenced_message: discord.py has the ids only and fetches the answer
            fix = await gateway_message(
                env, channel, alice, "better: hi there", reference=first.id, referenced_message=...
            )
            rid = await engine.reply_for_message(key, str(first.id))
            assert (await engine.store.get_reply(key, rid)).corrections[0]["text"] == "hi there"
            stored_fix = env.backend.get_message(channel.id, fix.id)
            assert [r.emoji for r in stored_fix.reactions] == [CORRECTION_ACK]

            # the answer is deleted; the correction arrives with referenced_message null.
            # A reply to a deleted message pings nobody, so without the message content
            # intent Discord only sends its text when it mentions the bot.
            await mod.delete(second)
            await env.settle()
            fix = await gateway_message(
                env,
                channel,
                bob,
                f"{env.bot.user.mention} better: hello!",
                reference=second.id,
                referenced_message=None,
            )
            rid = await engine.reply_for_message(key, str(second.id))
            assert (await engine.store.get_reply(key, rid)).corrections[0]["text"] == "hello!"
            stored_fix = env.backend.get_message(channel.id, fix.id)
            assert [r.emoji for r in stored_fix.reactions] == [CORRECTION_ACK]
            assert len(bot_messages(env, channel)) == 1  # "better: …" was not answered

    asyncio.run(go())


def test_correction_on_a_bot_message_that_is_not_an_answer_is_told_why(engine, settings):
    """A ``better:`` reply to the bot's "ask me something" prompt (no answer behind
    it) cannot count; the member is told, instead of hearing nothing."""

    async def go():
        async with simcord.run(make_bot(engine, settings)) as env:
            guild, channel, alice, bob = await world(env)
            await bob.send(channel, f"{env.bot.user.mention}")
            await env.settle()
            (prompt,) = bot_messages(env, channel)
            assert "Ask me something" in prompt.content
            fix = await bob.send(channel, "better: say hello", reply_to=prompt)
            await env.settle()
            told = bot_messages(env, channel)[-1]
            assert told.reference.message_id == fix.id
            assert told.content == NOT_LEARNABLE

    asyncio.run(go())


# -- when Discord refuses to post -------------------------------------------------------
def undelivered(metrics, kind: str) -> float:
    value = metrics.registry.get_sample_value(
        "gesal_undelivered_total", {"platform": "discord", "kind": kind}
    )
    return value or 0.0


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def flags_on(env, channel, message) -> list[str]:
    """The bot's own reactions on ``message``."""
    stored = env.backend.get_message(channel.id, message.id)
    return [r.emoji for r in stored.reactions if env.bot.user.id in r.user_ids]


@pytest.mark.parametrize("where", ["channel", "thread"])
def test_no_permission_to_post_flags_the_question_and_tells_the_operator_once(
    engine, settings, caplog, where
):
    """Send Messages (or Send Messages in Threads) denied: the refused typing indicator
    does not stop anything, the unposted answer is discarded, the operator reads one
    warning with the channel and Discord's reason, the member sees ⚠️ on the question."""
    from bot.metrics import Metrics

    caplog.set_level(logging.INFO)
    metrics = Metrics()

    async def go():
        bot = GesalDiscordBot(ChatService(engine, settings, metrics=metrics), settings)
        async with simcord.run(bot) as env:
            guild, _, alice, bob = await world(env)
            deny = (
                discord.PermissionOverwrite(send_messages=False)
                if where == "channel"
                else discord.PermissionOverwrite(send_messages_in_threads=False)
            )
            channel = guild.create_text_channel("quiet", overwrites={env.bot.user: deny})
            target = channel
            if where == "thread":
                made = env.backend.create_thread(channel.id, "t", bob.id)
                await env.settle()
                target = next(t for t in channel.threads if t.id == made.id)
            await env.settle()
            question = await bob.send(target, f"{env.bot.user.mention} hello world")
            await env.settle()
            assert not bot_messages(env, target)
            assert flags_on(env, target, question) == [UNDELIVERED_FLAG]
            key = f"discord:{guild.id}:{channel.id}"
            assert (await engine.stats(key))["replies"] == 0  # discarded
            return key, target.id

    key, target_id = asyncio.run(go())
    (warning,) = warnings_of(caplog)
    assert key in warning and "Missing Permissions (HTTP 403, code 50013)" in warning
    assert (f"in thread {target_id}" in warning) is (where == "thread")
    assert undelivered(metrics, "answer") == 1


def test_archived_thread_is_reported_when_nothing_can_be_posted(engine, settings, caplog):
    """Discord refuses every write in an archived thread (50083): the answer is dropped
    and logged once; the ⚠️ cannot be added either, which changes nothing else."""
    caplog.set_level(logging.INFO)

    async def go():
        async with simcord.run(make_bot(engine, settings)) as env:
            guild, channel, alice, bob = await world(env)
            made = env.backend.create_thread(channel.id, "old", bob.id)
            await env.settle()
            thread = next(t for t in channel.threads if t.id == made.id)
            for method, path in (
                ("POST", "/channels/*/typing"),
                ("POST", "/channels/*/messages"),
                ("PUT", "/channels/*/messages/*/reactions/*"),
            ):
                env.inject_error(
                    method, path, status=400, code=50083, message="Thread is archived", times=None
                )
            question = await bob.send(thread, f"{env.bot.user.mention} hello world")
            await env.settle()
            assert not bot_messages(env, thread) and not flags_on(env, thread, question)
            key = f"discord:{guild.id}:{channel.id}"
            assert (await engine.stats(key))["replies"] == 0
            return key, thread.id

    key, thread_id = asyncio.run(go())
    (warning,) = warnings_of(caplog)
    assert key in warning and f"in thread {thread_id}" in warning
    assert "Thread is archived (HTTP 400, code 50083)" in warning


def test_correction_without_add_reactions_still_counts_and_is_logged(engine, settings, caplog):
    caplog.set_level(logging.INFO)

    async def go():
        async with simcord.run(make_bot(engine, settings)) as env:
            guild, _, alice, bob = await world(env)
            deny = discord.PermissionOverwrite(add_reactions=False)
            channel = guild.create_text_channel("noreact", overwrites={env.bot.user: deny})
            await env.settle()
            await bob.send(channel, f"{env.bot.user.mention} hello world")
            await env.settle()
            (reply,) = bot_messages(env, channel)
            fix = await alice.send(channel, "better: hi!", reply_to=reply)
            await env.settle()
            key = f"discord:{guild.id}:{channel.id}"
            rid = await engine.reply_for_message(key, str(reply.id))
            assert (await engine.store.get_reply(key, rid)).corrections[0]["text"] == "hi!"
            assert not flags_on(env, channel, fix)
            return key, fix.id

    key, fix_id = asyncio.run(go())
    (warning,) = warnings_of(caplog)
    assert f"correction {fix_id} in {key} counted" in warning
    assert "Missing Permissions" in warning


@pytest.mark.parametrize(
    ("path", "status", "code", "error", "ran", "said"),
    [
        # the followup fails (the interaction token expired during a long command): the
        # command ran, and the operator reads what it said and why it was not shown
        ("/webhooks/*", 401, 50027, "Invalid Webhook Token", True, "Updated."),
        # Discord refuses the deferral (the interaction expired before the bot saw it):
        # the member saw "did not respond", so the command is not run behind their back
        ("/interactions/*", 404, 10062, "Unknown interaction", False, "was not run"),
    ],
)
def test_an_admin_answer_discord_refuses_is_logged_and_counted(
    engine, settings, caplog, path, status, code, error, ran, said
):
    from bot.metrics import Metrics

    caplog.set_level(logging.INFO)
    metrics = Metrics()

    async def go():
        bot = GesalDiscordBot(ChatService(engine, settings, metrics=metrics), settings)
        async with simcord.run(bot) as env:
            guild, channel, alice, bob = await world(env)
            env.inject_error("POST", path, status=status, code=code, message=error)
            await alice.slash(channel, "gesal config", threshold=0.5)
            await env.settle()
            key = f"discord:{guild.id}:{channel.id}"
            return (await engine.store.get_config(key)).threshold == 0.5

    assert asyncio.run(go()) is ran
    (warning,) = warnings_of(caplog)
    assert "/gesal config" in warning and f"{error} (HTTP {status}, code {code})" in warning
    assert said in warning
    assert undelivered(metrics, "command") == 1
