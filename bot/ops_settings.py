"""The operator's knobs: where /healthz and /metrics listen and how logs look.

Separate from `bot.settings.Settings` (what the bot does) because the container sets
these and the bot's behaviour never reads them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict


class OpsSettings(BaseSettings):
    """Where /healthz and /metrics listen and how logs look."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", case_sensitive=False, extra="ignore"
    )

    gesal_http_host: str = Field(
        "127.0.0.1",
        description="address /healthz and /metrics listen on (``0.0.0.0`` in containers)",
    )
    gesal_http_port: int = Field(
        8080, ge=0, le=65535, description="port of /healthz and /metrics (0: any free port)"
    )
    gesal_log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="log level: ``debug``, ``info``, ``warning`` or ``error``"
    )
    gesal_log_format: Literal["text", "json"] = Field(
        "text",
        description="``text`` for people, ``json`` (one object per line) for log shippers",
    )


def load_ops_settings(env_file: str | None = ".env", **overrides: object) -> OpsSettings:
    """Read and validate `OpsSettings`; errors name the variable, never its value."""
    from .settings import SettingsError

    try:
        return OpsSettings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors(include_input=False)
        )
        raise SettingsError(f"invalid configuration: {problems}") from None


__all__ = ["OpsSettings", "load_ops_settings"]
