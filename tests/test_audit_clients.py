"""An outside user's audit of the thin client and the UI server: arguments of every wrong kind refused before
any call with what is accepted, a silent server's deadline that names it, an asyncio client used from another
loop, the UI's own refusals (no such endpoint, a method a path does not take, a body over the limit, /ws
without a handshake, a version given twice, a body cut short) as JSON saying what is accepted without a
traceback, and the page not asking a service it knows is down (each such answer was a console error).

Against a tiny repository (write_tiny): one encoder process for the module, the UI in-process for its API and
as `aevae ui` for the browser test."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestServer

from aevae.client import AevaeError, AsyncDecoderClient, DecoderClient, EncoderClient
from aevae.services.process import ServiceProcess
from aevae.ui.server import MAX_BODY, create_app
from helpers import write_tiny

NOWHERE = "127.0.0.1:1"  # nothing listens: every check below happens before a call would go out


@pytest.fixture(scope="module")
def isolated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """No token from the environment or ~/.config/aevae/token: the services here have none."""
    return {"AEVAE_TOKEN": "", "AEVAE_TOKEN_FILE": "", "XDG_CONFIG_HOME": str(tmp_path_factory.mktemp("config"))}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory, isolated: dict[str, str]) -> Iterator[ServiceProcess]:
    models = tmp_path_factory.mktemp("audit") / "models"
    write_tiny(models, "vae", "vae")
    write_tiny(models, "ae", "ae")
    with ServiceProcess("encoder", models, env=isolated) as service:
        service.wait_healthy()
        yield service


def refused(call: Any, *fragments: str) -> AevaeError:
    """`call()` raises INVALID_ARGUMENT whose details hold every fragment."""
    with pytest.raises(AevaeError) as error:
        call()
    assert error.value.code().name == "INVALID_ARGUMENT", error.value
    for fragment in fragments:
        assert fragment in error.value.details(), (fragment, error.value.details())
    return error.value


# -- the client ---------------------------------------------------------------------------------------------
def test_bad_settings_and_inputs_are_refused_before_any_call_saying_what_is_accepted() -> None:
    """Each of these was a TypeError or ValueError from deep inside, an INTERNAL "Invalid metadata" on every
    call, a misleading server answer ("rows of 1" for one number), or (stream_chunk=0) a big batch sent one
    row per message until its deadline passed."""
    refused(lambda: DecoderClient(None), "target", "host:port")  # type: ignore[arg-type]
    refused(lambda: DecoderClient(52052), "target", "52052")  # type: ignore[arg-type]
    refused(lambda: DecoderClient(NOWHERE, retries=-1), "retries", "from 0 up")
    refused(lambda: DecoderClient(NOWHERE, retries="3"), "retries")  # type: ignore[arg-type]
    refused(lambda: DecoderClient(NOWHERE, backoff=float("nan")), "backoff")
    refused(lambda: DecoderClient(NOWHERE, stream_chunk=0), "stream_chunk", "from 1 up")
    refused(lambda: DecoderClient(NOWHERE, metadata="application=decoder"), "metadata", "pairs")  # type: ignore[arg-type]
    refused(lambda: DecoderClient(NOWHERE, metadata=[("Bad Key", "x")]), "'Bad Key'", "lowercase")
    refused(lambda: DecoderClient(NOWHERE, metadata=[("x-note", "a\nb")]), "printable ASCII")
    refused(lambda: DecoderClient(NOWHERE, tls_ca=b"not a certificate"), "tls_ca", "no PEM CERTIFICATE")
    DecoderClient(NOWHERE, metadata=[("application", "decoder"), ("trace-bin", b"\x00\x01")]).close()  # still fine

    with DecoderClient(NOWHERE, retries=0) as dec:
        refused(lambda: dec.decode(0.5), "N x d", "single float64")
        refused(lambda: dec.decode("abc"), "N x d")
        refused(lambda: dec.decode([]), "empty vector", "(0, d)")
        refused(lambda: dec.decode([["a", "b"]]), "real numbers", "str")
        refused(lambda: dec.decode(np.zeros((1, 4), bool)), "real numbers", "bool")
    with EncoderClient(NOWHERE, retries=0) as enc:
        refused(lambda: enc.encode(7), "N x H x W", "single int64")
        refused(lambda: enc.encode(np.zeros((1, 32, 32), bool)), "uint8 0..255 or float32", "bool")
        refused(lambda: enc.encode([[300] * 32] * 32), "0..255", "[300, 300]")


def test_whole_number_pixels_are_sent_as_uint8_and_sample_must_be_a_boolean(encoder: ServiceProcess,
                                                                              isolated: dict[str, str]) -> None:
    """A list of Python ints (int64 to numpy) was refused by the server as "expected float32 or uint8, got
    'int64'" although every value fits uint8; sample="no" is truthy and asked for a sample."""
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32))
    with EncoderClient(encoder.address, token="") as enc:
        from_list = enc.encode(pixels.tolist()).mean
        np.testing.assert_array_equal(from_list, enc.encode(pixels.astype(np.uint8)).mean)
        refused(lambda: enc.encode(pixels.astype(np.uint8), sample="no"), "sample", "True or False")  # type: ignore[arg-type]


