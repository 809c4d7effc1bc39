"""The `aevae` console script. Each subcommand lives beside the code it drives and registers itself here.

Registration modules import only argparse-level code, so `aevae encode` never pays for torch or Ray.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from typing import Any

# gRPC's core logs at INFO a line per failed TLS handshake ("Handshake failed with error SSL_ERROR_SSL ..."), on
# stderr: any peer that reaches a TLS port with plaintext or garbage writes to the log at its connection rate.
# Errors only, unless GRPC_VERBOSITY says otherwise (INFO to see such handshakes). Read when gRPC starts, so
# set before anything imports it.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from aevae.errors import UserError, raise_on_sigterm, stop_signal
from aevae.output import keep_standard_streams_open

# module -> it defines `register(subparsers)`; the order is the order of `aevae --help`.
COMMANDS = (
    "aevae.up",
    "aevae.trainer.cli",
    "aevae.export_command",
    "aevae.services.cli",
    "aevae.client.cli",
    "aevae.ui.cli",
    "aevae.report.cli",
    "aevae.batch.cli",
)


# The logging levels --log-level accepts, any case. Checked by argparse: logging.basicConfig would raise a
# ValueError (a traceback) for any other name, after the command was chosen.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _Parser(argparse.ArgumentParser):
    """Refuses an unknown argument in the (sub)command it was given to, with that command's usage: argparse
    hands a subcommand's unknown arguments up to the root, whose error showed `usage: aevae [-h] ... COMMAND`
    for `aevae serve decoder --prot 5`. Subparsers are made of the root's class, so every level is one."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:  # argparse's overloads, as one
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def parser() -> argparse.ArgumentParser:
    root = _Parser(prog="aevae", description="Serve and explore autoencoder latent spaces.")
    root.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS, metavar="LEVEL",
                      help=f"Python logging level: {', '.join(LOG_LEVELS)} (default: WARNING)")
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return root


def main(argv: list[str] | None = None) -> int:
    """Runs a command; Ctrl-C and SIGTERM end it with 130 and 143 and no traceback, from the first import on
    (a Ctrl-C while the commands' modules were imported printed one)."""
    keep_standard_streams_open()
    try:
        return _run(argv)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM / SIGHUP raised as Terminated / HungUp
        return 128 + stop_signal(exc)
    except RuntimeError as exc:
        # Python wraps what a class's __set_name__ raises ("Error calling __set_name__"): a Ctrl-C landing while
        # a module's dataclasses are made (an import of Ray Train's) was a traceback
        if isinstance(exc.__cause__, KeyboardInterrupt):
            return 128 + stop_signal(exc.__cause__)
        raise
    finally:
        # Exiting now: a SIGTERM from here on (a supervisor, `aevae up` stopping its children) ends the process
        # as by default, rather than raise Terminated into the interpreter's shutdown ("Exception ignored in
        # threading._shutdown" and a traceback).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
            signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _run(argv: list[str] | None) -> int:
    try:
        os.getcwd()
    except FileNotFoundError:  # torch's oneMKL failed to load ("Cannot load libtorch_cpu.so"), Ray's job an unnamed file
        print("aevae: error: the current folder no longer exists (it was removed); cd to another folder and run "
              "the command again", file=sys.stderr)
        return 2
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    raise_on_sigterm()  # `aevae serve` replaces it with its graceful drain once it is up
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"aevae {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
