"""`aevae serve encoder|decoder`: argument parsing only; the server is imported when the command runs."""

from __future__ import annotations

import argparse

from aevae.services.limits import Limits  # stdlib only

PORTS = {"encoder": 50051, "decoder": 50052}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the gRPC encoder or decoder service over a model repository")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="{encoder,decoder}")
    for kind, port in PORTS.items():
        k = kinds.add_parser(kind, help=f"the {kind} service (default port {port})",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        k.add_argument("--models-dir", default=None, help="model repository (or AEVAE_MODELS_DIR; default ./models)")
        k.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for all interfaces")
        k.add_argument("--port", type=int, default=port, help="port; 0 picks a free one (printed on start)")
        k.add_argument("--max-message-bytes", type=int, default=Limits.max_message_bytes,
                       help="largest request or response message; RESOURCE_EXHAUSTED beyond")
        k.add_argument("--max-batch", type=int, default=Limits.max_batch,
                       help="most images or latents per request message; RESOURCE_EXHAUSTED beyond")
        k.add_argument("--workers", type=int, default=2, help="threads running the model off the event loop")
        k.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
        k.add_argument("--inline-max", type=int, default=64,
                       help="batches up to this size run on the event loop (saves a thread hop); 0: never")
        k.add_argument("--refresh-seconds", type=float, default=2.0,
                       help="how often the repository is re-read, so new versions appear without a restart")
        k.add_argument("--grace", type=float, default=10.0, help="seconds calls in flight get to finish on SIGTERM")
        k.add_argument("--shutdown-delay", type=float, default=0.5,
                       help="seconds between NOT_SERVING and refusing new calls on SIGTERM")
        k.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from aevae.cli import UserError
    from aevae.services.server import ServerConfig, serve

    for name in ("max_message_bytes", "max_batch", "workers"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    config = ServerConfig(
        kind=args.kind, models_dir=args.models_dir, host=args.host, port=args.port,
        limits=Limits(max_message_bytes=args.max_message_bytes, max_batch=args.max_batch),
        workers=args.workers, torch_threads=args.torch_threads, inline_max=args.inline_max,
        refresh_seconds=args.refresh_seconds, grace=args.grace, shutdown_delay=args.shutdown_delay,
    )
    try:
        return asyncio.run(serve(config))
    except OSError as exc:
        raise UserError(str(exc)) from None
