"""Who may use the UI server: the Host and Origin checks, the login, and the WebSocket's bounds.

- Host: the request's Host header must name the bound host (on loopback: localhost, 127.0.0.1, ::1; on all
  interfaces: any IP address, this machine's names) or one given with `--allow-host`. A page on a rebound DNS
  name (DNS rebinding) gets 421.
- Origin: a WebSocket handshake and every POST must come from the page's own origin (the Origin header's
  host:port equal to the Host header) or one given with `--allow-origin`; a POST must also be JSON (a
  cross-site form cannot send that without the browser asking first). Otherwise 403.
- Login: with a login token (required when bound to a non-loopback address), every page, API call and the
  WebSocket need the session cookie set by logging in (`/login`, or `?token=` once on any page) or an
  `Authorization: Bearer` header; `/api/status` (the container health check) and `/static/` stay open.
- The WebSocket: at most MAX_SOCKETS open at once (one more: 503, Retry-After), at most MAX_DECODES decodes in
  flight per connection (more: an error reply each, never a queue), messages of at most MAX_MESSAGE_BYTES
  (more: an error reply), JSON nested at most MAX_DEPTH deep.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from aevae.client.credentials import TokenFile, is_loopback

COOKIE = "aevae_session"
# WebSockets open at once, over all clients: a page holds one; each costs a descriptor, buffers and a handler,
# so a flood of them (or of pages left open) would otherwise run the process out of descriptors (20,000 here).
MAX_SOCKETS = 256
MAX_DECODES = 4  # per WebSocket: the page keeps at most one or two per channel, a handful of channels at once
MAX_MESSAGE_BYTES = 1024 * 1024  # a WebSocket message (the page's biggest is a few KB)
TRANSPORT_MAX_BYTES = 16 * 1024 * 1024  # aiohttp closes the socket (1009) past this; below it we answer
MAX_DEPTH = 16  # JSON nesting (the page's messages are 3 deep)
OPEN_PATHS = ("/api/status", "/static/", "/login")
WILDCARDS = ("0.0.0.0", "::", "", "[::]")
LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>aevae: log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: sans-serif; max-width: 32em; margin: 4em auto">
<h1>aevae</h1><p>This explorer needs its token (printed by <code>aevae up</code>, or in the file given to
<code>aevae ui --login-token-file</code>).</p>
<form method="post" action="/login"><label>Token <input name="token" type="password" autocomplete="off"
required autofocus></label> <button type="submit">Log in</button></form>{error}</body></html>"""


class BadMessage(ValueError):
    """A WebSocket message or a JSON body the server will not parse; the text says what is accepted."""


