"""Channel settings are finite and in range wherever they are set: `/gesal config` (every
adapter goes through `ChatService`), the deployment's environment, an import; and a
value stored unchecked (by hand, or by another build) cannot break its channel."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from bot.messages import AdminCommand
from bot.service import ChatService
from bot.settings import SettingsError, load_settings
from gesal_core.records import ChannelConfig
from gesal_core.store.layout import Keys

from .fakes.tiny import make_engine


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("DISCORD_", "SLACK_", "GESAL_", "REDIS_URL")):
            monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("GESAL_REWARD_UP", "nan", "finite number"),
        ("GESAL_REWARD_UP", "inf", "finite number"),
        ("GESAL_REWARD_UP", "10.5", "less than or equal to 10"),
        ("GESAL_REWARD_DOWN", "-inf", "finite number"),
        ("GESAL_REWARD_DOWN", "NaN", "finite number"),
        ("GESAL_REWARD_DOWN", "-11", "greater than or equal to -10"),
        ("GESAL_THRESHOLD", "nan", "finite number"),
        ("GESAL_THRESHOLD", "1.5", "less than or equal to 1"),
        # every other number a deployment sets is finite too
        ("GESAL_TRAIN_INTERVAL", "inf", "finite number"),
        ("GESAL_TRAIN_MAX_WAIT", "Infinity", "finite number"),
        ("GESAL_LEARNING_RATE", "nan", "finite number"),
        ("GESAL_PULL", "nan", "finite number"),
    ],
)
def test_start_up_refuses_a_non_finite_or_out_of_range_default(clean_env, name, value, words):
    clean_env.setenv(name, value)
    with pytest.raises(SettingsError) as err:
        load_settings(None)
    message = str(err.value)
    assert f"{name}: " in message and words in message
    assert value not in message.split(f"{name}: ", 1)[1]  # the value is not echoed


def test_the_bounds_themselves_start(clean_env):
    clean_env.setenv("GESAL_REWARD_UP", "10")
    clean_env.setenv("GESAL_REWARD_DOWN", "-10")
    clean_env.setenv("GESAL_THRESHOLD", "-1")
    defaults = load_settings(None).channel_defaults()
    assert (defaults.reward_up, defaults.reward_down, defaults.threshold) == (10.0, -10.0, -1.0)


def test_slash_config_refuses_nan_and_keeps_the_settings(tiny_tokenizer, clean_env):
    settings = load_settings(None)

    def config(**args) -> AdminCommand:
        return AdminCommand("discord", "g", "c", "boss", "config", True, args=args)

    async def go():
        engine = make_engine(tiny_tokenizer)
        service = ChatService(engine, settings)
        try:
            set_ = await service.handle_admin(config(reward_up="2", threshold="0.4"))
            assert set_.ok and set_.data["reward_up"] == 2.0
            before = await engine.store.get_config("discord:g:c")
            for args in (
                {"reward_up": "nan"},
                {"reward_down": "-inf"},
                {"threshold": "NaN", "reward_up": "3"},  # one bad value: nothing changes
                {"reward_up": "1e400"},
                {"reward_down": "2"},
                {"max_nodes": "many"},
            ):
                result = await service.handle_admin(config(**args))
                assert not result.ok and result.text.startswith("Not changed: "), result.text
                assert result.text.count(".") <= 2 and "\n" not in result.text  # a sentence
                assert await engine.store.get_config("discord:g:c") == before, args
            assert "finite" in (await service.handle_admin(config(reward_up="nan"))).text
        finally:
            engine.close()

    asyncio.run(go())


def test_a_stored_nan_setting_falls_back_to_its_default():
    cfg = ChannelConfig.from_dict({"reward_up": float("nan"), "threshold": 0.3, "max_nodes": 5})
    assert cfg == ChannelConfig(threshold=0.3, max_nodes=5)  # only the bad one replaced
    assert ChannelConfig.from_dict({"reward_down": -50.0}).reward_down == -2.0
    with pytest.raises(ValueError, match="unknown setting"):
        ChannelConfig.from_dict({"colour": 1})


def test_a_channel_with_a_nan_reward_in_redis_answers_trains_and_can_be_fixed(
    tiny_tokenizer, make_redis_store, redis_client
):
    """A config stored unchecked (``NaN`` in the stored JSON): the
    channel still answers and trains, with the default in its place, and the admin's
    next change stores a valid config."""

    async def go():
        store = make_redis_store()
        engine = make_engine(tiny_tokenizer, store=store, threshold=-1.0)
        try:
            first = await engine.respond("c", [{"role": "user", "content": "hello"}])
            stored = {"threshold": -1.0, "reward_up": float("nan"), "reward_down": -2.0}
            redis_client.set(Keys("c").config, json.dumps({**stored, "max_nodes": 64}))
            assert "NaN" in redis_client.get(Keys("c").config).decode()

            reply = await engine.respond("c", [{"role": "user", "content": "hello"}])
            await engine.vote("c", first.reply_id, "ann", 1)
            await engine.vote("c", reply.reply_id, "ann", -1)
            (report,) = (await engine.train()).channels["c"]
            assert report.status == "updated", report.reason
            node = await store.get_node("c", reply.node_id)
            assert node.baseline == node.baseline and node.reward_sum == -1.0  # 1 - 2
            assert (await engine.stats("c"))["config"]["reward_up"] == 1.0

            await engine.configure("c", threshold=0.2)
            assert "NaN" not in redis_client.get(Keys("c").config).decode()
        finally:
            engine.close()
            await store.close()

    asyncio.run(go())
