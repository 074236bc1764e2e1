"""What the Discord adapter's parts share about Discord's REST API: the errors a call
raises once discord.py has given up retrying, and how to say why in a few words for the
operator's log.
"""

from __future__ import annotations

import aiohttp
import discord

# What a REST call can raise once discord.py has given up retrying: Discord's refusal,
# a rate limit longer than ``max_ratelimit_timeout`` (when one is set), or the network.
SEND_ERRORS = (discord.HTTPException, discord.RateLimited, aiohttp.ClientError, OSError)


def failure(exc: BaseException) -> str:
    """One short phrase for the operator's log: Discord's own words and code, which say
    what to fix (``Missing Permissions (HTTP 403, code 50013)``)."""
    if isinstance(exc, discord.HTTPException):
        return f"{exc.text or 'HTTP error'} (HTTP {exc.status}, code {exc.code})"
    if isinstance(exc, discord.RateLimited):
        return f"rate limited for {exc.retry_after:.0f} s"
    return f"network error: {type(exc).__name__}: {exc}"
