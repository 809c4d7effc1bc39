"""SIGTERM as Terminated (aevae.errors.raise_on_sigterm): raised once, so that stopping is not cut short."""

from __future__ import annotations

import os
import signal
import time

import pytest

from aevae.errors import Terminated, raise_on_sigterm


def test_the_first_sigterm_raises_and_later_ones_do_not_interrupt_the_stop() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    try:
        raise_on_sigterm()
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # a second one, while stopping: ignored
            time.sleep(0.05)
        except Terminated:
            pytest.fail("a second SIGTERM raised Terminated again, cutting the stop short")
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
