"""Who may call a service: TLS and mutual TLS credentials, the bearer-token check, the binding policy.

- TLS: `--tls-cert` and `--tls-key` (PEM) serve TLS; `--tls-client-ca` adds mutual TLS (a client certificate
  signed by one of those CAs is required and verified by gRPC's own handshake). A certificate that has expired
  or is not for a server is refused at start and at reload.
- Tokens: `--token-file` (one token per line, several for a rotation with overlap, re-read when the file
  changes) or the AEVAE_TOKEN variable. A grpc.aio server interceptor checks the `authorization: Bearer TOKEN`
  metadata of every call in constant time; a missing or wrong token gets UNAUTHENTICATED saying what is
  expected, never the token. `grpc.health.v1.Health` (probes) and server reflection answer without a token:
  reflection tells only the API's schema, which is public (proto/ in the repository), and lets stock tools
  (`grpcurl list`, `describe`) work; every call of aevae.v1 and of the Open Inference Protocol (which run the
  models or tell what the repository holds) needs the token.
- Binding: a non-loopback `--host` without TLS or without a token refuses to start unless `--insecure`, which
  then warns on every start.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import ssl
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc

from aevae.client.credentials import ENV_TOKEN, TokenFile, encrypted_key, is_loopback, no_passphrase
from aevae.services.settings import ServiceSettings, host_port

log = logging.getLogger(__name__)

# answer without a token: probes, and the (public) schema for stock tools
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")
EXPECTED = ("send the metadata `authorization: Bearer <token>` with a token the service accepts (its "
            "--token-file or AEVAE_TOKEN); aevae.client: token= or AEVAE_TOKEN")


class SecurityError(ValueError):
    """Security settings that cannot work (a certificate without its key, an unreadable file...)."""


class InsecureBinding(SecurityError):
    """A public address without TLS or a token, and no --insecure."""


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SecurityError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise SecurityError(f"{what}: {path} is not a PEM file")
    return data


# OpenSSL's verification codes: a certificate no client accepts, whoever signed it
X509_NOT_YET_VALID, X509_EXPIRED, X509_PURPOSE = 9, 10, 26


def _check_tls(cert: str, cert_pem: bytes, key: str, key_pem: bytes, ca: str | None, ca_pem: bytes | None) -> None:
    """SecurityError naming the option when the files are not a certificate, its private key and CA
    certificates. gRPC takes any PEM and fails only when it binds the port, with "Failed to bind to address
    ... (in use?)" and its own log lines: a key of another certificate, the two files swapped or an encrypted
    key looked like a port in use. And a certificate that has expired, or is a client's, gRPC serves without
    a word while every client's handshake fails: refused too (_client_verdict)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for option, path, pem in (("tls-cert", cert, cert_pem), ("tls-client-ca", ca, ca_pem)):
        if path is None or pem is None:
            continue
        try:
            context.load_verify_locations(cadata=pem.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError):
            what = "the server's certificate (chain)" if option == "tls-cert" else "the CA certificates of mutual TLS"
            raise SecurityError(f"{option}: {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----); it "
                                f"takes {what}") from None
    if encrypted_key(key_pem):
        raise SecurityError(f"tls-key: {key} is encrypted (it needs a passphrase); the service takes the "
                            "key unencrypted, e.g. `openssl pkey -in KEY -out KEY.plain`, readable by it alone")
    try:
        context.load_cert_chain(cert, key, password=no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise SecurityError(f"tls-key: {key} is not the private key of the certificate in --tls-cert {cert}; "
                                "give the key the certificate was issued for") from None
        raise SecurityError(f"tls-key: {key} holds no PEM private key (-----BEGIN PRIVATE KEY-----, EC or RSA); "
                            "it takes the unencrypted key of --tls-cert") from None
    except OSError as exc:  # replaced between the read above and this one (a rotation): as unreadable
        raise SecurityError(f"tls-cert, tls-key: cannot read {cert} or {key}: {exc.strerror}") from None
    refused = _client_verdict(context, cert_pem)
    if refused is not None and refused.verify_code in (X509_EXPIRED, X509_PURPOSE):
        what = ("has expired: renew it" if refused.verify_code == X509_EXPIRED else
                "is not for a server (its extended key usage lacks serverAuth: a client certificate?); give "
                "the server's certificate")
        raise SecurityError(f"tls-cert: the certificate in {cert} {what}; every client would refuse it "
                            f"({refused.verify_message})")
    if refused is not None and refused.verify_code == X509_NOT_YET_VALID:
        log.warning("tls-cert: the certificate in %s is not valid yet: clients refuse it until its start "
                    "(notBefore); served all the same", cert)


def _client_verdict(server: ssl.SSLContext, cert_pem: bytes) -> ssl.SSLCertVerificationError | None:
    """What a TLS client verifying the certificate would say, from a handshake in memory with the server's
    `server` context and a client that trusts the certificate itself (so that only the certificate's dates and
    purpose are judged, not who signed it or the names it carries); None when it passes, or when the
    handshake fails for another reason (gRPC's TLS may take what this one does not: no verdict then). gRPC
    serves an expired certificate, or a client certificate, without a word, and every client's handshake
    fails."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the certificate is its own trust anchor
    try:
        client.load_verify_locations(cadata=cert_pem.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError):
        return None
    bios = [ssl.MemoryBIO() for _ in range(4)]
    ends = ((client.wrap_bio(bios[0], bios[1]), bios[1], bios[2]),
            (server.wrap_bio(bios[2], bios[3], server_side=True), bios[3], bios[0]))
    for _ in range(4):  # TLS 1.3 is done in two flights each way
        for end, out, peer in ends:
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLCertVerificationError as exc:
                return exc
            except ssl.SSLError:
                return None
            peer.write(out.read())
    return None


class TlsFiles:
    """The server's certificate, key and client CA, re-read when they change, as the token file is: cert-manager
    and Kubernetes Secret volumes rotate them in place, and a restart must not be the only way to pick them up.
    gRPC asks `fetch` at every new connection (a stat of each file; connections already open keep their
    session). Files that changed but do not load (not PEM, or a certificate and a key not yet both renewed) keep
    the certificate in use, with one warning."""

    def __init__(self, cert: str, key: str, client_ca: str | None):
        self.files = {"tls-cert": cert, "tls-key": key, **({"tls-client-ca": client_ca} if client_ca else {})}
        self.initial = self._configuration()  # first: SecurityError naming the option when a file does not read
        self.stamp = self._stamp()
        self.refused: tuple[tuple[int, int, int], ...] | None = None  # the change last warned about

    def _stamp(self) -> tuple[tuple[int, int, int], ...]:
        stats = [os.stat(path) for path in self.files.values()]  # through symlinks: a Secret volume swaps them
        return tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in stats)

    def _configuration(self) -> Any:
        pair = (_read(self.files["tls-key"], "tls-key"), _read(self.files["tls-cert"], "tls-cert"))
        ca = _read(self.files["tls-client-ca"], "tls-client-ca") if "tls-client-ca" in self.files else None
        _check_tls(self.files["tls-cert"], pair[1], self.files["tls-key"], pair[0], self.files.get("tls-client-ca"),
                   ca)
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=ca)

    def fetch(self) -> Any:
        """A new configuration when the files changed and read, else None (gRPC keeps the one in use)."""
        try:
            stamp = self._stamp()
        except OSError:
            return None  # mid-rotation: a file is missing for a moment
        if stamp == self.stamp or stamp == self.refused:
            return None
        try:
            configuration = self._configuration()
        except SecurityError as exc:
            self.refused = stamp
            log.warning("the TLS files changed but do not load (%s); the certificate in use stays", exc)
            return None
        self.stamp = stamp
        log.info("TLS certificate reloaded from %s", self.files["tls-cert"])
        return configuration


def server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings (None: plaintext), reloaded when their files change (TlsFiles);
    ValueError naming the option when incomplete."""
    if not settings.tls_cert and not settings.tls_key:
        if settings.tls_client_ca:
            raise SecurityError("--tls-client-ca (mutual TLS) needs TLS: --tls-cert and --tls-key")
        return None
    if not (settings.tls_cert and settings.tls_key):
        raise SecurityError("--tls-cert and --tls-key go together: the certificate and its private key")
    files = TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    return grpc.dynamic_ssl_server_credentials(files.initial, files.fetch,
                                               require_client_authentication=settings.tls_client_ca is not None)


class Tokens:
    """The accepted tokens: from a file (re-read when it changes) or fixed ones (AEVAE_TOKEN)."""

    def __init__(self, file: TokenFile | None = None, fixed: tuple[str, ...] = ()):
        self.file = file
        self.fixed = fixed
        self.source = f"--token-file {file.path}" if file is not None else f"${ENV_TOKEN}"

    @classmethod
    def from_settings(cls, settings: ServiceSettings, env: dict[str, str] | None = None) -> "Tokens | None":
        env = dict(os.environ if env is None else env)
        if settings.token_file:
            try:
                return cls(file=TokenFile(settings.token_file))
            except ValueError as exc:
                raise SecurityError(f"token-file: {exc}") from None
        token = env.get(ENV_TOKEN, "").strip()
        return cls(fixed=(token,)) if token else None

    def accepts(self, header: str) -> bool:
        # whitespace around the value is no part of it (HTTP's OWS): " Bearer TOKEN" was refused as "wrong or
        # rotated", a right token told it was wrong
        scheme, _, presented = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return False
        candidate = presented.strip().encode()
        accepted = self.file.refresh() if self.file is not None else self.fixed
        ok = False
        for token in accepted:  # every token compared, in constant time each
            ok |= hmac.compare_digest(candidate, token.encode())
        return ok


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call with UNAUTHENTICATED; the request bytes
    are never parsed."""
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for every call but health and reflection without an accepted `authorization: Bearer`
    token."""

    def __init__(self, tokens: Tokens):
        self.tokens = tokens

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                             Awaitable[grpc.RpcMethodHandler | None]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        headers = [value if isinstance(value, str) else value.decode("latin-1")
                   for key, value in handler_call_details.invocation_metadata or () if key == "authorization"]
        if not headers:
            return _refusal(handler, f"missing token: {method} needs one; {EXPECTED}")
        if len(headers) > 1:  # which one counts would be a guess: one of them may have been added on the way
            return _refusal(handler, f"{len(headers)} authorization headers sent, one accepted; {EXPECTED}")
        if not self.tokens.accepts(headers[0]):
            return _refusal(handler, f"the token sent is not accepted ({_why_refused(headers[0])}); {EXPECTED}")
        return handler


def _why_refused(header: str) -> str:
    """What is wrong with an `authorization` value that was refused, without echoing any of it (a client that
    left out "Bearer " would see its token in the error)."""
    scheme, _, presented = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return "not a Bearer token"
    if not presented.strip():
        return "an empty token after Bearer"
    return "wrong or rotated"


class _UndecodedMetadata(logging.Filter):
    """grpc logs a metadata value that is not UTF-8 at ERROR, with a traceback and THE VALUE ITSELF ("Invalid
    encoding on b'Bearer <token>\\xe9'"), before any interceptor runs: a token with one stray byte reached the log
    whole, and any client, without a token, could write a traceback into the log per call. Such a record
    becomes one INFO line giving only the value's length (grpc then reads the value as latin-1, which no
    accepted token matches: the call is refused as usual)."""

    PREFIX = "Invalid encoding on"

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith(self.PREFIX)):
            return True
        value = record.args[0] if isinstance(record.args, tuple) and record.args else b""
        record.msg = "a call carried a metadata value of %d bytes that is not UTF-8 (not logged: it may be a " \
                     "credential)"
        record.args = (len(value) if isinstance(value, (bytes, str)) else 0,)
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info = record.exc_text = None
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)


