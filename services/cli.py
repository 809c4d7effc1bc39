"""`aevae serve encoder|decoder`: argument parsing only; the server is imported when the command runs."""

from __future__ import annotations

import argparse

from aevae.errors import UserError
from aevae.help_format import DefaultsFormatter
from aevae.memory import SERVICE_ADDRESS_SPACE, address_space_refusal
from aevae.services.settings import PORTS, ServiceSettings  # stdlib only


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the gRPC encoder or decoder service over a model repository")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="{encoder,decoder}")
    for kind in ("encoder", "decoder"):
        k = kinds.add_parser(kind, help=f"the {kind} service (default port {PORTS[kind]})",
                             formatter_class=DefaultsFormatter)
        ServiceSettings.add_arguments(k)
        k.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    try:
        settings = ServiceSettings.from_args(args)
    except ValueError as exc:
        raise UserError(f"--{exc}") from None
    try:
        from aevae.services.security import SecurityError
        from aevae.services.server import serve
    except ImportError as exc:
        raise UserError(f"serving needs the serve extra ({exc.name} is missing): pip install 'aevae[serve]'") from None
    refusal = address_space_refusal(SERVICE_ADDRESS_SPACE, f"the {args.kind} service")
    if refusal:
        raise UserError(refusal)
    try:
        return asyncio.run(serve(args.kind, settings))
    except SecurityError as exc:
        raise UserError(f"--{exc}" if str(exc).startswith(("tls-", "token-")) else str(exc)) from None
    except OSError as exc:
        raise UserError(str(exc)) from None
