"""Reading a Slack thread's newest end within Slack's rate limits.

``conversations.replies`` returns a thread oldest first, a page at a time (at most 15
messages a page and one request a minute for apps distributed outside the Marketplace;
Tier 3 for the others). The bot only ever needs the newest end of a thread: the few
messages before a question (its context) and the bot's last answer before a correction.
So `ThreadReader` reads backwards in time windows bounded by ``oldest``/``latest``: the
two minutes before the message, then four times further back at each step (eight
minutes, half an hour, two hours… three weeks), then the rest of the thread, stopping as
soon as it has what it needs. Each window holds at most about four times what the
previous one did, so it is one page or a few. What it read stays in a small cache: the
next question or correction in the thread costs one request for the messages posted
since (or, when more than a page was posted since, a fresh read from the newest end).

The cache holds, per thread, the messages of one unbroken stretch ``[lo, hi]`` of the
thread (every message posted in it, by anyone) and forgets a thread after `CACHE_TTL_S`:
an edit or a deletion is seen at the latest then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

from slack_sdk.web.async_client import AsyncWebClient

log = logging.getLogger(__name__)

PAGE_LIMIT = 200  # asked for per page; Slack lowers it where the app's limit is smaller
# How far back each step reads, in seconds before the message (2 min × 4^k, up to about
# three weeks); after the last one, the rest of the thread.
WINDOWS_S = tuple(120 * 4**k for k in range(8))
MAX_PAGES = 20  # per read: a thread that needs more is read on, from the cache, next time
CACHE_THREADS = 512
CACHE_TTL_S = 600.0
KEEP_MESSAGES = 200  # per cached thread: the newest ones


def _ts(value: str) -> Decimal:
    """Slack timestamps have six decimals: Decimal, as a float would round them."""
    return Decimal(value)


def _fmt(value: Decimal) -> str:
    return f"{value:.6f}"


@dataclass
class _Thread:
    lo: Decimal  # every message with lo <= ts <= hi is in ``messages``
    hi: Decimal
    messages: dict[str, dict] = field(default_factory=dict)  # ts -> message
    read_at: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ThreadReader:
    """The newest messages of Slack threads, read in bounded windows and cached."""

    def __init__(
        self,
        *,
        page_limit: int = PAGE_LIMIT,
        max_pages: int = MAX_PAGES,
        ttl: float = CACHE_TTL_S,
        size: int = CACHE_THREADS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.page_limit, self.max_pages, self.ttl, self.size = page_limit, max_pages, ttl, size
        self.clock = clock
        self._threads: OrderedDict[tuple[str, str], _Thread] = OrderedDict()

    async def before(
        self, client: AsyncWebClient, channel: str, thread: str, ts: str, count: int
    ) -> tuple[list[dict], bool]:
        """The last ``count`` messages of the thread posted before ``ts``, oldest
        first, and whether the thread has earlier ones that are left out."""

        def enough(earlier: list[dict]) -> bool:
            return len(earlier) > count

        earlier, complete = await self._read(client, channel, thread, ts, enough)
        return earlier[-count:], len(earlier) > count or not complete

    async def last(
        self,
        client: AsyncWebClient,
        channel: str,
        thread: str,
        ts: str,
        match: Callable[[dict], bool],
    ) -> dict | None:
        """The newest message before ``ts`` in the thread for which ``match`` holds."""

        def enough(earlier: list[dict]) -> bool:
            return any(match(m) for m in earlier)

        earlier, _ = await self._read(client, channel, thread, ts, enough)
        return next((m for m in reversed(earlier) if match(m)), None)

    # -- the cache and the windows -----------------------------------------------------
    def _entry(self, key: tuple[str, str], before: Decimal) -> _Thread:
        entry = self._threads.get(key)
        if entry is None or self.clock() - entry.read_at > self.ttl:
            entry = _Thread(lo=before, hi=before)
            self._threads[key] = entry
        self._threads.move_to_end(key)
        while len(self._threads) > self.size:
            self._threads.popitem(last=False)
        return entry

    async def _read(
        self,
        client: AsyncWebClient,
        channel: str,
        thread: str,
        ts: str,
        enough: Callable[[list[dict]], bool],
    ) -> tuple[list[dict], bool]:
        """The cached messages before ``ts`` (oldest first) after reading back until
        ``enough`` of them holds, and whether they reach the thread's first message.
        Raises slack-sdk's errors when Slack refuses."""
        root, before = _ts(thread), _ts(ts)
        entry = self._entry((channel, thread), before)
        left = self.max_pages  # pages this read may still ask for

        async def fetch(oldest: Decimal, latest: Decimal, pages: int) -> int | None:
            return await self._fetch(client, channel, thread, entry, oldest, latest, pages)

        async with entry.lock:
            if entry.hi < before:  # what was posted since the last read, if it is one page
                if await fetch(entry.hi, before, 1) is not None:
                    entry.hi = before
                else:  # more: read the thread afresh from its newest end
                    entry.lo = entry.hi = before
                    entry.messages.clear()
            steps = iter(WINDOWS_S)

            def earlier() -> list[dict]:
                return [m for t, m in sorted(entry.messages.items()) if _ts(t) < before]

            while entry.lo > root and not enough(earlier()):
                width = next(steps, None)
                lo = root if width is None else max(root, before - width)
                if lo >= entry.lo:
                    continue  # this window is read already: widen
                used = await fetch(lo, entry.lo, left)
                if used is None:
                    log.warning(
                        "thread %s in %s: read %d pages without finding enough; "
                        "using what was read",
                        thread,
                        channel,
                        self.max_pages,
                    )
                    break
                left -= used
                entry.lo = lo
            entry.read_at = self.clock()
            self._trim(entry)
            return earlier(), entry.lo <= root

    async def _fetch(
        self,
        client: AsyncWebClient,
        channel: str,
        thread: str,
        entry: _Thread,
        oldest: Decimal,
        latest: Decimal,
        pages: int,
    ) -> int | None:
        """Read every message with ``oldest <= ts <= latest`` into ``entry`` in at most
        ``pages`` pages: how many it took, or None when more were needed. Pages are only
        merged once the whole stretch is read, so the cache never holds a stretch with a
        hole in it."""
        cursor, found = None, []
        for used in range(1, pages + 1):
            resp = await client.conversations_replies(
                channel=channel,
                ts=thread,
                oldest=_fmt(oldest),
                latest=_fmt(latest),
                inclusive=True,
                limit=self.page_limit,
                cursor=cursor,
            )
            page = [m for m in resp.get("messages", []) if "ts" in m]
            found += [m for m in page if oldest <= _ts(m["ts"]) <= latest]
            cursor = (resp.get("response_metadata") or {}).get("next_cursor")
            if not resp.get("has_more") or not cursor:
                entry.messages.update((m["ts"], m) for m in found)
                return used
        return None

    @staticmethod
    def _trim(entry: _Thread) -> None:
        """Keep the newest `KEEP_MESSAGES`; the stretch known whole starts at the oldest
        kept."""
        if len(entry.messages) <= KEEP_MESSAGES:
            return
        kept = sorted(entry.messages, key=_ts)[-KEEP_MESSAGES:]
        entry.messages = {t: entry.messages[t] for t in kept}
        entry.lo = max(entry.lo, _ts(kept[0]))


__all__ = ["ThreadReader"]