def redact_metadata_logs() -> None:
    """Installs _UndecodedMetadata on grpc's Cython logger, once."""
    logger = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, _UndecodedMetadata) for f in logger.filters):
        logger.addFilter(_UndecodedMetadata())


def interceptors(settings: ServiceSettings) -> list[grpc.aio.ServerInterceptor]:
    """The token check, when the settings give tokens. Every server gets here (server.build), with or without
    tokens: so this is also where grpc's log is kept from showing metadata values (redact_metadata_logs)."""
    redact_metadata_logs()
    tokens = Tokens.from_settings(settings)
    return [] if tokens is None else [TokenInterceptor(tokens)]


def check_binding(settings: ServiceSettings, kind: str, env: dict[str, str] | None = None) -> str:
    """A line describing the service's protection, printed on start. InsecureBinding for a non-loopback host
    without TLS or a token unless --insecure; with --insecure, a warning on stderr on every start."""
    tls = bool(settings.tls_cert and settings.tls_key)
    tokens = Tokens.from_settings(settings, env)
    parts = [("mutual TLS" if settings.tls_client_ca else "TLS") if tls else "plaintext",
             f"token from {tokens.source}" if tokens is not None else "no token"]
    summary = ", ".join(parts)
    missing = [what for what, ok in (("TLS (--tls-cert, --tls-key)", tls),
                                     ("a token (--token-file or AEVAE_TOKEN)", tokens is not None)) if not ok]
    if missing and not is_loopback(settings.host):
        if not settings.insecure:
            raise InsecureBinding(
                f"refusing to serve the {kind} on {settings.host} without {' and '.join(missing)}: anyone who "
                "can reach the port could call it" + (" and read its traffic" if not tls else "") + ". Give "
                "them, listen on 127.0.0.1, or pass --insecure when something else protects the traffic (a "
                "private network, a mesh with mutual TLS)")
        print(f"aevae {kind}: WARNING: --insecure: listening on {settings.host} without "
              f"{' and '.join(missing)}; whatever reaches this port can call the service"
              + ("" if tls else " and read its traffic"), file=sys.stderr, flush=True)
    return summary