def test_a_server_that_never_answers_gives_a_deadline_naming_it_and_the_setting() -> None:
    """gRPC's own "Deadline Exceeded" named neither the server nor the option."""
    with socket.socket() as silent:  # accepts connections (the backlog) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        with DecoderClient(target, timeout=0.5, retries=0, token="") as dec:
            with pytest.raises(AevaeError) as error:
                dec.decode(np.zeros((1, 4), np.float32))
    assert error.value.code().name == "DEADLINE_EXCEEDED"
    assert target in error.value.details() and "timeout=" in error.value.details()


def test_an_asyncio_client_used_in_another_event_loop_says_so() -> None:
    """Made outside a coroutine (or in one asyncio.run and used in the next), a grpc.aio channel failed with
    asyncio's "got Future ... attached to a different loop"; the old pattern of one loop run by hand works."""
    async def make() -> AsyncDecoderClient:
        return AsyncDecoderClient(NOWHERE, retries=0, token="")

    client = asyncio.run(make())
    with pytest.raises(AevaeError) as error:
        asyncio.run(client.decode(np.zeros((1, 4), np.float32)))
    assert error.value.code().name == "FAILED_PRECONDITION" and "another event loop" in error.value.details()
    assert "async with AsyncDecoderClient" in error.value.details()
    with pytest.raises(AevaeError) as outside:  # no loop at all here: asyncio.run unset this thread's loop
        AsyncDecoderClient(NOWHERE, retries=0, token="")
    assert outside.value.code().name == "FAILED_PRECONDITION" and "needs an event loop" in outside.value.details()

    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        same = AsyncDecoderClient(NOWHERE, retries=0, timeout=2, token="")
        with pytest.raises(AevaeError) as unreachable:  # reaches the channel: the loop is the channel's own
            loop.run_until_complete(same.decode(np.zeros((1, 4), np.float32)))
        assert unreachable.value.code().name == "UNAVAILABLE"
        loop.run_until_complete(same.close())
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def test_cli_decode_of_latents_of_different_lengths_says_so() -> None:
    """`aevae decode 1,2,3,4 1,2` said the latents "must be comma-separated numbers", which they were."""
    from aevae.client.cli import decode
    from aevae.errors import UserError

    args = argparse.Namespace(latents=["1,2,3,4", "1,2"], timeout=5.0, scale=1, output="x.png",
                              decoder=NOWHERE, model="vae", version=None)
    with pytest.raises(UserError, match="as many values .* got latents of 4, 2 values"):
        decode(args)


