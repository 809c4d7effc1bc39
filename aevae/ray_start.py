"""Starting Ray from a command that a stop (Ctrl-C, SIGTERM) may end at any moment, its start-up included.

`ray.init` takes seconds to start a local Ray, and makes SIGTERM a `sys.exit(15)` first thing. A SIGTERM during
it ended `aevae train` and `aevae decode-batch` with status 15 and not a word, where any later one ends them
with 143 and their stop line; and a stop during it (either signal) left the processes it had started, whose
agents then lived on for a minute after the command had gone, with 200 MB between them. Here a stop during the
start-up shuts down what had started, and raises what a stop raises elsewhere: Terminated for SIGTERM,
KeyboardInterrupt for Ctrl-C. After a successful start SIGTERM raises Terminated again (errors.raise_on_sigterm).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any

from aevae.errors import Terminated, raise_on_sigterm


def stopping() -> None:
    """A stop has begun: further Ctrl-C and SIGTERM are ignored, so that the stop (Ray's shutdown, the account of
    what is kept) is not cut short by an impatient second one. Another Ctrl-C during Ray's shutdown printed an
    "Exception ignored in atexit callback" traceback. From another thread it does nothing."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def init(**kwargs: Any) -> None:
    """ray.init(**kwargs); a stop during it shuts down what had started and raises Terminated or
    KeyboardInterrupt. Other errors (an address with no cluster) are ray.init's own."""
    import ray

    try:
        ray.init(**kwargs)
    except (KeyboardInterrupt, SystemExit) as exc:
        if isinstance(exc, SystemExit) and exc.code != signal.SIGTERM:
            raise_on_sigterm()
            raise
        stopping()
        with contextlib.suppress(Exception):
            ray.shutdown()
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise Terminated() from None
    except BaseException:
        raise_on_sigterm()
        raise
    raise_on_sigterm()  # ray.init made SIGTERM a sys.exit