# HTTP/2 streams one connection may hold open at once. gRPC's default is unbounded, and calls that need no
# token (grpc.health.v1 Watch: about 5.5 kB of server memory each) could pile up on one connection by the
# thousand; a client that opens more waits for one of its own to end (HTTP/2 flow, no error). Far above what a
# client pipelines (64 in flight, a stream per replica of a fan-out); the admission caps calls below it.
MAX_STREAMS_PER_CONNECTION = 1024
# A connection must finish its handshake (TLS, and the client's HTTP/2 preface and SETTINGS) within this long.
# gRPC's default is 2 minutes and keepalive ended a silent one after about 60 s: so 350 bare TCP connects a
# second from one peer, no token needed, held every file descriptor the server had (20,000), and no client
# could connect. A real client sends its preface at once; a TLS handshake takes well under a second.
HANDSHAKE_TIMEOUT_MS = 5_000
# Descriptors kept free of connections (for the model files, the metrics endpoint, logs): the cap on
# connections at once is the process's open-file limit less these. Past it gRPC closes a new connection at
# once: the server goes on serving the connections it has and can still open a version's files.
SPARE_DESCRIPTORS = 256
# Request metadata (headers) of a call: at most 16 KiB, the same bound soft and hard. gRPC's defaults (a soft
# 8 KiB, a hard 16 KiB) refused a call whose headers fell between them at random (at 12 KiB, 26 of 40 calls),
# so a client with a big token or tracing headers looked flaky.
MAX_METADATA_BYTES = 16 * 1024


