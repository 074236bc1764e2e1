"""Deployment settings, read once at start-up from the environment and a ``.env`` file.

Why one pydantic model: every knob is validated before anything connects to Discord,
Slack or Redis, so a typo fails in the first second with a sentence that names the
variable, instead of minutes later inside an event handler. Secrets are `SecretStr`,
so printing the settings (or an exception that contains them) never shows a token, and
`load_settings` rewrites pydantic's errors without the offending *values*.

Two kinds of variable, each described once, where it is declared:

* the deployment's own (tokens, addresses, limits): fields of `BotSettings` below, each
  with its ``description``;
* the engine's (learning rate, training rounds, routing threshold, …): generated from
  the engine's config fields that name an ``env`` (gesal_core/config.py,
  `gesal_core.config_fields`), with their defaults, ranges and help texts, so a setting
  of the engine is declared once for the library, the environment, ``gesal-bot eval``
  and the README's table (``scripts/config_reference.py``).

Names are case-insensitive.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gesal_core.config import EngineConfig
from gesal_core.config_fields import apply, env_entries
from gesal_core.errors import GesalError
from gesal_core.records import ChannelConfig


class SettingsError(GesalError):
    """The configuration is invalid; the message names each bad variable."""


class BotSettings(BaseSettings):
    """The deployment's own variables; `Settings` adds the engine's. Build the settings
    with `load_settings`."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        case_sensitive=False,
        extra="ignore",  # a shared .env may hold other tools' variables
        # every number a deployment sets is finite: an infinite interval or a NaN rate
        # would pass the range checks' comparisons in surprising ways
        allow_inf_nan=False,
    )

    # -- platforms ------------------------------------------------------------------
    discord_token: SecretStr | None = Field(
        None,
        description="bot token from the Discord developer portal; when set, the bot serves Discord",
    )
    gesal_discord_message_content: bool = Field(
        False,
        description="``true``: also read the messages of a reply chain that neither mention "
        "the bot nor come from it (needs the privileged Message Content intent)",
    )
    slack_bot_token: SecretStr | None = Field(
        None, description="``xoxb-…`` bot token of the Slack app; when set, the bot serves Slack"
    )
    slack_app_token: SecretStr | None = Field(
        None, description="``xapp-…`` app-level token, for Socket Mode"
    )
    slack_signing_secret: SecretStr | None = Field(
        None, description="signing secret that verifies requests in HTTP mode"
    )
    slack_admin_users: Annotated[frozenset[str], NoDecode] = Field(
        frozenset(),
        description="comma-separated Slack user ids allowed to administer the bot, besides "
        "the workspace's admins and owners",
    )
    slack_mode: Literal["socket", "http"] | None = Field(
        None,
        description="``socket`` or ``http``; unset: ``socket`` when SLACK_APP_TOKEN is set, "
        "else ``http``",
    )
    slack_http_host: str = Field(
        "0.0.0.0",
        description="address the HTTP-mode endpoint (``/slack/events``) listens on; "
        "``0.0.0.0``: every interface",
    )
    slack_http_port: int = Field(
        3000, ge=1, le=65535, description="port of the HTTP-mode endpoint (1-65535)"
    )

    # -- engine and store -----------------------------------------------------------
    redis_url: SecretStr | None = Field(  # may embed a password
        None,
        description="Redis for the graph store: a ``redis://``, ``rediss://`` or ``unix://`` "
        "URL, or ``memory://`` to keep nothing across restarts; unset: an embedded Redis "
        "server",
    )
    # gesal_core.store.embedded.DEFAULT_MAXMEMORY, repeated so the reference shows it
    # without importing the store; a test keeps the two equal. Not 0: without a limit
    # the server's noeviction never applies.
    gesal_redis_maxmemory: str = Field(
        "1gb",
        description="memory limit of the embedded Redis (REDIS_URL unset), in Redis's syntax "
        "(``512mb``, ``2gb``); at the limit it refuses writes, votes included, and members "
        "are told nothing was saved (a server of your own sets its own ``maxmemory``)",
    )
    gesal_model: str | None = Field(
        None,
        description="the model: unset or ``bundled`` for the bundled SmolLM2-135M-Instruct, "
        "else a folder, a ``.gguf`` file or a Hugging Face hub id (needs internet)",
    )
    gesal_device: str = Field(
        "auto",
        description="where the model runs: ``auto`` (CUDA when available, else CPU), "
        "``cpu``, ``cuda``, ``cuda:N`` or ``mps``",
    )
    gesal_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="dtype the model is loaded and answers in: ``float32``, ``bfloat16`` or "
        "``float16``",
    )
    # -- training schedule ----------------------------------------------------------
    gesal_train_interval: float = Field(
        300.0, ge=1.0, description="seconds between scheduled training runs"
    )
    # Replaced by GESAL_TRAIN_ROUND; kept only to refuse it with a sentence that says so,
    # instead of ignoring a setting a deployment believes is in force.
    gesal_train_early_votes: int | None = Field(None, exclude=True)
    gesal_train_misfire_grace: int = Field(
        120,
        ge=1,
        description="seconds a training run delayed past its time (a busy process) may still start",
    )

    # -- chat behaviour -------------------------------------------------------------
    gesal_rate_user: int = Field(
        6, ge=1, description="mentions answered per user per minute; more are asked to wait"
    )
    gesal_rate_channel: int = Field(
        30, ge=1, description="mentions answered per channel per minute; more are asked to wait"
    )
    gesal_context_messages: int = Field(
        10,
        ge=0,
        le=100,
        description="earlier messages of a reply chain or thread read as context (0 to 100)",
    )
    gesal_context_chars: int = Field(
        4000,
        ge=200,
        le=100_000,
        description="characters of context kept at most (200 to 100000); the oldest "
        "messages go first",
    )

    # -- playground -----------------------------------------------------------------
    gesal_playground_host: str = Field(
        "127.0.0.1",
        description="address the local web playground listens on (anyone who can reach it "
        "has admin rights)",
    )
    gesal_playground_port: int = Field(
        8765, ge=1, le=65535, description="port of the local web playground"
    )
    gesal_playground_public: bool = Field(  # checked where the playground binds
        False,
        description="``true``: allow GESAL_PLAYGROUND_HOST to be an address other than "
        "loopback; whoever can reach it then has admin rights over every playground channel",
    )

    @field_validator("slack_admin_users", mode="before")
    @classmethod
    def _split_users(cls, v: object) -> object:
        if isinstance(v, str):
            return frozenset(u.strip() for u in v.split(",") if u.strip())
        return v

    @field_validator(
        "discord_token",
        "slack_bot_token",
        "slack_app_token",
        "slack_signing_secret",
        "redis_url",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        # `DISCORD_TOKEN=` in a .env file means "not configured", not "an empty token"
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("gesal_train_early_votes")
    @classmethod
    def _removed_early_votes(cls, v: object) -> object:
        if v is not None:
            raise ValueError(
                "was replaced by GESAL_TRAIN_ROUND (how many of a channel's replies need "
                "new feedback before it trains, which also starts training at once); remove it"
            )
        return v

    @field_validator("gesal_redis_maxmemory")
    @classmethod
    def _redis_size(cls, v: str) -> str:
        if not re.fullmatch(r"[1-9][0-9]*(b|kb?|mb?|gb?)?", v.strip(), re.IGNORECASE):
            raise ValueError(
                "must be a size in Redis's syntax above 0: a whole number of bytes, or "
                "with a unit (512mb, 2gb)"
            )
        return v.strip()

    @field_validator("gesal_device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "mps") and not v.startswith("cuda"):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return v

    @model_validator(mode="after")
    def _check_platforms(self) -> Settings:
        bot, app, secret = self.slack_bot_token, self.slack_app_token, self.slack_signing_secret
        if bot and not bot.get_secret_value().startswith("xoxb-"):
            raise ValueError("SLACK_BOT_TOKEN must be a bot token starting with xoxb-")
        if app and not app.get_secret_value().startswith("xapp-"):
            raise ValueError("SLACK_APP_TOKEN must be an app-level token starting with xapp-")
        if (app or secret or self.slack_mode) and not bot:
            raise ValueError("Slack is partly configured: SLACK_BOT_TOKEN is missing")
        if bot:
            mode = self.slack_mode or ("socket" if app else "http")
            if mode == "socket" and not app:
                raise ValueError("SLACK_MODE=socket needs SLACK_APP_TOKEN (xapp-…)")
            if mode == "http" and not secret:
                raise ValueError("Slack HTTP mode needs SLACK_SIGNING_SECRET")
            self.slack_mode = mode
        return self

    # -- helpers --------------------------------------------------------------------
    def platforms(self) -> list[str]:
        """The chat platforms that have credentials: a subset of ``["discord", "slack"]``.

        An empty list is what makes ``gesal-bot run`` start the local playground.
        """
        out = []
        if self.discord_token:
            out.append("discord")
        if self.slack_bot_token:
            out.append("slack")
        return out

    def channel_defaults(self) -> ChannelConfig:
        """The per-channel settings a channel starts with (admins can change them)."""
        return self.engine_config().channel_defaults.validate()

    def engine_config(self) -> EngineConfig:
        """The engine's configuration: library defaults plus what a deployment sets."""
        values = {e.path: getattr(self, e.setting.env.lower()) for e in env_entries(EngineConfig)}
        return apply(EngineConfig(), values)

    def is_slack_admin(self, user_id: str) -> bool:
        return user_id in self.slack_admin_users

    def describe(self) -> dict[str, object]:
        """A loggable summary: which secrets are set, never their values."""
        out: dict[str, object] = {}
        for name, value in self:
            if isinstance(value, SecretStr):
                out[name] = "set"
            elif isinstance(value, frozenset):
                out[name] = sorted(value)
            else:
                out[name] = value
        return out


def _engine_variables() -> dict[str, Any]:
    """One settings field per engine setting that names an environment variable: its
    type, default, range and help text, from the config field itself."""
    out: dict[str, Any] = {}
    for e in env_entries(EngineConfig):
        s = e.setting
        words = s.help + (f" Range: {s.range_text()}." if s.range_text() else "")
        out[s.env.lower()] = (e.type, Field(e.default, description=words, **s.bounds()))
    return out


# Every variable: the deployment's own (`BotSettings`) and the engine's, generated.
Settings = create_model(
    "Settings",
    __base__=BotSettings,
    __doc__="Everything a deployment can configure. Build it with `load_settings`.",
    __module__=__name__,
    **_engine_variables(),
)


def _describe_error(err: dict) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ())) or "settings"
    msg = err.get("msg", "invalid")
    msg = msg.removeprefix("Value error, ")
    return f"{loc.upper()}: {msg}" if loc != "settings" else msg


def load_settings(env_file: str | Path | None = ".env", **overrides: object) -> Settings:
    """Read and validate the settings; raise `SettingsError` with every problem listed.

    ``env_file=None`` reads the environment only (tests use this). ``overrides`` win
    over both, which is how command-line flags are layered on top.
    The message never contains the values given, because they may be secrets.
    """
    try:
        return Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
    except ValidationError as exc:
        problems = "; ".join(_describe_error(e) for e in exc.errors(include_input=False))
        raise SettingsError(f"invalid configuration: {problems}") from None


__all__ = ["BotSettings", "Settings", "SettingsError", "load_settings"]
