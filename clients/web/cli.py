"""`aevae ui`: the reference web UI over the encoder and decoder services."""

from __future__ import annotations

import argparse
from pathlib import Path

from aevae.errors import UserError


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
    p.add_argument("--classifier", type=Path, default=None, metavar="NPZ",
                   help="the digit classifier that judges samples (default: the one shipped with the UI, "
                        "exported from the report's by tools/export_classifier.py)")
    p.set_defaults(func=run)


def _check_target(option: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{option} must be HOST:PORT (e.g. 127.0.0.1:50051), got {value!r}")


def run(args: argparse.Namespace) -> int:
    _check_target("--encoder", args.encoder)
    _check_target("--decoder", args.decoder)
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be 0..65535, got {args.port}")
    if args.classifier is not None and not args.classifier.is_file():
        raise UserError(f"--classifier: no such file {args.classifier}")
    try:
        import aiohttp  # noqa: F401
    except ModuleNotFoundError as exc:
        raise UserError("the UI needs aiohttp: pip install 'aevae[ui]'") from exc
    from aevae.ui.server import serve
    from aevae.ui.validity import DEFAULT_PATH

    try:
        serve(args.encoder, args.decoder, host=args.host, port=args.port, classifier=args.classifier or DEFAULT_PATH,
              metrics_port=args.metrics_port)
    except OSError as exc:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from exc
    return 0