def test_a_command_started_with_standard_streams_closed_keeps_them_apart(tmp_path: Path) -> None:
    """`aevae decode ... -o - 2>&-`: Python set sys.stderr to None and print() sent the error to standard output,
    into the PNG stream, and the next file opened took descriptor 2 (gRPC's log lines would land inside it)."""
    def run(code: str, close: tuple[int, ...]) -> subprocess.CompletedProcess[bytes]:
        def closed() -> None:
            for fd in close:
                os.close(fd)
        return subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, preexec_fn=closed,
                              timeout=120, check=False)

    usage = run("import sys; from aevae.cli import main; sys.exit(main(['decode', '1,2', '-o', '-', '--version', "
                "'abc']))", (2,))
    assert usage.returncode == 2 and usage.stdout == b"", usage
    opened = run(f"import os; from aevae.output import keep_standard_streams_open as k; k(); "
                 f"print(os.open({str(tmp_path / 'f')!r}, os.O_CREAT | os.O_WRONLY), "
                 f"os.path.samefile('/proc/self/fd/2', {os.devnull!r}), flush=True)", (0, 2))
    assert opened.returncode == 0 and opened.stdout.split() == [b"3", b"True"], opened
    lost = subprocess.run([sys.executable, "-m", "aevae.cli", "decode", "1,2", "-o", "-", "--decoder", NOWHERE],
                          stderr=subprocess.PIPE, preexec_fn=lambda: os.close(1), timeout=120, check=False)
    assert lost.returncode == 2 and b"-o -: standard output was closed when the command started" in lost.stderr, lost


# -- the UI server ------------------------------------------------------------------------------------------
def run_ui(scenario: Any, encoder: str = NOWHERE) -> Any:
    """`scenario(session, base_url)` against a fresh UI app (decoder nowhere)."""
    async def main() -> Any:
        app = create_app(encoder, NOWHERE, poll_interval=0.5, classifier=None, security=None)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as session:
                return await scenario(session, f"http://127.0.0.1:{server.port}")
        finally:
            await server.close()
    return asyncio.run(main())


