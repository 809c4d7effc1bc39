"""SIGTERM as Terminated (aevae.errors.raise_on_sigterm): raised once, so that stopping is not cut short."""

from __future__ import annotations

import os
import signal
import time

import pytest

from aevae.errors import HungUp, Terminated, raise_on_sigterm


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


def test_a_sigterm_after_main_returned_is_not_raised_into_the_shutdown() -> None:
    """A command that has returned is exiting: a SIGTERM then (`aevae up` stopping a child that ended on a
    Ctrl-C) raised Terminated into the interpreter's shutdown, a traceback under "Exception ignored in
    threading._shutdown". main leaves SIGTERM to its default on the way out."""
    from aevae.cli import main

    before = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["report", "--seed", "-1"]) == 2  # a UserError, after raise_on_sigterm
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


def test_decode_batch_stopped_while_ray_starts_says_what_is_on_disk(tiny_repo: object, tmp_path: object,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A SIGTERM during ray.init (Ray's sys.exit(15)) ended `aevae decode-batch` with status 15 and no line, and
    left the Ray it had half started; now status 143, the stop line, and that Ray shut down."""
    ray = pytest.importorskip("ray")
    from aevae.cli import main

    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    shutdowns: list[bool] = []

    def init(*args: object, **kwargs: object) -> None:
        raise SystemExit(signal.SIGTERM)

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda *args, **kwargs: shutdowns.append(True))
    code = main(["decode-batch", "--prior", "100", "--output", f"{tmp_path}/out", "--models-dir", str(tiny_repo),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGTERM, err
    assert "0 of 1 shards are on disk" in err and "Traceback" not in err, err
    assert shutdowns


def test_a_hangup_stops_like_sigterm_and_exits_129(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGHUP (a closed terminal) killed a command at once: a batch job without its "interrupted" line and with
    Ray's agents left running, a service without its drain. It stops the same way as SIGTERM now, once."""
    from aevae.cli import main

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM)}
    try:
        raise_on_sigterm()
        with pytest.raises(HungUp):
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(5)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN  # a second one does not cut the stop short
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN

        def hang_up(argv: object) -> int:
            raise HungUp()

        import aevae.cli

        monkeypatch.setattr(aevae.cli, "_run", hang_up)
        assert main([]) == 128 + signal.SIGHUP
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_a_hangup_ignored_at_start_stays_ignored() -> None:
    """Under nohup (SIGHUP ignored) a command must go on when the terminal closes: that is what nohup is for."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        raise_on_sigterm()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGHUP)  # nothing happens
        time.sleep(0.05)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_a_sigterm_whose_interrupt_a_library_replaced_still_exits_143(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Train, while it starts, caught the Terminated raised for a SIGTERM and raised a plain
    KeyboardInterrupt of its own: `aevae train` said "stopped by Ctrl-C" and exited 130."""
    import aevae.cli
    from aevae.cli import main
    from aevae.errors import stop_signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM)}

    def replaced(argv: object) -> int:
        raise_on_sigterm()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except Terminated:
            raise KeyboardInterrupt() from None  # what the library did
        return 0

    try:
        monkeypatch.setattr(aevae.cli, "_run", replaced)
        assert main([]) == 128 + signal.SIGTERM
        raise_on_sigterm()  # the next command starts afresh: a plain KeyboardInterrupt is Ctrl-C again
        assert stop_signal(KeyboardInterrupt()) == signal.SIGINT
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
