"""Who may talk to the playground: only its own page, at the addresses it serves.

Every playground endpoint acts as an admin, so a request is trusted only when it cannot
have come from a page on another site:

* **Host** (every request, GET included): it must name an address this server serves:
  for a loopback bind ``127.0.0.1``, ``localhost`` and ``[::1]``, with the port the
  connection arrived on. A DNS-rebinding page reaches the server under its own name
  (``evil.example``), so it is refused before it can read anything.
* **Origin** (every request that carries one): a browser names the page that sent a
  request; a page of another origin is refused.
* **State-changing requests** (any method but GET and HEAD) also need
  ``Content-Type: application/json`` and the per-process token in ``X-Gesal-Token``.
  A page elsewhere can send ``text/plain``, urlencoded or multipart bodies without
  asking first, but not a JSON one or a custom header (the browser asks this server
  first, which says nothing), and it cannot read the token, which only the served page
  carries.

A refusal is answered before any handler runs, so it changes nothing, and says why in
one sentence.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
from urllib.parse import urlsplit

from aiohttp import web

from ..settings import SettingsError

TOKEN_HEADER = "X-Gesal-Token"
SAFE_METHODS = frozenset({"GET", "HEAD"})
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARDS = ("", "0.0.0.0", "::")
PUBLIC_WARNING = (
    "WARNING: the playground listens on {host}, not on loopback: anyone who can reach "
    "it has admin rights over every playground channel."
)


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP literal (bracketed IPv6 too)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, public: bool) -> str | None:
    """Refuse a non-loopback bind unless GESAL_PLAYGROUND_PUBLIC allows it.

    Returns the warning to print for an allowed public bind, else None.
    """
    if is_loopback(host):
        return None
    if not public:
        raise SettingsError(
            f"GESAL_PLAYGROUND_HOST={host or '(every interface)'} is not a loopback address, "
            "and whoever can reach the playground has admin rights: use 127.0.0.1, or set "
            "GESAL_PLAYGROUND_PUBLIC=true to serve it there on purpose"
        )
    return PUBLIC_WARNING.format(host=host or "every interface")


def _host_literal(host: str) -> str:
    """How a host appears in a Host header: lowercase, IPv6 in brackets."""
    host = host.lower()
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return f"[{ip.compressed}]" if ip.version == 6 else ip.compressed


def _split_hostport(value: str) -> tuple[str, int] | None:
    """``name:port``, ``[v6]:port`` or a bare name (port 80) -> (host, port)."""
    value = value.strip().lower()
    if not value:
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[: end + 1], value[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port = rest[1:]
    elif value.count(":") == 1:
        host, port = value.split(":")
    elif ":" in value:
        return None  # an unbracketed IPv6 literal is not a valid Host
    else:
        host, port = value, ""
    if port == "":
        return _host_literal(host), 80
    if not port.isdigit():
        return None
    return _host_literal(host), int(port)


class Guard:
    """The checks above, for a server bound to ``bind_host``; one token per process."""

    def __init__(self, bind_host: str, port: int | None = None, token: str | None = None):
        self.bind_host = bind_host
        self.port = port
        self.token = token or secrets.token_urlsafe(32)

    def _served(self, request: web.Request) -> tuple[set[str], int | None]:
        """The host names this request may address, and the port it arrived on."""
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        local_ip = sockname[0] if sockname else None
        port = sockname[1] if sockname else self.port
        names: set[str] = set()
        bind = self.bind_host
        if bind in WILDCARDS:
            names.update(LOOPBACK_NAMES)
            names.add(socket.gethostname().lower())
            if local_ip:
                names.add(_host_literal(local_ip))  # the interface it arrived on
        else:
            names.add(_host_literal(bind))
            if is_loopback(bind):
                names.update(LOOPBACK_NAMES)
        return names, port

    def _serves(self, hostport: str, request: web.Request) -> bool:
        parsed = _split_hostport(hostport)
        if parsed is None:
            return False
        names, port = self._served(request)
        return parsed[0] in names and (port is None or parsed[1] == port)

    def refusal(self, request: web.Request) -> tuple[int, str] | None:
        """(status, one sentence) when the request must be refused, else None."""
        host = request.headers.get("Host", "")
        if not self._serves(host, request):
            return 421, (
                f"This playground does not serve the Host {host[:80] or '(none)'}: open it at "
                "the address gesal-bot run printed."
            )
        origin = request.headers.get("Origin")
        if origin is not None and not self._same_origin(origin, request):
            return 403, (
                f"Requests from pages on another origin ({origin[:80]}) are refused: "
                "only the playground's own page may use it."
            )
        if request.method in SAFE_METHODS:
            return None
        if request.content_type != "application/json":
            return 415, (
                f"Changes must be sent as application/json, not {request.content_type}: "
                "only the playground's own page may change anything."
            )
        given = request.headers.get(TOKEN_HEADER)
        if not given:
            return 403, (
                f"This request has no {TOKEN_HEADER} header: only the playground's own page "
                "may change anything (reload it if it is open)."
            )
        if not hmac.compare_digest(given.encode("utf-8", "replace"), self.token.encode()):
            return 403, (
                f"The {TOKEN_HEADER} header does not match this playground's token: reload "
                "the page (the server restarts with a new token)."
            )
        return None

    def _same_origin(self, origin: str, request: web.Request) -> bool:
        try:
            parts = urlsplit(origin)
        except ValueError:
            return False
        if parts.scheme != "http" or parts.path or parts.query or parts.username:
            return False
        return self._serves(parts.netloc, request)

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        refused = self.refusal(request)
        if refused is not None:
            status, message = refused
            return web.json_response({"error": message}, status=status)
        return await handler(request)


async def security_headers(_request: web.Request, response: web.StreamResponse) -> None:
    """No framing by other sites (clickjacking) and no content sniffing, on every reply."""
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'"
    )


__all__ = ["TOKEN_HEADER", "Guard", "check_bind", "is_loopback", "security_headers"]
