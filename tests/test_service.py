"""The platform-neutral chat service, settings and text helpers, on the tiny engine."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from bot.messages import (
    UNAVAILABLE,
    AdminCommand,
    ContextMessage,
    Correction,
    Mention,
    PostError,
    Reaction,
    channel_key,
    strip_mentions,
)
from bot.ratelimit import RateLimiter
from bot.service import ChatService
from bot.settings import SettingsError, load_settings
from bot.text import parse_correction, split_message, vote_for_emoji
from gesal_core.records import vec_from_b64, vec_to_b64

from .fakes.tiny import make_engine

# -- settings --------------------------------------------------------------------------


def _clear_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith(("DISCORD_", "SLACK_", "GESAL_", "REDIS_URL")):
            monkeypatch.delenv(name, raising=False)


def test_settings_from_env_and_dotenv(monkeypatch, tmp_path):
    _clear_env(monkeypatch)
    env = tmp_path / ".env"
    env.write_text(
        "DISCORD_TOKEN=abc.def\nSLACK_BOT_TOKEN=xoxb-1\nSLACK_APP_TOKEN=xapp-1\n"
        "SLACK_ADMIN_USERS=U1, U2 ,\nGESAL_THRESHOLD=0.7\n"
    )
    monkeypatch.setenv("GESAL_TRAIN_INTERVAL", "42")
    s = load_settings(env)
    assert s.platforms() == ["discord", "slack"]
    assert s.slack_mode == "socket"
    assert s.slack_admin_users == frozenset({"U1", "U2"})
    assert s.gesal_train_interval == 42
    assert s.channel_defaults().threshold == 0.7
    assert s.engine_config().learning.compute_dtype == "auto"  # the library's default
    assert s.engine_config().channel_defaults.threshold == 0.7
    monkeypatch.setenv("GESAL_UPDATE_DTYPE", "float32")
    assert load_settings(env).engine_config().learning.compute_dtype == "float32"
    # the step size: the library's defaults unless a deployment sets it
    from gesal_core.engine import EngineConfig
    from gesal_core.learning import LearningConfig

    lib = LearningConfig()
    learning = s.engine_config().learning
    assert (learning.lr, learning.max_step, learning.rejected_step, learning.l2) == (
        lib.lr,
        lib.max_step,
        lib.rejected_step,
        lib.l2,
    )
    explore = s.engine_config().explore_max_temperature
    assert explore == EngineConfig.explore_max_temperature
    # the training round: the library's unless a deployment sets it
    rounds = s.engine_config()
    assert (rounds.train_round, rounds.train_max_wait) == (
        EngineConfig.train_round,
        EngineConfig.train_max_wait,
    )
    monkeypatch.setenv("GESAL_TRAIN_ROUND", "8")
    monkeypatch.setenv("GESAL_TRAIN_MAX_WAIT", "3600")
    rounds = load_settings(env).engine_config()
    assert (rounds.train_round, rounds.train_max_wait) == (8, 3600.0)
    monkeypatch.delenv("GESAL_TRAIN_ROUND")
    monkeypatch.delenv("GESAL_TRAIN_MAX_WAIT")
    # the replaced early-vote count is refused by name, not silently ignored
    monkeypatch.setenv("GESAL_TRAIN_EARLY_VOTES", "8")
    with pytest.raises(SettingsError, match="EARLY_VOTES: was replaced by GESAL_TRAIN_ROUND"):
        load_settings(env)
    monkeypatch.delenv("GESAL_TRAIN_EARLY_VOTES")
    monkeypatch.setenv("GESAL_LEARNING_RATE", "6e-3")
    monkeypatch.setenv("GESAL_MAX_STEP", "6")
    monkeypatch.setenv("GESAL_REJECTED_STEP", "2.5")
    monkeypatch.setenv("GESAL_PULL", "0.05")
    monkeypatch.setenv("GESAL_EXPLORE_TEMPERATURE", "1.0")
    config = load_settings(env).engine_config()
    learning = config.learning
    assert (learning.lr, learning.max_step, learning.rejected_step) == (6e-3, 6.0, 2.5)
    assert (learning.l2, config.explore_max_temperature) == (0.05, 1.0)
    # the guard's sampled probes: off as in the library unless a deployment turns them on
    from gesal_core.guard import GuardConfig

    assert s.engine_config().guard == GuardConfig()
    # compiled updates: off as in the library unless a deployment turns them on
    assert learning.compile is LearningConfig().compile is False
    monkeypatch.setenv("GESAL_COMPILE_UPDATES", "1")
    assert load_settings(env).engine_config().learning.compile is True
    monkeypatch.setenv("GESAL_GUARD_SAMPLED", "true")
    assert load_settings(env).engine_config().guard.sampled is True
    # secrets never show up in reprs or the loggable summary
    assert "abc.def" not in repr(s) and "abc.def" not in str(s.describe())
    assert s.describe()["discord_token"] == "set"


def test_settings_none_configured_means_playground(monkeypatch):
    _clear_env(monkeypatch)
    monkeypatch.setenv("DISCORD_TOKEN", "")  # empty means unset
    assert load_settings(None).platforms() == []


@pytest.mark.parametrize(
    "env, words",
    [
        ({"SLACK_BOT_TOKEN": "xoxp-secretvalue"}, "SLACK_BOT_TOKEN must be a bot token"),
        ({"SLACK_APP_TOKEN": "xapp-secretvalue"}, "SLACK_BOT_TOKEN is missing"),
        ({"SLACK_BOT_TOKEN": "xoxb-secretvalue", "SLACK_MODE": "http"}, "SLACK_SIGNING_SECRET"),
        ({"SLACK_BOT_TOKEN": "xoxb-secretvalue"}, "SLACK_SIGNING_SECRET"),
        ({"GESAL_THRESHOLD": "2"}, "GESAL_THRESHOLD"),
        ({"GESAL_RATE_USER": "lots"}, "GESAL_RATE_USER"),
        ({"GESAL_DEVICE": "tpu"}, "GESAL_DEVICE"),
        ({"GESAL_UPDATE_DTYPE": "fp8"}, "GESAL_UPDATE_DTYPE"),
        ({"GESAL_LEARNING_RATE": "0"}, "GESAL_LEARNING_RATE"),
        ({"GESAL_MAX_STEP": "-1"}, "GESAL_MAX_STEP"),
        ({"GESAL_REJECTED_STEP": "0.5"}, "GESAL_REJECTED_STEP"),
    ],
)
def test_settings_errors_are_clear_and_hide_values(monkeypatch, env, words):
    _clear_env(monkeypatch)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SettingsError) as err:
        load_settings(None)
    assert words in str(err.value)
    assert "secretvalue" not in str(err.value)


# -- text helpers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "emoji, vote",
    [
        ("👍", 1),
        ("👍🏻", 1),
        ("👍🏿", 1),
        ("👎", -1),
        ("👎🏽", -1),
        ("+1", 1),
        ("thumbsup", 1),
        (":+1:", 1),
        ("+1::skin-tone-3", 1),
        ("thumbsup::skin-tone-6", 1),
        ("-1", -1),
        ("thumbsdown::skin-tone-2", -1),
        ("heart", None),
        ("❤️", None),
        ("👌", None),
        ("+1::skin-tone-9", None),
        ("", None),
    ],
)
def test_vote_for_emoji(emoji, vote):
    assert vote_for_emoji(emoji) == vote


def test_parse_correction_markers():
    assert parse_correction("better: Paris.") == "Paris."
    assert parse_correction("BETTER : Paris") == "Paris"
    assert parse_correction("✏️ Paris") == "Paris"
    assert parse_correction("✏ Paris") == "Paris"
    assert parse_correction("<@123> better: Paris") == "Paris"
    assert parse_correction(":pencil2: Paris") == "Paris"
    assert parse_correction("better:") is None
    assert parse_correction("Maybe better: Paris") is None
    assert parse_correction("thanks!") is None


def test_split_message_limits_and_code_fences():
    assert split_message("short", 2000) == ["short"]
    text = "a" * 2001
    chunks = split_message(text, 2000)
    assert [len(c) for c in chunks] == [2000, 1] and "".join(chunks) == text
    words = " ".join(["word"] * 1000)  # 4999 chars
    chunks = split_message(words, 2000)
    assert all(len(c) <= 2000 for c in chunks)
    assert " ".join(chunks).split() == words.split()
    code = "Here:\n```python\n" + "\n".join(f"x{i} = {i}" for i in range(600)) + "\n```\nDone."
    chunks = split_message(code, 2000)
    assert len(chunks) > 2 and all(len(c) <= 2000 for c in chunks)
    for c in chunks:  # every chunk renders on its own: fences balanced
        assert c.count("```") % 2 == 0, c[:80]
    assert all(c.startswith("```python\n") for c in chunks[1:-1])
    body = "\n".join(line for c in chunks for line in c.split("\n") if not line.startswith("```"))
    assert [ln for ln in body.split("\n") if ln.startswith("x")] == [
        f"x{i} = {i}" for i in range(600)
    ]
    with pytest.raises(ValueError):
        split_message("x", 10)


def test_rate_limiter_sliding_window():
    now = [0.0]
    rl = RateLimiter(2, 60.0, clock=lambda: now[0])
    for _ in range(2):
        assert rl.retry_after("u") == 0
        rl.hit("u")
    assert rl.retry_after("u") == pytest.approx(60.0)
    assert rl.retry_after("other") == 0
    now[0] = 60.5
    assert rl.retry_after("u") == 0


def test_channel_key_and_mentions():
    assert channel_key("discord", "1", "2") == "discord:1:2"
    with pytest.raises(ValueError):
        channel_key("discord", "a:b", "2")
    assert strip_mentions("<@123> hi <@!456>") == "hi"
    assert strip_mentions("<@U02ABC> what?") == "what?"


# -- the service ------------------------------------------------------------------------


@pytest.fixture
def settings(monkeypatch):
    _clear_env(monkeypatch)
    return load_settings(None, gesal_rate_user=3, gesal_context_messages=2)


@pytest.fixture
def service(tiny_tokenizer, settings):
    engine = make_engine(tiny_tokenizer)
    svc = ChatService(engine, settings)
    yield svc
    engine.close()


def mention(text="hello world", user="u1", context=(), channel="c1"):
    return Mention("discord", "g1", channel, user, text, "m1", context=list(context))


def run(coro):
    return asyncio.run(coro)


def test_mention_reply_link_and_votes(service):
    async def go():
        parts = await service.handle_mention(mention())
        assert parts.ok and parts.reply_id and parts.chunks
        assert parts.channel_key == "discord:g1:c1"
        await service.link_reply(parts, ["b1", "b2"])
        seen = []
        service.on_feedback = lambda key, reply: _record(seen, (key, reply))

        def react(emoji, added=True, user="u2", msg="b2", bot=False):
            r = Reaction("discord", "g1", "c1", user, msg, emoji, added, bot)
            return service.handle_reaction(r)

        assert (await react("👍🏽")).status == "up"
        reply = await service.engine.store.get_reply(parts.channel_key, parts.reply_id)
        assert reply.votes == {"u2": 1}
        assert (await react("👎", user="u3", msg="b1")).status == "down"
        assert (await react("❤️")).status == "ignored"
        assert (await react("👍", bot=True)).status == "ignored"
        assert (await react("👍", msg="someone-else")).status == "ignored"
        # last write wins: 👍 then 👎; removing the 👍 keeps the 👎
        assert (await react("👎")).status == "down"
        assert (await react("👍", added=False)).status == "ignored"
        reply = await service.engine.store.get_reply(parts.channel_key, parts.reply_id)
        assert reply.votes == {"u2": -1, "u3": -1}
        assert (await react("👎", added=False)).status == "retracted"
        reply = await service.engine.store.get_reply(parts.channel_key, parts.reply_id)
        assert reply.votes == {"u3": -1}
        # the same message id in another channel is not this bot's reply there
        other = Reaction("discord", "g1", "c2", "u2", "b1", "👍", True)
        assert (await service.handle_reaction(other)).status == "ignored"
        assert seen == [("discord:g1:c1", parts.reply_id)] * 4
        assert await service.engine.pending(parts.channel_key) == 4

    run(go())


async def _record(seen, key):
    seen.append(key)


def test_exchange_answers_posts_links_and_counts_under_one_request_id(service):
    """The whole exchange in the service: the adapter's own reads for the mention, its
    "thinking" sign (left before anything is posted), the posts and the links share one
    request id; reactions on any posted message count."""
    from bot.logs import current_request_id

    async def go():
        seen: list[tuple[str, str | None]] = []

        async def build() -> Mention:
            seen.append(("build", current_request_id()))
            return mention("tell me a long story")

        @contextlib.asynccontextmanager
        async def thinking():
            seen.append(("think", current_request_id()))
            yield
            seen.append(("done", current_request_id()))

        async def post(chunk: str) -> str:
            seen.append(("post", current_request_id()))
            return f"b{len(seen)}"

        delivery = await service.exchange(build(), post, thinking())
        assert delivery.complete and delivery.parts.ok and delivery.request_id
        assert len(delivery.message_ids) == len(delivery.parts.chunks)
        assert [what for what, _ in seen[:3]] == ["build", "think", "done"]
        assert {rid for _, rid in seen} == {delivery.request_id}
        assert current_request_id() is None
        react = Reaction("discord", "g1", "c1", "u2", delivery.message_ids[-1], "👍", True)
        assert (await service.handle_reaction(react)).status == "up"
        registry = service.metrics.registry
        assert registry.get_sample_value("gesal_replies_total", {"platform": "discord"}) == 1
        assert registry.get_sample_value("gesal_votes_total", {"value": "up"}) == 1

    run(go())


def test_an_exchange_nothing_of_which_is_posted_drops_the_answer(service):
    async def go():
        async def refused(chunk: str) -> str:
            raise PostError("channel_not_found")

        delivery = await service.exchange(mention(), refused)
        assert delivery.message_ids == [] and delivery.error == "channel_not_found"
        assert not delivery.complete and delivery.parts.reply_id
        assert await service.engine.get_reply("discord:g1:c1", delivery.parts.reply_id) is None
        undelivered = service.metrics.registry.get_sample_value(
            "gesal_undelivered_total", {"platform": "discord", "kind": "answer"}
        )
        assert undelivered == 1

    run(go())


def test_correction(service):
    async def go():
        parts = await service.handle_mention(mention())
        await service.link_reply(parts, ["b1"])
        c = Correction("discord", "g1", "c1", "u2", "m9", "b1", "better: Paris is the capital.")
        res = await service.handle_correction(c)
        assert res.status == "corrected"
        reply = await service.engine.store.get_reply(parts.channel_key, parts.reply_id)
        assert reply.corrections[0]["text"] == "Paris is the capital."
        plain = Correction("discord", "g1", "c1", "u2", "m9", "b1", "nice answer")
        assert (await service.handle_correction(plain)).status == "ignored"
        stray = Correction("discord", "g1", "c1", "u2", "m9", "zzz", "better: x")
        assert (await service.handle_correction(stray)).status == "ignored"

    run(go())


def test_context_window_and_truncation_note(service):
    ctx = [
        ContextMessage("u9", "very old message"),
        ContextMessage("bot", "an earlier answer", is_bot=True),
        ContextMessage("u1", "follow up"),
    ]
    messages, cut = service.build_messages(mention("and now?", context=ctx))
    assert cut  # three context messages, window of two
    assert messages == [
        {"role": "assistant", "content": "an earlier answer"},
        {"role": "user", "content": "follow up"},
        {"role": "user", "content": "and now?"},
    ]
    messages, cut = service.build_messages(mention("q", context=ctx[2:], user="u5"))
    assert not cut and messages[0]["content"] == "u1: follow up"

    async def go():
        parts = await service.handle_mention(mention("and now?", context=ctx))
        assert parts.ok and "most recent part" in parts.chunks[-1]

    run(go())


def test_rate_limits_and_empty_mention(service):
    async def go():
        assert (await service.handle_mention(mention("   "))).kind == "empty"
        kinds = [(await service.handle_mention(mention("hi"))).kind for _ in range(4)]
        assert kinds == ["answer"] * 3 + ["rate_limited"]
        # another user in the same channel is still served
        assert (await service.handle_mention(mention("hi", user="u2"))).kind == "answer"

    run(go())


def test_rate_limits_are_shared_across_processes_through_redis(
    tiny_tokenizer, monkeypatch, make_redis_store, redis_client
):
    """Two services (two bot processes) on one Redis share the allowance: the user's
    4th mention is refused even though each process has seen only two."""
    from bot.ratelimit import RATE_PREFIX, RedisMentionLimits

    _clear_env(monkeypatch)
    settings = load_settings(None, gesal_rate_user=3, gesal_rate_channel=5)

    async def go():
        stores = [make_redis_store(), make_redis_store()]
        engine = make_engine(tiny_tokenizer, store=stores[0])
        other = make_engine(tiny_tokenizer, store=stores[1])
        a, b = ChatService(engine, settings), ChatService(other, settings)
        try:
            assert isinstance(a.limits, RedisMentionLimits)
            kinds = [(await svc.handle_mention(mention("hi"))).kind for svc in (a, b, a, b)]
            assert kinds == ["answer"] * 3 + ["rate_limited"]
            user_key = f"{RATE_PREFIX}user:discord:g1:u1"
            assert redis_client.get(user_key) == b"3"
            assert 0 < redis_client.pttl(user_key) <= 60_000  # INCR and EXPIRE together
            # the channel's allowance (5) is shared too: u1's refused mention did not count
            kinds = [
                (await svc.handle_mention(mention("hi", user=f"v{i}"))).kind
                for i, svc in enumerate((b, a, b))
            ]
            assert kinds == ["answer", "answer", "rate_limited"]
            assert redis_client.get(f"{RATE_PREFIX}channel:discord:g1:c1") == b"5"
            refused = await b.handle_mention(mention("hi", user="v9"))
            assert refused.kind == "rate_limited" and "try again in" in refused.chunks[0]
        finally:
            for svc in (a, b):
                await svc.close()
            engine.close()
            other.close()
            for store in stores:
                await store.close()

    run(go())


def test_rate_limits_fall_back_to_the_process_when_redis_is_down():
    """An unreachable Redis never blocks or frees everyone: this process's limits apply."""
    from bot.ratelimit import RedisMentionLimits

    async def go():
        limits = RedisMentionLimits("redis://127.0.0.1:1/0", per_user=2, per_channel=10)
        waits = [await limits.take("u", "c") for _ in range(3)]
        assert waits[:2] == [0, 0] and waits[2] > 0
        await limits.close()

    run(go())


