"""Structured logs: one request id per mention, secrets masked, text or JSON lines.

The request id is a `ContextVar`, so it follows the asyncio task from the adapter
through the service and the engine and back, and two mentions answered at once never
share one. `RedactFilter` is the last line of defence for a token that reaches a log
line by way of a third-party library's exception text.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Iterator
from contextvars import ContextVar

_request_id: ContextVar[str | None] = ContextVar("gesal_request_id", default=None)


def current_request_id() -> str | None:
    """The request id of the mention being handled, or None outside one."""
    return _request_id.get()


@contextlib.contextmanager
def request_context(request_id: str | None = None) -> Iterator[str]:
    """Tag every log line inside the block (and tasks it starts) with one request id."""
    rid = request_id or uuid.uuid4().hex[:12]
    token = _request_id.set(rid)
    try:
        yield rid
    finally:
        _request_id.reset(token)


_STD_ATTRS = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {
    "message",
    "asctime",
    "request_id",
}


class RequestIdFilter(logging.Filter):
    """Sets ``record.request_id`` (``-`` outside a mention) for the formatters."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id.get() or "-"
        return True


class RedactFilter(logging.Filter):
    """Masks secret values wherever they would appear in a formatted log line.

    Secrets are `SecretStr` in the settings, but a token can still reach a log line by
    way of a third-party library's exception text.
    """

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        redacted = message
        for s in self.secrets:
            redacted = redacted.replace(s, "***")
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            for s in self.secrets:
                text = text.replace(s, "***")
            record.exc_info, record.exc_text = None, text
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, request_id, msg, and any extras."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", None) or _request_id.get() or "-",
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                out[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def configure_logging(
    level: int | str = logging.INFO, fmt: str = "text", secrets: list[str] | None = None
) -> logging.Handler:
    """Install one stderr handler on the root logger (replacing earlier ones).

    ``fmt`` is ``text`` (people) or ``json`` (log shippers). Returns the handler.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be text or json, not {fmt!r}")
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RedactFilter(secrets or []))
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


__all__ = [
    "JsonFormatter",
    "RedactFilter",
    "RequestIdFilter",
    "configure_logging",
    "current_request_id",
    "request_context",
]
