"""`aevae ui`: the reference web UI over the encoder and decoder services."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from aevae.errors import UserError, require_port


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ui", help="serve the latent-space explorer web page",
        description="Serve the latent-space explorer. Its server reaches the services only through aevae.client.")
    p.add_argument("--encoder", default="127.0.0.1:50051", metavar="HOST:PORT",
                   help="encoder service address (default 127.0.0.1:50051)")
    p.add_argument("--decoder", default="127.0.0.1:50052", metavar="HOST:PORT",
                   help="decoder service address (default 127.0.0.1:50052)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (off when unset; 0 picks a free port)")
    p.add_argument("--metrics-host", default=None, metavar="HOST",
                   help="address the metrics port listens on (default: --host), e.g. 127.0.0.1 to keep them on "
                        "this machine while --host serves beyond it")
    p.add_argument("--classifier", type=Path, default=None, metavar="NPZ",
                   help="the digit classifier that judges samples (default: the one shipped with the UI, "
                        "exported from the report's by tools/export_classifier.py)")
    from aevae.client.cli import add_security_arguments

    add_security_arguments(p)  # how the UI server reaches the services
    g = p.add_argument_group("who may use the UI")
    g.add_argument("--login-token-file", default=None, metavar="FILE",
                   help="tokens that log in to the page, one per line (default, when bound to a non-loopback "
                        "address: the services' token); with one, every page and call needs the login")
    g.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="another origin (scheme://host:port) whose pages may open the WebSocket and POST; "
                        "repeatable (default: the page's own origin only)")
    g.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="another name the server answers for in the Host header (default: the bound host; "
                        "on loopback also localhost, 127.0.0.1, ::1); repeatable")
    g.add_argument("--https-cert", default=None, metavar="PEM", help="serve HTTPS with this certificate")
    g.add_argument("--https-key", default=None, metavar="PEM", help="the HTTPS certificate's key")
    g.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without a login (warns on every start)")
    p.set_defaults(func=run)


def _check_target(option: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{option} must be HOST:PORT (e.g. 127.0.0.1:50051), got {value!r}")


def run(args: argparse.Namespace) -> int:
    _check_target("--encoder", args.encoder)
    _check_target("--decoder", args.decoder)
    require_port("--port", args.port)
    require_port("--metrics-port", args.metrics_port)
    if args.classifier is not None and not args.classifier.is_file():
        raise UserError(f"--classifier: no such file {args.classifier}")
    try:
        import aiohttp  # noqa: F401
    except ModuleNotFoundError as exc:
        raise UserError("the UI needs aiohttp: pip install 'aevae[ui]'") from exc
    from aevae.ui.server import serve
    from aevae.ui.validity import DEFAULT_PATH, Judge

    if args.classifier is not None:
        # A file named on purpose that cannot be used is an error: the server alone would only warn and serve
        # the samples unjudged, which the user would take for the classifier they asked for. (The shipped
        # default may be missing from an unusual install; then the samples are unjudged, with the reason.)
        judge = Judge(args.classifier)
        if judge.classifier is None:
            raise UserError(f"--classifier: {judge.reason}")
    guard, security, ssl_context = _protection(args)
    metrics_down: tuple[type[OSError], ...] = ()  # the metrics module is imported only when they are on
    if args.metrics_port is not None:
        from aevae.services.metrics import MetricsUnavailable

        metrics_down = (MetricsUnavailable,)
    try:
        serve(args.encoder, args.decoder, host=args.host, port=args.port, classifier=args.classifier or DEFAULT_PATH,
              metrics_port=args.metrics_port, guard=guard, security=security, ssl_context=ssl_context,
              metrics_host=args.metrics_host)
    except metrics_down as exc:  # it names its address and flag
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from exc
    return 0


def _protection(args: argparse.Namespace):
    """The Guard (Host, Origin, login), the services' ChannelSecurity and the HTTPS context from the options;
    UserError for a non-loopback --host without a login unless --insecure."""
    import ssl
    import sys

    from aevae.client import AevaeError
    from aevae.client.cli import security_options
    from aevae.client.credentials import ChannelSecurity, TokenFile, encrypted_key, no_passphrase
    from aevae.ui.guard import Guard, is_loopback

    try:
        security = ChannelSecurity.resolve(**security_options(args), target=[args.encoder, args.decoder])
        # The files are read here, once: the UI makes its channels later, and an unreadable CA would then fail
        # every page request (a 500) and stop the service watchers, with the UI apparently up.
        security.credentials()
    except AevaeError as exc:
        raise UserError(f"{exc.details()} (--tls-ca, --tls-cert, --tls-key, --token-file, or their AEVAE_ variables)"
                        ) from None
    public = not is_loopback(args.host)
    login: TokenFile | tuple[str, ...] | None = None
    try:
        if args.login_token_file:
            login = TokenFile(args.login_token_file)
        elif public and security.has_token:
            login = security._tokens if security._tokens is not None else (security.current_token(),)
    except ValueError as exc:
        raise UserError(f"--login-token-file: {exc}") from None
    if public and login is None:
        if not args.insecure:
            raise UserError(f"refusing to serve the UI on {args.host} without a login: anyone who can reach the "
                            "port could use it. Give --login-token-file (or the services' token: --token-file, "
                            "AEVAE_TOKEN), listen on 127.0.0.1, or pass --insecure when something else guards it")
        print(f"aevae ui: WARNING: --insecure: serving on {args.host} without a login", file=sys.stderr, flush=True)
    if public and login is not None and not args.https_cert:
        print(f"aevae ui: note: the login token and the pages travel unencrypted on {args.host}; use --https-cert "
              "and --https-key, or a TLS proxy in front", file=sys.stderr, flush=True)
    ssl_context = None
    if args.https_cert or args.https_key:
        if not (args.https_cert and args.https_key):
            raise UserError("--https-cert and --https-key go together")
        # Each file is read here first: ssl's load_cert_chain reports a missing or unreadable file as a bare
        # "[Errno 2] No such file or directory", naming neither the file nor the option.
        for flag, path in (("--https-cert", args.https_cert), ("--https-key", args.https_key)):
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise UserError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_context.load_cert_chain(args.https_cert, args.https_key, password=no_passphrase)
        except (OSError, ssl.SSLError) as exc:
            with open(args.https_key, "rb") as key:
                if encrypted_key(key.read()):
                    raise UserError(f"--https-key {args.https_key} is encrypted (it needs a passphrase); the UI "
                                    "takes the key unencrypted, e.g. `openssl pkey -in KEY -out KEY.plain`") from None
            raise UserError(f"--https-cert {args.https_cert} and --https-key {args.https_key} are not a PEM "
                            f"certificate and its private key: {exc}") from None
    if login is not None:
        print(f"aevae ui: the page needs a login: {_login_source(args, security)}", file=sys.stderr, flush=True)
    try:
        guard = Guard.create(args.host, args.allow_host, args.allow_origin, login)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return guard, security, ssl_context


def _login_source(args: argparse.Namespace, security: Any) -> str:
    """Where the login token comes from, in words, for the start-up output (never the token itself). By default
    it is the services' token, which the client may have found by itself in ~/.config/aevae/token (left by
    `aevae up`): without this line a user who never gave a token would not know which one the page wants."""
    import os

    from aevae.client.credentials import ENV_TOKEN_FILE, local_token_path

    if args.login_token_file:
        return f"a token from --login-token-file {args.login_token_file}"
    if security.token:
        return "the services' token, from AEVAE_TOKEN"
    if args.token_file:
        return f"the services' token, from --token-file {args.token_file}"
    if os.environ.get(ENV_TOKEN_FILE):
        return f"the services' token, from AEVAE_TOKEN_FILE ({security.token_file})"
    if security.token_file and Path(security.token_file) == local_token_path():
        return f"the services' token, from {security.token_file} (written by `aevae up`)"
    return f"the services' token, from {security.token_file}"