def test_errors_become_words(service):
    async def go():
        async def down(*a, **k):
            raise ConnectionError("redis: connection refused")

        async def bug(*a, **k):
            raise KeyError("oops")

        service.engine.respond = down
        parts = await service.handle_mention(mention())
        assert parts.kind == "unavailable" and parts.chunks == [UNAVAILABLE]
        assert parts.reply_id is None
        service.engine.respond = bug
        parts = await service.handle_mention(mention())
        assert parts.kind == "error" and "oops" not in parts.chunks[0]
        service.engine.reply_for_message = down
        res = await service.handle_reaction(Reaction("discord", "g1", "c1", "u", "m", "👍", True))
        assert res.status == "error" and res.message == UNAVAILABLE

    run(go())


def admin(name, is_admin=True, **kw):
    return AdminCommand("discord", "g1", "c1", "u1", name, is_admin, **kw)


def test_admin_stats_say_when_a_channel_nears_a_cap(service):
    async def go():
        await service.handle_mention(mention())
        res = await service.handle_admin(admin("stats"))
        assert res.ok and "Near a limit" not in res.text and res.data["near_caps"] == []
        res = await service.handle_admin(admin("config", args={"max_nodes": "1"}))
        assert res.ok
        res = await service.handle_admin(admin("stats"))
        assert "**Near a limit**: 1 of 1 nodes: new topics fold" in res.text
        assert res.data["near_caps"][0].startswith("1 of 1 nodes")

    run(go())