def raise_open_files_limit() -> int:
    """Raises the soft limit on open files to the hard limit and returns it: each connection takes a
    descriptor, and systemd and containers often leave the soft one at 1,024."""
    import resource

    from aevae.rlimits import raise_soft_limit

    return raise_soft_limit(resource.RLIMIT_NOFILE)


def max_connections(open_files: int) -> int:
    """Connections held at once: the open-file limit less SPARE_DESCRIPTORS, at least 16 (a tiny limit)."""
    return max(16, min(open_files, 2**31 - 1) - SPARE_DESCRIPTORS)


def connection_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    """Every port's connection policy (the main port's, server.build, and the health port's).

    A peer that vanished without closing its connection (a crash of its host, a network partition) is found by
    pings (--keepalive-seconds): without them its streams would hold their slots until TCP gives up, hours
    later. A stream silent both ways is pinged all the same, and so is a connection without calls: one its
    client opened and abandoned (or whose host vanished) otherwise held its file descriptor for good, and
    enough of them (128 under a limit of 128 open files) took the last descriptor, so that the server could
    accept no other client (gRPC logs "File descriptor limit reached" and retries, for ever); on the health
    port (plaintext, no token needed) anyone could do that. A live client answers the pings: its idle channel
    stays connected, until --max-connection-age-s. A connection that never finishes its handshake is closed
    sooner (HANDSHAKE_TIMEOUT_MS), and connections at once stay under the open-file limit (max_connections),
    which this raises to its hard value first."""
    timeout_ms = round(min(settings.keepalive_seconds, 20.0) * 1000)
    options = [("grpc.keepalive_time_ms", round(settings.keepalive_seconds * 1000)),
               ("grpc.keepalive_timeout_ms", timeout_ms), ("grpc.http2.ping_timeout_ms", timeout_ms),
               ("grpc.http2.max_pings_without_data", 0), ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
               ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
               ("grpc.max_allowed_incoming_connections", max_connections(raise_open_files_limit())),
               ("grpc.max_metadata_size", MAX_METADATA_BYTES),
               ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
               # aevae's client pings a call's connection every 20 s (client.core.KEEPALIVE_MS), also while a
               # big call computes and sends nothing: gRPC's default (a ping per 5 min without data, two
               # strikes) would end such a connection with "too_many_pings" after a minute
               ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
               # Requests are taken uncompressed only (gzip and deflate answer UNIMPLEMENTED, naming the
               # algorithm): gRPC inflates a compressed message whole, before any handler, token check or size
               # limit of ours, so 40 gzip requests of 61 KB each, 2.4 MB on the wire, grew a server by 1.8 GiB
               # (60 MiB of zeros each), token or not, and on the health port too. Tensors of floats hardly
               # compress anyway; responses are never compressed.
               ("grpc.compression_enabled_algorithms_bitset", 1)]
    # A live client that stops reading a stream answers the pings and holds its call slot (and the answers
    # gRPC has taken) for as long as its connection lives: the connection's age is what ends it.
    if settings.max_connection_age_s > 0:
        options += [("grpc.max_connection_age_ms", round(settings.max_connection_age_s * 1000)),
                    ("grpc.max_connection_age_grace_ms", round(settings.max_connection_age_grace_s * 1000))]
    return options


