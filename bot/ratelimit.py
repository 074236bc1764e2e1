"""Mention rate limits: per user and per channel, in this process or shared through Redis.

Why shared: a deployment can run several bot processes against one Redis (Slack over
HTTP behind a load balancer, Discord shards). Limits kept in each process's memory
would let a member get N times the allowance, one per process. When the store is Redis,
`RedisMentionLimits` counts in that same server with one Lua script per mention, so the
check and the increments are atomic across processes. Without Redis (the in-memory
store, tests) `MemoryMentionLimits` keeps the sliding windows in this process; the Redis
limiter also falls back to it while Redis cannot be reached, so a Redis blip never turns
into "everyone is rate limited".

Both count a mention against the user *and* the channel only when both allow it, and
answer with the seconds to wait otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

RATE_PREFIX = "gesal:rate:{r}:"  # one hash tag: the two-key script works on a cluster too

# KEYS: user counter, channel counter. ARGV: user limit, channel limit, window (ms).
# Fixed windows that start at a key's first mention (INCR, then PEXPIRE on the first).
_TAKE = """
local wait = 0
for i = 1, 2 do
  local n = tonumber(redis.call('GET', KEYS[i]) or '0')
  if n >= tonumber(ARGV[i]) then
    local ttl = redis.call('PTTL', KEYS[i])
    if ttl < 0 then
      redis.call('PEXPIRE', KEYS[i], ARGV[3])
      ttl = tonumber(ARGV[3])
    end
    if ttl > wait then wait = ttl end
  end
end
if wait > 0 then return wait end
for i = 1, 2 do
  if redis.call('INCR', KEYS[i]) == 1 then redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
end
return 0
"""


class MentionLimits(Protocol):
    async def take(self, user_key: str, channel_key: str) -> float:
        """0 when the mention may go ahead (it is then counted); else seconds to wait."""
        ...


class RateLimiter:
    """Sliding window: at most ``limit`` events per ``window`` seconds for each key."""

    def __init__(
        self, limit: int, window: float = 60.0, clock: Callable[[], float] = time.monotonic
    ):
        self.limit, self.window, self.clock = limit, window, clock
        self._hits: dict[str, deque[float]] = {}

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may act again; 0 when it may act now."""
        hits = self._hits.get(key)
        if not hits:
            return 0.0
        now = self.clock()
        while hits and hits[0] <= now - self.window:
            hits.popleft()
        if len(hits) < self.limit:
            return 0.0
        return hits[0] + self.window - now

    def hit(self, key: str) -> None:
        self._hits.setdefault(key, deque()).append(self.clock())


class MemoryMentionLimits:
    """Per-process limits (sliding windows)."""

    def __init__(
        self,
        per_user: int,
        per_channel: int,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.user = RateLimiter(per_user, window, clock)
        self.channel = RateLimiter(per_channel, window, clock)

    async def take(self, user_key: str, channel_key: str) -> float:
        wait = max(self.user.retry_after(user_key), self.channel.retry_after(channel_key))
        if wait <= 0:
            self.user.hit(user_key)
            self.channel.hit(channel_key)
        return wait


class RedisMentionLimits:
    """Limits shared by every process on one Redis (fixed windows, atomic per mention).

    It opens its own small client from the store's URL (TLS and password options
    included), one per event loop, since redis-py's asyncio connections are loop-bound.
    """

    def __init__(
        self,
        url: str,
        per_user: int,
        per_channel: int,
        window: float = 60.0,
        fallback: MemoryMentionLimits | None = None,
    ) -> None:
        self.url = url
        self.per_user, self.per_channel, self.window = per_user, per_channel, window
        self.fallback = fallback or MemoryMentionLimits(per_user, per_channel, window)
        self._client = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._script = None

    def _redis(self):
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            import redis.asyncio as aioredis

            self._client = aioredis.Redis.from_url(
                self.url, socket_timeout=2.0, socket_connect_timeout=2.0
            )
            self._loop, self._script = loop, self._client.register_script(_TAKE)
        return self._script

    async def take(self, user_key: str, channel_key: str) -> float:
        keys = [f"{RATE_PREFIX}user:{user_key}", f"{RATE_PREFIX}channel:{channel_key}"]
        args = [self.per_user, self.per_channel, int(self.window * 1000)]
        try:
            wait_ms = await self._redis()(keys=keys, args=args)
        except Exception as exc:  # noqa: BLE001 - Redis trouble must not block every mention
            log.warning("shared rate limits unavailable (%s); using this process's", exc)
            return await self.fallback.take(user_key, channel_key)
        return int(wait_ms) / 1000.0

    async def close(self) -> None:
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client = self._loop = None


def mention_limits(
    shared_url: str | None,
    per_user: int,
    per_channel: int,
    clock: Callable[[], float] = time.monotonic,
) -> MentionLimits:
    """Limits shared on the Redis server at ``shared_url`` (`Engine.shared_url`, which
    every bot process of a deployment uses), else this process's own."""
    memory = MemoryMentionLimits(per_user, per_channel, 60.0, clock)
    if shared_url:
        return RedisMentionLimits(shared_url, per_user, per_channel, 60.0, fallback=memory)
    return memory


__all__ = [
    "MemoryMentionLimits",
    "MentionLimits",
    "RateLimiter",
    "RedisMentionLimits",
    "mention_limits",
]
