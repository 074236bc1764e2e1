"""Where a channel's graph, replies, votes and feedback buffer live.

`Store` is the contract; `MemoryStore` backs tests and the evaluation harness, and
`RedisStore` is the production system of record. `open_store` picks one the way the app
should: ``REDIS_URL`` set means that server, unset means a private embedded Redis.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from ..records import ChannelConfig
from .base import ConflictError, NodeGoneError, Store, StoreUnavailableError, UnknownReplyError
from .memory import MemoryStore

Closer = Callable[[], Awaitable[None]]


async def open_store(
    url: str | None = None,
    default_config: ChannelConfig | None = None,
    *,
    embedded_dir: Path | None = None,
    embedded_maxmemory: str | None = None,
    **redis_options,
) -> tuple[Store, Closer]:
    """Open the store the app should use and a coroutine function that closes it.

    ``url`` (default: the ``REDIS_URL`` environment variable): ``redis://``, ``rediss://``
    (TLS; redis-py's query options such as ``?ssl_ca_certs=/path/ca.crt`` pass through)
    or ``unix://`` with an optional password, or ``memory://`` for a throwaway
    in-process store. Unset or empty: start the embedded server under the data directory
    (or ``embedded_dir``), with ``embedded_maxmemory`` (Redis syntax, ``1gb``; default
    `embedded.DEFAULT_MAXMEMORY`) as its memory limit. The server must answer PING, or this raises
    `StoreUnavailableError` with a message for the operator that names it (secrets
    masked); once open, the store's errors name no server (see `StoreUnavailableError`).
    """
    from .redis_store import RedisStore, check_url

    url = url if url is not None else os.environ.get("REDIS_URL", "")
    url = url.strip()
    if url == "memory://":
        store = MemoryStore(default_config)

        async def close_memory() -> None:
            return None

        return store, close_memory
    embedded = None
    if not url:
        from .embedded import DEFAULT_MAXMEMORY, start_embedded

        maxmemory = embedded_maxmemory or DEFAULT_MAXMEMORY
        embedded = await asyncio.to_thread(start_embedded, embedded_dir, maxmemory=maxmemory)
        url = embedded.url
    elif not url.startswith(("redis://", "rediss://", "unix://")):
        raise StoreUnavailableError(
            "REDIS_URL must start with redis://, rediss:// or unix:// "
            "(for example redis://:password@localhost:6379/0)"
        )
    else:
        check_url(url)
    store = RedisStore(url, default_config, **redis_options)
    try:
        await store.ping()
    except Exception as exc:
        await store.close()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
        if isinstance(exc, StoreUnavailableError):
            # start-up: whoever reads this runs the bot, so it names the server
            raise StoreUnavailableError(exc.detail) from exc
        raise

    async def close() -> None:
        await store.close()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)

    return store, close


__all__ = [
    "ConflictError",
    "MemoryStore",
    "NodeGoneError",
    "Store",
    "StoreUnavailableError",
    "UnknownReplyError",
    "open_store",
]