def test_the_ui_s_own_refusals_are_json_saying_what_is_accepted(encoder: ServiceProcess,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp answered these in plain text ("404: Not Found", "405: Method Not Allowed", "Maximum request body
    size 8388608 exceeded.", "No WebSocket UPGRADE hdr: None"); a body cut short logged an ERROR with a
    traceback per request; `?version=1&version=2` silently took the first."""
    async def scenario(session: aiohttp.ClientSession, base: str) -> None:
        json_post = {"Origin": base, "Content-Type": "application/json"}

        async def error(method: str, path: str, status: int, **kwargs: Any) -> str:
            async with session.request(method, base + path, **kwargs) as answer:
                assert answer.status == status and answer.content_type == "application/json", (path, answer.status)
                return str((await answer.json())["error"])

        assert "POST /api/samples" in await error("GET", "/api/nope", 404)
        assert "it takes POST" in await error("GET", "/api/encode", 405)
        assert "it takes GET" in await error("DELETE", "/api/models", 405, headers={"Origin": base})
        ws = await error("GET", "/ws", 400)
        assert ws.startswith("/ws is the page's WebSocket (No WebSocket UPGRADE hdr: None Can ") and "\n" not in ws, ws
        assert f"{MAX_BODY:,} bytes" in await error("POST", "/api/samples", 413, data=b" " * (MAX_BODY + 1),
                                                     headers=json_post)
        assert "given 2 times" in await error("GET", "/api/stats/vae?version=1&version=2", 400)
        assert "1..256 printable characters" in await error("GET", "/api/stats/" + "v" * 300, 400)

        host, port = base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"POST /api/samples HTTP/1.1\r\nHost: {host}:{port}\r\nOrigin: {base}\r\nContent-Type: "
                     "application/json\r\nContent-Length: 100\r\n\r\n{\"mo".encode())
        await writer.drain()
        writer.close()  # gone, 96 bytes short
        await asyncio.sleep(0.3)
        async with session.get(f"{base}/api/models") as still:  # the server goes on
            assert still.status == 200

    with caplog.at_level("INFO"):
        run_ui(scenario, encoder.address)
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelno >= 40], caplog.text


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (make setup)")
def test_the_page_asks_nothing_of_a_decoder_it_knows_is_down(encoder: ServiceProcess,
                                                             isolated: dict[str, str]) -> None:
    """Drawing samples while the decoder was down posted /api/samples, and each 503 was a console error; the
    page knows the decoder is down (the status), so it says so and draws when the decoder is back."""
    playwright = pytest.importorskip("playwright.sync_api")
    ui = subprocess.Popen([sys.executable, "-m", "aevae.cli", "ui", "--encoder", encoder.address, "--decoder",
                           NOWHERE, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, **isolated})
    try:
        assert ui.stdout is not None
        url = ""
        for line in ui.stdout:
            if match := re.search(r"(http://\S+/)", line):
                url = match.group(1)
                break
        assert url, "aevae ui printed no address"
        deadline = time.monotonic() + 20
        while '"decoder": {"target": "127.0.0.1:1", "state": "down"' not in urllib.request.urlopen(
                url + "api/status", timeout=5).read().decode():  # known down before the page asks anything
            assert time.monotonic() < deadline, "the UI did not find the decoder down"
            time.sleep(0.1)
        problems: list[str] = []
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: problems.append(str(e)))
                page.goto(url)
                page.wait_for_function("() => /decoder unavailable/i.test(document.querySelector("
                                       "'[data-testid=service-status]').textContent)", timeout=20000)
                page.wait_for_function("() => document.querySelectorAll('[data-testid=input-image]').length > 0",
                                       timeout=20000)
                page.get_by_text("Draw 16 new samples").click()
                page.wait_for_function("() => /decoder unavailable/.test(document.getElementById('share-vae')"
                                       ".textContent)", timeout=10000)
            finally:
                browser.close()
        assert problems == [], problems
    finally:
        ui.terminate()
        ui.wait(timeout=15)


def _bare_tls_server(cert: Path, key: Path, client_ca: Path | None = None) -> tuple[Any, int]:
    """A gRPC server with no services, serving these credentials: only its TLS handshake matters here."""
    from concurrent import futures

    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(1))
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())],
                                              root_certificates=None if client_ca is None else client_ca.read_bytes(),
                                              require_client_auth=client_ca is not None)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


def test_tls_failures_the_client_can_name_are_named(tmp_path: Path) -> None:
    """A server certificate that expired while served was explained as "not signed by the CA this client
    trusts"; a client certificate a mutual-TLS server refused gave a bare "Socket closed"."""
    from aevae.services.security import make_certificates
    from helpers import self_signed_certificate

    cert, key = self_signed_certificate(tmp_path, "expired", -10, -1)
    server, port = _bare_tls_server(cert, key)
    try:
        with DecoderClient(f"localhost:{port}", tls_ca=str(cert), retries=0, timeout=10) as client:
            with pytest.raises(AevaeError, match="has expired: the server must be given a renewed one"):
                client.list_models()
    finally:
        server.stop(0)
    ours, theirs = make_certificates(tmp_path / "ours"), make_certificates(tmp_path / "theirs")
    server, port = _bare_tls_server(Path(ours["cert"]), Path(ours["key"]), client_ca=Path(ours["ca"]))
    try:
        with DecoderClient(f"localhost:{port}", tls_ca=str(ours["ca"]), tls_cert=str(theirs["client_cert"]),
                           tls_key=str(theirs["client_key"]), retries=0, timeout=10) as client:
            with pytest.raises(AevaeError, match=r"must be signed by a CA it trusts for clients"):
                client.list_models()
    finally:
        server.stop(0)