async def serve_health(settings: ServiceSettings, add_health: Callable[[grpc.aio.Server], None]) -> grpc.aio.Server | None:
    """With --health-port: grpc.health.v1 alone (`add_health` registers the main port's servicer, so the
    same status, NOT_SERVING on SIGTERM included) on a plaintext port without a token, for probes that
    speak neither (Kubernetes' grpc probes). Nothing else is served there."""
    if settings.health_port is None:
        return None
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *connection_options(settings)])
    add_health(server)
    address = host_port(settings.host, settings.health_port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address} for health (in use?): {exc}") from None
    await server.start()
    print(f"health (grpc.health.v1 only, plaintext) on {host_port(settings.host, bound)}", flush=True)
    return server


# -- made here: a token, and a self-signed CA with a server (and client) certificate ----------------------
def new_token() -> str:
    import secrets

    return secrets.token_urlsafe(32)


def write_secret(path: Path, data: str | bytes) -> Path:
    """Writes a file only its owner can read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return path


def make_certificates(folder: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
                      days: int = 30) -> dict[str, Path]:
    """A throwaway CA and, signed by it, a server certificate naming `hosts` and a client certificate (for
    mutual TLS): ca.pem, server.pem, server.key, client.pem, client.key in `folder` (keys 0600). Needs the
    `cryptography` package."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aevae"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("aevae local CA")).issuer_name(name("aevae local CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(common: str, usage: Any, sans: list[x509.GeneralName]) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(common)).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return (cert.public_bytes(serialization.Encoding.PEM),
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))

    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_pem, server_key = leaf(hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, sans)
    client_pem, client_key = leaf("aevae client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    folder.mkdir(parents=True, exist_ok=True)
    out = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key",
           "client_cert": folder / "client.pem", "client_key": folder / "client.key"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out["cert"].write_bytes(server_pem)
    write_secret(out["key"], server_key)
    out["client_cert"].write_bytes(client_pem)
    write_secret(out["client_key"], client_key)
    return out
