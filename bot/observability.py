"""The names `bot.discord_app` imports from here; `bot.health` and `bot.logs` hold them."""

from .health import Check, Health, connection_check
from .logs import request_context

__all__ = ["Check", "Health", "connection_check", "request_context"]
