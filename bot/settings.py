"""Deployment settings, read once at start-up from the environment and a ``.env`` file.

Why one pydantic model: every knob is validated before anything connects to Discord,
Slack or Redis, so a typo fails in the first second with a sentence that names the
variable, instead of minutes later inside an event handler. Secrets are `SecretStr`,
so printing the settings (or an exception that contains them) never shows a token, and
`load_settings` rewrites pydantic's errors without the offending *values*.

Variable names (case-insensitive):

=================================  =====================================================
``DISCORD_TOKEN``                  bot token from the Discord developer portal; when
                                   set, the bot serves Discord
``GESAL_DISCORD_MESSAGE_CONTENT``  ``true``: also read the messages of a reply chain
                                   that neither mention the bot nor come from it (needs
                                   the privileged Message Content intent)
``SLACK_BOT_TOKEN``                ``xoxb-…`` bot token of the Slack app; when set, the
                                   bot serves Slack
``SLACK_APP_TOKEN``                ``xapp-…`` app-level token, for Socket Mode
``SLACK_SIGNING_SECRET``           signing secret that verifies requests in HTTP mode
``SLACK_ADMIN_USERS``              comma-separated Slack user ids allowed to administer
                                   the bot, besides the workspace's admins and owners
``SLACK_MODE``                     ``socket`` or ``http``; unset: ``socket`` when
                                   SLACK_APP_TOKEN is set, else ``http``
``SLACK_HTTP_HOST``                address the HTTP-mode endpoint (``/slack/events``)
                                   listens on; ``0.0.0.0``: every interface
``SLACK_HTTP_PORT``                port of the HTTP-mode endpoint (1-65535)
``REDIS_URL``                      Redis for the graph store: a ``redis://``,
                                   ``rediss://`` or ``unix://`` URL, or ``memory://`` to
                                   keep nothing across restarts; unset: an embedded
                                   Redis server
``GESAL_REDIS_MAXMEMORY``          memory limit of the embedded Redis (REDIS_URL unset),
                                   in Redis's syntax (``512mb``, ``2gb``); at the limit
                                   it refuses writes, votes included, and members are
                                   told nothing was saved (a server of your own sets its
                                   own ``maxmemory``)
``GESAL_MODEL``                    the model: unset or ``bundled`` for the bundled
                                   SmolLM2-135M-Instruct, else a folder, a ``.gguf``
                                   file or a Hugging Face hub id (needs internet)
``GESAL_DEVICE``                   where the model runs: ``auto`` (CUDA when available,
                                   else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``
``GESAL_DTYPE``                    dtype the model is loaded and answers in:
                                   ``float32``, ``bfloat16`` or ``float16``
``GESAL_THRESHOLD``                similarity (-1 to 1) a prompt needs to join its
                                   channel's nearest node, else it starts a new one; new
                                   channels start with it, admins change it per channel
``GESAL_REWARD_UP``                reward of a 👍 (above 0, at most 10); new channels
                                   start with it
``GESAL_REWARD_DOWN``              reward of a 👎 (below 0, at least -10); new channels
                                   start with it
``GESAL_UPDATE_DTYPE``             dtype of a training update's matrix products:
                                   ``auto`` (``bfloat16`` where it runs faster on this
                                   machine, else ``float32``), ``float32`` or
                                   ``bfloat16``; answers keep GESAL_DTYPE
``GESAL_COMPILE_UPDATES``          ``true``: run training updates through
                                   ``torch.compile``, faster after minutes of compiling
                                   at start-up
``GESAL_LEARNING_RATE``            step size of a training update (Adam's learning rate,
                                   up to 0.1)
``GESAL_MAX_STEP``                 bound on how far one update moves a node's adapter
                                   (L2 norm)
``GESAL_REJECTED_STEP``            a node whose recent votes are all 👎 takes steps this
                                   many times larger (1 to 10; 1: off)
``GESAL_PULL``                     strength λ of the pull of a node's adapter towards
                                   the base model, (λ/2)‖z−1‖² (0 to 10; 0: off)
``GESAL_EXPLORE_TEMPERATURE``      highest sampling temperature (up to 1.2), reached by
                                   a node whose recent votes are all 👎; 0.7 or less, the
                                   usual temperature: no exploring
``GESAL_GUARD_SAMPLED``            ``true``: the collapse guard also judges sampled
                                   answers to its probes, as replies are served (one
                                   more generation pass per update)
``GESAL_TRAIN_INTERVAL``           seconds between scheduled training runs
``GESAL_TRAIN_ROUND``              a channel trains as soon as this many of its replies
                                   have new votes or corrections (1: as soon as one has)
``GESAL_TRAIN_MAX_WAIT``           seconds new feedback waits for its channel's round at
                                   most; after that, the next scheduled run trains it
``GESAL_TRAIN_MISFIRE_GRACE``      seconds a training run delayed past its time (a busy
                                   process) may still start
``GESAL_RATE_USER``                mentions answered per user per minute; more are asked
                                   to wait
``GESAL_RATE_CHANNEL``             mentions answered per channel per minute; more are
                                   asked to wait
``GESAL_CONTEXT_MESSAGES``         earlier messages of a reply chain or thread read as
                                   context (0 to 100)
``GESAL_CONTEXT_CHARS``            characters of context kept at most (200 to 100000);
                                   the oldest messages go first
``GESAL_PLAYGROUND_HOST``          address the local web playground listens on (anyone
                                   who can reach it has admin rights)
``GESAL_PLAYGROUND_PORT``          port of the local web playground
``GESAL_PLAYGROUND_PUBLIC``        ``true``: allow GESAL_PLAYGROUND_HOST to be an address
                                   other than loopback; whoever can reach it then has
                                   admin rights over every playground channel
=================================  =====================================================
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gesal_core.errors import GesalError
from gesal_core.records import REWARD_LIMIT, ChannelConfig

if TYPE_CHECKING:
    from gesal_core.engine import EngineConfig

_DEFAULTS = ChannelConfig()


class SettingsError(GesalError):
    """The configuration is invalid; the message names each bad variable."""


class Settings(BaseSettings):
    """Everything a deployment can configure. Build it with `load_settings`."""

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
    discord_token: SecretStr | None = None
    gesal_discord_message_content: bool = False  # privileged intent; see discord_app
    slack_bot_token: SecretStr | None = None
    slack_app_token: SecretStr | None = None
    slack_signing_secret: SecretStr | None = None
    slack_admin_users: Annotated[frozenset[str], NoDecode] = frozenset()
    slack_mode: Literal["socket", "http"] | None = None
    slack_http_host: str = "0.0.0.0"
    slack_http_port: int = Field(3000, ge=1, le=65535)

    # -- engine and store -----------------------------------------------------------
    redis_url: SecretStr | None = None  # may embed a password
    # gesal_core.store.embedded.DEFAULT_MAXMEMORY, repeated so the reference shows it
    # without importing the store; a test keeps the two equal. Not 0: without a limit
    # the server's noeviction never applies.
    gesal_redis_maxmemory: str = "1gb"
    gesal_model: str | None = None
    gesal_device: str = "auto"
    gesal_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # the ranges of `ChannelConfig`, NaN and infinities refused by name: a NaN reward makes
    # every baseline and loss of a channel NaN
    gesal_threshold: float = Field(_DEFAULTS.threshold, ge=-1.0, le=1.0, allow_inf_nan=False)
    gesal_reward_up: float = Field(_DEFAULTS.reward_up, gt=0, le=REWARD_LIMIT, allow_inf_nan=False)
    gesal_reward_down: float = Field(
        _DEFAULTS.reward_down, lt=0, ge=-REWARD_LIMIT, allow_inf_nan=False
    )
    gesal_update_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    gesal_compile_updates: bool = False  # LearningConfig.compile
    # The library's defaults (LearningConfig), repeated here so the reference shows them
    # without importing torch; a test keeps the two equal.
    gesal_learning_rate: float = Field(3e-3, gt=0, le=0.1)
    gesal_max_step: float = Field(3.0, gt=0, le=100.0)
    gesal_rejected_step: float = Field(2.0, ge=1.0, le=10.0)
    gesal_pull: float = Field(0.0, ge=0.0, le=10.0)
    gesal_explore_temperature: float = Field(0.7, ge=0.0, le=1.2)  # EngineConfig's
    gesal_guard_sampled: bool = False  # GuardConfig.sampled

    # -- training schedule ----------------------------------------------------------
    gesal_train_interval: float = Field(300.0, ge=1.0)
    gesal_train_round: int = Field(8, ge=1, le=1000)  # EngineConfig.train_round
    gesal_train_max_wait: float = Field(86400.0, ge=0.0)  # EngineConfig.train_max_wait
    # Replaced by GESAL_TRAIN_ROUND; kept only to refuse it with a sentence that says so,
    # instead of ignoring a setting a deployment believes is in force.
    gesal_train_early_votes: int | None = Field(None, exclude=True)
    gesal_train_misfire_grace: int = Field(120, ge=1)

    # -- chat behaviour -------------------------------------------------------------
    gesal_rate_user: int = Field(
        6, ge=1, description="mentions answered per user per minute; more are asked to wait"
    )
    gesal_rate_channel: int = Field(
        30, ge=1, description="mentions answered per channel per minute; more are asked to wait"
    )
    gesal_context_messages: int = Field(10, ge=0, le=100)
    gesal_context_chars: int = Field(4000, ge=200, le=100_000)

    # -- playground -----------------------------------------------------------------
    gesal_playground_host: str = "127.0.0.1"
    gesal_playground_port: int = Field(8765, ge=1, le=65535)
    gesal_playground_public: bool = False  # checked where the playground binds

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
        return ChannelConfig(
            threshold=self.gesal_threshold,
            reward_up=self.gesal_reward_up,
            reward_down=self.gesal_reward_down,
        ).validate()

    def engine_config(self) -> EngineConfig:
        """The engine's configuration: library defaults plus what a deployment sets."""
        from gesal_core.engine import EngineConfig  # torch: only once an engine is built
        from gesal_core.guard import GuardConfig
        from gesal_core.learning import LearningConfig

        return EngineConfig(
            channel_defaults=self.channel_defaults(),
            guard=GuardConfig(sampled=self.gesal_guard_sampled),
            explore_max_temperature=self.gesal_explore_temperature,
            train_round=self.gesal_train_round,
            train_max_wait=self.gesal_train_max_wait,
            learning=LearningConfig(
                compute_dtype=self.gesal_update_dtype,
                compile=self.gesal_compile_updates,
                lr=self.gesal_learning_rate,
                max_step=self.gesal_max_step,
                rejected_step=self.gesal_rejected_step,
                l2=self.gesal_pull,
            ),
        )

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


__all__ = ["Settings", "SettingsError", "load_settings"]
