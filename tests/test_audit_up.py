"""`aevae up` as a demanding user runs it: killed with SIGKILL, --ui-port 0, --host ::1, its output piped into
a reader that goes away, a child killed under it, a models folder that is neither usable nor empty; and
`make up`, which should not need what only the tests need. Real processes over tiny models (tests/helpers.py)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from helpers import ROOT, UpProcess, run_aevae


def _up(tmp_path: Path, *args: str, stderr: int = subprocess.STDOUT) -> UpProcess:
    """`aevae up` in a session of its own (so that what outlives it can be found), with its own token folder."""
    return UpProcess(*args, session=True, config=tmp_path / "config", stderr=stderr)


def _ports(*extra: str) -> list[str]:
    return ["--encoder-port", "0", "--decoder-port", "0", *extra]


def _free_port(host: str = "127.0.0.1") -> str:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return str(s.getsockname()[1])


def _urls(text: str) -> list[str]:
    return re.findall(r"http://\S+/(?:metrics)?", text.split("aevae is up:")[1].split("Call them:")[0])


def test_sigkill_of_up_takes_its_children_with_it(tiny_repo: Path, tmp_path: Path) -> None:
    """SIGKILL (the OOM killer, `kill -9`, a supervisor's last resort) ended `aevae up` alone: the encoder, the
    decoder and the UI served on, orphaned, holding their ports, and a second `aevae up` could not start."""
    up = _up(tmp_path, "--models-dir", str(tiny_repo), *_ports("--ui-port", _free_port()))
    try:
        up.wait_ready()
        assert len(up.running()) == 4, up.running()  # aevae up and its three children
        up.process.kill()
        up.process.wait()
        assert up.gone_within(30) == [], up.text
    finally:
        up.cleanup()


def test_ui_port_0_takes_a_free_port_and_prints_it(tiny_repo: Path, tmp_path: Path) -> None:
    """--ui-port 0 (as the services' 0: a free port): `aevae up` waited 60 s for a listener on port 0, then
    failed with "the web UI did not listen on 127.0.0.1:0", the UI up on the port it had picked."""
    up = _up(tmp_path, "--models-dir", str(tiny_repo), "--no-metrics", *_ports("--ui-port", "0"))
    try:
        text = up.wait_ready(50)
        url = re.search(r"web UI\s+(http://127\.0\.0\.1:(\d+)/)", text)
        assert url and url.group(2) != "0", text
        with urllib.request.urlopen(url.group(1), timeout=10) as page:
            assert page.status == 200
    finally:
        up.cleanup()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_urls_printed_for_an_ipv6_host_have_brackets_and_answer(tiny_repo: Path, tmp_path: Path) -> None:
    """--host ::1 printed http://::1:PORT/ for the UI and the metrics: no browser, curl or urllib takes it."""
    up = _up(tmp_path, "--models-dir", str(tiny_repo), "--host", "::1",
            *_ports("--ui-port", _free_port("::1")))
    try:
        urls = _urls(up.wait_ready())
        assert len(urls) == 4, up.text  # the UI and three /metrics
        for url in urls:
            assert url.startswith("http://[::1]:"), up.text
            with urllib.request.urlopen(url, timeout=10) as page:
                assert page.status == 200, url
    finally:
        up.cleanup()


def test_ctrl_c_after_its_output_reader_went_away_is_no_traceback(tiny_repo: Path, tmp_path: Path) -> None:
    """`aevae up | tee up.log`, then Ctrl-C: tee ends first, and every line written after it (the services'
    "stopping", "aevae up: stopped") raised BrokenPipeError: a traceback per echo thread and one from the main
    thread, exit 1."""
    up = _up(tmp_path, "--models-dir", str(tiny_repo), "--no-ui", *_ports(), stderr=subprocess.PIPE)
    try:
        up.wait_ready()
        up.reader.join(10)
        assert up.process.stdout is not None and up.process.stderr is not None
        up.process.stdout.close()  # the reader is gone
        up.process.send_signal(signal.SIGINT)
        code = up.process.wait(60)
        err = up.process.stderr.read()
        assert "Traceback" not in err and "BrokenPipeError" not in err, err
        assert code in (0, 130), err  # 130: the signal came before it waited, right after the summary
        assert up.gone_within(30) == []
    finally:
        up.cleanup()


def test_ctrl_c_while_a_child_starts_is_no_traceback(tiny_repo: Path, tmp_path: Path) -> None:
    """A Ctrl-C at the terminal goes to the whole foreground process group: `aevae up` and its children. One
    that came while a service was still importing printed that child's KeyboardInterrupt traceback. The services
    and the UI now leave Ctrl-C to `aevae up`, which stops them."""
    import time

    up = _up(tmp_path, "--models-dir", str(tiny_repo), *_ports("--ui-port", _free_port()))
    try:
        deadline = time.monotonic() + 60
        while not any("serve encoder" in line and "-I -S" not in line for line in up.running()):  # past the launcher
            assert time.monotonic() < deadline and up.process.poll() is None, up.text
            time.sleep(0.02)
        time.sleep(0.3)  # into its imports (they take about a second): the old code printed a traceback here
        os.killpg(up.process.pid, signal.SIGINT)  # as the terminal sends it: to the group
        code = up.process.wait(60)
        up.reader.join(10)
        assert "Traceback" not in up.text and "KeyboardInterrupt" not in up.text, up.text
        assert code in (0, 130), up.text
        assert up.gone_within(30) == [], up.text
    finally:
        up.cleanup()


def test_a_child_killed_under_up_stops_the_rest_and_says_so(tiny_repo: Path, tmp_path: Path) -> None:
    """A child's end said as Popen's code ("decoder exited with code -9"): killed by a signal, said so."""
    up = _up(tmp_path, "--models-dir", str(tiny_repo), "--no-ui", *_ports())
    try:
        up.wait_ready()
        os.kill(up.pid_of("serve decoder"), signal.SIGKILL)
        assert up.process.wait(60) == 1, up.text
        assert "aevae up: the decoder was killed by SIGKILL; stopping the rest" in up.text, up.text
        assert "Traceback" not in up.text
        assert up.gone_within(30) == [], up.text
    finally:
        up.cleanup()


def test_a_service_that_dies_before_it_is_healthy_is_one_line() -> None:
    """wait_healthy's RuntimeError repeated the service's whole output (echoed above already) under
    `aevae up: error:`, and did not say that it had exited."""
    from aevae.up import _await_healthy

    class Dead:
        kind, address = "encoder", "127.0.0.1:5"

        def wait_healthy(self) -> None:
            raise RuntimeError("encoder at 127.0.0.1:5 did not become healthy:\naevae encoder serving ...\n")

        def poll(self) -> int:
            return -signal.SIGKILL

    with pytest.raises(RuntimeError) as info:
        _await_healthy(Dead())
    assert str(info.value) == "the encoder at 127.0.0.1:5 was killed by SIGKILL (its output is above)"


def _broken_only(tiny_repo: Path) -> Path:
    for manifest in tiny_repo.glob("*/*/manifest.json"):
        manifest.write_text("{not json")
    return tiny_repo


def _a_file(tmp_path: Path) -> Path:
    path = tmp_path / "models.txt"
    path.write_text("not a repository\n")
    return path


@pytest.mark.parametrize("make, message", [
    (_a_file, "is a file, not a folder"),
    (_broken_only, "no loadable model in"),
])
def test_a_models_dir_with_nothing_to_serve_that_is_not_empty_is_refused_before_training(
        make: object, message: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Taken for empty: "no models in ...: training", then a trainer that failed on the file, or trained for
    minutes beside the broken versions, whose reason was never shown. (--train-args names an unknown flag:
    a trainer started here fails at once instead of training.)"""
    models = make(request.getfixturevalue("tiny_repo") if make is _broken_only else tmp_path)  # type: ignore[operator]
    done = run_aevae("up", "--models-dir", str(models), "--data-root", str(tmp_path / "no-data"), "--no-ui",
                     *_ports(), "--train-args=--no-such-flag", timeout=120,
                     env={"XDG_CONFIG_HOME": str(tmp_path / "config")})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "training" not in done.stdout and "no-such-flag" not in done.stderr, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aevae up: error: ") and message in lines[0], done.stderr
    assert "pass another --models-dir" in lines[0]


def test_an_unreadable_models_dir_is_refused_before_training(tmp_path: Path) -> None:
    """As above, for a repository the scan could not read (as root here, permissions cannot show it)."""
    from aevae.errors import UserError
    from aevae.repository import Scan
    from aevae.up import _require_empty

    root = tmp_path / "models"
    root.mkdir()
    with pytest.raises(UserError) as info:
        _require_empty(Scan(ignored=[(root, "the repository cannot be read: Permission denied")]), root)
    assert "cannot be read: Permission denied" in str(info.value)
    _require_empty(Scan(), root)  # empty: trained into
    _require_empty(Scan(), tmp_path / "new")  # missing: made and trained into


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_up_does_not_install_what_only_the_tests_need() -> None:
    """`make up` ran `setup`, which installs Chromium with apt-get (root) for the browser tests: on a machine
    without Chromium and without root, `make up` failed before serving anything."""
    done = subprocess.run(["make", "-n", "up"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "chromium" not in done.stdout and "apt-get" not in done.stdout, done.stdout
    assert "aevae up" in done.stdout
