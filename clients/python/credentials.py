"""TLS and token authentication for the client: where every channel of aevae.client is made.

`ChannelSecurity` says how to reach a service: plaintext or TLS (the CA that signed the server's certificate,
optionally a client certificate and key for mutual TLS) and a bearer token sent as `authorization` metadata.
Anything not passed is read from the environment:

| variable | what |
| --- | --- |
| `AEVAE_TOKEN` | the token itself |
| `AEVAE_TOKEN_FILE` | a file holding it (re-read when it changes, so a rotated token is picked up) |
| `AEVAE_TLS_CA` | PEM file of the CA that signed the server's certificate; turns TLS on |
| `AEVAE_TLS_CERT`, `AEVAE_TLS_KEY` | the client's certificate and key, for a server that requires mutual TLS |
| `AEVAE_TLS` | `1`: TLS with the system's root certificates (no CA file) |

With none of these, a client of services on this machine only (loopback targets) sends the token that `aevae
up` keeps in `local_token_path()` (~/.config/aevae/token) when that file exists; it never goes elsewhere.

`open_channel` is the one function that makes a channel (sync or asyncio), so a fan-out client's replicas,
the UI's links and the CLI all get the same credentials. `TokenFile` is shared with the services, which read
their accepted tokens the same way.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import grpc

from aevae.client.errors import AevaeError

ENV_TOKEN, ENV_TOKEN_FILE = "AEVAE_TOKEN", "AEVAE_TOKEN_FILE"
ENV_CA, ENV_CERT, ENV_KEY, ENV_TLS = "AEVAE_TLS_CA", "AEVAE_TLS_CERT", "AEVAE_TLS_KEY", "AEVAE_TLS"
RECHECK_SECONDS = 1.0  # how often a token file's size, mtime and inode are looked at


def local_token_path() -> Path:
    """Where `aevae up` keeps the token of the services it runs on this machine."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "aevae" / "token"


def is_loopback(host: str) -> bool:
    """Whether a host name or address (IPv6 in brackets or not) is this machine's loopback: the one rule for
    the client, the services' binding policy and the UI's login."""
    import ipaddress

    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_target(target: str | Sequence[str]) -> bool:
    """Whether every host:port of `target` (a list or comma-separated) is on this machine."""
    items = [target] if isinstance(target, str) else list(target)
    parts = [p.strip() for item in items for p in item.split(",") if p.strip()]
    return bool(parts) and all(
        is_loopback(part.removeprefix("ipv4:").removeprefix("ipv6:").rpartition(":")[0]) for part in parts)


def encrypted_key(pem: bytes) -> bool:
    """Whether a PEM private key needs a passphrase (its first block says ENCRYPTED: "BEGIN ENCRYPTED PRIVATE
    KEY", or an old RSA key's "Proc-Type: 4,ENCRYPTED"). A server has nobody to ask for one: the services and
    the UI take keys unencrypted, and say so rather than fail as if the key were no key."""
    return b"ENCRYPTED" in pem.split(b"-----END", 1)[0]


def no_passphrase() -> bytes:
    """The passphrase given to OpenSSL for a key: none. Without a callback, OpenSSL would stop the start to ask
    for one on the terminal."""
    return b""


