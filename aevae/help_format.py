"""The commands' --help: every flag's default shown, from where the default is defined."""

from __future__ import annotations

import argparse


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default, so --help cannot drift from the code. A default of None is left out: it
    stands for something the flag's help names (an environment variable, a value computed at run time), never
    for "None" (argparse's own showed "default ./models) (default: None)"); nor an on/off flag's False."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # an on/off flag's default is off, which its name says ("--insecure ... (default: False)")
        if action.default is None or (action.nargs == 0 and action.default is False):
            return action.help
        return super()._get_help_string(action)