def split_host(value: str) -> str:
    """The host of a Host header or netloc, lowercase, without port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value[1:]
    return value.rpartition(":")[0] if value.count(":") == 1 else value


def _netloc(origin: str) -> str:
    """The host:port of an --allow-origin value (scheme://host:port or host:port); ValueError saying what is
    accepted when it has none or does not parse (an unclosed IPv6 bracket)."""
    try:
        netloc = urlsplit(origin if "//" in origin else f"//{origin}").netloc.lower()
    except ValueError:
        netloc = ""
    if not netloc:
        raise ValueError(f"--allow-origin {origin!r} is not an origin: give scheme://host:port, e.g. "
                         "https://ui.example:8443 (IPv6 in brackets: http://[::1]:8080)")
    return netloc


def _raw(text: str) -> bytes:
    """A header's text as the bytes that came: aiohttp keeps bytes that are not UTF-8 as lone surrogates, which
    plain .encode() refuses (a 500 and a traceback for any client sending a byte such as 0xff)."""
    return text.encode("utf-8", "surrogateescape")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


@dataclass
class Guard:
    bound: str
    allow_hosts: frozenset[str] = frozenset()
    allow_origins: frozenset[str] = frozenset()  # host:port (or scheme://host:port) of other allowed origins
    login: TokenFile | tuple[str, ...] | None = None
    session: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    @classmethod
    def create(cls, bound: str, allow_hosts: Iterable[str] = (), allow_origins: Iterable[str] = (),
               login: TokenFile | tuple[str, ...] | None = None) -> "Guard":
        origins = frozenset(_netloc(o) for o in allow_origins)
        return cls(bound, frozenset(split_host(h) for h in allow_hosts), origins, login)

    # -- the checks -------------------------------------------------------------------------------------
    def host_allowed(self, header: str) -> bool:
        host = split_host(header)
        bound = split_host(self.bound) if self.bound not in WILDCARDS else self.bound
        if host in self.allow_hosts or host == bound:
            return True
        if is_loopback(bound):
            return host in ("localhost", "127.0.0.1", "::1")
        names = {socket.gethostname().lower(), socket.getfqdn().lower(), "localhost"}
        if self.bound in WILDCARDS:
            return _is_ip(host) or host in names
        return host in names

    def origin_allowed(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:
            # not a browser's cross-site request (browsers send Origin on WebSockets and cross-site POSTs);
            # a browser's fetch metadata, when present, must not say cross-site
            return request.headers.get("Sec-Fetch-Site", "same-origin") in ("same-origin", "none")
        try:
            netloc = urlsplit(origin).netloc.lower()
        except ValueError:  # "http://[::1" (an unclosed IPv6 bracket): not an origin, so not this server's
            return False
        return bool(netloc) and (netloc == request.host.lower() or netloc in self.allow_origins)

    def tokens(self) -> tuple[str, ...]:
        if self.login is None:
            return ()
        return self.login.refresh() if isinstance(self.login, TokenFile) else self.login

    def token_ok(self, presented: str) -> bool:
        ok = False
        for token in self.tokens():
            ok |= hmac.compare_digest(_raw(presented), token.encode())
        return ok

    def logged_in(self, request: web.Request) -> bool:
        if self.login is None:
            return True
        cookie = request.cookies.get(COOKIE, "")
        if cookie and hmac.compare_digest(_raw(cookie), self.session.encode()):
            return True
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and bool(presented) and self.token_ok(presented.strip())

    def set_session(self, response: web.StreamResponse, request: web.Request) -> None:
        response.set_cookie(COOKIE, self.session, httponly=True, samesite="Strict", path="/",
                            secure=request.secure)

    # -- the middleware ---------------------------------------------------------------------------------
    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        @web.middleware
        async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                        ) -> web.StreamResponse:
            if not self.host_allowed(request.host):
                return web.json_response({"error": f"this server does not answer for host {request.host!r}; "
                                                   "start it with --allow-host NAME to add one"}, status=421)
            websocket = request.headers.get("Upgrade", "").lower() == "websocket"
            if (websocket or request.method not in ("GET", "HEAD", "OPTIONS")) and not self.origin_allowed(request):
                return web.json_response({"error": f"cross-origin request refused (Origin "
                                                   f"{request.headers.get('Origin')!r}); the page must come from "
                                                   "this server, or start it with --allow-origin ORIGIN"},
                                         status=403)
            if (request.method == "POST" and request.path != "/login"
                    and request.content_type != "application/json"):
                return web.json_response({"error": "POST bodies must be JSON (Content-Type: application/json)"},
                                         status=415)
            if request.method == "POST" and request.headers.get("Content-Encoding", "identity").lower() != "identity":
                # small JSON needs no compression; a body that claims one it does not have fails in aiohttp's
                # parser, which logs a traceback when it drains the body after the answer: so, not read at all,
                # and the connection closed with the answer
                response = web.json_response({"error": "POST bodies must not be compressed (no Content-Encoding)"},
                                             status=415)
                response.force_close()
                return response
            if self.login is not None:
                token = request.query.get("token")
                if token is not None and request.method == "GET" and not websocket:
                    if not self.token_ok(token):
                        return web.Response(text=LOGIN_PAGE.format(error="<p role=alert>Wrong token.</p>"),
                                            content_type="text/html", status=401)
                    rest = {k: v for k, v in request.query.items() if k != "token"}
                    response = redirect(local_location(request.path, rest))
                    self.set_session(response, request)
                    return response
                if not request.path.startswith(OPEN_PATHS) and not self.logged_in(request):
                    if request.path == "/" and not websocket:
                        return redirect("/login")
                    return web.json_response({"error": "log in first: open / in a browser, or send "
                                                       "Authorization: Bearer TOKEN"}, status=401)
            return await handler(request)
        return guard

    def add_routes(self, app: web.Application) -> None:
        async def login_page(request: web.Request) -> web.Response:
            return web.Response(text=LOGIN_PAGE.format(error=""), content_type="text/html")

        async def login(request: web.Request) -> web.StreamResponse:
            try:
                form = await request.post()
            except (LookupError, ValueError, HttpProcessingError) as exc:
                # an unknown charset, bytes not in it, a multipart body that breaks off: 400 on the one open
                # page (aiohttp's own error for the multipart was a 500)
                return web.Response(text=LOGIN_PAGE.format(error="<p role=alert>The form could not be read "
                                                           f"({type(exc).__name__}): send the token field as a "
                                                           "form (urlencoded or multipart) in UTF-8.</p>"),
                                    content_type="text/html", status=400)
            token = form.get("token")
            if not isinstance(token, str) or not self.token_ok(token.strip()):
                return web.Response(text=LOGIN_PAGE.format(error="<p role=alert>Wrong token.</p>"),
                                    content_type="text/html", status=401)
            response = redirect("/")
            self.set_session(response, request)
            return response

        app.router.add_get("/login", login_page)
        app.router.add_post("/login", login)


def redirect(location: str) -> web.Response:
    return web.Response(status=302, headers={"Location": location})


def local_location(path: str, query: dict[str, str]) -> str:
    """A redirect to `path` on this server: "//evil.com/" (a path that begins with two slashes) would be
    taken by a browser for another host, so the path keeps one leading slash."""
    return str(URL.build(path="/" + path.lstrip("/\\"), query=query))


# -- parsing what a client sends ----------------------------------------------------------------------------
def depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of parsed JSON, counted without recursion and stopping past `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, level)
            if deepest > limit:
                return deepest
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _not_json(constant: str) -> float:
    """Python's json reads NaN and Infinity, which are not JSON: echoed back (a message's id), the page's
    JSON.parse failed on the answer."""
    raise BadMessage(f"messages must be JSON, and {constant} is not: numbers are finite")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: a float past the largest, read as infinity
        raise BadMessage(f"messages must hold finite numbers; {text[:40]} is past the largest a float holds")
    return value


def _once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose keys are each given once: {"model": "vae", "model": "ae"} was taken as "ae" without a
    word (JSON leaves it open; a query string's repeated `version` is refused the same way)."""
    value = dict(pairs)
    if len(value) != len(pairs):
        repeated = next(key for i, (key, _) in enumerate(pairs) if any(key == k for k, _ in pairs[:i]))
        raise BadMessage(f"key {repeated[:40]!r} given more than once in one object; give each once")
    return value


def parse_json(text: str | bytes, max_bytes: int = MAX_MESSAGE_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads with a size and a nesting limit; BadMessage saying which was passed."""
    if len(text) > max_bytes:
        raise BadMessage(f"message of {len(text)} bytes is over the limit of {max_bytes} bytes")
    try:
        value = json.loads(text, parse_constant=_not_json, parse_float=_finite, object_pairs_hook=_once)
    except RecursionError:
        raise BadMessage(f"JSON nested deeper than {max_depth} levels") from None
    except BadMessage:
        raise
    except ValueError:  # not JSON, not UTF-8, or an integer past Python's 4,300 digits
        raise BadMessage("messages must be JSON (numbers of at most 4,300 digits)") from None
    if depth(value, max_depth) > max_depth:
        raise BadMessage(f"JSON nested deeper than {max_depth} levels")
    return value