class TokenFile:
    """Tokens from a file, one per line (several: all accepted, for a rotation with overlap; blank lines and
    lines starting with # are ignored). Re-read when the file's size, mtime or inode change, checked at most
    once a second; a file that cannot be read, or is not UTF-8 text, keeps the last tokens read (a service
    would otherwise fail every call, as UNKNOWN, until the file is fixed)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self.tokens: tuple[str, ...] = ()
        self.refresh(force=True)
        if not self.tokens:
            raise ValueError(f"token file {self.path} holds no token")

    def refresh(self, force: bool = False) -> tuple[str, ...]:
        now = time.monotonic()
        if not force and now - self._checked < RECHECK_SECONDS:
            return self.tokens
        with self._lock:
            self._checked = now
            try:
                st = self.path.stat()
                stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
                if stamp != self._stamp:
                    lines = self.path.read_text(encoding="utf-8").splitlines()
                    tokens = tuple(t for t in (line.strip() for line in lines) if t and not t.startswith("#"))
                    if tokens or force:
                        self.tokens, self._stamp = tokens, stamp
            except OSError as exc:
                if force:
                    reason = exc.strerror or type(exc).__name__
                    raise ValueError(f"cannot read the token file {self.path}: {reason}") from None
            except UnicodeDecodeError:
                if force:
                    raise ValueError(f"the token file {self.path} is not UTF-8 text: it holds tokens, one per "
                                     "line") from None
        return self.tokens

    def __getstate__(self) -> dict[str, object]:
        """Pickled with the tokens last read, without the lock; re-read where unpickled when the file is there
        (a client sent to a process pool or a Ray worker)."""
        state = dict(self.__dict__)
        del state["_lock"]
        state["_checked"], state["_stamp"] = 0.0, None
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def first(self) -> str:
        tokens = self.refresh()
        return tokens[0] if tokens else ""


# What each PEM must hold: gRPC takes any bytes and fails only at the handshake, where a CA file that is no
# certificate read as "if the server requires mutual TLS, pass tls_cert=", which was not the problem.
PEM_HOLDS = {"tls_ca": ("CERTIFICATE", "the CA certificate (PEM) that signed the server's"),
             "tls_cert": ("CERTIFICATE", "the client certificate (PEM)"),
             "tls_key": ("PRIVATE KEY", "the client certificate's private key (PEM)")}


def _check_types(**given: tuple[object, type | tuple[type, ...]]) -> None:
    """INVALID_ARGUMENT for an argument of another type (None always passes): `tls_ca=5` was a TypeError from
    pathlib, and `tls="no"` turned TLS on, being truthy."""
    for name, (value, kinds) in given.items():
        if value is not None and not isinstance(value, kinds):
            wanted = " or ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
            raise AevaeError(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: expected {wanted}, got {value!r:.80}")


def _read(value: str | bytes | os.PathLike[str] | None, what: str) -> bytes | None:
    """PEM bytes: given as bytes, or read from a path; INVALID_ARGUMENT when they hold no PEM block of the
    kind `what` needs."""
    if value is None:
        return value
    where = "as given" if isinstance(value, bytes) else str(value)
    if isinstance(value, bytes):
        data = value
    else:
        try:
            data = Path(value).read_bytes()
        except OSError as exc:
            raise AevaeError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"{what}: cannot read {value}: {exc.strerror}") from None
    block, expected = PEM_HOLDS.get(what, ("", ""))
    if block and not (b"-----BEGIN " in data and block.encode() in data):
        raise AevaeError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"{what} ({where}) holds no PEM {block} block; expected {expected}")
    return data


def _checked_token(token: object) -> str:
    """A token as given, its surrounding whitespace dropped (as a token file's is: `open(f).read()` keeps the
    newline); one that cannot travel in a gRPC header is refused here, not as INTERNAL on every call."""
    if not isinstance(token, str):
        raise AevaeError(grpc.StatusCode.INVALID_ARGUMENT, f"token: expected a string, got {type(token).__name__}")
    token = token.strip()
    if any(not " " <= ch <= "~" for ch in token):
        raise AevaeError(grpc.StatusCode.INVALID_ARGUMENT,
                         "token: only printable ASCII characters can travel in the authorization header")
    return token


@dataclass(frozen=True)
class ChannelSecurity:
    """How a client reaches a service. `tls`: None turns TLS on when a CA or a client certificate is given
    (here or in the environment) or AEVAE_TLS=1; True uses the system's roots when no CA is given."""

    token: str | None = None
    token_file: str | None = None
    tls: bool | None = None
    tls_ca: str | bytes | None = None
    tls_cert: str | bytes | None = None
    tls_key: str | bytes | None = None
    _tokens: TokenFile | None = field(default=None, compare=False, repr=False)

    @classmethod
    def resolve(cls, token: str | None = None, token_file: str | None = None, tls: bool | None = None,
                tls_ca: str | bytes | None = None, tls_cert: str | bytes | None = None,
                tls_key: str | bytes | None = None, env: dict[str, str] | None = None,
                target: str | Sequence[str] = "") -> "ChannelSecurity":
        """The arguments given, the environment for the rest. `token=""` or `tls=False` turn them off."""
        env = dict(os.environ if env is None else env)
        _check_types(token=(token, str), token_file=(token_file, (str, os.PathLike)), tls=(tls, bool),
                     tls_ca=(tls_ca, (str, bytes, os.PathLike)), tls_cert=(tls_cert, (str, bytes, os.PathLike)),
                     tls_key=(tls_key, (str, bytes, os.PathLike)))
        named_by = "token_file"  # what named the token file, for an error about it
        if token is None and token_file is None:
            token = env.get(ENV_TOKEN) or None
            token_file = None if token else env.get(ENV_TOKEN_FILE) or None
            named_by = f"{ENV_TOKEN_FILE} (the environment)"
            if not token and not token_file and is_loopback_target(target) and local_token_path().is_file():
                token_file = str(local_token_path())
                named_by = "token_file (this machine's, from aevae serve)"
        tls_ca = tls_ca if tls_ca is not None else env.get(ENV_CA) or None
        tls_cert = tls_cert if tls_cert is not None else env.get(ENV_CERT) or None
        tls_key = tls_key if tls_key is not None else env.get(ENV_KEY) or None
        if tls is None:
            tls = bool(tls_ca or tls_cert or env.get(ENV_TLS, "") in ("1", "true", "yes"))
        if (tls_cert is None) != (tls_key is None):
            raise AevaeError(grpc.StatusCode.INVALID_ARGUMENT,
                             "tls_cert and tls_key: a client certificate needs its key, and the other way round")
        if token is not None:
            token = _checked_token(token)
        tokens = None
        if token_file and not token:
            try:
                tokens = TokenFile(token_file)
            except ValueError as exc:
                raise AevaeError(grpc.StatusCode.INVALID_ARGUMENT, f"{named_by}: {exc}") from None
            try:  # the token a file gives is sent as it is: refused here, as token= is, not as INTERNAL later
                _checked_token(tokens.first())
            except AevaeError as exc:
                raise AevaeError(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"{named_by}: {token_file}: {exc.details()}") from None
        return cls(token or None, token_file, bool(tls), tls_ca, tls_cert, tls_key, tokens)

    def current_token(self) -> str:
        if self.token:
            return self.token
        return self._tokens.first() if self._tokens is not None else ""

    @property
    def has_token(self) -> bool:
        return bool(self.token or self._tokens is not None)

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        cert = _read(self.tls_cert, "tls_cert")
        return grpc.ssl_channel_credentials(root_certificates=_read(self.tls_ca, "tls_ca"),
                                            private_key=_read(self.tls_key, "tls_key"), certificate_chain=cert)

    def metadata(self) -> Callable[[], Sequence[tuple[str, str]]] | None:
        """A function giving the `authorization` metadata of each call (None without a token)."""
        if not self.has_token:
            return None
        return lambda: (("authorization", f"Bearer {self.current_token()}"),)

    def explain(self, target: str) -> Callable[[AevaeError], AevaeError]:
        """Turns gRPC's transport-level failures into errors that say what to change."""
        def explain(error: AevaeError) -> AevaeError:
            code, details = error.code(), error.details() or ""
            lowered = details.lower()
            hint = ""
            if code == grpc.StatusCode.UNAUTHENTICATED:
                hint = ("" if self.has_token else
                        f" (this client sent no token: pass token= (--token-file to the aevae commands) or set "
                        f"{ENV_TOKEN} / {ENV_TOKEN_FILE})")
            elif code == grpc.StatusCode.UNAVAILABLE:
                if not self.tls and ("socket closed" in lowered or "connection reset" in lowered
                                     or "ssl" in lowered or "handshake" in lowered or "eof" in lowered):
                    hint = (f"; the server at {target} closed a plaintext connection: if it serves TLS, pass "
                            f"tls_ca= (--tls-ca to the aevae commands, or set {ENV_CA}) with the CA that signed its "
                            "certificate")
                elif self.tls and ("wrong_version_number" in lowered or "wrong version number" in lowered
                                   or "record layer failure" in lowered or "packet length too long" in lowered):
                    hint = (f"; TLS handshake with {target} failed: the server answers in plaintext (connect "
                            "without TLS, or start it with --tls-cert and --tls-key)")
                elif self.tls and "certificate has expired" in lowered:
                    hint = (f"; the certificate of {target} has expired: the server must be given a renewed one "
                            "(or this machine's clock is wrong)")
                elif self.tls and ("certificate_verify_failed" in lowered or "certificate verify failed" in lowered
                                   or "self signed" in lowered or "self-signed" in lowered):
                    hint = (f"; the certificate of {target} is not signed by the CA this client trusts (tls_ca=, "
                            f"--tls-ca or {ENV_CA}), or does not name {target.rpartition(':')[0]}")
                elif self.tls and ("certificate required" in lowered or "alert" in lowered
                                   or "handshake" in lowered or "ssl" in lowered
                                   or (self.tls_cert is None and "socket closed" in lowered)):
                    hint = (f"; TLS handshake with {target} failed: if the server requires mutual TLS, pass "
                            f"tls_cert= and tls_key= (--tls-cert and --tls-key, or {ENV_CERT} and {ENV_KEY}) with "
                            "a certificate its client CA signed")
                elif self.tls and "socket closed" in lowered:  # a client certificate was sent, and refused
                    hint = (f"; the server at {target} closed the TLS connection: if it requires mutual TLS, "
                            f"the client certificate (tls_cert=, --tls-cert or {ENV_CERT}) must be signed by a CA "
                            "it trusts for clients, and be valid now")
            return AevaeError(code, details + hint) if hint else error
        return explain


def open_channel(target: str, options: list[tuple[str, Any]], security: ChannelSecurity,
                 metadata: Sequence[tuple[str, str]] = (), aio: bool = False) -> tuple[Any, Any]:
    """(the raw channel, the channel to make stubs on): TLS or plaintext per `security`, with interceptors
    adding `metadata` and the token to every call. The only place aevae.client creates a channel."""
    from aevae.client.metadata import async_interceptors, sync_channel

    credentials = security.credentials()
    dynamic = security.metadata()
    if aio:
        interceptors = async_interceptors(metadata, dynamic)
        if credentials is None:
            channel = grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
        else:
            channel = grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)
        return channel, channel
    if credentials is None:
        raw = grpc.insecure_channel(target, options=options)
    else:
        raw = grpc.secure_channel(target, credentials, options=options)
    return raw, sync_channel(raw, metadata, dynamic)