def test_admin_commands(service):
    async def go():
        for name in ("reset", "export", "import", "stats", "config", "train"):
            res = await service.handle_admin(admin(name, is_admin=False))
            assert not res.ok and "only admins" in res.text and not res.files
        parts = await service.handle_mention(mention())
        await service.link_reply(parts, ["b1"])
        await service.handle_reaction(Reaction("discord", "g1", "c1", "u2", "b1", "👎", True))
        res = await service.handle_admin(admin("stats"))
        assert res.ok and "1 nodes" in res.text and res.data["votes_down"] == 1
        assert "1 waiting for training (the channel trains once 8 replies" in res.text
        assert "once it has waited 24 h" in res.text
        res = await service.handle_admin(admin("config", args={"threshold": "0.5"}))
        assert res.ok and res.data["threshold"] == 0.5
        for bad in ({"threshold": "7"}, {"threshold": "abc"}, {"colour": "1"}):
            res = await service.handle_admin(admin("config", args=bad))
            assert not res.ok, bad
        assert (await service.engine.store.get_config("discord:g1:c1")).threshold == 0.5
        exp = await service.handle_admin(admin("export"))
        js, png = exp.file(".json"), exp.file(".png")
        assert png.data.startswith(b"\x89PNG") and len(png.data) > 1000
        data = json.loads(js.data)
        assert data["channel"] == "discord:g1:c1" and len(data["nodes"]) == 1
        # reset asks first, then forgets
        res = await service.handle_admin(admin("reset"))
        assert res.needs_confirmation and "1 nodes" in res.text
        assert (await service.engine.stats("discord:g1:c1"))["nodes"] == 1
        res = await service.handle_admin(admin("reset", confirmed=True))
        assert res.ok and (await service.engine.stats("discord:g1:c1"))["nodes"] == 0
        # bad imports change nothing and say why
        for raw, words in ((b"{not json", "not valid JSON"), (b"\xff\xfe", "not text")):
            res = await service.handle_admin(admin("import", file=raw))
            assert not res.ok and words in res.text
        res = await service.handle_admin(admin("import", file=b'{"format": "x"}'))
        assert not res.ok and "not a gesal-bot graph export" in res.text
        assert not (await service.handle_admin(admin("import"))).ok
        res = await service.handle_admin(admin("import", file=js.data))
        assert res.ok and res.data == {"nodes": 1, "replies": 1}
        assert (await service.engine.stats("discord:g1:c1"))["nodes"] == 1
        res = await service.handle_admin(admin("train"))
        assert res.ok and "Training done" in res.text
        assert not (await service.handle_admin(admin("dance"))).ok

    run(go())


def test_a_refused_import_says_what_and_where_and_changes_nothing(service):
    """`/gesal import` sends the file itself to the engine: nesting that would have been
    a RecursionError ("something went wrong") and a harmful z are each one sentence
    naming the field, and the channel keeps its graph."""

    async def go():
        await service.handle_mention(mention())
        before = (await service.handle_admin(admin("export"))).file(".json").data
        data = json.loads(before)
        z = vec_from_b64(data["nodes"][0]["z"])
        z[0] = 1e30
        data["nodes"][0]["z"] = vec_to_b64(z)
        deep = b'{"format": "gesal-graph", "nodes": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        for raw, words in (
            (deep, "the file nests lists and objects 100001 deep"),
            (json.dumps(data).encode(), "nodes[0].z: component 0 is 1e+30, outside [-10, 10]"),
        ):
            res = await service.handle_admin(admin("import", file=raw))
            assert not res.ok and res.text.startswith("Not imported, nothing was changed: ")
            assert words in res.text, res.text
            after = (await service.handle_admin(admin("export"))).file(".json").data
            assert after == before

    run(go())
